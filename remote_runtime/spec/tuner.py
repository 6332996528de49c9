"""LoRA options: checked without config.json (`tuner_problems`), then resolved against the model
family's name table (`resolve_lora`). Torch-free: the operator validates jobs with it.

Adapters sit on megatron's linear layers. A fused layer carries one adapter per Hugging Face
module it is made of (`linear_qkv`: q_proj, k_proj, v_proj; `linear_fc1`: gate_proj, up_proj), so
the saved adapter is the one PEFT would have trained. On a mixture-of-experts model the routed
experts' stacked weights (`mlp.experts.linear_fc1/fc2`) carry one such adapter per expert (HF
`mlp.experts.{expert}.gate_proj`, ...); an HF name (gate_proj) selects the dense or shared-expert
module and the experts' alike, as PEFT's target_modules does. The router is never adapted.
Which HF modules make up a megatron layer, and how its weight is split under tensor parallelism,
comes from the family table (`Param.hf`, `Param.transform`): no per-model names here.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

from remote_runtime.spec.config import ConfigError, TunerConfig

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
ALL_LINEAR = "all-linear"
# Transforms of the family table that are linear layers inside a decoder layer, how the LoRA
# pair is split under tensor parallelism: column-parallel layers split B, row-parallel split A.
# The routed experts' stacked weights (one adapter per expert) split the same way under expert TP.
ADAPTABLE = {
    "qkv": "column",
    "gate_up": "column",
    "column": "column",
    "row": "row",
    "expert_gate_up": "column",
    "expert_row": "row",
}
MEGATRON_LINEARS = ("linear_qkv", "linear_proj", "linear_fc1", "linear_fc2")
# modules_to_save: PEFT's short name -> (the megatron parameter trained in full, its HF module)
SAVE_MODULES = {
    "embed_tokens": ("embedding.word_embeddings.weight", "model.embed_tokens"),
    "lm_head": ("output_layer.weight", "lm_head"),
}
SAVE_ALIASES = {"word_embeddings": "embed_tokens", "output_layer": "lm_head"}
_LORA_LEAVES = (
    "lora_rank",
    "lora_alpha",
    "lora_dropout",
    "target_modules",
    "modules_to_save",
    "use_rslora",
    "init_lora_weights",
    "merge_lora",
    "adapters",
)


@dataclass(frozen=True)
class LoraTarget:
    """One adapted megatron linear layer (pattern with `{layer}`) and its HF modules."""

    megatron: str  # e.g. decoder.layers.{layer}.self_attention.linear_qkv
    transform: str  # the weight's family transform: qkv | gate_up | column | row
    hf: tuple[str, ...]  # HF module patterns, in the fused weight's order
    active: tuple[bool, ...]  # which of them carry an adapter (q_proj v_proj: k_proj does not)
    layers: str | None = None  # the row's layer kind (Param.layers): "moe" / "dense" layers only

    @property
    def parallel(self) -> str:
        return ADAPTABLE[self.transform]

    @property
    def per_expert(self) -> bool:
        """A routed experts' weight: one adapter per expert (`{expert}` in the HF names)."""
        return "{expert}" in self.hf[0]

    def short_names(self) -> list[str]:
        return [h.rsplit(".", 1)[-1] for h, on in zip(self.hf, self.active) if on]


@dataclass
class LoraSettings:
    """The resolved LoRA setup of a job (an adapter continued with --adapters wins)."""

    rank: int
    alpha: float
    dropout: float
    use_rslora: bool
    init: str  # true | gaussian | false
    targets: list[LoraTarget]
    modules_to_save: list[str] = field(default_factory=list)  # HF names: embed_tokens, lm_head
    adapter_dir: str | None = None
    merge: bool = False

    @property
    def scale(self) -> float:
        return self.alpha / (math.sqrt(self.rank) if self.use_rslora else self.rank)

    def target_names(self) -> list[str]:
        return sorted({n for t in self.targets for n in t.short_names()})

    def summary(self) -> dict:
        return {
            "r": self.rank,
            "lora_alpha": self.alpha,
            "lora_dropout": self.dropout,
            "use_rslora": self.use_rslora,
            "scale": self.scale,
            "target_modules": self.target_names(),
            "modules_to_save": self.modules_to_save,
            "adapters": self.adapter_dir,
            "merge_lora": self.merge,
        }


