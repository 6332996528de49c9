"""Qwen2-MoE (Qwen2MoeForCausalLM: Qwen1.5-MoE-A2.7B, Qwen2-57B-A14B): Qwen2's attention (q, k
and v biases) with every MLP a mixture of experts plus one shared expert, a dense SwiGLU MLP of
`shared_expert_intermediate_size` whose output is scaled by sigmoid(`shared_expert_gate` · x)
(megatron's SharedExpertMLP with `moe_shared_expert_gate`).

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
    SHARED_EXPERT_CONFIG,
    SHARED_EXPERT_PARAMS,
)

FAMILY = ModelFamily(
    name="qwen2_moe",
    architectures=("Qwen2MoeForCausalLM",),
    model_types=("qwen2_moe",),
    config=dense_decoder_config(tie_default=False) + MOE_CONFIG + SHARED_EXPERT_CONFIG,
    constants={**DENSE_CONSTANTS, **MOE_CONSTANTS, "add_qkv_bias": True, "qk_layernorm": False,
               "moe_shared_expert_gate": True},
    params=ATTENTION_PARAMS + MOE_PARAMS + SHARED_EXPERT_PARAMS + (
        Param(L + "self_attention.linear_qkv.bias",
              (H + "self_attn.q_proj.bias", H + "self_attn.k_proj.bias", H + "self_attn.v_proj.bias"),
              "qkv"),
    ),
    ignore=DENSE_IGNORE,
    require=DENSE_REQUIRE + MOE_REQUIRE + (
        Require("qkv_bias", (True,), why="the Qwen2-MoE checkpoints have q/k/v biases"),),
    notes="Qwen2-MoE with a gated shared expert (e.g. Qwen1.5-MoE-A2.7B, Qwen2-57B-A14B)",
)
