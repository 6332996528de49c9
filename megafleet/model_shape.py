"""The shape of a model, from its config.json, for planning and memory estimates (torch-free).

`shape_from_hf_config(hf)` asks the runtime's model families
(`remote_runtime.spec.families.family_for_hf_config(hf).transformer_config_kwargs(hf)`), so the
planner sees exactly the numbers the runtime builds the model from and refuses the same
checkpoints. Where that package is not importable (an operator install without the runtime
files), it reads the few config.json fields of the dense Llama/Qwen layouts itself.

`load_model_config(ref)` accepts a checkpoint directory, a config.json path, or the name of a
well-known shape (`qwen3-8b`), so a plan can be made before the weights are downloaded.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

from remote_runtime.spec.config import ConfigError


@dataclass(frozen=True)
class ModelShape:
    family: str
    num_layers: int
    hidden_size: int
    num_attention_heads: int
    num_query_groups: int
    kv_channels: int  # head dim
    ffn_hidden_size: int
    vocab_size: int
    tie_word_embeddings: bool = False
    qkv_bias: bool = False
    qk_layernorm: bool = False

    def layer_params(self) -> int:
        h, d = self.hidden_size, self.kv_channels
        qkv_out = (self.num_attention_heads + 2 * self.num_query_groups) * d
        attn = h * qkv_out + (qkv_out if self.qkv_bias else 0) + self.num_attention_heads * d * h
        mlp = 3 * h * self.ffn_hidden_size  # SwiGLU: gate, up, down
        norms = 2 * h + (2 * d if self.qk_layernorm else 0)
        return attn + mlp + norms

    def total_params(self) -> int:
        """Parameters of the Hugging Face checkpoint (unpadded vocabulary)."""
        embed = self.vocab_size * self.hidden_size
        head = 0 if self.tie_word_embeddings else embed
        return self.num_layers * self.layer_params() + embed + head + self.hidden_size

    def to_dict(self) -> dict:
        return {**asdict(self), "params": self.total_params()}


def as_shape(model_config: dict | ModelShape) -> ModelShape:
    """A shape, from a config.json dict or as given."""
    if isinstance(model_config, ModelShape):
        return model_config
    return shape_from_hf_config(model_config)


def shape_from_hf_config(hf: dict) -> ModelShape:
    """The model's shape; raises ConfigError for architectures the runtime cannot train."""
    try:
        from remote_runtime.spec.families import family_for_hf_config
    except ModuleNotFoundError as exc:
        if exc.name not in ("remote_runtime.spec.families", "remote_runtime"):
            raise
        return _shape_without_families(hf)
    family = family_for_hf_config(hf)
    tc = family.transformer_config_kwargs(hf)
    heads = tc["num_attention_heads"]
    return ModelShape(
        family=family.name, num_layers=tc["num_layers"], hidden_size=tc["hidden_size"],
        num_attention_heads=heads, num_query_groups=tc.get("num_query_groups") or heads,
        kv_channels=tc.get("kv_channels") or tc["hidden_size"] // heads,
        ffn_hidden_size=tc["ffn_hidden_size"],
        vocab_size=int(tc.get("vocab_size", hf["vocab_size"])),
        tie_word_embeddings=bool(tc.get("share_embeddings_and_output_weights", False)),
        qkv_bias=bool(tc.get("add_qkv_bias", False)),
        qk_layernorm=bool(tc.get("qk_layernorm", False)))


# The direct reading, for when remote_runtime.spec.families is not importable: dense decoders only.
_DIRECT = {"LlamaForCausalLM": "llama", "Qwen2ForCausalLM": "qwen2", "Qwen3ForCausalLM": "qwen3"}


