"""Job templates: commented YAML job files rendered from a JobConfig with jinja2.

A template is a jinja2 file in `templates/` (found through `resources.templates_dir()`) that
starts with a header in a jinja comment, so the header never reaches the output:

    {#- template
    summary: Full-parameter SFT of a dense model
    supported: true          # false: `render` refuses, with `reason`
    defaults: {task: sft, data: {max_length: 4096, packing: true}, ...}   # before --set
    -#}
    task: {{ task | y }}
    optim:
      lr: {{ optim.lr | y }}   # comments survive rendering

`{{ group.field | y }}` writes the job's value as YAML. Fields the body does not mention but
the job changes (from `--set`) are appended as flat ms-swift keys, which the job loader accepts
beside the nested groups, so every rendered job loads back (`load_job_file`) equal to the job
it was rendered from. A YAML file without the header is a plain job file: its values are the
defaults and it renders with `dump_job` (its comments are not kept).
"""

from __future__ import annotations

import copy
import os
import re
import shlex
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from megafleet.errors import FieldProblem, UsageError, ValidationError
from megafleet.resources import templates_dir
from remote_runtime.spec.config import (
    GROUPS,
    LEAVES,
    ConfigError,
    JobConfig,
    canonical_leaf,
    from_dict,
    leaf_kind,
    validate,
)
from remote_runtime.spec.flags import dump_job, load_job_file, to_flags

FORMATS = ("yaml", "flags", "command")
_HEADER = re.compile(r"\A\{#-?\s*template\s*\n(.*?)\n\s*-?#\}", re.S)


class TemplateNotSupported(UsageError):
    """The template describes a job the runtime cannot run yet."""


def validation_error(exc: ConfigError, source: str | None = None) -> ValidationError:
    """A job ConfigError as the CLI's ValidationError (exit 2, problems by field)."""
    return ValidationError(
        [FieldProblem(p.field or "job", p.message, source, hint=p.hint) for p in exc.problems]
    )


@dataclass
class Template:
    name: str
    path: Path
    summary: str = ""
    supported: bool = True
    reason: str | None = None  # why it is not supported (shown and used to refuse)
    defaults: dict = field(default_factory=dict)
    is_job_file: bool = False  # a plain job YAML without a template header

    def body(self) -> str:
        text = self.path.read_text()
        return _HEADER.sub("", text, count=1).lstrip("\n")

    def to_dict(self) -> dict:
        return {
            "name": self.name,
            "path": str(self.path),
            "summary": self.summary,
            "supported": self.supported,
            "reason": self.reason,
        }


def read_template(path: Path) -> Template:
    text = path.read_text()
    match = _HEADER.match(text)
    name = path.name[:-5] if path.name.endswith(".yaml") else path.name
    if not match:
        return Template(name, path, "a job file", is_job_file=True)
    try:
        meta = yaml.safe_load(match.group(1)) or {}
    except yaml.YAMLError as exc:
        raise UsageError(f"{path}: template header is not valid YAML: {exc}") from None
    if not isinstance(meta, dict):
        raise UsageError(f"{path}: template header must be a mapping")
    supported = bool(meta.get("supported", True))
    reason = meta.get("reason")
    if not supported and not reason:
        raise UsageError(f"{path}: an unsupported template must say why (reason:)")
    return Template(
        name,
        path,
        str(meta.get("summary", "")),
        supported,
        reason,
        dict(meta.get("defaults") or {}),
    )


def list_templates() -> list[Template]:
    folder = templates_dir()
    found = [read_template(p) for p in sorted(folder.glob("*.yaml"))] if folder.is_dir() else []
    return sorted(found, key=lambda t: (not t.supported, t.name))


def get_template(ref: str) -> Template:
    """A shipped template by name (`sft-full`), or any template / job file by path."""
    path = Path(ref).expanduser()
    if ("/" in ref or ref.endswith((".yaml", ".yml"))) and path.is_file():
        return read_template(path)
    name = ref[:-5] if ref.endswith(".yaml") else ref
    candidate = templates_dir() / f"{name}.yaml"
    if candidate.is_file():
        return read_template(candidate)
    known = ", ".join(t.name for t in list_templates()) or "none found"
    raise UsageError(
        f"no template named {ref!r} (templates: {known})", hint="megafleet render --list"
    )


