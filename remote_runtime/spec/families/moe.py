"""The declarations shared by the mixture-of-experts families (Qwen3-MoE, Qwen2-MoE).

A MoE decoder layer is the dense layer with its MLP replaced by megatron-core's MoELayer:

* `mlp.router.weight` [num_experts, hidden] <- `mlp.gate.weight` (replicated on every rank);
* the routed experts, stacked per layer (the contract with `remote_runtime/model/moe.py`):
  `mlp.experts.linear_fc1.weight` [local experts, 2 * moe_ffn / expert-TP, hidden], each expert's
  rows [gate_r; up_r], and `mlp.experts.linear_fc2.weight` [local experts, hidden,
  moe_ffn / expert-TP], from the per-expert `mlp.experts.{expert}.{gate,up,down}_proj.weight`;
  EP rank k holds experts k * E / EP ... (k + 1) * E / EP - 1;
* Qwen2-MoE's shared expert: megatron's SharedExpertMLP (`mlp.shared_experts.linear_fc1/fc2`,
  a dense SwiGLU MLP split by TP) and its sigmoid gate `mlp.shared_experts.gate_weight` [1, hidden].

Dense layers between MoE layers (`mlp_only_layers`, `decoder_sparse_step`): transformers makes
layer i a MoE layer iff `i not in mlp_only_layers and (i + 1) % decoder_sparse_step == 0`, the
others a dense SwiGLU MLP of `intermediate_size` (`mlp.{gate,up,down}_proj` directly). That is
megatron's per-layer `moe_layer_freq` list (1 = MoE, 0 = dense, a dense MLP of ffn_hidden_size);
the table's MoE rows apply to the MoE layers, the dense MLP rows to the others.

Router semantics: transformers takes the softmax over all experts, then the top k, and divides by
their sum when `norm_topk_prob`; megatron's `moe_router_pre_softmax=True` is softmax-then-top-k
(unnormalised), `False` top-k-then-softmax, which equals the renormalised top k. So
`moe_router_pre_softmax = not norm_topk_prob`.
"""

from __future__ import annotations

import dataclasses

from remote_runtime.spec.config import ConfigError
from remote_runtime.spec.families.base import (
    DENSE_CONSTANTS,
    DENSE_IGNORE,
    DENSE_PARAMS,
    DENSE_REQUIRE,
    ConfigField,
    H,
    L,
    ModelFamily,
    Param,
    dense_decoder_config,
)

# transformers' defaults for the MoE fields (Qwen2MoeConfig and Qwen3MoeConfig agree).
HF_NORM_TOPK_DEFAULT = False
HF_AUX_LOSS_DEFAULT = 0.001


def num_experts(hf: dict) -> int:
    """`num_experts` (the published Qwen configs) or `num_local_experts` (transformers >= 5)."""
    for key in ("num_experts", "num_local_experts"):
        if hf.get(key) is not None:
            return int(hf[key])
    raise ConfigError(
        [
            (
                "model.model",
                "config.json has neither 'num_experts' nor "
                "'num_local_experts' (a mixture-of-experts model needs its expert count)",
            )
        ]
    )


def moe_layer_freq(hf: dict) -> int | list[int]:
    """megatron's moe_layer_freq from transformers' rule: 1 (every layer, the published Qwen
    MoE models) or the per-layer 0/1 list."""
    layers = int(hf["num_hidden_layers"])
    step = hf.get("decoder_sparse_step")
    step = 1 if step is None else step
    dense = hf.get("mlp_only_layers") or []
    problems = []
    if not isinstance(step, int) or isinstance(step, bool) or step < 1:
        problems.append(
            ("model.model", f"config.json decoder_sparse_step={step!r} is not a positive integer")
        )
    listed = isinstance(dense, list)
    if not listed or any(not isinstance(i, int) or not 0 <= i < layers for i in dense):
        problems.append(
            (
                "model.model",
                f"config.json mlp_only_layers={dense!r} must list layer indices 0-{layers - 1}",
            )
        )
    if problems:
        raise ConfigError(problems)
    pattern = [int(i not in dense and (i + 1) % step == 0) for i in range(layers)]
    if not any(pattern):
        raise ConfigError(
            [
                (
                    "model.model",
                    f"config.json decoder_sparse_step={step} and mlp_only_layers={dense} leave "
                    "no MoE layer (a dense model: use its dense family)",
                )
            ]
        )
    return 1 if all(pattern) else pattern


