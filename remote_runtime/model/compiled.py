"""Compiled RMSNorm and rotary embedding for the local (non-Transformer-Engine) spec on GPU.

Eager RMSNorm and RoPE are chains of small memory-bound kernels (upcast, square, mean, rsqrt,
scale, downcast; cos, sin, rotate, multiply, add) run on every layer, forward and backward.
torch.compile fuses each chain into one kernel per direction. The maths is the eager maths
(Hugging Face's RMSNorm; megatron's non-interleaved RoPE), so results agree to rounding.

RoPE plugs into megatron-core through the hook it has for this: `rope_utils` looks up module-level
`fused_apply_rotary_pos_emb` / `fused_apply_rotary_pos_emb_thd` (normally Transformer Engine's)
when `apply_rope_fusion` is set. `install_rope()` fills them, only where TE has not.
"""

from __future__ import annotations

import sys

import torch

_compiled: dict[str, object] = {}


def _compile(name: str, fn):
    # dynamic=None: static kernels first, shape-generic ones after the first new shape (packed
    # batches vary in length), instead of a recompile per length.
    if name not in _compiled:
        _compiled[name] = torch.compile(fn, dynamic=None)
    return _compiled[name]


def _rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    dtype = x.dtype
    x32 = x.float()
    x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    return weight * x32.to(dtype)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    return _compile("rms_norm", _rms_norm)(x, weight, eps)


def _rope(t: torch.Tensor, freqs: torch.Tensor) -> torch.Tensor:
    """t [..., d] rotated by angles freqs (broadcastable to t[..., :rot_dim]), non-interleaved."""
    rot_dim = freqs.shape[-1]
    rot, rest = t[..., :rot_dim], t[..., rot_dim:]
    cos, sin = torch.cos(freqs).to(t.dtype), torch.sin(freqs).to(t.dtype)
    x1, x2 = rot.chunk(2, dim=-1)
    out = rot * cos + torch.cat((-x2, x1), dim=-1) * sin
    return torch.cat((out, rest), dim=-1)


def rope_bshd(t: torch.Tensor, freqs: torch.Tensor, interleaved: bool = False) -> torch.Tensor:
    """megatron's fused_apply_rotary_pos_emb: t [s, b, h, d], freqs [s, 1, 1, rot_dim]."""
    if interleaved:
        raise NotImplementedError("interleaved rotary embeddings need Transformer Engine")
    return _compile("rope", _rope)(t, freqs)


class _Positions:
    """Position of each packed token within its document, computed once per batch (every
    layer's q and k share the same cu_seqlens tensor) and without a host sync."""

    cu: torch.Tensor | None = None
    pos: torch.Tensor | None = None


def packed_positions(cu_seqlens: torch.Tensor, total: int) -> torch.Tensor:
    """[total] int64: each packed token's position within its document (cached per batch)."""
    cache = _Positions
    if cache.cu is not cu_seqlens or cache.pos is None or cache.pos.shape[0] != total:
        starts = cu_seqlens[:-1].long()
        lengths = cu_seqlens[1:].long() - starts
        cache.pos = torch.arange(total, device=cu_seqlens.device) - torch.repeat_interleave(
            starts, lengths, output_size=total
        )
        cache.cu = cu_seqlens
    return cache.pos


def rope_thd(
    t: torch.Tensor,
    cu_seqlens: torch.Tensor,
    freqs: torch.Tensor,
    cp_size: int = 1,
    cp_rank: int = 0,
) -> torch.Tensor:
    """megatron's fused_apply_rotary_pos_emb_thd: t [T, h, d] packed documents, positions
    restarting at each cu_seqlens boundary; freqs [max_len, 1, 1, rot_dim]."""
    if cp_size != 1:
        raise NotImplementedError("context parallelism needs Transformer Engine")
    pos = packed_positions(cu_seqlens, t.shape[0])
    per_token = freqs.reshape(freqs.shape[0], freqs.shape[-1])[pos].unsqueeze(1)  # [T, 1, rot]
    return _compile("rope", _rope)(t, per_token)


def install_rope(kernels: str = "compile") -> bool:
    """Register our RoPE (`compile`: the functions above; `triton`: `ops.py`) as megatron's
    fused RoPE. Transformer Engine's, when megatron found it, is left in place; ours from an
    earlier model in this process is replaced."""
    from megatron.core.models.common.embeddings import rope_utils

    from remote_runtime.model import ops as triton_impl

    impl = triton_impl if kernels == "triton" else sys.modules[__name__]
    ours = {rope_bshd, rope_thd, triton_impl.rope_bshd, triton_impl.rope_thd}
    for name, fn in (
        ("fused_apply_rotary_pos_emb", impl.rope_bshd),
        ("fused_apply_rotary_pos_emb_thd", impl.rope_thd),
    ):
        current = getattr(rope_utils, name)
        if current is None or current in ours:
            setattr(rope_utils, name, fn)
    return True