def tuner_problems(tuner: TunerConfig) -> list[tuple]:
    """What is wrong with the tuner options on their own (no config.json needed)."""
    problems: list[tuple] = []
    if tuner.train_type != "lora":
        default = TunerConfig()
        changed = [k for k in _LORA_LEAVES if getattr(tuner, k) != getattr(default, k)]
        for leaf in changed:
            problems.append(
                (
                    f"tuner.{leaf}",
                    f"applies to LoRA only; train_type is "
                    f"{tuner.train_type!r} (add --train_type lora, or drop it)",
                )
            )
        return problems
    if tuner.lora_rank <= 0:
        problems.append(("tuner.lora_rank", f"must be > 0, got {tuner.lora_rank}"))
    if tuner.lora_alpha <= 0:
        problems.append(("tuner.lora_alpha", f"must be > 0, got {tuner.lora_alpha}"))
    if not 0 <= tuner.lora_dropout < 1:
        problems.append(("tuner.lora_dropout", f"must be in [0, 1), got {tuner.lora_dropout}"))
    names = tuner.target_modules
    if not names:
        problems.append(("tuner.target_modules", f"is empty (use {ALL_LINEAR})"))
    elif ALL_LINEAR in names and len(names) > 1:
        problems.append(
            (
                "tuner.target_modules",
                f"{ALL_LINEAR} already means every linear layer; "
                f"drop the other names ({', '.join(n for n in names if n != ALL_LINEAR)})",
            )
        )
    for name in tuner.modules_to_save:
        if SAVE_ALIASES.get(name, name) not in SAVE_MODULES:
            problems.append(
                (
                    "tuner.modules_to_save",
                    f"{name!r} cannot be trained in full here; "
                    f"supported: {', '.join([*SAVE_MODULES, *SAVE_ALIASES])}",
                )
            )
    if len(tuner.adapters) > 1:
        problems.append(("tuner.adapters", f"one adapter directory, got {len(tuner.adapters)}"))
    return problems


def adaptable_linears(family) -> list[LoraTarget]:
    """Every decoder-layer linear of the family as a target with all its HF modules active."""
    out = []
    for p in family.params:
        module = p.megatron.rsplit(".", 1)[0]
        if (
            p.transform in ADAPTABLE
            and p.megatron.endswith(".weight")
            and "{layer}" in module
            and module.rsplit(".", 1)[-1] in MEGATRON_LINEARS
        ):
            hf = tuple(h.rsplit(".", 1)[0] for h in p.hf)
            out.append(LoraTarget(module, p.transform, hf, (True,) * len(hf), p.layers))
    return out


def select_targets(family, names: list[str]) -> list[LoraTarget]:
    """The targets `target_modules` names (all-linear, HF or megatron module names); raises
    ConfigError naming what this family does not have."""
    every = adaptable_linears(family)
    if ALL_LINEAR in names:
        return every
    wanted, seen = set(names), set()
    out = []
    for t in every:
        megatron_name = t.megatron.rsplit(".", 1)[-1]
        short = [h.rsplit(".", 1)[-1] for h in t.hf]
        whole = megatron_name in wanted
        active = tuple(whole or s in wanted for s in short)
        seen.update([megatron_name, *short])
        if any(active):
            out.append(LoraTarget(t.megatron, t.transform, t.hf, active, t.layers))
    unknown = sorted(wanted - seen)
    if unknown:
        raise ConfigError(
            [
                (
                    "tuner.target_modules",
                    f"{', '.join(unknown)}: not a linear layer of "
                    f"{family.name}; choose from {ALL_LINEAR}, {', '.join(sorted(seen))}",
                )
            ]
        )
    return out


def read_adapter_config(path: str) -> dict:
    """adapter_config.json of a PEFT adapter directory; ConfigError naming the file otherwise."""
    file = Path(path).expanduser() / ADAPTER_CONFIG
    if not file.is_file() or not (file.parent / ADAPTER_WEIGHTS).is_file():
        raise ConfigError(
            [
                (
                    "tuner.adapters",
                    f"{file.parent} is not a PEFT adapter directory "
                    f"(needs {ADAPTER_CONFIG} and {ADAPTER_WEIGHTS})",
                )
            ]
        )
    try:
        data = json.loads(file.read_text())
    except json.JSONDecodeError as exc:
        raise ConfigError([("tuner.adapters", f"{file}:{exc.lineno}: invalid JSON")]) from None
    if data.get("peft_type", "LORA") != "LORA":
        raise ConfigError(
            [
                (
                    "tuner.adapters",
                    f"{file}: peft_type {data.get('peft_type')!r}; "
                    "only LORA adapters can be continued",
                )
            ]
        )
    return data


