"""Llama 3, 3.1 and 3.2 (LlamaForCausalLM): GQA, SwiGLU, RMSNorm, llama3 rope scaling.

Llama 3.2 1B/3B tie the output layer to the embeddings; 3.0/3.1 do not. Checkpoints with
attention or MLP biases (a few Llama derivatives) are refused rather than loaded wrongly.
"""

from remote_runtime.spec.families.base import (
    DENSE_CONSTANTS,
    DENSE_IGNORE,
    DENSE_PARAMS,
    DENSE_REQUIRE,
    ModelFamily,
    Require,
    dense_decoder_config,
)

FAMILY = ModelFamily(
    name="llama",
    architectures=("LlamaForCausalLM",),
    model_types=("llama",),
    config=dense_decoder_config(tie_default=False),
    constants={**DENSE_CONSTANTS, "add_qkv_bias": False, "qk_layernorm": False},
    params=DENSE_PARAMS,
    ignore=DENSE_IGNORE,
    require=DENSE_REQUIRE
    + (
        Require("attention_bias", (False,)),
        Require("mlp_bias", (False,)),
    ),
    rope_types=("default", "llama3"),
    notes="Llama 3 / 3.1 / 3.2 dense",
)
