"""Mixture-of-experts job options against the model and the world size (torch-free).

`check_moe(job, tc, world_size)` is called by `resolve_job`: it returns the problems (named
fields), the warnings (options accepted as no-ops, adjustments) and the expert layout to report;
`moe_settings` gives the TransformerConfig settings the job's `moe` options add to the family's.
`expert_layout_problems` is the arithmetic alone, which the planner enumerates layouts with.

megatron-core 0.16's arithmetic (parallel_state.initialize_model_parallel): the expert layers
use their own grid of expert-TP × EP × expert-DP × PP over the same ranks, so
world % (expert_tensor_parallel_size × expert_model_parallel_size × PP) == 0, i.e. EP × expert-TP
divides the TP × CP × DP ranks of one pipeline stage; expert-DP is the rest, and the distributed
optimizer shards the expert parameters over it. MoE with TP > 1 needs sequence parallelism in
training (MoELayer refuses it otherwise): a named error, as the planner always sets it with TP.
"""

from __future__ import annotations

import dataclasses

from remote_runtime.spec.config import JobConfig, MoEConfig
from remote_runtime.spec.errors import Problem
from remote_runtime.spec.shape import ModelShape

# Options that only select a transformer-engine fusion: accepted, no effect without TE.
TE_ONLY = {
    "moe_permute_fusion": "it names transformer-engine's fused token permutation; the runtime "
    "permutes tokens with its own index kernels",
}


def is_moe(tc: dict) -> bool:
    return bool(tc.get("num_moe_experts"))


def changed_options(moe: MoEConfig) -> list[str]:
    """The `moe` options set to something other than their defaults."""
    default = MoEConfig()
    return [
        f.name
        for f in dataclasses.fields(MoEConfig)
        if getattr(moe, f.name) != getattr(default, f.name)
    ]


def moe_settings(job: JobConfig, tc: dict) -> dict:
    """The TransformerConfig settings the job's MoE options add to the family's kwargs."""
    if not is_moe(tc):
        return {}
    m = job.moe
    coeff = tc["moe_aux_loss_coeff"] if m.moe_aux_loss_coeff is None else m.moe_aux_loss_coeff
    return {
        "expert_model_parallel_size": m.expert_model_parallel_size,
        "expert_tensor_parallel_size": m.expert_tensor_parallel_size,
        "moe_grouped_gemm": m.moe_grouped_gemm,
        "moe_aux_loss_coeff": float(coeff),
        "moe_router_dtype": None if m.moe_router_dtype == "none" else m.moe_router_dtype,
        "moe_token_dispatcher_type": m.moe_token_dispatcher_type,
        "moe_expert_capacity_factor": m.moe_expert_capacity_factor,
        "moe_shared_expert_overlap": (
            m.moe_shared_expert_overlap and bool(tc.get("moe_shared_expert_intermediate_size"))
        ),
    }


def expert_layout_problems(
    shape: ModelShape, world_size: int, tp: int, pp: int, ep: int = 1, etp: int = 1
) -> list[Problem]:
    """Why an EP × expert-TP layout cannot run this MoE model (empty: it can, or it is dense)."""
    if not shape.is_moe:
        return []
    problems = []
    experts, ffn = shape.num_experts, shape.moe_ffn_hidden_size
    stage_ranks = world_size // pp if world_size % pp == 0 else 0
    if experts % ep:
        problems.append(
            Problem(
                "moe.expert_model_parallel_size",
                f"{ep} does not divide the model's {experts} experts",
                "use a divisor of the expert count",
            )
        )
    if stage_ranks and stage_ranks % (ep * etp):
        problems.append(
            Problem(
                "moe.expert_model_parallel_size",
                f"expert_model_parallel_size={ep} × expert_tensor_parallel_size={etp} does not "
                f"divide the {stage_ranks} ranks of a pipeline stage (world size {world_size} / "
                f"pipeline_model_parallel_size={pp}; megatron-core needs world % (EP × expert-TP × "
                "PP) == 0)",
                f"choose EP × expert-TP dividing {stage_ranks}",
            )
        )
    if ffn % etp:
        problems.append(
            Problem(
                "moe.expert_tensor_parallel_size",
                f"{etp} does not divide the expert FFN size moe_intermediate_size={ffn}",
            )
        )
    shared = shape.shared_expert_ffn_hidden_size
    if shared and shared % tp:
        problems.append(
            Problem(
                "parallel.tensor_model_parallel_size",
                f"{tp} does not divide shared_expert_intermediate_size={shared}",
            )
        )
    return problems


def check_moe(
    job: JobConfig, tc: dict, world_size: int, family: str
) -> tuple[list[Problem], list[str], dict | None]:
    """(problems, warnings, expert layout or None for a dense model)."""
    m = job.moe
    if not is_moe(tc):
        return (
            [
                Problem(
                    f"moe.{name}",
                    f"is set, but {family} is a dense model (no experts)",
                    "remove it",
                )
                for name in changed_options(m)
            ],
            [],
            None,
        )
    warnings: list[str] = []
    par = job.parallel
    tp, pp = par.tensor_model_parallel_size, par.pipeline_model_parallel_size
    ep, etp = m.expert_model_parallel_size, m.expert_tensor_parallel_size
    shape = ModelShape.from_transformer_config(tc, family)
    problems = expert_layout_problems(shape, world_size, tp, pp, ep, etp)
    experts, topk = shape.num_experts, shape.moe_router_topk
    stage_ranks = world_size // pp if world_size % pp == 0 else 0
    if topk > experts:
        problems.append(
            Problem(
                "model.model",
                f"config.json num_experts_per_tok={topk} is more than the {experts} experts",
            )
        )
    if m.moe_shared_expert_overlap and not shape.shared_expert_ffn_hidden_size:
        warnings.append(f"moe_shared_expert_overlap has no effect: {family} has no shared expert")
    elif m.moe_shared_expert_overlap and m.moe_token_dispatcher_type != "alltoall":
        problems.append(
            Problem("moe.moe_shared_expert_overlap", "needs moe_token_dispatcher_type=alltoall")
        )
    for name, why in TE_ONLY.items():
        if getattr(m, name):
            warnings.append(f"{name}=true is accepted but has no effect: {why}")
    if m.moe_expert_capacity_factor is not None:
        warnings.append(
            f"moe_expert_capacity_factor={m.moe_expert_capacity_factor}: tokens "
            "routed beyond an expert's capacity are dropped (leave it unset for "
            "dropless routing, as transformers computes)"
        )
    if tp > 1 and not par.sequence_parallel:
        problems.append(
            Problem(
                "parallel.sequence_parallel",
                f"MoE with tensor_model_parallel_size={tp} needs sequence "
                "parallelism (megatron-core's MoE layer refuses to train without)",
                "set sequence_parallel: true",
            )
        )
    layout = None
    if stage_ranks and not problems:
        layout = expert_layout(experts, topk, ep, etp, stage_ranks // (ep * etp))
    return problems, warnings, layout


def expert_layout(experts: int, topk: int, ep: int, etp: int, edp: int) -> dict:
    """Which experts each EP rank holds, for the resolved job and the dry run."""
    per_rank = experts // ep
    return {
        "num_experts": experts,
        "router_topk": topk,
        "expert_model_parallel_size": ep,
        "expert_tensor_parallel_size": etp,
        "expert_data_parallel_size": edp,
        "experts_per_rank": per_rank,
        "experts_of_ep_rank": [f"{k * per_rank}-{(k + 1) * per_rank - 1}" for k in range(ep)],
    }
