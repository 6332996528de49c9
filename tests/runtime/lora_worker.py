"""The megatron side of tests/runtime/test_lora.py and test_lora_moe.py, run in separate
processes (see bridge_worker.py for why): one process for TP=1, two gloo processes for TP=2, TP=2
with sequence parallelism and PP=2; for the MoE families (modes *-moe) one process for EP=1, two
for TP=2 + SP (expert TP 2) and EP=2.

For each family it loads the tiny base model, adds our adapters, loads the PEFT adapter the test
made (random A and B), and records: logits, adapter gradients of one mean-loss backward, then
after three Adam steps the saved adapter, the logits, whether any frozen weight changed, and the
merged model. Tensors go to `<out>/<tag>-<family>.safetensors` (rank 0), numbers to
`<out>/<mode>-rank<r>.json`.

    python lora_worker.py single|parallel|single-moe|parallel-moe MODELS_DIR OUT_DIR
"""

from __future__ import annotations

import json
import sys
import types
from pathlib import Path

import torch
from safetensors.torch import save_file

from remote_runtime import platform
from remote_runtime.bridge.adapter import adapter_tensors, load_adapter, save_adapter
from remote_runtime.bridge.load import load_hf_checkpoint
from remote_runtime.bridge.save import save_hf_checkpoint
from remote_runtime.model.builder import ModelOptions, build_model
from remote_runtime.model.forward import forward_logits, padded_batch
from remote_runtime.model.lora import attach_lora, merge_lora
from remote_runtime.spec.config import JobConfig, TunerConfig
from remote_runtime.spec.families import family_for_hf_config
from remote_runtime.spec.resolve import read_hf_config
from remote_runtime.spec.tuner import resolve_lora

FAMILIES = ("qwen3", "qwen2", "llama")
PARTIAL = "qwen3-qv"  # an adapter on some modules of the fused layers (test_lora.ADAPTERS)
MOE_FAMILIES = ("qwen3_moe", "qwen2_moe")
# mode -> [(tag, TP, PP, sequence parallel, EP)]
LAYOUTS = {
    "single": [("tp1", 1, 1, False, 1)],
    "parallel": [("tp2", 2, 1, False, 1), ("tp2sp", 2, 1, True, 1), ("pp2", 1, 2, False, 1)],
    "single-moe": [("ep1", 1, 1, False, 1)],
    "parallel-moe": [("tp2sp", 2, 1, True, 1), ("ep2", 1, 1, False, 2)],
}
TRAIN_STEPS = 3


def batch_tokens(vocab: int) -> torch.Tensor:
    """The fixed batch both sides see: [2, 12] (even length, so SP can split it)."""
    return torch.randint(0, vocab, (2, 12), generator=torch.Generator().manual_seed(5))


def micro_batch(tokens: torch.Tensor):
    """What remote_runtime.train.step.forward_step reads, every token a loss token."""
    positions = torch.arange(tokens.shape[1]).unsqueeze(0).expand_as(tokens).contiguous()
    return types.SimpleNamespace(
        tokens=tokens,
        position_ids=positions,
        labels=torch.roll(tokens, -1, 1),
        loss_mask=torch.ones(tokens.shape),
        is_thd=False,
    )


def model_with_adapter(models: Path, family_name: str, dist, sp: bool):
    src = models / family_name.split("-")[0]
    hf = read_hf_config(src)
    family = family_for_hf_config(hf)
    chunks = build_model(family, hf, ModelOptions(dtype="float32", sequence_parallel=sp), dist)
    load_hf_checkpoint(chunks, src, dist)
    tuner = TunerConfig(
        train_type="lora", lora_dropout=0.0, adapters=[str(models / f"adapter-{family_name}")]
    )
    settings = resolve_lora(tuner, family, hf)
    attach_lora(chunks, settings, hf, dist)
    load_adapter(chunks, tuner.adapters[0], dist)
    return chunks, hf


def frozen_snapshot(chunks) -> dict:
    return {
        n: p.detach().clone()
        for c in chunks
        for n, p in c.named_parameters()
        if not getattr(p, "is_lora", False)
    }


