"""Model families: which Hugging Face architectures we run, and how they map to megatron-core.

Each family is one declarative module (see `base.py`). To add one, write a module with a
`FAMILY = ModelFamily(...)` and list it in `FAMILIES`. Torch-free: the operator validates jobs
with it.
"""

from __future__ import annotations

from remote_runtime.spec.config import ConfigError
from remote_runtime.spec.families import llama, qwen2, qwen2_moe, qwen3, qwen3_moe
from remote_runtime.spec.families.base import ModelFamily

FAMILIES: dict[str, ModelFamily] = {
    f.name: f
    for f in (llama.FAMILY, qwen2.FAMILY, qwen3.FAMILY, qwen3_moe.FAMILY, qwen2_moe.FAMILY)
}

__all__ = ["FAMILIES", "ModelFamily", "family_for_hf_config", "get_family", "supported_summary"]


def supported_summary() -> str:
    return "; ".join(
        f"{', '.join(f.architectures)} ({f.name}: {f.notes})" for f in FAMILIES.values()
    )


def get_family(name: str) -> ModelFamily:
    if name not in FAMILIES:
        raise ConfigError(
            [
                (
                    "model.model_type",
                    f"unknown model family {name!r}; supported: {', '.join(FAMILIES)}",
                )
            ]
        )
    return FAMILIES[name]


def family_for_hf_config(hf: dict) -> ModelFamily:
    """The family of a config.json: by `architectures`, else by `model_type`.

    Raises ConfigError listing the supported architectures for anything else.
    """
    archs = hf.get("architectures") or []
    model_type = hf.get("model_type")
    for family in FAMILIES.values():
        if any(a in family.architectures for a in archs):
            return family
    if not archs:
        for family in FAMILIES.values():
            if model_type in family.model_types:
                return family
    shown = archs[0] if archs else f"model_type {model_type!r}"
    raise ConfigError(
        [
            (
                "model.model",
                f"architecture {shown} is not supported; supported: {supported_summary()}",
            )
        ]
    )
