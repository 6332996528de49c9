"""The shared tensor transforms named in the family tables, both directions.

`shard` builds one tensor-parallel rank's piece of a Megatron parameter straight from
safetensors slices (reading only that piece); `unshard` turns the pieces gathered from all TP
ranks back into the Hugging Face tensors. Layouts (megatron-core):

* qkv: `linear_qkv` holds, for each query group g, [q heads of g | k_g | v_g] along dim 0; a TP
  rank owns a contiguous run of groups.
* gate_up: `linear_fc1` of a gated MLP holds [gate_r; up_r] on each rank r (it chunks the local
  output in two), so the global tensor is not [gate; up] when TP > 1.
* vocab: the vocabulary is padded to a multiple of 128 × TP; padded rows are zeros.
* expert_gate_up / expert_row: the routed experts of a MoE layer, stacked on a new dim 0 (the
  EP rank's experts, `Layout.local_experts`), each split like gate_up / row over the
  expert-tensor-parallel ranks. Their slices and keys come expert by expert, each expert's in the
  table's order (gate, up; or down).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch


class ShapeError(ValueError):
    pass


@dataclass(frozen=True)
class Layout:
    """What the transforms need to know about the model and this rank."""

    heads: int
    groups: int
    head_dim: int
    vocab: int
    padded_vocab: int
    tp: int
    tp_rank: int
    num_experts: int = 0
    ep: int = 1  # expert model parallel size
    ep_rank: int = 0
    etp: int = 1  # expert tensor parallel size
    etp_rank: int = 0

    @property
    def heads_per_group(self) -> int:
        return self.heads // self.groups

    def local_experts(self, ep_rank: int | None = None) -> range:
        """The experts EP rank `ep_rank` (default: this rank's) holds."""
        n = _part(self.num_experts, self.ep, "num_experts (expert_model_parallel_size)")
        k = self.ep_rank if ep_rank is None else ep_rank
        return range(k * n, (k + 1) * n)

    def expert_tp(self) -> "Layout":
        """This layout with expert-TP in place of TP (what each expert's split follows)."""
        return replace(self, tp=self.etp, tp_rank=self.etp_rank)


# The per-expert transform behind each expert transform, and the HF tensors per expert.
_PER_EXPERT = {"expert_gate_up": ("gate_up", 2), "expert_row": ("row", 1)}


class TensorSlice:
    """A tensor with the part of safetensors' slice interface the transforms read (tests,
    and weights that are already in memory)."""

    def __init__(self, tensor: torch.Tensor):
        self.tensor = tensor

    def get_shape(self) -> list[int]:
        return list(self.tensor.shape)

    def __getitem__(self, item):
        return self.tensor[item]


def _part(size: int, tp: int, what: str) -> int:
    if size % tp:
        raise ShapeError(f"{what}: size {size} is not divisible by tensor parallel size {tp}")
    return size // tp


def _rows(sl, start: int, stop: int) -> torch.Tensor:
    return sl[start:stop]


def shard(transform: str, slices: list, lay: Layout, keys: list[str]) -> torch.Tensor:
    """This TP rank's piece of one Megatron parameter, from safetensors slices of its HF tensors."""
    r, tp = lay.tp_rank, lay.tp
    if transform == "replicated":
        return slices[0][:]
    if transform == "column":
        n = _part(slices[0].get_shape()[0], tp, keys[0])
        return _rows(slices[0], r * n, (r + 1) * n)
    if transform == "row":
        n = _part(slices[0].get_shape()[1], tp, keys[0])
        return slices[0][:, r * n : (r + 1) * n]
    if transform == "vocab":
        return _vocab_shard(slices[0], lay, keys[0])
    if transform == "qkv":
        return _qkv_shard(slices, lay, keys)
    if transform == "gate_up":
        n = _part(slices[0].get_shape()[0], tp, keys[0])
        if slices[1].get_shape()[0] != slices[0].get_shape()[0]:
            raise ShapeError(f"{keys[0]} and {keys[1]} differ in size")
        return torch.cat([_rows(s, r * n, (r + 1) * n) for s in slices], dim=0)
    if transform in _PER_EXPERT:
        base, per = _PER_EXPERT[transform]
        elay = lay.expert_tp()
        return torch.stack(
            [
                shard(base, slices[i : i + per], elay, keys[i : i + per])
                for i in range(0, len(slices), per)
            ]
        )
    raise ValueError(f"unknown transform {transform!r}")


def _vocab_shard(sl, lay: Layout, key: str) -> torch.Tensor:
    rows = sl.get_shape()[0]
    if rows != lay.vocab:
        raise ShapeError(f"{key}: {rows} rows, but config.json vocab_size is {lay.vocab}")
    n = lay.padded_vocab // lay.tp
    start, stop = lay.tp_rank * n, min((lay.tp_rank + 1) * n, lay.vocab)
    piece = sl[start:stop] if stop > start else None
    if piece is not None and piece.shape[0] == n:
        return piece
    width = sl.get_shape()[1:]
    out = torch.zeros((n, *width), dtype=piece.dtype if piece is not None else torch.float32)
    if piece is not None:
        out[: piece.shape[0]] = piece
    return out


def _qkv_shard(slices, lay: Layout, keys: list[str]) -> torch.Tensor:
    hd, hpg = lay.head_dim, lay.heads_per_group
    want = (lay.heads * hd, lay.groups * hd, lay.groups * hd)
    for sl, key, rows in zip(slices, keys, want):
        if sl.get_shape()[0] != rows:
            raise ShapeError(
                f"{key}: {sl.get_shape()[0]} rows, expected {rows} "
                f"(heads={lay.heads}, kv heads={lay.groups}, head_dim={hd})"
            )
    g = _part(lay.groups, lay.tp, "num_key_value_heads")
    g0 = lay.tp_rank * g
    q = _rows(slices[0], g0 * hpg * hd, (g0 + g) * hpg * hd)
    k = _rows(slices[1], g0 * hd, (g0 + g) * hd)
    v = _rows(slices[2], g0 * hd, (g0 + g) * hd)
    rest = q.shape[1:]
    per_group = [q.reshape(g, hpg * hd, *rest), k.reshape(g, hd, *rest), v.reshape(g, hd, *rest)]
    return torch.cat(per_group, dim=1).reshape(-1, *rest)


def unshard(transform: str, pieces: list[torch.Tensor], lay: Layout, keys: list[str]) -> dict:
    """{HF key: full tensor} from the pieces of all TP ranks (in TP rank order); for the expert
    transforms, of all expert-TP ranks, with `keys` those of one EP rank's experts."""
    if transform in _PER_EXPERT:
        base, per = _PER_EXPERT[transform]
        out = {}
        for i, start in enumerate(range(0, len(keys), per)):
            out.update(
                unshard(base, [p[i] for p in pieces], lay.expert_tp(), keys[start : start + per])
            )
        return out
    if transform == "replicated":
        return {keys[0]: pieces[0]}
    if transform == "column":
        return {keys[0]: torch.cat(pieces, dim=0)}
    if transform == "row":
        return {keys[0]: torch.cat(pieces, dim=1)}
    if transform == "vocab":
        return {keys[0]: torch.cat(pieces, dim=0)[: lay.vocab]}
    if transform == "qkv":
        hd, hpg = lay.head_dim, lay.heads_per_group
        qs, ks, vs = [], [], []
        for p in pieces:
            rest = p.shape[1:]
            grouped = p.reshape(-1, (hpg + 2) * hd, *rest)
            q, k, v = torch.split(grouped, [hpg * hd, hd, hd], dim=1)
            qs.append(q.reshape(-1, *rest))
            ks.append(k.reshape(-1, *rest))
            vs.append(v.reshape(-1, *rest))
        return dict(zip(keys, (torch.cat(qs), torch.cat(ks), torch.cat(vs))))
    if transform == "gate_up":
        gates, ups = zip(*(torch.chunk(p, 2, dim=0) for p in pieces))
        return {keys[0]: torch.cat(gates), keys[1]: torch.cat(ups)}
    raise ValueError(f"unknown transform {transform!r}")