def check_family(models: Path, out: Path, dist, tag: str, sp: bool, name: str) -> dict:
    from megatron.core.pipeline_parallel import get_forward_backward_func

    from remote_runtime.train.optim import Schedule, build_optimizer, wrap_ddp
    from remote_runtime.train.step import forward_step, train_step

    chunks, hf = model_with_adapter(models, name, dist, sp)
    vocab = hf["vocab_size"]
    src = models / name.split("-")[0]
    tokens = batch_tokens(vocab)
    tensors: dict[str, torch.Tensor] = {}
    logits = forward_logits(chunks, [padded_batch(tokens)], vocab)
    before = frozen_snapshot(chunks)
    job = JobConfig()
    job.parallel.sequence_parallel = sp
    job.optim.lr, job.optim.weight_decay = 1e-2, 0.0
    # EP2 has two data-parallel ranks: the distributed optimizer would reduce-scatter, leaving
    # each rank only its shard of main_grad
    job.parallel.use_distributed_optimizer = dist.dp == 1
    model = wrap_ddp(chunks, job)
    optimizer, scheduler = build_optimizer(model, job, Schedule(TRAIN_STEPS, 0, TRAIN_STEPS))
    for chunk in model:
        chunk.train()
        chunk.zero_grad_buffer()
    mb = micro_batch(tokens)
    get_forward_backward_func()(
        forward_step_func=forward_step,
        data_iterator=iter([mb]),
        model=model,
        num_microbatches=1,
        seq_length=tokens.shape[1],
        micro_batch_size=tokens.shape[0],
        forward_only=False,
    )
    # the optimizer step applies the 1/tokens average (train/optimizer_step.py): main_grad holds
    # the summed gradient, so scale it here to compare with PEFT's mean-loss gradient
    scale = optimizer.megafleet_scaling.token_scale
    grads = adapter_tensors(model, dist, vocab, of=lambda p: p.main_grad * scale)
    for _ in range(TRAIN_STEPS):
        train_step(model, optimizer, scheduler, [mb], get_forward_backward_func())
    trained = forward_logits(model, [padded_batch(tokens)], vocab)
    after = frozen_snapshot(chunks)
    changed = sorted(n for n in before if not torch.equal(before[n], after[n]))
    adapter_dir = out / f"adapter-{tag}-{name}"
    save_adapter(model, adapter_dir, src, dist)
    merge_lora(model)
    merged_logits = forward_logits(model, [padded_batch(tokens)], vocab)
    save_hf_checkpoint(model, out / f"merged-{tag}-{name}", src, dist)
    if logits is not None and dist.tp_rank == 0:
        tensors.update(logits=logits[0], trained=trained[0], merged=merged_logits[0])
    if grads is not None:
        tensors.update({f"grad/{k}": v for k, v in grads.items()})
    if tensors:
        save_file(
            {k: v.contiguous() for k, v in tensors.items()},
            str(out / f"{tag}-{name}-rank{dist.rank}.safetensors"),
        )
    return {"frozen_changed": changed, "frozen_count": len(before)}


def reinit(tp: int, pp: int, ep: int = 1):
    from megatron.core import parallel_state

    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    return platform.init_distributed("cpu", tp, pp, expert_model_parallel_size=ep)


def lean_base(models: Path, dist, name: str = "qwen3") -> dict:
    """bf16 base with adapters inside DDP + distributed optimizer: what holds memory."""
    from remote_runtime.train.optim import Schedule, build_optimizer, wrap_ddp

    src = models / name
    hf = read_hf_config(src)
    family = family_for_hf_config(hf)
    chunks = build_model(family, hf, ModelOptions(dtype="bfloat16"), dist)
    load_hf_checkpoint(chunks, src, dist)
    settings = resolve_lora(TunerConfig(train_type="lora", lora_rank=4), family, hf)
    attach_lora(chunks, settings, hf, dist)
    model = wrap_ddp(chunks, JobConfig())
    optimizer, _ = build_optimizer(model, JobConfig(), Schedule(1, 0, 1))
    params = [p for c in chunks for p in c.parameters()]
    lora = [p for p in params if getattr(p, "is_lora", False)]
    in_optimizer = [p for g in optimizer.param_groups for p in g["params"]]
    buffer = sum(
        b.numel_unpadded if hasattr(b, "numel_unpadded") else b.grad_data.numel()
        for m in model
        for b in [*m.buffers, *m.expert_parallel_buffers]
    )
    return {
        "frozen_bf16": all(
            p.dtype == torch.bfloat16 and not p.requires_grad
            for p in params
            if not getattr(p, "is_lora", False)
        ),
        "frozen_with_main_grad": sum(
            hasattr(p, "main_grad") for p in params if not getattr(p, "is_lora", False)
        ),
        "lora_numel": sum(p.numel() for p in lora),
        "grad_buffer_numel": buffer,
        "optimizer_numel": sum(p.numel() for p in in_optimizer),
    }


def main(mode: str, models: Path, out: Path) -> None:
    results = {}
    dist = None
    for tag, tp, pp, sp, ep in LAYOUTS[mode]:
        dist = reinit(tp, pp, ep)
        if mode.endswith("moe"):
            names = MOE_FAMILIES
        else:
            names = ("qwen3",) if sp else FAMILIES if pp > 1 else (*FAMILIES, PARTIAL)
        for name in names:
            results[f"{tag}/{name}"] = check_family(models, out, dist, tag, sp, name)
    if mode == "single":
        results["lean"] = lean_base(models, dist)
    if mode == "single-moe":
        results["lean"] = lean_base(models, dist, "qwen3_moe")
    (out / f"{mode}-rank{dist.rank}.json").write_text(json.dumps(results, indent=1))
    platform.shutdown()


if __name__ == "__main__":
    main(sys.argv[1], Path(sys.argv[2]), Path(sys.argv[3]))
