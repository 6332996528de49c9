"""Self-attention whose q/k RMSNorm, rotary embedding and q/k/v split run as one Triton kernel.

Megatron's `SelfAttention` splits the fused QKV projection output into q, k and v (a reshape that
copies q), applies `q_layernorm` and `k_layernorm`, then rotates q and k: four small kernels and
their autograd nodes per layer and direction, plus the gradient sums where the three views meet
again. On a GPU waiting for its host (micro-batch 1 of a 1.7B model) that Python and launch cost
is the step time. `QKFusedSelfAttention` does all of it in one kernel each way
(`kernels.qk_norm_rope`): it takes the rotary frequencies from the layer's call, hands megatron
no rotary embedding to apply, and returns the finished q, k and v from
`get_query_key_value_tensors`.

It falls back to megatron's own path (same module, same parameters) whenever the fused kernel
does not apply: no rotary embedding or separate q/k ones, inference, cross attention, gated
attention, partial or interleaved rotary, or more TP ranks than KV groups.
"""

from __future__ import annotations

import functools


@functools.lru_cache(maxsize=None)
def qk_fused_self_attention_class():
    from megatron.core.transformer.attention import SelfAttention

    from remote_runtime.model import ops as kernels
    from remote_runtime.model.norm import RMSNorm

    class QKFusedSelfAttention(SelfAttention):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            c = self.config
            self._fused_rope = None  # (freqs, cu_seqlens) for the call in progress
            self.qk_fused = (
                isinstance(self.q_layernorm, RMSNorm)
                and isinstance(self.k_layernorm, RMSNorm)
                and not c.rotary_interleaved
                and not c.attention_output_gate
                and getattr(c, "rope_type", "rope") != "yarn"
                and c.context_parallel_size == 1
                and c.num_query_groups >= self.world_size
                and kernels.qk_norm_rope_supported(
                    self.hidden_size_per_attention_head,
                    self.num_attention_heads_per_partition,
                    self.num_query_groups_per_partition,
                )
            )

        def forward(self, hidden_states, *args, **kwargs):
            freqs = kwargs.get("rotary_pos_emb")
            packed = kwargs.get("packed_seq_params")
            if (
                not self.qk_fused
                or args
                or freqs is None
                or isinstance(freqs, tuple)
                or freqs.shape[-1] != self.hidden_size_per_attention_head
                or kwargs.get("inference_context") is not None
                or kwargs.get("inference_params") is not None
                or kwargs.get("key_value_states") is not None
                or (packed is not None and packed.qkv_format != "thd")
            ):
                return super().forward(hidden_states, *args, **kwargs)
            cu = None
            if packed is not None:
                cu = (
                    packed.cu_seqlens_q_padded
                    if packed.cu_seqlens_q_padded is not None
                    else packed.cu_seqlens_q
                )
            self._fused_rope = (freqs, cu)
            try:  # rotary_pos_emb=None: the rotation happens in get_query_key_value_tensors
                return super().forward(hidden_states, **{**kwargs, "rotary_pos_emb": None})
            finally:
                self._fused_rope = None

        def get_query_key_value_tensors(
            self, hidden_states, key_value_states=None, output_gate=False, split_qkv=True
        ):
            if self._fused_rope is None or output_gate or not split_qkv:
                return super().get_query_key_value_tensors(
                    hidden_states, key_value_states, output_gate=output_gate, split_qkv=split_qkv
                )
            freqs, cu = self._fused_rope
            mixed_qkv, _ = super().get_query_key_value_tensors(
                hidden_states, key_value_states, split_qkv=False
            )
            q_norm, k_norm = self.q_layernorm, self.k_layernorm
            return kernels.qk_norm_rope(
                mixed_qkv,
                q_norm.weight,
                k_norm.weight,
                q_norm.eps,
                freqs,
                self.num_attention_heads_per_partition,
                self.num_query_groups_per_partition,
                self.hidden_size_per_attention_head,
                cu_seqlens=cu,
            )

    return QKFusedSelfAttention