def resolve_lora(
    tuner: TunerConfig, family, hf_config: dict, transformer_impl: str = "auto"
) -> LoraSettings | None:
    """The job's LoRA settings checked against the family (None for full fine-tuning)."""
    if tuner.train_type != "lora":
        return None
    rank, alpha, rslora, names = (
        tuner.lora_rank,
        tuner.lora_alpha,
        tuner.use_rslora,
        tuner.target_modules,
    )
    save = [SAVE_ALIASES.get(n, n) for n in tuner.modules_to_save]
    problems: list[tuple] = []
    adapter_dir = tuner.adapters[0] if tuner.adapters else None
    if adapter_dir:  # the adapter being continued defines its own shape
        cfg = read_adapter_config(adapter_dir)
        rank, alpha = int(cfg["r"]), float(cfg["lora_alpha"])
        rslora = bool(cfg.get("use_rslora", False))
        target = cfg.get("target_modules") or []
        # PEFT writes the module paths all-linear found (model.layers.0.mlp.up_proj, ...)
        names = sorted(
            {n.rsplit(".", 1)[-1] for n in ([target] if isinstance(target, str) else target)}
        )
        save = sorted(set(save) | set(cfg.get("modules_to_save") or []))
        if cfg.get("target_parameters"):
            problems.append(
                (
                    "tuner.adapters",
                    f"{adapter_dir}: an adapter on fused expert parameters (target_parameters "
                    f"{', '.join(sorted(cfg['target_parameters']))}) is not supported; continue "
                    "one saved per expert (mlp.experts.N.gate_proj, ...), as megafleet writes",
                )
            )
        if cfg.get("layers_to_transform") or cfg.get("rank_pattern") or cfg.get("alpha_pattern"):
            problems.append(
                (
                    "tuner.adapters",
                    f"{adapter_dir}: per-layer ranks or layer subsets are not supported",
                )
            )
    if transformer_impl == "transformer_engine":
        problems.append(
            (
                "model.transformer_impl",
                "LoRA runs on the local implementation: use --transformer_impl local (or auto)",
            )
        )
    if save and hf_config.get("tie_word_embeddings", False):
        problems.append(
            (
                "tuner.modules_to_save",
                f"{', '.join(save)}: the model ties its input "
                "and output embeddings; training them in full is not supported",
            )
        )
    try:
        targets = select_targets(family, names)
    except ConfigError as exc:
        problems.extend(exc.problems)
        targets = []
    if problems:
        raise ConfigError(problems)
    return LoraSettings(
        rank=rank,
        alpha=float(alpha),
        dropout=tuner.lora_dropout,
        use_rslora=rslora,
        init=tuner.init_lora_weights,
        targets=targets,
        modules_to_save=save,
        adapter_dir=adapter_dir,
        merge=tuner.merge_lora,
    )


def peft_adapter_config(settings: LoraSettings, base_model: str) -> dict:
    """adapter_config.json as PEFT writes it for these settings. With expert adapters the
    dropout is written as 0: PEFT loads them onto transformers 5's fused experts as parameter
    adapters (ParamWrapper), which refuse any other value; it only matters for training, and a
    continued run takes its dropout from the job."""
    experts = any(t.per_expert for t in settings.targets)
    return {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model,
        "r": settings.rank,
        "lora_alpha": settings.alpha,
        "lora_dropout": 0.0 if experts else settings.dropout,
        "use_rslora": settings.use_rslora,
        "target_modules": settings.target_names(),
        "modules_to_save": settings.modules_to_save or None,
        "bias": "none",
        "fan_in_fan_out": False,
        "init_lora_weights": True,
        "inference_mode": True,
        "use_dora": False,
        "layers_to_transform": None,
        "layers_pattern": None,
        "rank_pattern": {},
        "alpha_pattern": {},
        "revision": None,
    }