def check_supported(t: Template) -> None:
    if not t.supported:
        raise TemplateNotSupported(
            f"template {t.name!r} is not supported yet: {t.reason}",
            hint="megafleet render --list shows the templates that render",
        )


# ---- building the job ------------------------------------------------------------------------


def parse_sets(items: list[str]) -> dict:
    """`key=value` items (leaf names like `lr`, or dotted like `optim.lr`) -> a nested job dict.

    List fields take comma-separated values or a YAML list (`dataset=[a.jsonl, b.jsonl]`).
    Raises ConfigError naming each bad item (unknown keys get a suggestion).
    """
    nested: dict = {}
    problems: list[tuple] = []
    for item in items:
        key, sep, raw = item.partition("=")
        key = key.strip()
        if not sep or not key:
            problems.append((item, "--set takes key=value (e.g. lr=2e-5 or optim.lr=2e-5)"))
            continue
        group, _, name = key.rpartition(".")
        try:
            leaf = canonical_leaf(name)
        except ConfigError as exc:
            problems.extend(exc.problems)
            continue
        dotted = LEAVES[leaf][0]
        if group and dotted != f"{group}.{leaf}":
            problems.append((key, f"there is no {key}; {leaf} is {dotted}"))
            continue
        value: object = raw
        if leaf_kind(leaf) == "list":
            value = (
                yaml.safe_load(raw)
                if raw.strip().startswith("[")
                else [v.strip() for v in raw.split(",") if v.strip()]
            )
        if "." in dotted:
            g, f = dotted.split(".")
            nested.setdefault(g, {})[f] = value
        else:
            nested[leaf] = value
    if problems:
        raise ConfigError(problems)
    return nested


def base_job(t: Template) -> JobConfig:
    if t.is_job_file:
        return load_job_file(t.path)
    try:
        return from_dict(t.defaults, source=f"{t.path} (defaults)")
    except ConfigError as exc:
        raise validation_error(exc, str(t.path)) from None


def job_from_template(t: Template, sets: list[str] | None = None) -> JobConfig:
    """The template's defaults with `--set` items applied. Refuses unsupported templates."""
    check_supported(t)
    job = base_job(t)
    if sets:
        job = from_dict(parse_sets(sets), base=copy.deepcopy(job))
    return job


def check_job(job: JobConfig) -> tuple[list[str], list[tuple[str, str]]]:
    """(missing, invalid): fields still to fill in (a template may leave them open), and fields
    with bad values."""
    try:
        validate(job)
    except ConfigError as exc:
        missing = [p.field for p in exc.problems if p.kind == "missing"]
        invalid = [(p.field, p.message) for p in exc.problems if p.kind != "missing"]
        return missing, invalid
    return [], []


# ---- rendering -------------------------------------------------------------------------------


def yaml_value(value) -> str:
    """One value as inline YAML that loads back to the same Python value."""
    text = yaml.safe_dump(value, default_flow_style=True, width=10_000).strip()
    return text[:-4].rstrip() if text.endswith("\n...") else text  # drop the document end mark


class _Group:
    """A job group for jinja; records which fields the template mentions."""

    def __init__(self, name: str, obj, seen: set[str], where: Path):
        self._name, self._obj, self._seen, self._where = name, obj, seen, where

    def __getattr__(self, attr: str):
        if attr.startswith("_") or not hasattr(self._obj, attr):
            raise ValueError(
                f"{self._where}: the template uses {self._name}.{attr}, which is not a job field"
            )
        self._seen.add(f"{self._name}.{attr}")
        return getattr(self._obj, attr)


