"""Core attention without Transformer Engine, on torch's fused kernels.

Replaces the `core_attention` submodule of megatron's local layer spec, whose
`DotProductAttention` materialises the s×s score matrix and cannot take packed sequences.

* Padded batches ([s, b, h, d], Megatron's sbhd layout): `scaled_dot_product_attention`, causal,
  on the backend asked for (`flash`, `fused` = cuDNN, `unfused` = math; `auto` lets torch pick).
* Packed sequences (THD: [t, h, d] with `PackedSeqParams.cu_seqlens_q`): every document attends
  only to itself. On GPU with bf16/fp16, `torch.nn.attention.varlen.varlen_attn` (flash varlen,
  torch >= 2.10) runs the whole pack in one kernel; otherwise (CPU, fp32, older torch) a loop of
  causal SDPA calls, one per document, which is exact and needs no mask. A kernel that fails
  once is not tried again (recorded in PACKED_PATH, reported by check-convert and benchmarks).
  cuDNN's ragged kernels (aten._cudnn_attention_forward with cum_seq offsets) would be faster on
  Hopper, but on torch 2.11 their backward returned inf (measured 2026-11-21, see
  benchmarks/results/); torch's own varlen_attn keeps them disabled too.
* Uniform packs: when every document of the pack has the same length L (pre-training chunks,
  fixed-length benchmarks), the pack is a plain batch [n, L] of causal sequences. Known on the
  host without a device sync (t == n·max_seqlen), it runs as one dense causal SDPA call on
  the fastest kernel that accepts it (UNIFORM_KERNELS: cuDNN first on GPU, whose Hopper kernels
  are faster than flash-attention-2; then flash), the same mathematics as the varlen path.
"""

from __future__ import annotations

import inspect
import math
import warnings
from contextlib import nullcontext
from typing import Optional

import torch
import torch.nn.functional as F
from megatron.core import parallel_state, tensor_parallel
from megatron.core.transformer.module import MegatronModule

try:
    from torch.nn.attention import SDPBackend, sdpa_kernel
except ImportError:  # torch < 2.3
    SDPBackend = sdpa_kernel = None

try:
    from torch.nn.attention.varlen import varlen_attn as _varlen_attn
except ImportError:  # torch < 2.10
    _varlen_attn = None

BACKENDS = ("auto", "flash", "fused", "unfused")


def _varlen_flags() -> dict:
    """How this torch spells causal masking, GQA and the softmax scale in varlen_attn.

    torch 2.10 has `is_causal` and nothing else; 2.11+ has `window_size=(-1, 0)` for causal and
    keyword-only `scale` and `enable_gqa`.
    """
    if _varlen_attn is None:
        return {}
    params = inspect.signature(_varlen_attn).parameters
    flags = {"causal": {"window_size": (-1, 0)} if "window_size" in params else {"is_causal": True}}
    flags["gqa"] = "enable_gqa" in params
    flags["scale"] = "scale" in params
    return flags


VARLEN = _varlen_flags()
# Which packed-sequence kernel actually ran ("varlen" / "per-document SDPA"), and why varlen was
# dropped if it failed once (unsupported GPU or shape): reported by check-convert and benchmarks.
PACKED_PATH = {"used": None, "varlen_error": None, "uniform_errors": {}}

# Kernels for uniform packs, in order of preference per `attention_backend`. "cudnn" passes
# grouped K/V as they are (enable_gqa), "cudnn-expand" repeats them to all query heads first (for
# cuDNN builds that take no GQA). "varlen" turns the uniform path off.
UNIFORM_KERNELS = {
    "auto": ("cudnn", "cudnn-expand", "flash", "efficient"),
    "fused": ("cudnn", "cudnn-expand"),
    "flash": ("flash",),
    "unfused": ("math",),
}
UNIFORM_CHOICES = ("auto", "cudnn", "cudnn-expand", "flash", "efficient", "math", "varlen")
_SDPA_BACKEND = {
    "cudnn": "CUDNN_ATTENTION",
    "cudnn-expand": "CUDNN_ATTENTION",
    "flash": "FLASH_ATTENTION",
    "efficient": "EFFICIENT_ATTENTION",
    "math": "MATH",
}


def varlen_available(device_type: str, dtype: torch.dtype) -> bool:
    return (
        bool(VARLEN)
        and PACKED_PATH["varlen_error"] is None
        and device_type == "cuda"
        and dtype in (torch.bfloat16, torch.float16)
    )


def _kernel_context(backend: str, device_type: str):
    """Restrict SDPA to one backend on GPU. On CPU only `unfused` (math) is honoured: the CPU
    kernels are flash-style or math, and cuDNN does not exist there."""
    if sdpa_kernel is None or backend == "auto":
        return nullcontext()
    if device_type != "cuda":
        return sdpa_kernel([SDPBackend.MATH]) if backend == "unfused" else nullcontext()
    choice = {
        "flash": SDPBackend.FLASH_ATTENTION,
        "fused": SDPBackend.CUDNN_ATTENTION,
        "unfused": SDPBackend.MATH,
    }[backend]
    return sdpa_kernel([choice])


