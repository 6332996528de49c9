"""The declarative types every model family is written in, and the torch-free logic over them.

A family says three things and nothing imperative:

* `config`: pairs (Megatron key <- config.json key), plus constants and the config.json values we
  support (`Require`), from which `transformer_config_kwargs` builds the model's settings;
* `params`: the name table, one `Param` per Megatron parameter, with `{layer}` wildcards, the HF
  tensor(s) it comes from (an `{expert}` wildcard in an HF name: one tensor per expert, stacked into
  one Megatron parameter of the layer's local experts) and the name of a shared transform
  (`TRANSFORMS`, implemented once in `remote_runtime.bridge.transforms`);
* `ignore`: HF keys that are deliberately not loaded, each with the reason.

Conversion is total: `expected_hf_keys` lists every HF tensor the table needs, and the bridge
refuses a checkpoint with missing or unclaimed tensors, or a model with an unmapped parameter.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, Callable

from remote_runtime.spec.config import ConfigError

# Shared tensor transforms (torch code in remote_runtime/bridge/transforms.py):
#   replicated  one HF tensor, the same on every tensor-parallel rank (norm weights)
#   column      one HF tensor split along dim 0 (output features)
#   row         one HF tensor split along dim 1 (input features)
#   vocab       one HF tensor split along dim 0 after padding the vocabulary (embeddings, head)
#   qkv         q, k, v (weights or biases) interleaved per query group, split by groups
#   gate_up     gate, up stacked per rank as [gate_r; up_r], split along dim 0
#   expert_gate_up  per-expert gate, up ({expert}): this EP rank's experts stacked on a new dim 0,
#               each [gate_r; up_r] for its expert-TP rank r
#   expert_row  per-expert down ({expert}): this EP rank's experts stacked, each split along dim 1
#               by expert-TP
TRANSFORMS = (
    "replicated",
    "column",
    "row",
    "vocab",
    "qkv",
    "gate_up",
    "expert_gate_up",
    "expert_row",
)
EXPERT_TRANSFORMS = ("expert_gate_up", "expert_row")
CONDITIONS = (None, "tied", "untied")
LAYER_KINDS = (None, "moe", "dense")

# Keys of `transformer_config_kwargs` that are not TransformerConfig fields: the model builder
# passes them to GPTModel / the rotary embedding instead.
MODEL_KEYS = (
    "vocab_size",
    "max_position_embeddings",
    "share_embeddings_and_output_weights",
    "activation",
    "position_embedding_type",
    "rotary_base",
    "rope_scaling",
)

_REQUIRED = object()


@dataclass(frozen=True)
class ConfigField:
    """One setting: `megatron` key <- config.json `hf` key (or `default(hf)` when absent)."""

    megatron: str
    hf: str
    default: Any = _REQUIRED  # a value, or a callable(hf_config) -> value
    convert: Callable[[Any], Any] = lambda v: v
    # computed from the whole config.json (several keys): derive(hf_config) -> value; `hf`
    # then only names the keys for messages
    derive: Callable[[dict], Any] | None = None


@dataclass(frozen=True)
class Require:
    """A config.json value we support: absent is fine, anything outside `allowed` is an error."""

    hf: str
    allowed: tuple
    each: bool = False  # the value is a list; every element must be allowed
    why: str = ""


@dataclass(frozen=True)
class Param:
    """One Megatron parameter (name relative to GPTModel) and the HF tensors it is made from."""

    megatron: str
    hf: tuple[str, ...]
    transform: str
    when: str | None = None  # "tied" / "untied": only for checkpoints with/without tied embeddings
    save: bool = True  # False: a copy of another parameter, not written back (tied output layer)
    # "moe" / "dense": a `{layer}` row of the MoE layers only, or of the dense-MLP layers only
    # (models that mix them: megatron's moe_layer_freq); None: every layer
    layers: str | None = None

    def __post_init__(self):
        assert self.transform in TRANSFORMS, self.transform
        assert self.when in CONDITIONS, self.when
        assert self.layers in LAYER_KINDS, self.layers
        assert len(self.hf) == {"qkv": 3, "gate_up": 2, "expert_gate_up": 2}.get(
            self.transform, 1
        ), self
        assert all(("{expert}" in k) == self.per_expert for k in self.hf), self

    @property
    def per_expert(self) -> bool:
        return self.transform in EXPERT_TRANSFORMS


@dataclass(frozen=True)
class Ignore:
    """An HF key that is present in some checkpoints and deliberately not loaded."""

    hf: str
    reason: str
    when: str | None = None


@dataclass(frozen=True)
class ModelFamily:
    name: str
    architectures: tuple[str, ...]  # config.json "architectures"
    model_types: tuple[str, ...]  # config.json "model_type"
    config: tuple[ConfigField, ...]
    constants: dict
    params: tuple[Param, ...]
    ignore: tuple[Ignore, ...] = ()
    require: tuple[Require, ...] = ()
    rope_types: tuple[str, ...] = ("default",)
    notes: str = ""
    _compiled: dict = field(default_factory=dict, compare=False, repr=False)

    # ---- configuration ---------------------------------------------------------------------
    def transformer_config_kwargs(self, hf: dict) -> dict:
        """config.json -> TransformerConfig kwargs plus the `MODEL_KEYS`; plain JSON values.

        Raises ConfigError naming the config.json field for anything this family cannot run.
        """
        problems = [("model.model", msg) for msg in self.unsupported(hf)]
        out: dict[str, Any] = {}
        for f in self.config:
            if f.derive is not None:
                try:
                    out[f.megatron] = f.derive(hf)
                except ConfigError as exc:
                    problems.extend(exc.problems)
            elif f.hf in hf and hf[f.hf] is not None:
                out[f.megatron] = f.convert(hf[f.hf])
            elif f.default is _REQUIRED:
                problems.append(
                    ("model.model", f"config.json has no {f.hf!r} ({self.name} needs it)")
                )
            else:
                out[f.megatron] = f.default(hf) if callable(f.default) else f.default
        if problems:
            raise ConfigError(problems)
        out.update(self.constants)
        out.update(rope_settings(hf, self))
        return out

    def unsupported(self, hf: dict) -> list[str]:
        msgs = []
        for req in self.require:
            value = hf.get(req.hf)
            values = value if (req.each and isinstance(value, list)) else [value]
            bad = [v for v in values if v is not None and v not in req.allowed]
            if bad:
                why = f" ({req.why})" if req.why else ""
                msgs.append(
                    f"config.json {req.hf}={bad[0]!r} is not supported for {self.name}; "
                    f"supported: {', '.join(map(repr, req.allowed))}{why}"
                )
        return msgs

    # ---- name table ------------------------------------------------------------------------
    def active_params(self, tied: bool) -> list[Param]:
        return [p for p in self.params if p.when in (None, "tied" if tied else "untied")]

    def active_ignores(self, tied: bool) -> list[Ignore]:
        return [i for i in self.ignore if i.when in (None, "tied" if tied else "untied")]

    def match_megatron(self, name: str, tied: bool) -> tuple[Param, int | None] | None:
        """(row, layer) for a Megatron parameter name with a *global* layer index, or None."""
        for p in self.active_params(tied):
            layer = _match(p.megatron, name, self._compiled)
            if layer is not False:
                return p, layer
        return None

    def expected_hf_keys(
        self, num_layers: int, tied: bool, num_experts: int = 0, moe_layers=None
    ) -> dict[str, tuple[Param, int | None]]:
        """Every HF key the table loads, mapped to (row, layer); `{expert}` names once per
        expert (num_experts: the model's `num_moe_experts`). `moe_layers`: which layers are MoE
        layers (`moe_layer_flags`; None: all of them), for the rows of one layer kind."""
        flags = [True] * num_layers if moe_layers is None else list(moe_layers)
        out: dict[str, tuple[Param, int | None]] = {}
        for p in self.active_params(tied):
            layers = range(num_layers) if "{layer}" in p.megatron else [None]
            if p.layers is not None:
                layers = [i for i in layers if flags[i] == (p.layers == "moe")]
            for layer in layers:
                for key in p.hf:
                    for name in expert_keys(key, layer, range(num_experts)):
                        out.setdefault(name, (p, layer))
        return out

    def ignored_hf_key(self, key: str, tied: bool) -> Ignore | None:
        for ig in self.active_ignores(tied):
            if _match(ig.hf, key, self._compiled) is not False:
                return ig
        return None


def moe_layer_flags(tc: dict) -> list[bool] | None:
    """Which layers are MoE layers, from `transformer_config_kwargs` (megatron's
    moe_layer_freq: every k-th layer from 0, or a 0/1 list per layer); None for a dense model."""
    if not tc.get("num_moe_experts"):
        return None
    freq, n = tc.get("moe_layer_freq", 1), tc["num_layers"]
    if isinstance(freq, int):
        return [i % freq == 0 for i in range(n)]
    if len(freq) != n:
        raise ValueError(f"moe_layer_freq has {len(freq)} entries for {n} layers")
    return [bool(f) for f in freq]


def fill(pattern: str, layer: int | None) -> str:
    return pattern if layer is None else pattern.replace("{layer}", str(layer))


def expert_keys(pattern: str, layer: int | None, experts) -> list[str]:
    """The HF names of one table entry in one layer: one per expert for `{expert}` patterns."""
    name = fill(pattern, layer)
    if "{expert}" not in name:
        return [name]
    return [name.replace("{expert}", str(e)) for e in experts]


def _match(pattern: str, name: str, cache: dict) -> int | None | bool:
    """Layer index (or None for a layer-free pattern) when name matches pattern, else False."""
    rx = cache.get(pattern)
    if rx is None:
        rx = cache[pattern] = re.compile(
            "^" + re.escape(pattern).replace(re.escape("{layer}"), r"(\d+)") + "$"
        )
    m = rx.match(name)
    if not m:
        return False
    return int(m.group(1)) if m.groups() else None


def rope_settings(hf: dict, family: ModelFamily) -> dict:
    """rotary_base and rope scaling from either config.json layout.

    transformers >= 5 writes `rope_parameters: {rope_theta, rope_type, ...}`; checkpoints saved
    by older versions (most on the Hub) have top-level `rope_theta` and `rope_scaling`.
    """
    params = dict(hf.get("rope_parameters") or {})
    scaling = dict(hf.get("rope_scaling") or {})
    theta = params.get("rope_theta", hf.get("rope_theta", 10000.0))
    merged = {**scaling, **params}
    rope_type = merged.get("rope_type") or merged.get("type") or "default"
    if rope_type not in family.rope_types:
        raise ConfigError(
            [
                (
                    "model.model",
                    f"config.json rope type {rope_type!r} is not supported for "
                    f"{family.name}; supported: {', '.join(family.rope_types)}",
                )
            ]
        )
    out: dict[str, Any] = {"rotary_base": float(theta), "rope_scaling": None}
    if rope_type == "llama3":
        out["rope_scaling"] = {
            "rope_type": "llama3",
            "factor": float(merged["factor"]),
            "low_freq_factor": float(merged.get("low_freq_factor", 1.0)),
            "high_freq_factor": float(merged.get("high_freq_factor", 4.0)),
            "original_max_position_embeddings": int(
                merged.get("original_max_position_embeddings", 8192)
            ),
        }
    return out


def head_dim_default(hf: dict) -> int:
    return hf["hidden_size"] // hf["num_attention_heads"]


def kv_heads_default(hf: dict) -> int:
    return hf["num_attention_heads"]


def tied(hf: dict) -> bool:
    return bool(hf.get("tie_word_embeddings", False))


# The configuration shared by the dense decoder families (Llama 3, Qwen2, Qwen3): only the
# defaults differ from family to family, which each family states in its own module.
def dense_decoder_config(tie_default: bool) -> tuple[ConfigField, ...]:
    return (
        ConfigField("num_layers", "num_hidden_layers"),
        ConfigField("hidden_size", "hidden_size"),
        ConfigField("ffn_hidden_size", "intermediate_size"),
        ConfigField("num_attention_heads", "num_attention_heads"),
        ConfigField("num_query_groups", "num_key_value_heads", kv_heads_default),
        ConfigField("kv_channels", "head_dim", head_dim_default),
        ConfigField("layernorm_epsilon", "rms_norm_eps", 1e-6, float),
        ConfigField("attention_dropout", "attention_dropout", 0.0, float),
        ConfigField("vocab_size", "vocab_size"),
        ConfigField("max_position_embeddings", "max_position_embeddings", 4096),
        ConfigField(
            "share_embeddings_and_output_weights", "tie_word_embeddings", tie_default, bool
        ),
    )


DENSE_CONSTANTS = {
    "normalization": "RMSNorm",
    "gated_linear_unit": True,
    "activation": "silu",
    "add_bias_linear": False,
    "hidden_dropout": 0.0,
    "position_embedding_type": "rope",
}

# The name table of a Llama-style dense decoder. Qwen2 adds q/k/v biases, Qwen3 q/k norms.
L = "decoder.layers.{layer}."
H = "model.layers.{layer}."
DENSE_PARAMS = (
    Param("embedding.word_embeddings.weight", ("model.embed_tokens.weight",), "vocab"),
    Param(L + "input_layernorm.weight", (H + "input_layernorm.weight",), "replicated"),
    Param(
        L + "self_attention.linear_qkv.weight",
        (
            H + "self_attn.q_proj.weight",
            H + "self_attn.k_proj.weight",
            H + "self_attn.v_proj.weight",
        ),
        "qkv",
    ),
    Param(L + "self_attention.linear_proj.weight", (H + "self_attn.o_proj.weight",), "row"),
    Param(L + "pre_mlp_layernorm.weight", (H + "post_attention_layernorm.weight",), "replicated"),
    Param(
        L + "mlp.linear_fc1.weight",
        (H + "mlp.gate_proj.weight", H + "mlp.up_proj.weight"),
        "gate_up",
    ),
    Param(L + "mlp.linear_fc2.weight", (H + "mlp.down_proj.weight",), "row"),
    Param("decoder.final_layernorm.weight", ("model.norm.weight",), "replicated"),
    Param("output_layer.weight", ("lm_head.weight",), "vocab", when="untied"),
    # Tied: the last pipeline stage keeps its own copy of the embedding as the output layer
    # (Megatron keeps both in sync); with one stage there is no separate parameter.
    Param("output_layer.weight", ("model.embed_tokens.weight",), "vocab", when="tied", save=False),
)

DENSE_IGNORE = (
    Ignore(
        "lm_head.weight",
        "tied to model.embed_tokens.weight (tie_word_embeddings=true)",
        when="tied",
    ),
    Ignore(H + "self_attn.rotary_emb.inv_freq", "a buffer recomputed from config.json"),
)

DENSE_REQUIRE = (
    Require("hidden_act", ("silu",)),
    Require(
        "layer_types", ("full_attention",), each=True, why="sliding-window layers are not supported"
    ),
    Require("use_sliding_window", (False,)),
)