def render_yaml(t: Template, job: JobConfig) -> str:
    """The job as this template's YAML (comments kept); loads back equal to `job`."""
    if t.is_job_file:
        return dump_job(job)
    import jinja2

    env = jinja2.Environment(
        undefined=jinja2.StrictUndefined, keep_trailing_newline=True, autoescape=False
    )
    env.filters["y"] = yaml_value
    seen: set[str] = {"task"}
    context = {g: _Group(g, getattr(job, g), seen, t.path) for g in GROUPS}
    context["task"] = job.task
    try:
        text = env.from_string(t.body()).render(**context)
    except jinja2.TemplateError as exc:
        raise UsageError(f"{t.path}: template error: {exc}") from None
    except ValueError as exc:  # a field the job does not have (from _Group)
        raise UsageError(str(exc)) from None
    return text.rstrip("\n") + "\n" + _extras(job, seen)


def _extras(job: JobConfig, seen: set[str]) -> str:
    default = JobConfig()
    lines = []
    for leaf, (dotted, _, _) in LEAVES.items():
        if dotted in seen or job.get(dotted) == default.get(dotted):
            continue
        lines.append(f"{leaf}: {yaml_value(job.get(dotted))}")
    if not lines:
        return ""
    title = "# Set with --set; not part of this template (flat ms-swift keys):"
    return "\n" + "\n".join([title, *lines]) + "\n"


TASK_TEMPLATES = {"sft": "sft-full", "pt": "pt"}


def job_file_text(job: JobConfig) -> str:
    """A commented job file for any job: its task's template, rendered with the job's values."""
    return render_yaml(get_template(TASK_TEMPLATES[job.task]), job)


def write_text_file(path: Path, text: str, overwrite: bool) -> None:
    """Write atomically (temp file + rename); an existing file only with `overwrite`."""
    if path.exists() and not overwrite:
        raise UsageError(f"{path} exists", hint="pass --yes to overwrite it")
    if not path.parent.is_dir():
        raise UsageError(f"{path.parent} is not a directory")
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "w") as fh:
            fh.write(text)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def torchrun_commands(job: JobConfig) -> list[dict]:
    """The command that starts the job on each node: [{"host", "node_rank", "argv"}].

    One node (no or one host): `torchrun --standalone`. Several: rank 0's host is the master
    (its inventory name; the launcher resolves the address). Environment variables from
    `launch.env` are passed by the launcher, never on the command line.
    """
    launch = job.launch
    torchrun = f"{launch.venv.rstrip('/')}/bin/torchrun"
    nproc = str(launch.nproc_per_node or "gpu")
    tail = ["-m", "remote_runtime", job.task, *to_flags(job)]
    hosts = launch.hosts
    if len(hosts) <= 1:
        argv = [torchrun, "--standalone", "--nnodes", "1", "--nproc_per_node", nproc, *tail]
        return [{"host": hosts[0] if hosts else None, "node_rank": 0, "argv": argv}]
    out = []
    for rank, host in enumerate(hosts):
        argv = [
            torchrun,
            "--nnodes",
            str(len(hosts)),
            "--nproc_per_node",
            nproc,
            "--node_rank",
            str(rank),
            "--master_addr",
            hosts[0],
            "--master_port",
            str(launch.master_port),
            *tail,
        ]
        out.append({"host": host, "node_rank": rank, "argv": argv})
    return out


def render(t: Template, job: JobConfig, fmt: str = "yaml") -> str:
    """The job as `yaml` (the template), `flags` (runtime flags) or `command` (torchrun lines)."""
    if fmt == "yaml":
        return render_yaml(t, job)
    if fmt == "flags":
        return shlex.join(to_flags(job)) + "\n"
    if fmt == "command":
        lines = []
        for cmd in torchrun_commands(job):
            if cmd["host"] is not None and len(job.launch.hosts) > 1:
                lines.append(f"# on {cmd['host']} (node {cmd['node_rank']})")
            lines.append(shlex.join(cmd["argv"]))
        return "\n".join(lines) + "\n"
    raise UsageError(f"unknown format {fmt!r} (use one of: {', '.join(FORMATS)})")
