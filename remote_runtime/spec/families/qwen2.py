"""Qwen2 and Qwen2.5 dense (Qwen2ForCausalLM): the Llama layout plus biases on q, k and v.

The q/k/v biases are interleaved per query group exactly like the weights (`qkv` transform).
The smaller Qwen2.5 models (0.5B-3B) tie the output layer to the embeddings.
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
    dense_decoder_config,
)

FAMILY = ModelFamily(
    name="qwen2",
    architectures=("Qwen2ForCausalLM",),
    model_types=("qwen2",),
    config=dense_decoder_config(tie_default=False),
    constants={**DENSE_CONSTANTS, "add_qkv_bias": True, "qk_layernorm": False},
    params=DENSE_PARAMS
    + (
        Param(
            L + "self_attention.linear_qkv.bias",
            (H + "self_attn.q_proj.bias", H + "self_attn.k_proj.bias", H + "self_attn.v_proj.bias"),
            "qkv",
        ),
    ),
    ignore=DENSE_IGNORE,
    require=DENSE_REQUIRE,
    notes="Qwen2 / Qwen2.5 dense",
)
