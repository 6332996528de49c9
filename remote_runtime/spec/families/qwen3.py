"""Qwen3 dense (Qwen3ForCausalLM): the Llama layout plus RMSNorm on each query and key head.

Qwen3's head_dim is set explicitly and is not hidden_size / num_attention_heads (e.g. Qwen3-1.7B:
hidden 2048, 16 heads, head_dim 128), so kv_channels comes from config.json `head_dim`.
"""

from remote_runtime.spec.families.base import (
    DENSE_CONSTANTS,
    DENSE_IGNORE,
    DENSE_PARAMS,
    DENSE_REQUIRE,
    H,
    L,
    ModelFamily,
    Param,
    Require,
    dense_decoder_config,
)

FAMILY = ModelFamily(
    name="qwen3",
    architectures=("Qwen3ForCausalLM",),
    model_types=("qwen3",),
    config=dense_decoder_config(tie_default=False),
    constants={**DENSE_CONSTANTS, "add_qkv_bias": False, "qk_layernorm": True},
    params=DENSE_PARAMS
    + (
        Param(
            L + "self_attention.q_layernorm.weight", (H + "self_attn.q_norm.weight",), "replicated"
        ),
        Param(
            L + "self_attention.k_layernorm.weight", (H + "self_attn.k_norm.weight",), "replicated"
        ),
    ),
    ignore=DENSE_IGNORE,
    require=DENSE_REQUIRE + (Require("attention_bias", (False,)),),
    notes="Qwen3 dense",
)
