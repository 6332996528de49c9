"""Qwen3-MoE (Qwen3MoeForCausalLM, e.g. Qwen3-30B-A3B): Qwen3's attention (q/k norms, GQA,
explicit head_dim) with every MLP a mixture of experts: a softmax router over `num_experts`
(128), the top `num_experts_per_tok` (8) experts per token, each a SwiGLU MLP of
`moe_intermediate_size` (768), renormalised when `norm_topk_prob`. No shared expert.

See `moe.py` for the expert name table and the router settings.
"""

from remote_runtime.spec.families.base import (
    DENSE_CONSTANTS,
    DENSE_IGNORE,
    DENSE_REQUIRE,
    H,
    L,
    ModelFamily,
    Param,
    Require,
    dense_decoder_config,
)
from remote_runtime.spec.families.moe import (
    ATTENTION_PARAMS,
    MOE_CONFIG,
    MOE_CONSTANTS,
    MOE_PARAMS,
    MOE_REQUIRE,
)

FAMILY = ModelFamily(
    name="qwen3_moe",
    architectures=("Qwen3MoeForCausalLM",),
    model_types=("qwen3_moe",),
    config=dense_decoder_config(tie_default=False) + MOE_CONFIG,
    constants={**DENSE_CONSTANTS, **MOE_CONSTANTS, "add_qkv_bias": False, "qk_layernorm": True},
    params=ATTENTION_PARAMS + MOE_PARAMS + (
        Param(L + "self_attention.q_layernorm.weight", (H + "self_attn.q_norm.weight",), "replicated"),
        Param(L + "self_attention.k_layernorm.weight", (H + "self_attn.k_norm.weight",), "replicated"),
    ),
    ignore=DENSE_IGNORE,
    require=DENSE_REQUIRE + MOE_REQUIRE + (Require("attention_bias", (False,)),),
    notes="Qwen3-MoE (e.g. Qwen3-30B-A3B)",
)
