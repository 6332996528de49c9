"""LoRA adapters (remote_runtime.model.lora) <-> a PEFT adapter directory.

    save_adapter(chunks, out_dir, base_model_dir, dist)  collective; rank 0 writes
    load_adapter(chunks, adapter_dir, dist)             every rank reads its pieces

The directory is what `peft.PeftModel.from_pretrained(base, out_dir)` loads: adapter_config.json
and adapter_model.safetensors with PEFT's names (`base_model.model.<module>.lora_A.weight`,
and `base_model.model.<module>.weight` for modules trained in full). Each adapter matrix is
gathered over tensor parallelism by its owning stage and sent to rank 0 as one object per stage
(adapters are megabytes, not gigabytes). Expert adapters are written per expert
(`mlp.experts.N.gate_proj`, ..., the layout PEFT converts onto transformers 5's fused experts and
vLLM reads), gathered over expert TP and sent by each expert-parallel rank for its own experts.
On a large MoE model they are gigabytes (Qwen3-30B-A3B r16: 844M parameters): still one object
per rank, which a sharded per-rank writer would avoid.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from remote_runtime.bridge.mapping import ConversionError, unwrap
from remote_runtime.model.lora import (
    PEFT_PREFIX,
    adapters_of,
    get_piece,
    lora_settings,
    peft_key,
    set_piece,
)
from remote_runtime.spec.tuner import (
    ADAPTER_CONFIG,
    ADAPTER_WEIGHTS,
    SAVE_MODULES,
    peft_adapter_config,
)


def _tp_group():
    from megatron.core import parallel_state

    return parallel_state.get_tensor_model_parallel_group()


def _gather(local: torch.Tensor, dim: int | None, size: int, group=None) -> torch.Tensor:
    """The whole tensor from its `size` pieces split along `dim` over `group` (TP default)."""
    if dim is None or size == 1:
        return local.detach().clone()  # a copy: gradients live in buffers reused next step
    pieces = [torch.empty_like(local) for _ in range(size)]
    torch.distributed.all_gather(pieces, local.detach().contiguous(), group=group or _tp_group())
    return torch.cat(pieces, dim=dim)


def _writer(dist) -> bool:
    """One rank per pipeline stage holds the gathered tensors: TP 0, DP 0, CP 0."""
    from megatron.core import parallel_state

    return (
        dist.tp_rank == 0
        and parallel_state.get_data_parallel_rank() == 0
        and parallel_state.get_context_parallel_rank() == 0
    )


def _expert_writer() -> bool:
    """One rank per stage and expert-parallel rank holds its experts' gathered adapters:
    expert TP 0, expert-data-parallel 0."""
    from megatron.core import parallel_state

    return (
        parallel_state.get_expert_tensor_parallel_rank() == 0
        and parallel_state.get_expert_data_parallel_rank() == 0
    )


def _full_params(chunks) -> dict[str, torch.Tensor]:
    """modules_to_save on this rank: {HF module name: local (vocab-split) parameter}."""
    settings = lora_settings(chunks)
    out = {}
    for chunk in chunks:
        params = dict(unwrap(chunk).named_parameters())
        for name in settings.modules_to_save:
            megatron, hf_module = SAVE_MODULES[name]
            if megatron in params:
                out[hf_module] = params[megatron]
    return out


def adapter_tensors(
    chunks, dist, vocab_size: int, of=lambda p: p
) -> dict[str, torch.Tensor] | None:
    """{PEFT key: full tensor (CPU)} on global rank 0, None elsewhere. Collective. `of` picks
    what to gather from each trained parameter (the tests take `main_grad`)."""
    dense: dict[str, torch.Tensor] = {}
    experts: dict[str, torch.Tensor] = {}
    for adapter in adapters_of(chunks):
        dims, size, group = adapter.split_dims(), adapter.lay.tp, adapter.tp_group()
        mine = experts if adapter.experts else dense
        for module, a, b in adapter.pairs(of):
            for which, view, dim in (("A", a, dims[0]), ("B", b, dims[1])):
                mine[peft_key(module, which)] = _gather(get_piece(view), dim, size, group).cpu()
    for module, param in _full_params(chunks).items():
        dense[f"{PEFT_PREFIX}{module}.weight"] = _gather(of(param), 0, dist.tp)[:vocab_size].cpu()
    if dist.world_size == 1:
        return {**dense, **experts}
    mine = {**(dense if _writer(dist) else {}), **(experts if _expert_writer() else {})}
    everyone = [None] * dist.world_size if dist.rank == 0 else None
    torch.distributed.gather_object(mine, everyone, dst=0)
    if dist.rank != 0:
        return None
    return {k: v for part in everyone for k, v in part.items()}


def save_adapter(chunks, out_dir: str | Path, base_model: str | Path, dist) -> None:
    """Write the PEFT adapter directory for the base model directory (rank 0; collective)."""
    from safetensors.torch import save_file

    from remote_runtime.spec.resolve import read_hf_config

    tensors = adapter_tensors(chunks, dist, int(read_hf_config(base_model)["vocab_size"]))
    if dist.rank != 0:
        return
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    config = peft_adapter_config(lora_settings(chunks), str(base_model))
    (out / ADAPTER_CONFIG).write_text(json.dumps(config, indent=2) + "\n")
    save_file(
        {k: v.contiguous() for k, v in sorted(tensors.items())},
        str(out / ADAPTER_WEIGHTS),
        metadata={"format": "pt"},
    )


@torch.no_grad()
def load_adapter(chunks, adapter_dir: str | Path, dist) -> int:
    """Copy a PEFT adapter's matrices (and full modules) into this rank's pieces. Raises
    ConversionError listing what the file lacks or holds beyond this model's adapters.
    Returns the number of tensors this rank took."""
    from safetensors import safe_open

    path = Path(adapter_dir).expanduser() / ADAPTER_WEIGHTS
    taken, missing = 0, []
    with safe_open(str(path), framework="pt") as f:
        keys = set(f.keys())
        for adapter in adapters_of(chunks):
            for module, a, b in adapter.pairs():
                for which, param in (("A", a), ("B", b)):
                    key = peft_key(module, which)
                    if key not in keys:
                        missing.append(key)
                        continue
                    try:
                        set_piece(adapter, param, f.get_tensor(key), 0 if which == "A" else 1)
                    except ValueError as exc:
                        raise ConversionError(
                            [(f"{exc} (another base model or rank?)", [key])], str(path)
                        ) from None
                    taken += 1
        for module, param in _full_params(chunks).items():
            key = f"{PEFT_PREFIX}{module}.weight"
            if key in keys:
                _copy(param, _vocab_piece(f.get_tensor(key), param, dist), key, path)
                taken += 1
    if missing:
        raise ConversionError(
            [
                (
                    "LoRA matrices this model needs that the adapter lacks (does "
                    "target_modules match?)",
                    missing,
                )
            ],
            str(path),
        )
    _check_all_taken(keys, chunks, dist, str(path))
    return taken


def _copy(param: torch.Tensor, piece: torch.Tensor, key: str, path) -> None:
    if tuple(piece.shape) != tuple(param.shape):
        raise ConversionError(
            [
                (
                    f"shape {tuple(piece.shape)} does not match the model's piece "
                    f"{tuple(param.shape)} (another rank or base model?)",
                    [key],
                )
            ],
            str(path),
        )
    param.copy_(piece.to(device=param.device, dtype=param.dtype))


def _vocab_piece(full: torch.Tensor, param: torch.Tensor, dist) -> torch.Tensor:
    rows = param.shape[0] * dist.tp
    padded = torch.zeros((rows, *full.shape[1:]), dtype=full.dtype)
    padded[: full.shape[0]] = full
    return padded.chunk(dist.tp, dim=0)[dist.tp_rank]


def _check_all_taken(keys: set[str], chunks, dist, where: str) -> None:
    """Every tensor of the file is used by some rank (an adapter for other layers or modules
    would otherwise be dropped silently)."""
    wanted = {peft_key(m, w) for ad in adapters_of(chunks) for m, _, _ in ad.pairs() for w in "AB"}
    wanted |= {f"{PEFT_PREFIX}{m}.weight" for m in _full_params(chunks)}
    everyone = [wanted]
    if dist.world_size > 1:
        everyone = [None] * dist.world_size
        torch.distributed.all_gather_object(everyone, wanted)
    unused = keys - set().union(*everyone)
    if unused:
        raise ConversionError(
            [("adapter tensors this model has no place for", sorted(unused))], where
        )


__all__ = ["SAVE_MODULES", "adapter_tensors", "load_adapter", "save_adapter"]