class SDPAttention(MegatronModule):
    """Drop-in for megatron's core attention (same constructor and forward signature)."""

    def __init__(
        self,
        config,
        layer_number: int,
        attn_mask_type,
        attention_type: str,
        attention_dropout: Optional[float] = None,
        softmax_scale: Optional[float] = None,
        cp_comm_type: Optional[str] = None,
        pg_collection=None,
        backend: str = "auto",
        uniform: str = "auto",
    ):
        super().__init__(config=config)
        if config.context_parallel_size != 1:
            raise ValueError(
                "context parallelism needs Transformer Engine attention "
                "(--transformer_impl transformer_engine)"
            )
        if backend not in BACKENDS:
            raise ValueError(f"attention backend {backend!r} is not one of {BACKENDS}")
        if uniform not in UNIFORM_CHOICES:
            raise ValueError(f"uniform-pack attention {uniform!r} is not one of {UNIFORM_CHOICES}")
        tp = (
            pg_collection.tp.size()
            if pg_collection is not None and hasattr(pg_collection, "tp")
            else parallel_state.get_tensor_model_parallel_world_size()
        )
        self._set_shape(
            config.num_attention_heads // tp,
            config.num_query_groups // tp,
            config.kv_channels,
            backend,
            uniform,
            softmax_scale,
        )
        self.dropout = config.attention_dropout if attention_dropout is None else attention_dropout

    def _set_shape(
        self,
        heads: int,
        groups: int,
        head_dim: int,
        backend: str,
        uniform: str,
        softmax_scale: Optional[float] = None,
    ) -> None:
        self.backend = backend
        self.uniform_kernels = (
            ()
            if uniform == "varlen"
            else UNIFORM_KERNELS[backend]
            if uniform == "auto"
            else (uniform,)
        )
        self.heads, self.groups, self.head_dim = heads, groups, head_dim
        self.scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(head_dim)

    @classmethod
    def bare(
        cls, heads: int, groups: int, head_dim: int, uniform: str = "auto", backend: str = "auto"
    ) -> "SDPAttention":
        """An instance outside a megatron model (no config, no parallel state), for calling the
        kernels directly: GPU kernel tests and benchmarks/attention_kernels.py."""
        module = cls.__new__(cls)
        module._set_shape(heads, groups, head_dim, backend, uniform)
        module.dropout = 0.0
        return module

    def forward(
        self,
        query,
        key,
        value,
        attention_mask,
        attn_mask_type=None,
        attention_bias=None,
        packed_seq_params=None,
    ):
        if attention_bias is not None:
            raise ValueError("attention_bias is not supported by SDPAttention")
        dropout = self.dropout if self.training else 0.0
        # Same rule as megatron's attention: dropout in the tensor-parallel region uses the
        # model-parallel RNG stream unless the sequence is split instead (sequence parallel).
        rng = (
            tensor_parallel.get_cuda_rng_tracker().fork()
            if dropout > 0 and not self.config.sequence_parallel
            else nullcontext()
        )
        with rng, _kernel_context(self.backend, query.device.type):
            if packed_seq_params is not None and packed_seq_params.qkv_format == "thd":
                return self._packed(query, key, value, packed_seq_params, dropout)
            return self._padded(query, key, value, attention_mask, dropout)

    def _padded(self, query, key, value, attention_mask, dropout):
        # [s, b, h, d] -> [b, h, s, d]
        q, k, v = (t.permute(1, 2, 0, 3) for t in (query, key, value))
        gqa = self.heads != self.groups
        if gqa and self.backend == "fused":  # cuDNN attention takes no enable_gqa: expand k/v
            rep = self.heads // self.groups
            k, v, gqa = k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1), False
        if attention_mask is None:
            mask, causal = None, True
        else:  # Megatron's convention: True = masked out; the mask already encodes causality
            mask, causal = ~attention_mask.bool(), False
        out = F.scaled_dot_product_attention(
            q,
            k,
            v,
            attn_mask=mask,
            dropout_p=dropout,
            is_causal=causal,
            scale=self.scale,
            enable_gqa=gqa,
        )
        s, b = query.shape[0], query.shape[1]
        return out.permute(2, 0, 1, 3).reshape(s, b, self.heads * self.head_dim)

    def _packed(self, query, key, value, psp, dropout):
        # THD: query [t, h, d], key/value [t, g, d]; documents delimited by cu_seqlens. Padded
        # offsets (when the packer aligned documents) are what RoPE used too.
        cu_q = psp.cu_seqlens_q_padded if psp.cu_seqlens_q_padded is not None else psp.cu_seqlens_q
        cu_k = (
            psp.cu_seqlens_kv_padded if psp.cu_seqlens_kv_padded is not None else psp.cu_seqlens_kv
        )
        if query.dim() == 4:  # [t, 1, h, d] when the caller kept the batch dimension
            query, key, value = (t.squeeze(1) for t in (query, key, value))
        out = None
        segments = cu_q.numel() - 1
        if (
            self.uniform_kernels
            and segments > 0
            and cu_k.numel() == cu_q.numel()
            and query.shape[0] == segments * int(psp.max_seqlen_q) == key.shape[0]
            and int(psp.max_seqlen_kv) == int(psp.max_seqlen_q)
        ):
            # every segment is exactly max_seqlen long (their sum is t, none is longer), for
            # keys as well: a batch of equal causal sequences
            out = self._uniform(query, key, value, segments, dropout)
        default_scale = self.scale == 1.0 / math.sqrt(self.head_dim)
        if (
            out is None
            and dropout == 0.0
            and varlen_available(query.device.type, query.dtype)
            and (VARLEN["scale"] or default_scale)
        ):
            try:
                out = self._varlen(query, key, value, cu_q, cu_k, psp)
                PACKED_PATH["used"] = "varlen"
            except (RuntimeError, TypeError, NotImplementedError) as exc:
                PACKED_PATH["varlen_error"] = f"{type(exc).__name__}: {exc}"[:500]
                warnings.warn(f"varlen_attn failed, using one SDPA call per document: {exc}")
        if out is None:
            out = self._per_document(query, key, value, cu_q, dropout)
            PACKED_PATH["used"] = "per-document SDPA"
        return out.reshape(out.shape[0], self.heads * self.head_dim)

    def _uniform(self, query, key, value, segments: int, dropout: float):
        """[t, h, d] as [n, h, L, d], one causal SDPA call; None when no preferred kernel runs."""
        q, k, v = (
            t.view(segments, t.shape[0] // segments, *t.shape[1:]).transpose(1, 2)
            for t in (query, key, value)
        )
        gqa = self.heads != self.groups
        kernels = self.uniform_kernels if query.device.type == "cuda" else ("cpu",)
        failed = PACKED_PATH["uniform_errors"]
        for name in kernels:
            key_ = f"{name}/{query.dtype}/{'gqa' if gqa else 'mha'}/d{self.head_dim}"
            if key_ in failed:
                continue
            kk, vv, native_gqa = k, v, gqa
            if gqa and name in ("cudnn-expand", "math"):
                rep = self.heads // self.groups
                kk, vv, native_gqa = k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1), False
            context = (
                nullcontext()
                if name == "cpu" or sdpa_kernel is None
                else sdpa_kernel([getattr(SDPBackend, _SDPA_BACKEND[name])])
            )
            try:
                with context:
                    out = F.scaled_dot_product_attention(
                        q,
                        kk,
                        vv,
                        dropout_p=dropout,
                        is_causal=True,
                        scale=self.scale,
                        enable_gqa=native_gqa,
                    )
            except RuntimeError as exc:  # no kernel of that kind for this shape / GPU / build
                failed[key_] = f"{type(exc).__name__}: {exc}"[:300]
                continue
            PACKED_PATH["used"] = f"uniform SDPA ({name})"
            # [n, h, L, d] -> [t, h, d]
            return out.transpose(1, 2).reshape(query.shape[0], self.heads, self.head_dim)
        return None

    def _varlen(self, query, key, value, cu_q, cu_k, psp):
        # value (never roped or normed) is still a strided view into the fused QKV output
        query, key, value = query.contiguous(), key.contiguous(), value.contiguous()
        gqa = self.heads != self.groups
        if gqa and not VARLEN["gqa"]:
            rep = self.heads // self.groups
            key, value = key.repeat_interleave(rep, 1), value.repeat_interleave(rep, 1)
        extra = dict(VARLEN["causal"])
        if gqa and VARLEN["gqa"]:
            extra["enable_gqa"] = True
        if VARLEN["scale"]:
            extra["scale"] = self.scale
        return _varlen_attn(
            query,
            key,
            value,
            cu_q.int(),
            cu_k.int(),
            int(psp.max_seqlen_q),
            int(psp.max_seqlen_kv),
            **extra,
        )

    def _per_document(self, query, key, value, cu_q, dropout):
        bounds = cu_q.tolist()
        out = torch.empty_like(query) if bounds[-1] == query.shape[0] else torch.zeros_like(query)
        for start, end in zip(bounds[:-1], bounds[1:]):
            if end <= start:
                continue
            q, k, v = (t[start:end].transpose(0, 1).unsqueeze(0) for t in (query, key, value))
            o = F.scaled_dot_product_attention(
                q,
                k,
                v,
                dropout_p=dropout,
                is_causal=True,
                scale=self.scale,
                enable_gqa=self.heads != self.groups,
            )
            out[start:end] = o.squeeze(0).transpose(0, 1)
        return out


def sdpa_core_attention(backend: str, uniform: str = "auto"):
    """The `core_attention` entry for a layer spec (megatron calls it like a class)."""

    class _SDPAttention(SDPAttention):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, backend=backend, uniform=uniform, **kwargs)

    _SDPAttention.__name__ = f"SDPAttention_{backend}"
    return _SDPAttention
