"""Hugging Face checkpoint -> megatron-core parameters, each rank reading only what it owns.

    report = load_hf_checkpoint(chunks, model_dir, dist)

Every rank checks the checkpoint's names against the family table (missing / unclaimed tensors
are an error listing them), then fills each of its parameters from safetensors slices: its TP
piece of its pipeline stage's layers and, in MoE layers, its EP rank's experts (split by
expert-TP), nothing else. After loading, the union of what all ranks
read must be every tensor the table expects (a model missing, say, its q/k norms would otherwise
silently skip q_norm). Call it before wrapping in DDP / building the optimizer, or follow it with
`optimizer.reload_model_params()`; it copies in place, so wrapped models work too.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from remote_runtime.bridge.checkpoint import FLOAT_DTYPES, HFCheckpoint
from remote_runtime.bridge.mapping import ConversionError, check_checkpoint_keys, local_params
from remote_runtime.bridge.transforms import Layout, ShapeError, shard
from remote_runtime.spec.families import family_for_hf_config
from remote_runtime.spec.families.base import expert_keys, moe_layer_flags
from remote_runtime.spec.resolve import padded_vocab_size, read_hf_config


@dataclass
class LoadReport:
    model_dir: str
    family: str
    params_loaded: int  # on this rank
    bytes_read: int  # on this rank
    seconds: float
    source_dtypes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return dict(self.__dict__)


def layout_for(hf_config: dict, family, dist) -> Layout:
    """The transforms' view of the model and of this rank (`dist`: platform.DistInfo)."""
    tc = family.transformer_config_kwargs(hf_config)
    return Layout(
        heads=tc["num_attention_heads"],
        groups=tc["num_query_groups"],
        head_dim=tc["kv_channels"],
        vocab=tc["vocab_size"],
        padded_vocab=padded_vocab_size(tc["vocab_size"], dist.tp),
        tp=dist.tp,
        tp_rank=dist.tp_rank,
        num_experts=tc.get("num_moe_experts") or 0,
        ep=getattr(dist, "ep", 1),
        ep_rank=getattr(dist, "ep_rank", 0),
        etp=getattr(dist, "etp", 1),
        etp_rank=getattr(dist, "etp_rank", 0),
    )


def row_keys(row, layer: int | None, lay: Layout, ep_rank: int | None = None) -> list[str]:
    """The HF tensors of one Megatron parameter: for per-expert rows, those of the experts of
    EP rank `ep_rank` (default: this rank's), expert by expert in the table's order."""
    if not row.per_expert:
        return [k for p in row.hf for k in expert_keys(p, layer, ())]
    return [
        k for e in lay.local_experts(ep_rank) for p in row.hf for k in expert_keys(p, layer, (e,))
    ]


def load_hf_checkpoint(chunks, model_dir: str | Path, dist) -> LoadReport:
    """Fill this rank's parameters from the HF checkpoint in model_dir (see module docstring)."""
    start = time.perf_counter()
    hf_config = read_hf_config(model_dir)
    family = family_for_hf_config(hf_config)
    tc = family.transformer_config_kwargs(hf_config)
    tied = tc["share_embeddings_and_output_weights"]
    ckpt = HFCheckpoint(model_dir)
    where = str(ckpt.dir)
    experts = tc.get("num_moe_experts") or 0
    check_checkpoint_keys(
        family, ckpt.keys(), tc["num_layers"], tied, where, experts, moe_layer_flags(tc)
    )
    lay = layout_for(hf_config, family, dist)
    read_keys: set[str] = set()
    nbytes, dtypes = 0, set()
    params = local_params(chunks, family, tied)
    try:
        for lp in params:
            keys = row_keys(lp.row, lp.layer, lay)
            for key in keys:
                dtype = ckpt.meta(key)[1]
                if dtype not in FLOAT_DTYPES:
                    raise ConversionError(
                        [
                            (
                                f"tensors of dtype {dtype} (expected one of "
                                f"{', '.join(FLOAT_DTYPES)})",
                                [key],
                            )
                        ],
                        where,
                    )
                dtypes.add(dtype)
            try:
                piece = shard(lp.row.transform, [ckpt.slice(k) for k in keys], lay, keys)
            except ShapeError as exc:
                raise ConversionError([(str(exc), [lp.name])], where) from None
            if tuple(piece.shape) != tuple(lp.param.shape):
                raise ConversionError(
                    [
                        (
                            f"shape {tuple(piece.shape)} from the checkpoint does not "
                            f"match the model's {tuple(lp.param.shape)}",
                            [lp.name],
                        )
                    ],
                    where,
                )
            with torch.no_grad():
                lp.param.copy_(piece.to(device=lp.param.device, dtype=lp.param.dtype))
            nbytes += piece.numel() * piece.element_size()
            read_keys.update(keys)
    finally:
        ckpt.close()
    _check_everything_loaded(family, tc, tied, read_keys, where)
    return LoadReport(
        where, family.name, len(params), nbytes, time.perf_counter() - start, sorted(dtypes)
    )


def _check_everything_loaded(family, tc, tied, read_keys: set[str], where: str) -> None:
    expected = set(
        family.expected_hf_keys(
            tc["num_layers"], tied, tc.get("num_moe_experts") or 0, moe_layer_flags(tc)
        )
    )
    everyone = [read_keys]
    if torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1:
        everyone = [None] * torch.distributed.get_world_size()
        torch.distributed.all_gather_object(everyone, read_keys)
    unread = expected - set().union(*everyone)
    if unread:
        raise ConversionError(
            [
                (
                    "checkpoint tensors that no model parameter took (does the model "
                    "match config.json?)",
                    sorted(unread),
                )
            ],
            where,
        )
