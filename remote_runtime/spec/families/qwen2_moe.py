"""Qwen2-MoE (Qwen2MoeForCausalLM: Qwen1.5-MoE-A2.7B, Qwen2-57B-A14B): Qwen2's attention (q, k
and v biases) with every MLP a mixture of experts plus one shared expert, a dense SwiGLU MLP of
`shared_expert_intermediate_size` whose output is scaled by sigmoid(`shared_expert_gate` · x)
(megatron's SharedExpertMLP with `moe_shared_expert_gate`). The expert rows, router settings and
dense MLP layers (`mlp_only_layers`, `decoder_sparse_step`) are in `moe.py`.
"""

from remote_runtime.spec.families.base import H, L, Param, Require
from remote_runtime.spec.families.moe import SHARED_EXPERT_CONFIG, SHARED_EXPERT_PARAMS, moe_family

FAMILY = moe_family(
    "qwen2_moe",
    "Qwen2MoeForCausalLM",
    "qwen2_moe",
    constants={"add_qkv_bias": True, "qk_layernorm": False, "moe_shared_expert_gate": True},
    config=SHARED_EXPERT_CONFIG,
    params=SHARED_EXPERT_PARAMS
    + (
        Param(
            L + "self_attention.linear_qkv.bias",
            tuple(H + f"self_attn.{x}_proj.bias" for x in "qkv"),
            "qkv",
        ),
    ),
    require=(Require("qkv_bias", (True,), why="the Qwen2-MoE checkpoints have q/k/v biases"),),
    notes="Qwen2-MoE with a gated shared expert (e.g. Qwen1.5-MoE-A2.7B, Qwen2-57B-A14B)",
)
