"""Model shapes for planning: from a checkpoint's config.json or a well-known name (torch-free).

The shape itself is `remote_runtime.spec.shape.ModelShape` (the one the runtime counts FLOPs
with); `shape_from_hf_config(hf)` goes through the runtime's model families, so the planner sees
exactly the numbers the runtime builds the model from and refuses the same checkpoints.

`load_model_config(ref)` accepts a checkpoint directory, a config.json path, or the name of a
well-known shape (`qwen3-8b`), so a plan can be made before the weights are downloaded.
"""

from __future__ import annotations

import json
from pathlib import Path

from remote_runtime.spec.errors import ConfigError
from remote_runtime.spec.shape import ModelShape

__all__ = [
    "ModelShape",
    "NAMED_CONFIGS",
    "as_shape",
    "load_model_config",
    "named_shape",
    "shape_from_hf_config",
]


def as_shape(model_config: dict | ModelShape) -> ModelShape:
    """A shape, from a config.json dict or as given."""
    if isinstance(model_config, ModelShape):
        return model_config
    return ModelShape.from_hf_config(model_config)


def shape_from_hf_config(hf: dict) -> ModelShape:
    """The model's shape; raises ConfigError for architectures the runtime cannot train."""
    return ModelShape.from_hf_config(hf)


def _qwen3(hidden, layers, heads, ffn, tied, kv=8):
    return {
        "architectures": ["Qwen3ForCausalLM"],
        "model_type": "qwen3",
        "hidden_size": hidden,
        "num_hidden_layers": layers,
        "num_attention_heads": heads,
        "num_key_value_heads": kv,
        "head_dim": 128,
        "intermediate_size": ffn,
        "vocab_size": 151936,
        "tie_word_embeddings": tied,
        "rms_norm_eps": 1e-6,
        "rope_theta": 1000000.0,
        "max_position_embeddings": 40960,
        "hidden_act": "silu",
    }


def _llama3(hidden, layers, heads, ffn, tied=False, head_dim=None):
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": hidden,
        "num_hidden_layers": layers,
        "num_attention_heads": heads,
        "num_key_value_heads": 8,
        "head_dim": head_dim or hidden // heads,
        "intermediate_size": ffn,
        "vocab_size": 128256,
        "tie_word_embeddings": tied,
        "rms_norm_eps": 1e-5,
        "rope_theta": 500000.0,
        "max_position_embeddings": 131072,
        "hidden_act": "silu",
        "rope_scaling": {
            "rope_type": "llama3",
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 8192,
        },
    }


def _qwen3_moe(hidden, layers, heads, kv, experts, topk, moe_ffn, ffn):
    """Qwen3-MoE config.json as published (Qwen/Qwen3-30B-A3B, Qwen/Qwen3-235B-A22B)."""
    return {
        **_qwen3(hidden, layers, heads, ffn, False, kv),
        "architectures": ["Qwen3MoeForCausalLM"],
        "model_type": "qwen3_moe",
        "num_experts": experts,
        "num_experts_per_tok": topk,
        "moe_intermediate_size": moe_ffn,
        "norm_topk_prob": True,
        "decoder_sparse_step": 1,
        "mlp_only_layers": [],
        "router_aux_loss_coef": 0.001,
        "attention_bias": False,
    }


def _qwen2_moe(hidden, layers, heads, kv, experts, topk, moe_ffn, shared_ffn, ffn, max_pos):
    """Qwen2-MoE config.json as published (Qwen/Qwen1.5-MoE-A2.7B, Qwen/Qwen2-57B-A14B)."""
    return {
        "architectures": ["Qwen2MoeForCausalLM"],
        "model_type": "qwen2_moe",
        "hidden_size": hidden,
        "num_hidden_layers": layers,
        "num_attention_heads": heads,
        "num_key_value_heads": kv,
        "intermediate_size": ffn,
        "vocab_size": 151936,
        "tie_word_embeddings": False,
        "rms_norm_eps": 1e-6,
        "rope_theta": 1000000.0,
        "max_position_embeddings": max_pos,
        "hidden_act": "silu",
        "use_sliding_window": False,
        "num_experts": experts,
        "num_experts_per_tok": topk,
        "moe_intermediate_size": moe_ffn,
        "shared_expert_intermediate_size": shared_ffn,
        "norm_topk_prob": False,
        "decoder_sparse_step": 1,
        "router_aux_loss_coef": 0.001,
    }


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
    "qwen3-30b-a3b": _qwen3_moe(2048, 48, 32, 4, 128, 8, 768, 6144),
    "qwen3-235b-a22b": _qwen3_moe(4096, 94, 64, 4, 128, 8, 1536, 12288),
    "qwen1.5-moe-a2.7b": _qwen2_moe(2048, 24, 16, 16, 60, 4, 1408, 5632, 5632, 8192),
    "qwen2-57b-a14b": _qwen2_moe(3584, 28, 28, 4, 64, 8, 2560, 20480, 18944, 32768),
}


_HUB_PREFIXES = (
    ("meta-llama-3.1-", "llama3-"),
    ("meta-llama-3-", "llama3-"),
    ("llama-3.1-", "llama3-"),
    ("llama-3.3-", "llama3-"),
    ("llama-3-", "llama3-"),
    ("llama-3.2-", "llama3.2-"),
)


def named_shape(ref: str) -> str | None:
    """The NAMED_CONFIGS key for a shape name or a well-known hub id (`Qwen/Qwen3-8B`,
    `meta-llama/Llama-3.1-8B-Instruct`), else None."""
    key = ref.strip().lower().rsplit("/", 1)[-1]
    for suffix in ("-instruct", "-base"):
        key = key.removesuffix(suffix)
    for prefix, replacement in _HUB_PREFIXES:
        if key.startswith(prefix):
            key = replacement + key[len(prefix) :]
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
        raise ConfigError(
            [
                (
                    "model.model",
                    f"{path} not found: pass a Hugging Face checkpoint "
                    f"directory, its config.json, or a known shape "
                    f"({', '.join(NAMED_CONFIGS)})",
                )
            ]
        )
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ConfigError(
            [("model.model", f"{path}:{exc.lineno}: invalid JSON ({exc.msg})")]
        ) from None
    if not isinstance(data, dict):
        raise ConfigError([("model.model", f"{path}: not a config.json object")])
    return data