MOE_CONFIG = (
    ConfigField("num_moe_experts", "num_experts", num_experts, int),
    ConfigField("moe_layer_freq", "decoder_sparse_step, mlp_only_layers", derive=moe_layer_freq),
    ConfigField("moe_router_topk", "num_experts_per_tok", convert=int),
    ConfigField("moe_ffn_hidden_size", "moe_intermediate_size", convert=int),
    ConfigField(
        "moe_router_pre_softmax", "norm_topk_prob", not HF_NORM_TOPK_DEFAULT, lambda v: not bool(v)
    ),
    ConfigField("moe_aux_loss_coeff", "router_aux_loss_coef", HF_AUX_LOSS_DEFAULT, float),
)

SHARED_EXPERT_CONFIG = (
    ConfigField(
        "moe_shared_expert_intermediate_size", "shared_expert_intermediate_size", convert=int
    ),
)

MOE_CONSTANTS = {
    "moe_router_score_function": "softmax",
    "moe_router_load_balancing_type": "aux_loss",
    "moe_router_dtype": "fp32",
    "moe_token_dispatcher_type": "alltoall",
}

# The dense table's attention, norms, embeddings and head, and its MLP rows for the dense layers.
ATTENTION_PARAMS = tuple(p for p in DENSE_PARAMS if ".mlp." not in p.megatron)
DENSE_MLP_PARAMS = tuple(
    dataclasses.replace(p, layers="dense") for p in DENSE_PARAMS if ".mlp." in p.megatron
)

E = H + "mlp.experts.{expert}."
MOE_PARAMS = (
    Param(L + "mlp.router.weight", (H + "mlp.gate.weight",), "replicated", layers="moe"),
    Param(
        L + "mlp.experts.linear_fc1.weight",
        (E + "gate_proj.weight", E + "up_proj.weight"),
        "expert_gate_up",
        layers="moe",
    ),
    Param(
        L + "mlp.experts.linear_fc2.weight", (E + "down_proj.weight",), "expert_row", layers="moe"
    ),
)

S = H + "mlp.shared_expert."
SHARED_EXPERT_PARAMS = (
    Param(
        L + "mlp.shared_experts.linear_fc1.weight",
        (S + "gate_proj.weight", S + "up_proj.weight"),
        "gate_up",
        layers="moe",
    ),
    Param(
        L + "mlp.shared_experts.linear_fc2.weight", (S + "down_proj.weight",), "row", layers="moe"
    ),
    Param(
        L + "mlp.shared_experts.gate_weight",
        (H + "mlp.shared_expert_gate.weight",),
        "replicated",
        layers="moe",
    ),
)


def moe_family(
    name: str,
    architecture: str,
    model_type: str,
    *,
    constants: dict,
    params: tuple,
    require: tuple,
    notes: str,
    config: tuple = (),
) -> ModelFamily:
    """A MoE decoder family: the dense decoder's attention, norms and embeddings, the MoE rows
    above, and what the family adds (`params`, `require`, `constants`, `config`)."""
    return ModelFamily(
        name=name,
        architectures=(architecture,),
        model_types=(model_type,),
        config=dense_decoder_config(tie_default=False) + MOE_CONFIG + config,
        constants={**DENSE_CONSTANTS, **MOE_CONSTANTS, **constants},
        params=ATTENTION_PARAMS + DENSE_MLP_PARAMS + MOE_PARAMS + params,
        ignore=DENSE_IGNORE,
        require=DENSE_REQUIRE + require,
        notes=notes,
    )
