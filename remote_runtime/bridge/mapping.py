"""Where the family's name table meets a live model and a checkpoint.

* `local_params`: this rank's Megatron parameters under their *global* names (megatron numbers
  the layers of a pipeline stage from 0; the table uses the model's layer numbers).
* `check_checkpoint_keys`: every HF tensor is loaded or explicitly ignored, none is missing.
* `ConversionError`: what is wrong, by name, grouped over layers so a missing tensor family reads
  as one line, not one per layer.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from remote_runtime.spec.families.base import ModelFamily, Param

_LAYER = re.compile(r"\.(\d+)\.")


class ConversionError(ValueError):
    """Names that do not line up between a checkpoint, the family table and the model."""

    def __init__(self, problems: list[tuple[str, list[str]]], where: str = ""):
        self.problems = problems
        lines = [f"{what}: {summarize(names)}" for what, names in problems if names]
        head = f"cannot convert {where}" if where else "cannot convert"
        super().__init__(head + ":\n  " + "\n  ".join(lines))


def summarize(names: list[str], limit: int = 12) -> str:
    """'model.layers.{0-27}.self_attn.q_norm.weight, lm_head.weight' style list."""
    groups: dict[str, list[int]] = {}
    for name in sorted(names):
        m = _LAYER.search(name)
        key = name if not m else name[: m.start()] + ".{}." + name[m.end() :]
        groups.setdefault(key, []).append(int(m.group(1)) if m else -1)
    shown = []
    for key, layers in groups.items():
        if "{}" in key:
            lo, hi = min(layers), max(layers)
            span = (
                str(lo)
                if len(layers) == 1
                else (f"{lo}-{hi}" if len(layers) == hi - lo + 1 else ",".join(map(str, layers)))
            )
            key = key.replace("{}", "{" + span + "}" if len(layers) > 1 else span)
        shown.append(key)
    more = f" (and {len(shown) - limit} more)" if len(shown) > limit else ""
    return ", ".join(shown[:limit]) + more


def unwrap(model):
    """The GPTModel inside DDP / Float16Module / torch DDP wrappers."""
    from megatron.core.models.gpt import GPTModel

    while not isinstance(model, GPTModel) and hasattr(model, "module"):
        model = model.module
    if not isinstance(model, GPTModel):
        raise TypeError(
            f"expected a megatron GPTModel (possibly wrapped), got {type(model).__name__}"
        )
    return model


def global_name(model, name: str) -> str:
    """decoder.layers.<local>.x -> decoder.layers.<global>.x (layer_number is 1-based, global)."""
    m = re.match(r"decoder\.layers\.(\d+)\.", name)
    if not m:
        return name
    layer = model.decoder.layers[int(m.group(1))].layer_number - 1
    return f"decoder.layers.{layer}.{name[m.end() :]}"


# Transformer Engine fuses the pre-attention / pre-MLP norms into the following linear layer;
# the table is written for the local spec, so translate TE's names to it.
_TE_NAMES = (
    (".self_attention.linear_qkv.layer_norm_weight", ".input_layernorm.weight"),
    (".mlp.linear_fc1.layer_norm_weight", ".pre_mlp_layernorm.weight"),
)


def table_name(name: str) -> str:
    for te, local in _TE_NAMES:
        if name.endswith(te):
            return name[: -len(te)] + local
    return name


@dataclass
class LocalParam:
    name: str  # global, table spelling
    param: object  # torch.nn.Parameter
    row: Param
    layer: int | None


def local_params(chunks, family: ModelFamily, tied: bool) -> list[LocalParam]:
    """Every parameter of this rank's chunks, matched to its table row; unmapped ones raise."""
    out, unmapped = [], []
    for chunk in chunks:
        model = unwrap(chunk)
        for name, param in model.named_parameters():
            if getattr(param, "is_lora", False):  # adapters: remote_runtime.bridge.adapter
                continue
            gname = table_name(global_name(model, name))
            hit = family.match_megatron(gname, tied)
            if hit is None:
                unmapped.append(gname)
            else:
                out.append(LocalParam(gname, param, hit[0], hit[1]))
    if unmapped:
        raise ConversionError(
            [(f"Megatron parameters with no entry in the {family.name} table", unmapped)]
        )
    return out


def check_checkpoint_keys(
    family: ModelFamily,
    keys: list[str],
    num_layers: int,
    tied: bool,
    where: str,
    num_experts: int = 0,
    moe_layers=None,
) -> dict:
    """The expected HF keys ({key: (row, layer)}); raises listing missing and unclaimed keys."""
    expected = family.expected_hf_keys(num_layers, tied, num_experts, moe_layers)
    present = set(keys)
    missing = sorted(set(expected) - present)
    extra = sorted(k for k in present - set(expected) if family.ignored_hf_key(k, tied) is None)
    if missing or extra:
        raise ConversionError(
            [
                ("missing from the checkpoint", missing),
                (
                    f"in the checkpoint but not in the {family.name} table "
                    "(neither loaded nor ignored)",
                    extra,
                ),
            ],
            where,
        )
    return expected
