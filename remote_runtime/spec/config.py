"""The job config: one schema for the wizard, CLI flags, templates, the operator and the runtime.

A job is a `JobConfig` composed of one small dataclass per component. Every leaf field is named
after the Megatron-SWIFT (ms-swift 3.12+/4.x) argument it stands for, and leaf names are unique
across groups, so `--tensor_model_parallel_size 2` on a command line,
`tensor_model_parallel_size: 2` in a flat ms-swift YAML and
`parallel: {tensor_model_parallel_size: 2}` in a megafleet job file all set
`parallel.tensor_model_parallel_size`.

This module imports neither torch nor megatron: the operator validates jobs with it. Building a
config has no side effects; `validate()` raises one `ConfigError` listing every bad field by its
dotted name and never changes the job; `normalize()` returns the copy the runtime trains with
(the adjustments validation reports as warnings applied).
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import types
import typing
from dataclasses import dataclass, field
from typing import Any, Optional, Union

from remote_runtime.spec.errors import ConfigError
from remote_runtime.spec.swift_compat import (
    MS_SWIFT_ONLY,
    SWIFT_SPELLINGS,
    SwiftCompatConfig,
    compat_warnings,
)

TASKS = ("sft", "pt", "rlhf")
RLHF_TYPES = ("dpo", "simpo", "orpo")  # simpo and orpo are reference-free
DPO_LOSS_TYPES = ("sigmoid", "ipo", "hinge")


@dataclass
class ModelConfig:
    model: str = ""  # Hugging Face checkpoint directory (config.json + safetensors + tokenizer)
    model_type: Optional[str] = None  # optional: must match the family detected from config.json
    torch_dtype: str = (
        "bfloat16"  # bfloat16 | float32 (params and compute; fp32 master weights kept)
    )
    transformer_impl: str = "auto"  # auto | local | transformer_engine
    attention_backend: str = "auto"  # auto | flash | fused (cuDNN) | unfused (math) | local
    device: str = "auto"  # auto | cuda | cpu
    finetune: bool = True  # load weights only: iteration, optimizer and schedule start fresh


@dataclass
class DataConfig:
    dataset: list[str] = field(
        default_factory=list
    )  # files, each optionally `path#N` (sample N rows)
    max_length: int = 2048
    truncation_strategy: str = "right"  # right | left | delete
    packing: bool = False
    padding_free: bool = True
    dataset_num_proc: int = 1
    dataset_shuffle: bool = True
    system: Optional[str] = None  # default system prompt for rows that have none
    data_cache_dir: Optional[str] = None  # default: <output_dir>/.data_cache


@dataclass
class ParallelConfig:
    tensor_model_parallel_size: int = 1
    pipeline_model_parallel_size: int = 1
    context_parallel_size: int = 1
    sequence_parallel: bool = False
    use_distributed_optimizer: bool = True
    overlap_grad_reduce: bool = False
    overlap_param_gather: bool = False


# deferred MoE expert weight gradients: micro-batches one kernel launch takes at most
# (remote_runtime/model/expert_wgrad.py; each count compiles its own kernel variant; the
# gain flattens: H100 kernel benchmark 2.11 / 1.47 / 1.04 / 0.86 ms per micro-batch at 1/2/4/8)
MOE_WGRAD_MAX_DEPTH = 8


@dataclass
class MoEConfig:
    """Mixture-of-experts settings (ignored, and refused when set, for dense models)."""

    expert_model_parallel_size: int = 1  # EP: the experts of each layer split over EP ranks
    expert_tensor_parallel_size: int = 1  # expert-TP: each expert's FFN split (gate/up columns)
    moe_grouped_gemm: bool = True  # all local experts in one grouped GEMM (else a loop)
    moe_permute_fusion: bool = False  # transformer-engine's fused permutation (a no-op here)
    moe_aux_loss_coeff: Optional[float] = None  # load-balancing loss; None: router_aux_loss_coef
    moe_router_dtype: str = "fp32"  # fp32 | fp64 | none (the model's dtype)
    moe_token_dispatcher_type: str = "alltoall"  # alltoall | allgather
    moe_expert_capacity_factor: Optional[float] = None  # None: dropless; else tokens dropped
    moe_shared_expert_overlap: bool = False  # overlap the shared expert with the dispatch
    # megafleet's own: expert weight gradients added to the fp32 gradient buffer once per this
    # many micro-batches (1-8), keeping their rows meanwhile; auto: as far as half the memory the
    # first step leaves unused allows (remote_runtime/model/expert_wgrad.py)
    moe_wgrad_defer: str = "auto"


@dataclass
class RecomputeConfig:
    recompute_granularity: str = "none"  # none | selective | full
    recompute_method: Optional[str] = None  # uniform | block (full recompute only)
    recompute_num_layers: Optional[int] = None


@dataclass
class OptimConfig:
    optimizer: str = "adam"
    lr: float = 1e-5
    min_lr: float = 0.0
    lr_warmup_fraction: Optional[float] = None
    lr_warmup_iters: int = 0
    lr_decay_style: str = "cosine"  # cosine | linear | constant
    weight_decay: float = 0.1
    clip_grad: float = 1.0
    adam_beta1: float = 0.9
    adam_beta2: float = 0.95
    adam_eps: float = 1e-8
    # megatron's precision-aware optimizer: Adam's moments stored in bf16 (4 bytes per parameter
    # less; remote_runtime/train/adamw.py). Main weights and gradients stay fp32.
    use_precision_aware_optimizer: bool = False
    exp_avg_dtype: str = "fp32"  # fp32 | bf16
    exp_avg_sq_dtype: str = "fp32"  # fp32 | bf16


@dataclass
class TunerConfig:
    """Full fine-tuning or LoRA adapters (ms-swift's tuner options; checks in spec/tuner.py)."""

    train_type: str = "full"  # full | lora (ms-swift 4 spells it --tuner_type)
    lora_rank: int = 8
    lora_alpha: int = 32
    lora_dropout: float = 0.05
    # all-linear, or Hugging Face module names (q_proj ... down_proj), or megatron ones
    # (linear_qkv linear_proj linear_fc1 linear_fc2)
    target_modules: list[str] = field(default_factory=lambda: ["all-linear"])
    modules_to_save: list[str] = field(default_factory=list)  # embed_tokens, lm_head: trained fully
    use_rslora: bool = False  # scale alpha / sqrt(r) instead of alpha / r
    init_lora_weights: str = "true"  # true (A Kaiming, B zero) | gaussian | false (both random)
    merge_lora: bool = False  # also write checkpoint-N-merged/ (a full HF model) at the end
    adapters: list[str] = field(default_factory=list)  # continue from this PEFT adapter directory


@dataclass
class TrainConfig:
    micro_batch_size: int = 1
    global_batch_size: int = 16
    num_train_epochs: Optional[float] = 1.0  # ms-swift's default; train_iters wins when set
    train_iters: Optional[int] = None
    seed: int = 42
    cross_entropy_loss_fusion: bool = True


@dataclass
class CheckpointConfig:
    output_dir: str = "output"
    save_steps: int = 500
    save_total_limit: Optional[int] = None
    no_save_optim: bool = False
    no_save_rng: bool = False
    resume: Optional[str] = None  # auto | a checkpoint-<step> directory


@dataclass
class LoggingConfig:
    logging_steps: int = 5
    tensorboard_dir: Optional[str] = None


@dataclass
class EvalConfig:
    val_dataset: list[str] = field(default_factory=list)  # held-out files, each `path` or `path#N`
    split_dataset_ratio: float = 0.0  # without val_dataset: this share of the rows is held out
    eval_steps: Optional[int] = None  # evaluate every N steps (and at the end); default save_steps
    eval_iters: int = -1  # global batches per evaluation; -1: the whole validation set


@dataclass
class RlhfConfig:
    """`rlhf` task (preference training). Megatron-SWIFT / TRL names and defaults."""

    rlhf_type: str = "dpo"  # dpo | simpo | orpo (TRL's CPOTrainer loss_type=simpo, ORPOTrainer)
    ref_model: Optional[str] = None  # HF directory of the reference; default: --model
    beta: Optional[float] = None  # None: 2.0 for simpo, else 0.1 (ms-swift); orpo: lambda
    loss_type: str = "sigmoid"  # sigmoid | ipo | hinge
    rpo_alpha: Optional[float] = None  # weight of the NLL loss on chosen answers (RPO)
    label_smoothing: float = 0.0  # conservative DPO (sigmoid only)
    reference_free: bool = False  # reference log-probs taken as 0
    simpo_gamma: float = 1.0  # simpo: the target reward margin
    cpo_alpha: float = 1.0  # simpo: weight of the NLL of the chosen answers (CPO-SimPO)


def uses_reference(rl: RlhfConfig) -> bool:
    """Whether the preference loss compares with a reference model (DPO; not simpo, orpo or
    reference_free)."""
    return rl.rlhf_type == "dpo" and not rl.reference_free


def effective_beta(rl: RlhfConfig) -> float:
    """`beta` as it applies: ms-swift's default (2.0 for simpo, 0.1 otherwise) when unset."""
    if rl.beta is not None:
        return rl.beta
    return 2.0 if rl.rlhf_type == "simpo" else 0.1


@dataclass
class CheckConfig:
    test_convert_precision: bool = False  # compare HF and Megatron logits before training
    dry_run: bool = False  # validate from config.json alone and print the resolved config


@dataclass
class LaunchConfig:
    """How the operator starts the job on the fleet. The runtime ignores this group."""

    hosts: list[str] = field(default_factory=list)  # inventory names; empty = every host
    nproc_per_node: Optional[int] = (
        None  # default: the GPU count of the first host (1 without GPUs)
    )
    master_port: int = 29500
    watcher_port: Optional[int] = None  # node 0's fail-fast watcher; default master_port + 1
    venv: str = "megafleet/venv"  # on each node, relative to the user's home unless absolute
    env: list[str] = field(
        default_factory=list
    )  # local env vars forwarded to nodes (e.g. HF_TOKEN)
    stall_timeout: int = 900  # no log progress on any node this long (or a node silent for
    #   min(stall_timeout, 120) s) and the watcher stops the job on every node
    stop_grace: int = 30  # seconds between SIGTERM and SIGKILL on stop


@dataclass
class JobConfig:
    task: str = "sft"
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    moe: MoEConfig = field(default_factory=MoEConfig)
    recompute: RecomputeConfig = field(default_factory=RecomputeConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    tuner: TunerConfig = field(default_factory=TunerConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    rlhf: RlhfConfig = field(default_factory=RlhfConfig)
    check: CheckConfig = field(default_factory=CheckConfig)
    launch: LaunchConfig = field(default_factory=LaunchConfig)
    swift_compat: SwiftCompatConfig = field(default_factory=SwiftCompatConfig)  # no-op options

    # ---- field access by leaf or dotted name -------------------------------------------------
    def get(self, dotted: str) -> Any:
        group, name = dotted.split(".") if "." in dotted else (None, dotted)
        return getattr(getattr(self, group), name) if group else getattr(self, name)

    def set(self, dotted: str, value: Any) -> None:
        group, name = dotted.split(".") if "." in dotted else (None, dotted)
        setattr(getattr(self, group) if group else self, name, value)

    def to_dict(self, only_changed: bool = False) -> dict:
        """Nested plain dict; with `only_changed`, fields equal to their defaults are left out."""
        default = JobConfig()
        out: dict[str, Any] = {"task": self.task}
        for gname in GROUPS:
            group = getattr(self, gname)
            values = dataclasses.asdict(group)
            if only_changed:
                base = dataclasses.asdict(getattr(default, gname))
                values = {k: v for k, v in values.items() if v != base[k]}
            if values or not only_changed:
                out[gname] = values
        return out


GROUPS = [f.name for f in dataclasses.fields(JobConfig) if f.name != "task"]


def _group_types() -> dict[str, type]:
    hints = typing.get_type_hints(JobConfig)
    return {g: hints[g] for g in GROUPS}


def leaf_fields() -> dict[str, tuple[str, Any, Any]]:
    """leaf name -> (dotted name, annotated type, default value), in declaration order."""
    out: dict[str, tuple[str, Any, Any]] = {"task": ("task", str, "sft")}
    for gname, gtype in _group_types().items():
        hints = typing.get_type_hints(gtype)
        instance = gtype()
        for f in dataclasses.fields(gtype):
            if f.name in out:
                raise AssertionError(f"leaf name {f.name} is not unique in JobConfig")
            out[f.name] = (f"{gname}.{f.name}", hints[f.name], getattr(instance, f.name))
    return out


LEAVES = leaf_fields()

# Megatron-SWIFT 3.x spellings of options we implement under their 4.x names.
ALIASES = {
    "save": "output_dir",
    "save_interval": "save_steps",
    "log_interval": "logging_steps",
    "max_epochs": "num_train_epochs",
    **SWIFT_SPELLINGS,
    "eval_interval": "eval_steps",
    "tuner_type": "train_type",  # ms-swift 4
}

# Megatron-SWIFT options that exist there but not (yet) here: an error, never silently ignored.
NOT_IMPLEMENTED = {
    "virtual_pipeline_model_parallel_size": (
        "interleaved pipeline schedules are not implemented yet"
    ),
    "decoder_first_pipeline_num_layers": "uneven pipeline stages are not implemented yet",
    "decoder_last_pipeline_num_layers": "uneven pipeline stages are not implemented yet",
    "fp16": "fp16 training is not implemented; use --torch_dtype bfloat16",
    "fp8_format": "fp8 training is not implemented yet",
    "fp8_recipe": "fp8 training is not implemented yet",
    "streaming": "streaming datasets are not implemented yet",
    "freeze_llm": "partial freezing is not implemented yet",
    "freeze_parameters": "partial freezing is not implemented yet",
    "new_special_tokens": "adding tokens is not implemented yet",
    "loss_scale": "custom loss scales are not implemented yet; loss covers assistant tokens",
    "load": "loading Megatron-format checkpoints is not implemented; use --model (HF) or --resume",
    "mcore_model": (
        "loading Megatron-format checkpoints is not implemented; use --model (HF directory)"
    ),
    "optimizer_cpu_offload": "optimizer CPU offload is not implemented yet",
}

CHOICES = {
    "task": TASKS,
    "torch_dtype": ("bfloat16", "float32"),
    "transformer_impl": ("auto", "local", "transformer_engine"),
    "attention_backend": ("auto", "flash", "fused", "unfused", "local"),
    "device": ("auto", "cuda", "cpu"),
    "truncation_strategy": ("right", "left", "delete"),
    "recompute_granularity": ("none", "selective", "full"),
    "recompute_method": (None, "uniform", "block"),
    "lr_decay_style": ("cosine", "linear", "constant"),
    "optimizer": ("adam",),
    "rlhf_type": RLHF_TYPES,
    "loss_type": DPO_LOSS_TYPES,
    "train_type": ("full", "lora"),
    "init_lora_weights": ("true", "false", "gaussian"),
    "moe_router_dtype": ("fp32", "fp64", "none"),
    "exp_avg_dtype": ("fp32", "bf16"),
    "exp_avg_sq_dtype": ("fp32", "bf16"),
    "moe_token_dispatcher_type": ("alltoall", "allgather"),
}
DTYPE_ALIASES = {"bf16": "bfloat16", "fp32": "float32", "float": "float32"}


def suggest(name: str) -> str:
    """' (did you mean --x?)' for a misspelt option, or ''."""
    known = list(LEAVES) + list(ALIASES) + list(NOT_IMPLEMENTED)
    close = difflib.get_close_matches(name, known, n=1, cutoff=0.6)
    return f" (did you mean --{close[0]}?)" if close else ""


def canonical_leaf(name: str) -> str:
    """Map an option name (flag or YAML key, with - or _) to its leaf name, or raise ConfigError."""
    key = name.lstrip("-").replace("-", "_")
    key = ALIASES.get(key, key)
    if key in LEAVES:
        return key
    if key in NOT_IMPLEMENTED:
        raise ConfigError([(key, f"--{key} is not supported by megafleet: {NOT_IMPLEMENTED[key]}")])
    if key in MS_SWIFT_ONLY:  # a real ms-swift option: no "did you mean" towards another one
        raise ConfigError(
            [
                (
                    key,
                    f"--{key} is a Megatron-SWIFT option that megafleet does not implement",
                    f"remove --{key}; `python -m remote_runtime sft "
                    "--help` lists the supported options",
                )
            ]
        )
    raise ConfigError([(key, f"unknown option --{key}{suggest(key)}")])


# ---- value coercion ------------------------------------------------------------------------

_TRUE = {"true", "1", "yes", "on", "y"}
_FALSE = {"false", "0", "no", "off", "n"}


def _unwrap_optional(tp: Any) -> tuple[Any, bool]:
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return args[0], True
    return tp, False


def leaf_kind(leaf: str) -> str:
    """How an option takes its value: "list" (one or more), "bool" (a flag) or "scalar"."""
    base, _ = _unwrap_optional(LEAVES[leaf][1])
    if typing.get_origin(base) is list:
        return "list"
    return "bool" if base is bool else "scalar"


def coerce(leaf: str, value: Any) -> Any:
    """Convert a raw value (string from a flag, or YAML scalar/list) to the leaf's type."""
    dotted, tp, _ = LEAVES[leaf]
    base, optional = _unwrap_optional(tp)
    if value is None or (optional and isinstance(value, str) and value.lower() in ("none", "null")):
        if optional:
            return None
        raise ConfigError([(dotted, "must not be empty")])
    try:
        if typing.get_origin(base) is list:
            items = value if isinstance(value, (list, tuple)) else [value]
            return [str(v) for v in items]
        if base is bool:
            if isinstance(value, bool):
                return value
            text = str(value).strip().lower()
            if text in _TRUE:
                return True
            if text in _FALSE:
                return False
            raise ValueError
        if base is int:
            if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
                raise ValueError
            return int(str(value)) if isinstance(value, str) else int(value)
        if base is float:
            if isinstance(value, bool):
                raise ValueError
            return float(value)
        if leaf == "init_lora_weights":  # PEFT's spelling: a bool or a method name
            return str(value).lower()
        if leaf == "torch_dtype":
            return DTYPE_ALIASES.get(str(value), str(value))
        return str(value)
    except (TypeError, ValueError):
        kind = {bool: "true or false", int: "an integer", float: "a number"}.get(base, "a string")
        raise ConfigError([(dotted, f"{value!r} is not {kind}")]) from None


# ---- building from dicts -------------------------------------------------------------------


def from_dict(data: dict, source: str | None = None, base: JobConfig | None = None) -> JobConfig:
    """Build a JobConfig from a nested megafleet job dict or a flat ms-swift style dict.

    Both shapes may be mixed. Unknown keys are errors with a suggestion; nothing is ignored.
    """
    job = base or JobConfig()
    problems: list[tuple[str, str]] = []

    def assign(key: str, value: Any, group: str | None) -> None:
        try:
            leaf = canonical_leaf(key)
            dotted = LEAVES[leaf][0]
            if group is not None and not dotted.startswith(group + "."):
                raise ConfigError(
                    [(f"{group}.{key}", f"belongs in group '{dotted.split('.')[0]}'")]
                )
            job.set(dotted, coerce(leaf, value))
        except ConfigError as exc:
            # Name the problem by where it is in the file (group.key), so loaders can add lines.
            where = f"{group}.{key}" if group else key
            problems.extend(
                p._replace(field=where) if p.field == key.replace("-", "_") else p
                for p in exc.problems
            )

    for key, value in (data or {}).items():
        if key in GROUPS and not (key in LEAVES and not isinstance(value, dict)):
            # `model: /path` (flat ms-swift style) is the leaf; `model: {...}` is the group.
            if not isinstance(value, dict):
                problems.append((key, "must be a mapping of options"))
                continue
            for sub, subval in value.items():
                assign(sub, subval, key)
        else:
            assign(key, value, None)
    if problems:
        raise ConfigError(problems, source)
    return job


def validate(job: JobConfig) -> list[str]:
    """Check what can be checked without config.json or a world size; `job` is not changed.

    Returns warnings (the adjustments `normalize` makes, which the user should know about);
    raises ConfigError with every invalid field. Fields that are only unset have kind "missing".
    """
    problems: list[tuple] = []
    for leaf, allowed in CHOICES.items():
        dotted = LEAVES[leaf][0]
        value = job.get(dotted)
        if value not in allowed:
            shown = ", ".join(str(a) for a in allowed if a is not None)
            problems.append((dotted, f"{value!r} is not one of: {shown}"))

    def positive(leaf: str, allow_zero: bool = False) -> None:
        dotted = LEAVES[leaf][0]
        value = job.get(dotted)
        if value is not None and (value < 0 or (value == 0 and not allow_zero)):
            problems.append((dotted, f"must be {'>= 0' if allow_zero else '> 0'}, got {value}"))

    for leaf in (
        "max_length",
        "dataset_num_proc",
        "tensor_model_parallel_size",
        "pipeline_model_parallel_size",
        "context_parallel_size",
        "micro_batch_size",
        "global_batch_size",
        "save_steps",
        "logging_steps",
        "lr",
        "master_port",
        "watcher_port",
        "stall_timeout",
        "num_train_epochs",
        "train_iters",
        "save_total_limit",
        "recompute_num_layers",
        "expert_model_parallel_size",
        "expert_tensor_parallel_size",
        "moe_expert_capacity_factor",
    ):
        positive(leaf)
    for leaf in (
        "min_lr",
        "weight_decay",
        "clip_grad",
        "lr_warmup_iters",
        "stop_grace",
        "moe_aux_loss_coeff",
    ):
        positive(leaf, allow_zero=True)

    defer = str(job.moe.moe_wgrad_defer)
    if defer != "auto" and not (defer.isdigit() and 1 <= int(defer) <= MOE_WGRAD_MAX_DEPTH):
        problems.append(
            (
                "moe.moe_wgrad_defer",
                f"{defer!r} is neither auto nor a micro-batch count from 1 to "
                f"{MOE_WGRAD_MAX_DEPTH}",
                "use auto, or 1 to add every micro-batch's expert gradients at once (least memory)",
            )
        )

    for leaf in ("master_port", "watcher_port"):
        port = job.get(LEAVES[leaf][0])
        if port is not None and port > 65535:
            problems.append((LEAVES[leaf][0], f"{port} is not a TCP port (1-65535)"))
    if job.launch.watcher_port and job.launch.watcher_port == job.launch.master_port:
        problems.append(("launch.watcher_port", "must differ from launch.master_port"))
    if not job.model.model and not job.check.dry_run:
        problems.append(
            (
                "model.model",
                "is required: a Hugging Face checkpoint directory",
                "set --model to a Hugging Face checkpoint directory",
                "missing",
            )
        )
    if not job.data.dataset:
        problems.append(
            (
                "data.dataset",
                "is required: one or more .jsonl/.json files",
                "set --dataset to one or more .jsonl/.json files",
                "missing",
            )
        )
    for spec in job.data.dataset:
        path, _, count = spec.partition("#")
        if not path:
            problems.append(("data.dataset", f"{spec!r} has no path"))
        if count and (not count.isdigit() or int(count) <= 0):
            problems.append(("data.dataset", f"{spec!r}: the part after # must be a row count > 0"))
    if job.train.train_iters is None and job.train.num_train_epochs is None:
        problems.append(
            (
                "train.train_iters",
                "set train_iters or num_train_epochs",
                "e.g. --num_train_epochs 1",
                "missing",
            )
        )
    frac = job.optim.lr_warmup_fraction
    if frac is not None and not 0 <= frac < 1:
        problems.append(("optim.lr_warmup_fraction", f"must be in [0, 1), got {frac}"))
    if frac is not None and job.optim.lr_warmup_iters:
        problems.append(
            ("optim.lr_warmup_fraction", "set lr_warmup_fraction or lr_warmup_iters, not both")
        )
    for leaf in ("exp_avg_dtype", "exp_avg_sq_dtype"):
        if getattr(job.optim, leaf) != "fp32" and not job.optim.use_precision_aware_optimizer:
            problems.append(
                (
                    f"optim.{leaf}",
                    f"{getattr(job.optim, leaf)} moments need the precision-aware optimizer",
                    "add --use_precision_aware_optimizer true",
                )
            )
    if job.optim.min_lr > job.optim.lr:
        problems.append(
            ("optim.min_lr", f"{job.optim.min_lr} is larger than optim.lr={job.optim.lr}")
        )
    if job.train.global_batch_size % job.train.micro_batch_size:
        problems.append(
            (
                "train.global_batch_size",
                f"{job.train.global_batch_size} is not a multiple of "
                f"train.micro_batch_size={job.train.micro_batch_size}",
            )
        )
    rc = job.recompute
    if rc.recompute_granularity == "full" and rc.recompute_method is None:
        problems.append(("recompute.recompute_method", "full recompute needs uniform or block"))
    if rc.recompute_granularity != "full" and (rc.recompute_method or rc.recompute_num_layers):
        problems.append(
            (
                "recompute.recompute_method",
                "recompute_method/num_layers apply only to recompute_granularity=full",
            )
        )
    if job.data.packing and not job.data.padding_free:
        problems.append(("data.padding_free", "packing needs padding_free=true"))
    if job.parallel.overlap_param_gather and not job.parallel.use_distributed_optimizer:
        problems.append(("parallel.overlap_param_gather", "needs use_distributed_optimizer=true"))
    if job.parallel.context_parallel_size > 1 and job.model.transformer_impl == "local":
        problems.append(
            (
                "parallel.context_parallel_size",
                "context parallelism needs transformer-engine "
                "(model.transformer_impl=transformer_engine); the local implementation "
                "does not support it",
            )
        )
    _validate_eval_and_rlhf(job, problems)
    from remote_runtime.spec.tuner import tuner_problems

    problems.extend(tuner_problems(job.tuner))
    if problems:
        raise ConfigError(problems)
    return [warning for _, _, warning in _adjustments(job)] + compat_warnings(job.swift_compat)


def _adjustments(job: JobConfig) -> list[tuple[str, Any, str]]:
    """(dotted field, value it takes, warning): settings that have no effect and are turned off."""
    out = []
    if job.parallel.sequence_parallel and job.parallel.tensor_model_parallel_size == 1:
        out.append(
            (
                "parallel.sequence_parallel",
                False,
                "sequence_parallel has no effect with tensor_model_parallel_size=1; disabled",
            )
        )
    if job.eval.val_dataset and job.eval.split_dataset_ratio:
        out.append(
            ("eval.split_dataset_ratio", 0.0, "split_dataset_ratio is ignored: val_dataset is set")
        )
    return out


def normalize(job: JobConfig) -> JobConfig:
    """A copy of `job` with the adjustments `validate` warns about applied."""
    out = copy.deepcopy(job)
    for dotted, value, _ in _adjustments(job):
        out.set(dotted, value)
    return out


def _validate_eval_and_rlhf(job: JobConfig, problems: list) -> None:
    ev, rl = job.eval, job.rlhf
    if not 0 <= ev.split_dataset_ratio < 1:
        problems.append(
            ("eval.split_dataset_ratio", f"must be in [0, 1), got {ev.split_dataset_ratio}")
        )
    if ev.eval_steps is not None and ev.eval_steps <= 0:
        problems.append(("eval.eval_steps", f"must be > 0, got {ev.eval_steps}"))
    if ev.eval_iters < -1 or ev.eval_iters == 0:
        problems.append(
            (
                "eval.eval_iters",
                f"must be > 0, or -1 for the whole validation set, got {ev.eval_iters}",
            )
        )
    if job.task != "rlhf":
        return
    if rl.beta is not None and rl.beta <= 0:
        problems.append(("rlhf.beta", f"must be > 0, got {rl.beta}"))
    if not 0 <= rl.label_smoothing < 0.5:
        problems.append(("rlhf.label_smoothing", f"must be in [0, 0.5), got {rl.label_smoothing}"))
    if rl.label_smoothing and rl.loss_type != "sigmoid":
        problems.append(("rlhf.label_smoothing", "applies to loss_type sigmoid only"))
    if rl.rpo_alpha is not None and rl.rpo_alpha < 0:
        problems.append(("rlhf.rpo_alpha", f"must be >= 0, got {rl.rpo_alpha}"))
    if rl.reference_free and rl.ref_model:
        problems.append(("rlhf.ref_model", "reference_free=true uses no reference model"))
    if rl.rlhf_type != "simpo":
        default = RlhfConfig()
        for leaf in ("simpo_gamma", "cpo_alpha"):
            if getattr(rl, leaf) != getattr(default, leaf):
                problems.append((f"rlhf.{leaf}", "applies to rlhf_type simpo only"))
    if rl.rlhf_type != "dpo":
        _validate_reference_free_type(rl, problems)


def _validate_reference_free_type(rl: RlhfConfig, problems: list) -> None:
    """simpo and orpo: no reference model; their own loss (TRL's CPO simpo loss, ORPO)."""
    kind = rl.rlhf_type
    if rl.ref_model:
        problems.append(("rlhf.ref_model", f"{kind} is reference-free: it uses no reference model"))
    if rl.loss_type != "sigmoid":
        problems.append(
            ("rlhf.loss_type", f"applies to rlhf_type dpo only; {kind} has its own loss")
        )
    if rl.rpo_alpha is not None:
        hint = "use cpo_alpha for the NLL term" if kind == "simpo" else "orpo always adds the NLL"
        problems.append(("rlhf.rpo_alpha", f"applies to rlhf_type dpo only ({hint})"))
    if kind == "orpo" and rl.label_smoothing:
        problems.append(("rlhf.label_smoothing", "applies to rlhf_type dpo and simpo only"))
    if kind == "simpo" and rl.cpo_alpha < 0:
        problems.append(("rlhf.cpo_alpha", f"must be >= 0, got {rl.cpo_alpha}"))