def _shape_without_families(hf: dict) -> ModelShape:
    archs = hf.get("architectures") or []
    family = next((_DIRECT[a] for a in archs if a in _DIRECT), None)
    if family is None and not archs:
        family = hf.get("model_type") if hf.get("model_type") in _DIRECT.values() else None
    if family is None:
        shown = archs[0] if archs else f"model_type {hf.get('model_type')!r}"
        raise ConfigError([("model.model", f"architecture {shown} is not supported; supported: "
                            f"{', '.join(_DIRECT)}")])
    missing = [k for k in ("num_hidden_layers", "hidden_size", "intermediate_size",
                           "num_attention_heads", "vocab_size") if hf.get(k) is None]
    if missing:
        raise ConfigError([("model.model", f"config.json has no {missing[0]!r}")])
    heads = int(hf["num_attention_heads"])
    return ModelShape(
        family=family, num_layers=int(hf["num_hidden_layers"]), hidden_size=int(hf["hidden_size"]),
        num_attention_heads=heads, num_query_groups=int(hf.get("num_key_value_heads") or heads),
        kv_channels=int(hf.get("head_dim") or hf["hidden_size"] // heads),
        ffn_hidden_size=int(hf["intermediate_size"]), vocab_size=int(hf["vocab_size"]),
        tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
        qkv_bias=family == "qwen2", qk_layernorm=family == "qwen3")


def _qwen3(hidden, layers, heads, ffn, tied, kv=8):
    return {"architectures": ["Qwen3ForCausalLM"], "model_type": "qwen3", "hidden_size": hidden,
            "num_hidden_layers": layers, "num_attention_heads": heads, "num_key_value_heads": kv,
            "head_dim": 128, "intermediate_size": ffn, "vocab_size": 151936,
            "tie_word_embeddings": tied, "rms_norm_eps": 1e-6, "rope_theta": 1000000.0,
            "max_position_embeddings": 40960, "hidden_act": "silu"}


def _llama3(hidden, layers, heads, ffn, tied=False, head_dim=None):
    return {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": hidden,
            "num_hidden_layers": layers, "num_attention_heads": heads, "num_key_value_heads": 8,
            "head_dim": head_dim or hidden // heads, "intermediate_size": ffn,
            "vocab_size": 128256, "tie_word_embeddings": tied, "rms_norm_eps": 1e-5,
            "rope_theta": 500000.0, "max_position_embeddings": 131072, "hidden_act": "silu",
            "rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                             "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}}


# config.json of well-known checkpoints (the published shapes), for planning before download
# and for the benchmarks' named shapes.
NAMED_CONFIGS = {
    "qwen3-0.6b": _qwen3(1024, 28, 16, 3072, True),
    "qwen3-1.7b": _qwen3(2048, 28, 16, 6144, True),
    "qwen3-4b": _qwen3(2560, 36, 32, 9728, True),
    "qwen3-8b": _qwen3(4096, 36, 32, 12288, False),
    "qwen3-14b": _qwen3(5120, 40, 40, 17408, False),
    "qwen3-32b": _qwen3(5120, 64, 64, 25600, False),
    "llama3.2-1b": _llama3(2048, 16, 32, 8192, tied=True, head_dim=64),
    "llama3.2-3b": _llama3(3072, 28, 24, 8192, tied=True, head_dim=128),
    "llama3-8b": _llama3(4096, 32, 32, 14336),
    "llama3-70b": _llama3(8192, 80, 64, 28672),
}


_HUB_PREFIXES = (("meta-llama-3.1-", "llama3-"), ("meta-llama-3-", "llama3-"),
                 ("llama-3.1-", "llama3-"), ("llama-3.3-", "llama3-"), ("llama-3-", "llama3-"),
                 ("llama-3.2-", "llama3.2-"))


def named_shape(ref: str) -> str | None:
    """The NAMED_CONFIGS key for a shape name or a well-known hub id (`Qwen/Qwen3-8B`,
    `meta-llama/Llama-3.1-8B-Instruct`), else None."""
    key = ref.strip().lower().rsplit("/", 1)[-1]
    for suffix in ("-instruct", "-base"):
        key = key.removesuffix(suffix)
    for prefix, replacement in _HUB_PREFIXES:
        if key.startswith(prefix):
            key = replacement + key[len(prefix):]
    return key if key in NAMED_CONFIGS else None


def load_model_config(ref: str) -> dict:
    """config.json as a dict from a checkpoint directory, a .json file, or the published shape
    of a NAMED_CONFIGS name or well-known hub id that is not a local path."""
    path = Path(ref).expanduser()
    name = None if path.exists() else named_shape(ref)
    if name:
        return dict(NAMED_CONFIGS[name])
    if path.is_dir():
        path = path / "config.json"
    if not path.is_file():
        raise ConfigError([("model.model", f"{path} not found: pass a Hugging Face checkpoint "
                            f"directory, its config.json, or a known shape "
                            f"({', '.join(NAMED_CONFIGS)})")])
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ConfigError([("model.model",
                            f"{path}:{exc.lineno}: invalid JSON ({exc.msg})")]) from None
    if not isinstance(data, dict):
        raise ConfigError([("model.model", f"{path}: not a config.json object")])
    return data
