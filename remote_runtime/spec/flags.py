"""Command-line flags and job files -> JobConfig, and JobConfig -> job file / command line.

Flags use Megatron-SWIFT names (`--tensor_model_parallel_size 2`, `--packing true`,
`--dataset a.jsonl b.jsonl#500`). A job file (`--config job.yaml`) is read first and flags
override it. Torch-free: the operator uses this to validate and render jobs.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from remote_runtime.spec.config import (
    LEAVES,
    ConfigError,
    JobConfig,
    canonical_leaf,
    coerce,
    from_dict,
    leaf_kind,
)
from remote_runtime.spec.yamlio import YamlSyntaxError, load_with_lines

_BOOL_WORDS = {"true", "false", "1", "0", "yes", "no", "on", "off"}


def parse_flags(argv: list[str]) -> tuple[dict[str, Any], str | None]:
    """Split argv into {leaf: raw value} and the --config path. Raises ConfigError."""
    values: dict[str, Any] = {}
    config_path = None
    problems: list[tuple[str, str]] = []
    i = 0
    while i < len(argv):
        token = argv[i]
        if not token.startswith("--"):
            problems.append(("", f"unexpected argument {token!r} (options start with --)"))
            i += 1
            continue
        name, eq, inline = token[2:].partition("=")
        if name == "config":
            if eq:
                config_path = inline
            elif i + 1 < len(argv):
                config_path, i = argv[i + 1], i + 1
            else:
                problems.append(("config", "--config needs a job file path"))
            i += 1
            continue
        try:
            leaf = canonical_leaf(name)
        except ConfigError as exc:
            problems.extend(exc.problems)
            i += 1
            # skip this unknown option's values so they are not reported again
            while i < len(argv) and not argv[i].startswith("--"):
                i += 1
            continue
        kind = leaf_kind(leaf)
        if eq:
            values[leaf] = inline.split(",") if kind == "list" else inline
            i += 1
        elif kind == "list":
            j = i + 1
            while j < len(argv) and not argv[j].startswith("--"):
                j += 1
            values[leaf] = argv[i + 1 : j]
            if not values[leaf]:
                problems.append((LEAVES[leaf][0], f"--{leaf} needs at least one value"))
            i = j
        elif kind == "bool":
            nxt = argv[i + 1] if i + 1 < len(argv) else None
            if nxt is not None and nxt.lower() in _BOOL_WORDS:
                values[leaf], i = nxt, i + 2
            else:
                values[leaf], i = True, i + 1
        else:
            if i + 1 >= len(argv) or argv[i + 1].startswith("--"):
                problems.append((LEAVES[leaf][0], f"--{leaf} needs a value"))
                i += 1
            else:
                values[leaf], i = argv[i + 1], i + 2
    if problems:
        raise ConfigError(problems)
    return values, config_path


def load_job_file(path: str | Path) -> JobConfig:
    """Read a job YAML (nested megafleet or flat ms-swift keys); errors name file and line."""
    try:
        data, lines = load_with_lines(path)
    except YamlSyntaxError as exc:
        raise ConfigError([("", str(exc))]) from None
    except OSError as exc:
        raise ConfigError([("config", f"cannot read job file {path}: {exc.strerror}")]) from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError([("", f"{path}: a job file must be a mapping of options")])
    try:
        return from_dict(data)
    except ConfigError as exc:
        located = []
        for p in exc.problems:
            line = lines.get(p.field) or lines.get(p.field.split(".")[-1])
            where = f"{path}:{line}" if line else str(path)
            located.append(p._replace(message=f"{p.message} ({where})"))
        raise ConfigError(located) from None


def job_from_argv(argv: list[str], task: str | None = None) -> JobConfig:
    """Build the job from `--config FILE` (if any) plus flags; flags win."""
    values, config_path = parse_flags(argv)
    job = load_job_file(config_path) if config_path else JobConfig()
    if task:
        job.task = task
    problems: list[tuple[str, str]] = []
    for leaf, raw in values.items():
        try:
            job.set(LEAVES[leaf][0], coerce(leaf, raw))
        except ConfigError as exc:
            problems.extend(exc.problems)
    if problems:
        raise ConfigError(problems)
    return job


def dump_job(job: JobConfig, only_changed: bool = True) -> str:
    """The job as YAML that `load_job_file` reads back to an equal JobConfig."""
    return yaml.safe_dump(
        job.to_dict(only_changed=only_changed), sort_keys=False, default_flow_style=False
    )


def to_flags(job: JobConfig) -> list[str]:
    """The job as runtime flags (only fields that differ from the defaults)."""
    flags: list[str] = []
    default = JobConfig()
    for leaf, (dotted, _, _) in LEAVES.items():
        if leaf == "task" or dotted.startswith("launch."):
            continue
        value = job.get(dotted)
        if value == default.get(dotted):
            continue
        flags.append(f"--{leaf}")
        if isinstance(value, list):
            flags.extend(str(v) for v in value)
        elif isinstance(value, bool):
            flags.append("true" if value else "false")
        else:
            flags.append("none" if value is None else str(value))
    return flags
