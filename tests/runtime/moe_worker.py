"""The megatron side of tests/runtime/test_moe.py, run in separate processes.

A tiny random Qwen3-MoE (8 experts, top-2, 2 layers, fp32) in transformers and in the runtime
(`remote_runtime/model/moe.py`), weights copied from the HF model to this rank's slices; per
layout it measures logits, per-token loss, the load-balancing aux loss and gradients against
transformers, and writes them to `<out>/<layout>-rank<r>.json`.

    python moe_worker.py LAYOUT[,LAYOUT...] OUT_DIR   (torchrun --nproc_per_node 2 for all but ep1)

Layouts: ep1 (one process); ep2 (EP=2: each rank one sample, tokens exchanged by megatron's
all-to-all dispatcher over gloo); tp2sp (TP=2 + sequence parallel, expert TP=2: megatron's
dispatcher with expert tensor parallelism); tp2sp_etp1 (TP=2 + SP, expert TP=1: local path);
pp2 (two pipeline stages, logits only).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

from remote_runtime import platform
from remote_runtime.bridge.load import layout_for
from remote_runtime.bridge.mapping import local_params
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
}
SEQ = 16
COEF = 0.02


def hf_model():
    from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

    config = Qwen3MoeConfig(
        vocab_size=131,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
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
    the stacked experts by the contract in MOE_CONTRACT.md."""
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
    }
    model.zero_grad()
    ref["aux_each"] = []
    for i in range(tokens.shape[0]):
        o = model(tokens[i : i + 1], labels=tokens[i : i + 1])
        o.loss.backward()
        ref["aux_each"].append(o.aux_loss.detach())
    ref["grads_each"] = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    return ref


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
    aux = moe_aux.pop_step_stats()
    return lm.detach() / n, aux


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
    model = hf_model()
    hf_config = model.config.to_dict()
    hf_config["architectures"] = ["Qwen3MoeForCausalLM"]
    family = family_for_hf_config(hf_config)
    chunks = build_model(
        family, hf_config, ModelOptions(dtype="float32", sequence_parallel=sp), dist
    )
    copy_weights(chunks, family, hf_config, model, dist)
    tokens = inputs(hf_config["vocab_size"])
    ref = hf_reference(model, tokens)
    result = {"layout": layout, "rank": dist.rank}
    mine = tokens[dist.ep_rank : dist.ep_rank + 1] if ep > 1 else tokens
    ref_logits = ref["logits"][dist.ep_rank : dist.ep_rank + 1] if ep > 1 else ref["logits"]
    logits = forward_logits(chunks, [padded_batch(mine)], hf_config["vocab_size"])
    if logits is not None:
        result["logits_diff"] = (logits[0] - ref_logits).abs().max().item()
        result["logit_scale"] = ref_logits.abs().max().item()
    moe_aux.pop_step_stats()
    if pp == 1:
        m = chunks[0]
        m.train()
        loss, stats = our_loss_backward(m, mine)
        result["aux"] = stats["aux_loss"]
        result["imbalance"] = stats["expert_load_imbalance"]
        if ep > 1:
            result["aux_ref"] = ref["aux_each"][dist.ep_rank].item()
            grads = ref["grads_each"]
        else:
            result["aux_ref"] = ref["aux"].item()
            result["aux_fn_ref"] = ref["aux_fn"].item()
            result["loss_diff"] = abs(
                (loss + COEF * torch.tensor(stats["aux_loss"])) - ref["loss"]
            ).item()
            grads = ref["grads"]
        result.update(grad_diffs(m, grads, dist, ep))
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{layout}-rank{dist.rank}.json").write_text(json.dumps(result, indent=1))


def grad_diffs(model, grads: dict, dist, ep: int) -> dict:
    """Max |ours - HF| of the router and expert gradients (router gradients summed over the
    ranks that hold different samples or sequence parts)."""
    out = {"router_grad_diff": 0.0, "expert_grad_diff": 0.0, "grad_scale": 0.0}
    for name, p in model.named_parameters():
        parts = name.split(".")
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
