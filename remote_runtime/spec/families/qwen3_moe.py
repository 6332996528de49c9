"""Qwen3-MoE (Qwen3MoeForCausalLM, e.g. Qwen3-30B-A3B): Qwen3's attention (q/k norms, GQA,
explicit head_dim) with every MLP a mixture of experts: a softmax router over `num_experts`
(128), the top `num_experts_per_tok` (8) experts per token, each a SwiGLU MLP of
`moe_intermediate_size` (768), renormalised when `norm_topk_prob`. No shared expert.
The expert rows, router settings and dense MLP layers (`mlp_only_layers`,
`decoder_sparse_step`) are in `moe.py`.
"""

from remote_runtime.spec.families.base import H, L, Param, Require
from remote_runtime.spec.families.moe import moe_family

FAMILY = moe_family(
    "qwen3_moe",
    "Qwen3MoeForCausalLM",
    "qwen3_moe",
    constants={"add_qkv_bias": False, "qk_layernorm": True},
    params=(
        Param(
            L + "self_attention.q_layernorm.weight", (H + "self_attn.q_norm.weight",), "replicated"
        ),
        Param(
            L + "self_attention.k_layernorm.weight", (H + "self_attn.k_norm.weight",), "replicated"
        ),
    ),
    require=(Require("attention_bias", (False,)),),
    notes="Qwen3-MoE (e.g. Qwen3-30B-A3B)",
)
