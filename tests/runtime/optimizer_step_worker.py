"""The runtime's optimizer step (gradient scaling folded into Adam) against megatron-core's own.

Run by tests/runtime/test_optimizer_step.py as two gloo processes under torchrun. Per layout it
builds the same tiny model twice, wraps each in megatron DDP with the distributed optimizer,
and trains both for 3 steps on the same micro-batches (a different number of loss tokens on
each rank and micro-batch): one with `build_optimizer(..., fold_grad_scaling=False)`
(megatron's finalize_model_grads scaling, norm and clipping), one with the runtime's step.
Variants: clipping active (clip_grad 0.05) with torch's fused AdamW (which reads the factor as
`grad_scale`) and with the foreach AdamW (the CPU path), clipping inactive, and megafleet's AdamW
(the GPU path; here its torch update) on a bf16 model, where it writes the bf16 weights itself.
Rank 0 writes {layout/variant: per step {norm_megatron, norm_ours, adam_state_diff, param_diff}}
(the last two relative: max |difference| / max |megatron's|; Adam's moments carry the scaled
gradients, which its update alone would hide: Adam is invariant to a gradient's scale).

    torchrun --standalone --nproc_per_node 2 optimizer_step_worker.py OUT.json
"""

from __future__ import annotations

import json
import sys
from types import SimpleNamespace

import torch

from remote_runtime import platform
from remote_runtime.model.builder import ModelOptions, build_model
from remote_runtime.model.forward import padded_batch
from remote_runtime.spec.config import JobConfig
from remote_runtime.spec.families import family_for_hf_config
from remote_runtime.train import adamw
from remote_runtime.train.optim import build_optimizer, inner_optimizers, schedule_for, wrap_ddp
from remote_runtime.train.step import train_step

# layout -> (TP, PP, EP, MoE model)
LAYOUTS = {
    "ep2_dp2": (1, 1, 2, True),  # dense parameters data-parallel, experts split: two optimizers
    "tp2": (2, 1, 1, False),  # norm weights duplicated over TP: counted once in the norm
    "pp2": (1, 2, 1, False),  # loss tokens only on the last stage: broadcast to the first
}
# variant -> (clip_grad, AdamW: torch's fused / foreach or megafleet's, model dtype)
VARIANTS = {
    "clip_fused": (0.05, "fused", "float32"),
    "clip_foreach": (0.05, "foreach", "float32"),
    "noclip": (1e4, "foreach", "float32"),
    # megafleet's AdamW on a bf16 model: writes the bf16 weights itself (megatron's copy
    # skipped); against megatron's step with torch's AdamW on the same bf16 model
    "megafleet_bf16": (0.05, "megafleet", "bfloat16"),
}
SEQ, STEPS, MICRO = 16, 3, 2


def hf_config(moe: bool) -> dict:
    from transformers import Qwen3Config, Qwen3MoeConfig

    common = dict(
        vocab_size=131,
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        max_position_embeddings=64,
        tie_word_embeddings=False,
    )
    if moe:
        config = Qwen3MoeConfig(
            intermediate_size=96,
            num_experts=8,
            num_experts_per_tok=2,
            moe_intermediate_size=32,
            norm_topk_prob=True,
            **common,
        ).to_dict()
        config["architectures"] = ["Qwen3MoeForCausalLM"]
    else:
        config = Qwen3Config(intermediate_size=96, **common).to_dict()
        config["architectures"] = ["Qwen3ForCausalLM"]
    return config


def micro_batches(step: int, rank: int, vocab: int) -> list:
    """MICRO one-sample micro-batches; the loss mask keeps a different number of tokens on each
    rank, step and micro-batch, so the token average is not a per-rank mean."""
    g = torch.Generator().manual_seed(100 * step + rank)
    out = []
    for i in range(MICRO):
        tokens = torch.randint(0, vocab, (1, SEQ), generator=g)
        mask = torch.ones(1, SEQ)
        mask[:, SEQ - 1 - (3 * rank + 2 * i + step) % (SEQ - 2) :] = 0
        batch = padded_batch(tokens)
        out.append(
            SimpleNamespace(
                tokens=batch["tokens"],
                position_ids=batch["position_ids"],
                labels=torch.roll(tokens, -1, 1),
                loss_mask=mask,
                is_thd=False,
            )
        )
    return out


def use_fused_adam(optimizer) -> None:
    """torch's fused AdamW on the CPU too (remote_runtime.train.optim picks it on GPUs only)."""
    for inner in inner_optimizers(optimizer):
        inner.defaults.update(fused=True, foreach=False)
        for group in inner.param_groups:
            group.update(fused=True, foreach=False)


