"""The megatron side of tests/runtime/test_moe.py, run in separate processes.

A tiny random Qwen3-MoE (8 experts, top-2, 2 layers, fp32) in transformers and in the runtime
(`remote_runtime/model/moe.py`), weights copied from the HF model to this rank's slices; per
layout it measures logits, per-token loss, the load-balancing aux loss and gradients against
transformers, and writes them to `<out>/<layout>-rank<r>.json`.

    python moe_worker.py LAYOUT[,LAYOUT...] OUT_DIR   (torchrun --nproc_per_node 2 for all but ep1)

Layouts: ep1 (one process); ep2 (EP=2: each rank one sample, tokens exchanged by megatron's
all-to-all dispatcher over gloo); tp2sp (TP=2 + sequence parallel, expert TP=2: megatron's
dispatcher with expert tensor parallelism); tp2sp_etp1 (TP=2 + SP, expert TP=1: local path);
pp2 (two pipeline stages: logits, and one training step of two one-sample micro-batches through
megatron's 1F1B schedule with the training loop's forward step, whose aux loss and gradients must
equal transformers' over all layers). `_mixed`: the same layout for a 4-layer model with a dense
MLP layer (mlp_only_layers=[0]; at PP2 stage 0 holds the dense and one MoE layer). Every layout
also reports the logged MoE stats reduced over the ranks (`pop_step_stats(reduce=True)`).
pp2_recompute: pp2 with full activation recompute (each layer's router runs again during the
backward of its micro-batch, while the next micro-batch's forward has already started).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

from remote_runtime import platform
from remote_runtime.bridge.load import layout_for
from remote_runtime.bridge.mapping import global_name, local_params
from remote_runtime.bridge.transforms import shard
from remote_runtime.model import moe_aux
from remote_runtime.model.builder import ModelOptions, build_model
from remote_runtime.model.forward import forward_logits, padded_batch
from remote_runtime.spec.families import family_for_hf_config
from remote_runtime.spec.families.base import fill

# layout -> (TP, PP, EP, expert TP, sequence parallel)
LAYOUTS = {
    "ep1": (1, 1, 1, 1, False),
    "ep2": (1, 1, 2, 1, False),
    "tp2sp": (2, 1, 1, 2, True),
    "tp2sp_etp1": (2, 1, 1, 1, True),
    "pp2": (1, 2, 1, 1, False),
    "ep1_mixed": (1, 1, 1, 1, False),
    "ep2_mixed": (1, 1, 2, 1, False),
    "pp2_mixed": (1, 2, 1, 1, False),
    "pp2_recompute": (1, 2, 1, 1, False),
}
SEQ = 16
COEF = 0.02


def hf_model(mixed: bool = False):
    """2 MoE layers, or (mixed) 4 layers whose first has a dense MLP."""
    from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

    config = Qwen3MoeConfig(
        vocab_size=131,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=4 if mixed else 2,
        mlp_only_layers=[0] if mixed else [],
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        num_experts=8,
        num_experts_per_tok=2,
        moe_intermediate_size=32,
        norm_topk_prob=True,
        router_aux_loss_coef=COEF,
        output_router_logits=True,
        max_position_embeddings=64,
        tie_word_embeddings=False,
        rope_theta=10000.0,
    )
    torch.manual_seed(0)
    model = Qwen3MoeForCausalLM(config).float()
    with torch.no_grad():  # random, not the zero init of the router, so routing is not a tie
        for p in model.parameters():
            p.normal_(0, 0.2 if p.dim() > 1 else 0.05)
            if p.dim() == 1:
                p.add_(1.0)
    return model


class _Slice:
    """A tensor with the safetensors-slice interface the bridge transforms read."""

    def __init__(self, t):
        self.t = t

    def get_shape(self):
        return list(self.t.shape)

    def __getitem__(self, item):
        return self.t[item]


def copy_weights(chunks, family, hf_config: dict, model, dist) -> None:
    """HF weights into this rank's parameters: the dense ones through the bridge's transforms,
    the stacked experts by the contract in remote_runtime/model/MOE_CONTRACT.md."""
    state = model.state_dict()
    lay = layout_for(hf_config, family, dist)
    for lp in local_params(chunks, family, False):
        layer = lp.layer
        hf_prefix = f"model.layers.{layer}.mlp.experts."
        if lp.row.transform in ("expert_gate_up", "expert_row"):
            local = lp.param.shape[0]
            first = dist.ep_rank * local
            if lp.row.transform == "expert_gate_up":
                w = state[hf_prefix + "gate_up_proj"][first : first + local]  # [E, 2F, H]
                f = w.shape[1] // 2
                n = f // dist.etp
                r = dist.etp_rank
                piece = torch.cat([w[:, r * n : (r + 1) * n], w[:, f + r * n : f + (r + 1) * n]], 1)
            else:
                w = state[hf_prefix + "down_proj"][first : first + local]  # [E, H, F]
                n = w.shape[2] // dist.etp
                piece = w[:, :, dist.etp_rank * n : (dist.etp_rank + 1) * n]
        else:
            keys = [fill(k, layer) for k in lp.row.hf]
            piece = shard(lp.row.transform, [_Slice(state[k]) for k in keys], lay, keys)
        assert tuple(piece.shape) == tuple(lp.param.shape), (lp.name, piece.shape, lp.param.shape)
        with torch.no_grad():
            lp.param.copy_(piece)


def inputs(vocab: int) -> torch.Tensor:
    return torch.randint(0, vocab, (2, SEQ), generator=torch.Generator().manual_seed(1))


def hf_reference(model, tokens: torch.Tensor) -> dict:
    """Logits, loss, aux loss and gradients of transformers: for the whole batch (one
    micro-batch) and summed over the samples run one by one (one sample per EP rank)."""
    from transformers.models.qwen3_moe.modeling_qwen3_moe import load_balancing_loss_func

    model.zero_grad()
    out = model(tokens, labels=tokens)
    out.loss.backward()
    ref = {
        "logits": out.logits.detach(),
        "loss": out.loss.detach(),
        "aux": out.aux_loss.detach(),
        "aux_fn": load_balancing_loss_func(out.router_logits, 8, 2).detach(),
        "grads": {n: p.grad.clone() for n, p in model.named_parameters()},
        "imbalance": [imbalance(logits) for logits in out.router_logits],
    }
    model.zero_grad()
    ref["aux_each"], ref["loss_each"] = [], []
    for i in range(tokens.shape[0]):
        o = model(tokens[i : i + 1], labels=tokens[i : i + 1])
        o.loss.backward()
        ref["aux_each"].append(o.aux_loss.detach())
        ref["loss_each"].append(o.loss.detach())
    ref["grads_each"] = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    return ref


def imbalance(router_logits: torch.Tensor) -> float:
    """max / mean top-2 assignments per expert of one layer (transformers' routing)."""
    chosen = torch.topk(torch.softmax(router_logits.float(), -1), 2, dim=-1).indices
    counts = torch.bincount(chosen.reshape(-1), minlength=8).float()
    return round(float(counts.max() / counts.mean()), 4)


def micro_batches_of(tokens: torch.Tensor) -> list:
    """One training-loop micro-batch per sample (labels shifted, last position masked)."""
    from types import SimpleNamespace

    out = []
    for i in range(tokens.shape[0]):
        sample = tokens[i : i + 1]
        mask = torch.ones_like(sample, dtype=torch.float32)
        mask[:, -1] = 0
        batch = padded_batch(sample)
        out.append(
            SimpleNamespace(
                tokens=batch["tokens"],
                position_ids=batch["position_ids"],
                labels=torch.roll(sample, -1, 1),
                loss_mask=mask,
                is_thd=False,
            )
        )
    return out


def evaluate_other_tokens(chunks, vocab: int, ep: int) -> None:
    """An evaluation pass (the training loop's forward_only_step) on other tokens: its router
    statistics must stay out of the step's logged ones."""
    from megatron.core.pipeline_parallel import get_forward_backward_func

    from remote_runtime.train.step import forward_only_step

    other = torch.randint(0, vocab, (2, SEQ), generator=torch.Generator().manual_seed(7))
    other = other[:1] if ep > 1 else other
    forward_only_step(chunks, micro_batches_of(other), get_forward_backward_func())


def pipeline_loss_backward(chunks, tokens: torch.Tensor):
    """One training step's forward/backward through megatron's schedule with the training
    loop's forward step (remote_runtime.train.step): the loss per token as HF computes it,
    gradients divided by the loss tokens (what finalize_model_grads does in training)."""
    from megatron.core.pipeline_parallel import get_forward_backward_func

    from remote_runtime.train.step import make_forward_step

    micro_batches = micro_batches_of(tokens)  # one sample each: 1F1B's warm-up and steady
    chunks[0].config.calculate_per_token_loss = True  # as remote_runtime.train.optim sets it
    chunks[0].train()
    losses = get_forward_backward_func()(
        forward_step_func=make_forward_step(),
        data_iterator=iter(micro_batches),
        model=chunks,
        num_microbatches=len(micro_batches),
        seq_length=tokens.shape[1],
        micro_batch_size=1,
        forward_only=False,
    )
    n = sum(mb.loss_mask.sum() for mb in micro_batches)
    with torch.no_grad():
        for p in chunks[0].parameters():
            if p.grad is not None:
                p.grad /= n
    if not losses:
        return None
    loss_sum, count = torch.stack([x["lm loss"] for x in losses]).sum(0)
    return loss_sum / count


def popped_stats() -> tuple[dict, dict]:
    """(this rank's MoE stats, the stats reduced over all ranks) of the same records."""
    records = list(moe_aux._step)
    local = moe_aux.pop_step_stats()
    moe_aux._step.extend(records)
    return local, moe_aux.pop_step_stats(reduce=True)


def our_loss_backward(model, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """HF's causal-LM loss on our model (mean over the shifted tokens) + the aux gradient."""
    labels = torch.roll(tokens, -1, 1)
    mask = torch.ones_like(tokens, dtype=torch.float32)
    mask[:, -1] = 0
    moe_aux.start_micro_batch(mask)
    batch = padded_batch(tokens)
    per_token = model(batch["tokens"], batch["position_ids"], None, labels=labels)
    n = mask.sum()
    lm = (per_token * mask).sum()
    lm.backward()
    with torch.no_grad():
        for p in model.parameters():
            if p.grad is not None:
                p.grad /= n
    return lm.detach() / n


def hf_name(name: str) -> str | None:
    """The HF parameter whose gradient a megatron router/expert parameter is compared with."""
    parts = name.split(".")
    if "router" in parts:
        return f"model.layers.{parts[2]}.mlp.gate.weight"
    return None


def run(layout: str, out: Path) -> None:
    tp, pp, ep, etp, sp = LAYOUTS[layout]
    dist = platform.init_distributed(
        "cpu", tp, pp, expert_model_parallel_size=ep, expert_tensor_parallel_size=etp, seed=5
    )
    model = hf_model(mixed=layout.endswith("_mixed"))
    hf_config = model.config.to_dict()
    hf_config["architectures"] = ["Qwen3MoeForCausalLM"]
    family = family_for_hf_config(hf_config)
    recompute = {}
    if layout.endswith("_recompute"):  # the routers run again in the backward
        recompute = dict(
            recompute_granularity="full", recompute_method="uniform", recompute_num_layers=1
        )
    options = ModelOptions(dtype="float32", sequence_parallel=sp, **recompute)
    chunks = build_model(family, hf_config, options, dist)
    copy_weights(chunks, family, hf_config, model, dist)
    tokens = inputs(hf_config["vocab_size"])
    ref = hf_reference(model, tokens)
    result = {"layout": layout, "rank": dist.rank, "imbalance_ref": ref["imbalance"]}
    mine = tokens[dist.ep_rank : dist.ep_rank + 1] if ep > 1 else tokens
    ref_logits = ref["logits"][dist.ep_rank : dist.ep_rank + 1] if ep > 1 else ref["logits"]
    logits = forward_logits(chunks, [padded_batch(mine)], hf_config["vocab_size"])
    if logits is not None:
        result["logits_diff"] = (logits[0] - ref_logits).abs().max().item()
        result["logit_scale"] = ref_logits.abs().max().item()
    moe_aux.pop_step_stats()
    m = chunks[0]
    if pp == 1:
        m.train()
        loss = our_loss_backward(m, mine)
    else:
        loss = pipeline_loss_backward(chunks, mine)
    evaluate_other_tokens(chunks, hf_config["vocab_size"], ep)
    stats, reduced = popped_stats()
    result["aux"] = stats["aux_loss"] if stats else None
    result["imbalance"] = stats.get("expert_load_imbalance")
    result["aux_reduced"] = reduced["aux_loss"]
    result["imbalance_reduced"] = reduced["expert_load_imbalance"]
    if ep > 1:
        result["aux_ref"] = ref["aux_each"][dist.ep_rank].item()
        result["aux_mean_ref"] = sum(a.item() for a in ref["aux_each"]) / ep
        grads = ref["grads_each"]
    elif pp > 1:  # two micro-batches of one sample: the mean of the per-sample losses
        samples = len(ref["aux_each"])
        result["aux_ref"] = sum(a.item() for a in ref["aux_each"]) / samples
        if loss is not None:  # the last pipeline stage
            want = sum(ref["loss_each"]) / samples
            result["loss_diff"] = abs(loss + COEF * reduced["aux_loss"] - want).item()
        grads = {k: g / samples for k, g in ref["grads_each"].items()}
    else:
        result["aux_ref"] = ref["aux"].item()
        result["aux_fn_ref"] = ref["aux_fn"].item()
        result["loss_diff"] = abs((loss + COEF * stats["aux_loss"]) - ref["loss"]).item()
        grads = ref["grads"]
    result.update(grad_diffs(m, grads, dist, ep))
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{layout}-rank{dist.rank}.json").write_text(json.dumps(result, indent=1))


def grad_diffs(model, grads: dict, dist, ep: int) -> dict:
    """Max |ours - HF| of the router and expert gradients (router gradients summed over the
    ranks that hold different samples or sequence parts)."""
    out = {"router_grad_diff": 0.0, "expert_grad_diff": 0.0, "grad_scale": 0.0, "compared": 0}
    for name, p in model.named_parameters():
        parts = global_name(model, name).split(".")  # the model's layer numbers (PP)
        if "router" in parts or "experts" in parts:
            out["compared"] += 1
        if "router" in parts:
            g = p.grad.clone()
            if ep > 1 or dist.tp > 1:  # each rank saw its own samples / sequence shard
                torch.distributed.all_reduce(g)
            ref = grads[f"model.layers.{parts[2]}.mlp.gate.weight"]
            out["router_grad_diff"] = max(out["router_grad_diff"], (g - ref).abs().max().item())
            out["grad_scale"] = max(out["grad_scale"], ref.abs().max().item())
        elif "experts" in parts:
            local = p.shape[0]
            first = dist.ep_rank * local
            layer = parts[2]
            if parts[-2] == "linear_fc1":
                w = grads[f"model.layers.{layer}.mlp.experts.gate_up_proj"][first : first + local]
                f = w.shape[1] // 2
                n, r = f // dist.etp, dist.etp_rank
                ref = torch.cat([w[:, r * n : (r + 1) * n], w[:, f + r * n : f + (r + 1) * n]], 1)
            else:
                w = grads[f"model.layers.{layer}.mlp.experts.down_proj"][first : first + local]
                n = w.shape[2] // dist.etp
                ref = w[:, :, dist.etp_rank * n : (dist.etp_rank + 1) * n]
            g = p.grad.clone()
            if dist.tp > 1 and dist.etp == 1:  # experts replicated over TP, tokens split
                torch.distributed.all_reduce(g)
            out["expert_grad_diff"] = max(out["expert_grad_diff"], (g - ref).abs().max().item())
    return out


def main(layouts: str, out: Path) -> None:
    """Each layout in turn in this process group (megatron's groups rebuilt in between)."""
    from megatron.core import parallel_state

    for layout in layouts.split(","):
        run(layout, out)
        parallel_state.destroy_model_parallel()
    platform.shutdown()


if __name__ == "__main__":
    main(sys.argv[1], Path(sys.argv[2]))