def build(layout: str, variant: str, dist, config: dict, start, fold: bool):
    tp, pp, _, _ = LAYOUTS[layout]
    clip, adam, dtype = VARIANTS[variant]
    job = JobConfig()
    job.parallel.tensor_model_parallel_size, job.parallel.pipeline_model_parallel_size = tp, pp
    job.optim.lr, job.optim.clip_grad, job.optim.weight_decay = 1e-2, clip, 0.1
    chunks = build_model(family_for_hf_config(config), config, ModelOptions(dtype=dtype), dist)
    with torch.no_grad():
        for p, want in zip(chunks[0].parameters(), start):
            p.copy_(want)
    model = wrap_ddp(chunks, job)
    optimizer, scheduler = build_optimizer(
        model, job, schedule_for(job, 100), fold_grad_scaling=fold
    )
    if adam == "fused":
        use_fused_adam(optimizer)
    elif adam == "megafleet" and fold:  # megatron's side keeps torch's AdamW
        assert adamw.install(optimizer)
    return model, optimizer, scheduler


def main_params(optimizer) -> list:
    return [
        p for inner in inner_optimizers(optimizer) for g in inner.param_groups for p in g["params"]
    ]


def weights_written(optimizer) -> dict:
    """megafleet's AdamW: how many model weights it maps, and the largest difference between one
    and its fp32 main parameter rounded to bf16 (0: written, as megatron's copy would)."""
    worst, mapped = 0.0, 0
    for inner in inner_optimizers(optimizer):
        for main, weight in (getattr(inner, "model_weights", None) or {}).items():
            mapped += 1
            worst = max(
                worst, (weight.float() - main.detach().to(weight.dtype).float()).abs().max().item()
            )
    leftover = any(
        "_copy_main_params_to_model_params" in vars(o)
        for o in getattr(optimizer, "chained_optimizers", [optimizer])
    )
    return {"mapped": mapped, "weight_vs_main": worst, "copy_override_left": leftover}


def adam_states(optimizer) -> list:
    return [
        inner.state[p][key]
        for inner in inner_optimizers(optimizer)
        for group in inner.param_groups
        for p in group["params"]
        for key in ("exp_avg", "exp_avg_sq")
    ]


def relative_diff(a: list, b: list) -> float:
    """max |a - b| / max |a| over matching tensors, the maximum over all ranks."""
    worst = torch.tensor(
        max(((x - y).abs().max() / x.abs().max().clamp(min=1e-30)).item() for x, y in zip(a, b))
    )
    torch.distributed.all_reduce(worst, op=torch.distributed.ReduceOp.MAX)
    return worst.item()


def run(layout: str, results: dict) -> None:
    from megatron.core.pipeline_parallel import get_forward_backward_func

    tp, pp, ep, moe = LAYOUTS[layout]
    dist = platform.init_distributed(
        "cpu", tp, pp, expert_model_parallel_size=ep, expert_tensor_parallel_size=1, seed=5
    )
    config = hf_config(moe)
    options = ModelOptions(dtype="float32", init_weights=True)
    (first,) = build_model(family_for_hf_config(config), config, options, dist)
    start = [p.detach().clone() for p in first.parameters()]
    for variant in VARIANTS:
        theirs = build(layout, variant, dist, config, start, fold=False)
        ours = build(layout, variant, dist, config, start, fold=True)
        begin = [p.detach().clone() for p in main_params(ours[1])]
        steps = []
        for step in range(STEPS):  # both in lockstep on the same micro-batches
            batches = micro_batches(step, dist.dp_rank, config["vocab_size"])
            norms = []
            for model, optimizer, scheduler in (theirs, ours):
                fb = get_forward_backward_func()
                _, norm, ok = train_step(model, optimizer, scheduler, batches, fb)
                assert ok
                norms.append(norm)
            params = [list(m[0].module.parameters()) for m, _, _ in (theirs, ours)]
            origin = start
            if VARIANTS[variant][2] != "float32":  # the fp32 main parameters carry the update
                params, origin = [main_params(o) for _, o, _ in (theirs, ours)], begin
            steps.append(
                {
                    **weights_written(ours[1]),
                    "norm_megatron": norms[0],
                    "norm_ours": norms[1],
                    "adam_state_diff": relative_diff(adam_states(theirs[1]), adam_states(ours[1])),
                    "param_diff": relative_diff(
                        [a - s for a, s in zip(params[0], origin)],
                        [b - s for b, s in zip(params[1], origin)],
                    ),
                }
            )
        results[f"{layout}/{variant}"] = steps


def main(out: str) -> None:
    from megatron.core import parallel_state

    results: dict = {}
    for layout in LAYOUTS:
        run(layout, results)
        parallel_state.destroy_model_parallel()
    if torch.distributed.get_rank() == 0:
        with open(out, "w") as f:
            json.dump(results, f, indent=1)
    platform.shutdown()


if __name__ == "__main__":
    main(sys.argv[1])
