"""Operator side of the environment check (`scripts/check_megatron_env.py`).

The script runs on each node with the venv's Python and prints one JSON report. This module
turns what came back from each host into validated reports (`report_from_output`), compares
hosts (`cross_node_findings`: torch, CUDA, NCCL, transformer-engine and megatron-core versions,
GPU models), and shows one host × check table (`render`). Everything here except `run_local`,
`check_hosts` and `render` is a pure function of its inputs. `check_hosts` uploads the script
to every host (~/megafleet/bin/) and runs `remote_command` there: the venv's python when the
venv exists, else the system python3.
"""

from __future__ import annotations

import functools
import importlib.util
import json
import shlex
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any, Iterable, Mapping, Sequence

from megafleet import resources
from megafleet.errors import (
    EXIT_FAILED,
    EXIT_OK,
    EXIT_REMOTE,
    EXIT_UNREACHABLE,
    FieldProblem,
    ValidationError,
)
from megafleet.jsonschema_subset import iter_errors, unsupported_keywords

# (facts key, label, the table row it marks, severity). A version difference between nodes
# breaks collectives or checkpoints; different GPU models only make the fleet run at the pace
# of the slowest, so that one is a warning.
COMPARED_FACTS = (
    ("torch", "torch", "torch.import", "fail"),
    ("torch_cuda", "torch CUDA", "torch.cuda_build", "fail"),
    ("nccl_runtime", "NCCL", "nccl.runtime", "fail"),
    ("transformer_engine", "transformer-engine", "te.import", "fail"),
    ("megatron_core", "megatron-core", "megatron_core.version", "fail"),
    ("gpu_models", "GPU models", "gpu.count", "warn"),
)
# Table rows whose cell shows a fact's value (the version) next to the status symbol.
CELL_FACTS = {
    "python.version": "python",
    "torch.import": "torch",
    "torch.cuda_build": "torch_cuda",
    "driver.version": "driver",
    "cuda.nvcc": "nvcc",
    "cudnn.runtime": "cudnn_runtime",
    "nccl.runtime": "nccl_runtime",
    "cudnn.headers": "cudnn_headers",
    "nccl.headers": "nccl_headers",
    "te.import": "transformer_engine",
    "megatron_core.version": "megatron_core",
    "apex.cuda_ext": "apex",
    "flash_attn.version": "flash_attn",
    "transformers.import": "transformers",
    "safetensors.import": "safetensors",
    "tokenizers.import": "tokenizers",
    "peft.import": "peft",
}
MISSING = "missing"


@dataclass
class HostReport:
    """What one host's check produced: a validated report, or why there is none."""

    host: str
    report: dict | None = None
    error: str | None = None
    exit_code: int | None = None
    reached: bool = True  # False: the host could not be reached or authenticated

    @property
    def ok(self) -> bool:
        return self.report is not None and self.report["summary"]["ok"]

    @property
    def facts(self) -> dict:
        return self.report["facts"] if self.report else {}

    def check(self, check_id: str) -> dict | None:
        for c in (self.report or {}).get("checks", []):
            if c["id"] == check_id:
                return c
        return None

    def to_dict(self) -> dict:
        return {
            "host": self.host,
            "ok": self.ok,
            "exit_code": self.exit_code,
            "error": self.error,
            "reached": self.reached,
            "report": self.report,
        }


@dataclass
class Finding:
    """A fact that differs between hosts."""

    key: str
    label: str
    check_id: str
    severity: str  # "fail" or "warn"
    values: dict[str, str] = field(default_factory=dict)  # host -> value ("missing" if none)

    @property
    def message(self) -> str:
        groups: dict[str, list[str]] = {}
        for host, value in self.values.items():
            groups.setdefault(value, []).append(host)
        parts = [f"{value} on {', '.join(hosts)}" for value, hosts in groups.items()]
        return f"{self.label} not the same on all hosts: " + "; ".join(parts)

    def to_dict(self) -> dict:
        return {
            "key": self.key,
            "label": self.label,
            "check_id": self.check_id,
            "severity": self.severity,
            "values": self.values,
            "message": self.message,
        }


# ------------------------------------------------------------------------- schema, parsing


@functools.lru_cache(maxsize=1)
def load_schema() -> dict:
    schema = json.loads(resources.check_schema_path().read_text())
    bad = unsupported_keywords(schema)
    if bad:
        raise RuntimeError(f"the report schema uses keywords megafleet cannot check: {bad}")
    return schema


def validate_report(doc: Any, host: str | None = None) -> list[FieldProblem]:
    """Every schema violation of a report, each naming the field (and the host)."""
    return [
        FieldProblem(field=where, message=message, source=host)
        for where, message in iter_errors(doc, load_schema())
    ]


def parse_report(text: str, host: str = "local") -> dict:
    """The report in a host's output, validated; raises ValidationError naming host and field."""
    start = text.find("\n{") + 1 if not text.startswith("{") else 0  # after login-script noise
    try:
        doc = json.loads(text[start:])
    except json.JSONDecodeError as exc:
        raise ValidationError(
            [
                FieldProblem(
                    field="(output)",
                    source=host,
                    message=f"not JSON ({exc.msg} at line {exc.lineno})",
                )
            ],
            hint="run the check script by hand on that host to see its output",
        )
    problems = validate_report(doc, host)
    if problems:
        raise ValidationError(
            problems,
            hint="the node's check script and this megafleet differ "
            "in version: upload the script again",
        )
    return doc


def report_from_output(
    host: str, exit_code: int | None, stdout: str, stderr: str = ""
) -> HostReport:
    """A HostReport from one run of the script (exit 0 or 1 both carry a full report)."""
    if exit_code not in (0, 1) or not stdout.strip():
        last = " | ".join(line.strip() for line in (stderr or stdout).strip().splitlines()[-3:])
        why = f"the check script exited with {exit_code}: {last or 'no output'}"
        return HostReport(host, error=why, exit_code=exit_code)
    try:
        doc = parse_report(stdout, host)
    except ValidationError as exc:
        return HostReport(host, error=exc.message, exit_code=exit_code)
    return HostReport(host, report=doc, exit_code=exit_code)


# --------------------------------------------------------------------------- comparisons


def _fact_value(facts: Mapping[str, Any], key: str) -> str:
    if key == "gpu_models":
        names = sorted({g.get("name") or "?" for g in facts.get("gpus") or []})
        return ", ".join(names) if names else "no GPU"
    value = facts.get(key)
    return MISSING if value is None else str(value)


def cross_node_findings(facts_by_host: Mapping[str, Mapping[str, Any]]) -> list[Finding]:
    """Facts that differ between hosts (a single host has none). `facts_by_host` maps a host
    to its report's `facts`; hosts without a report are left out by the caller."""
    findings = []
    if len(facts_by_host) < 2:
        return findings
    for key, label, check_id, severity in COMPARED_FACTS:
        values = {host: _fact_value(facts, key) for host, facts in facts_by_host.items()}
        if len(set(values.values())) > 1:
            findings.append(Finding(key, label, check_id, severity, values))
    return findings


def findings_for(reports: Iterable[HostReport]) -> list[Finding]:
    return cross_node_findings({r.host: r.facts for r in reports if r.report})


def exit_code_for(reports: Sequence[HostReport], findings: Sequence[Finding]) -> int:
    if not all(r.reached for r in reports):
        return EXIT_UNREACHABLE
    if any(r.report is None for r in reports):
        return EXIT_REMOTE
    if not all(r.ok for r in reports) or any(f.severity == "fail" for f in findings):
        return EXIT_FAILED
    return EXIT_OK


def fleet_json(reports: Sequence[HostReport], findings: Sequence[Finding]) -> dict:
    code = exit_code_for(reports, findings)
    return {
        "ok": code == EXIT_OK,
        "exit_code": code,
        "hosts": {r.host: r.to_dict() for r in reports},
        "findings": [f.to_dict() for f in findings],
    }


# ------------------------------------------------------------------------------ the table


def check_ids(reports: Iterable[HostReport]) -> list[str]:
    """Every check id of every report, in the script's order (first appearance)."""
    seen: dict[str, None] = {}
    for r in reports:
        for c in (r.report or {}).get("checks", []):
            seen.setdefault(c["id"], None)
    return list(seen)


def cell(report: HostReport, check_id: str) -> tuple[str, str]:
    """(status, short text) of one host's check: the fact value for version rows, else the
    start of the detail for anything that is not a plain pass."""
    if report.report is None:
        return "fail", "no report"
    c = report.check(check_id)
    if c is None:
        return "skip", "not checked"
    fact = CELL_FACTS.get(check_id)
    if fact and report.facts.get(fact) is not None:
        return c["status"], str(report.facts[fact])
    if check_id == "gpu.count" and report.facts.get("gpus"):
        return c["status"], _gpu_summary(report.facts["gpus"])
    text = "" if c["status"] == "pass" else c["detail"]
    return c["status"], text if len(text) <= 32 else text[:31] + "…"


def _gpu_summary(gpus: list[dict]) -> str:
    counts: dict[str, int] = {}
    for g in gpus:
        counts[g.get("name") or "?"] = counts.get(g.get("name") or "?", 0) + 1
    return ", ".join(f"{n}× {name}" for name, n in counts.items())


def matrix_rows(
    reports: Sequence[HostReport],
    findings: Sequence[Finding],
) -> list[tuple[str, bool, list[tuple[str, str]]]]:
    """(check id, differs across hosts, [(status, text) per host]) for every row."""
    marked = {f.check_id for f in findings}
    return [(cid, cid in marked, [cell(r, cid) for r in reports]) for cid in check_ids(reports)]


def problems(reports: Sequence[HostReport]) -> list[tuple[list[str], dict]]:
    """Failed and warning checks, identical ones (same id, status, detail and fix) grouped
    across hosts, failures of required checks first."""
    groups: dict[tuple, tuple[list[str], dict]] = {}
    for r in reports:
        for c in (r.report or {}).get("checks", []):
            if c["status"] in ("fail", "warn"):
                key = (c["id"], c["status"], c["detail"], c["fix"])
                groups.setdefault(key, ([], c))[0].append(r.host)
    rank = {("required", "fail"): 0, ("optional", "fail"): 1}
    return sorted(groups.values(), key=lambda g: rank.get((g[1]["level"], g[1]["status"]), 2))


def render(
    reports: Sequence[HostReport], findings: Sequence[Finding], show_fixes: bool = True
) -> None:
    from megafleet import ui

    ui.show_check_matrix(
        [r.host for r in reports],
        matrix_rows(reports, findings),
        title=f"Environment check: {len(reports)} host(s)",
    )
    for r in reports:
        if r.report is None:
            ui.check_row("fail", r.host, r.error or "no report")
    for f in findings:
        ui.check_row(f.severity, "mismatch", f.message)
    if show_fixes:
        for hosts, c in problems(reports):
            ui.problem(", ".join(hosts), c["id"], c["status"], c["level"], c["detail"], c["fix"])


# ------------------------------------------------------------------------- running it


def load_check_script() -> ModuleType:
    """The node script as a module, for its reusable functions (header discovery, export lines,
    driver table). It stays a standalone file; importing it has no side effects."""
    name = "megafleet_check_megatron_env"
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, resources.check_script_path())
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up while the file executes
    try:
        spec.loader.exec_module(module)
    except BaseException:
        del sys.modules[name]
        raise
    return module


def script_argv(
    python: str,
    script: str | Path,
    workdirs: Sequence[str] = (),
    require_te: bool = False,
    cpu_ok: bool = False,
    timeout: float | None = None,
) -> list[str]:
    """The command that runs the check with `python` and prints JSON (also what the SSH runner
    runs on a node after uploading the script; join it with shlex.join)."""
    argv = [python, str(script), "--json"]
    for w in workdirs:
        argv += ["--workdir", w]
    if require_te:
        argv.append("--require-te")
    if cpu_ok:
        argv.append("--cpu-ok")
    if timeout is not None:
        argv += ["--timeout", f"{timeout:g}"]
    return argv


def run_local(
    python: str,
    host: str = "local",
    workdirs: Sequence[str] = (),
    require_te: bool = False,
    cpu_ok: bool = False,
    timeout: float = 180,
    env: Mapping[str, str] | None = None,
) -> HostReport:
    """Run the check on this machine with the interpreter `python`."""
    argv = script_argv(python, resources.check_script_path(), workdirs, require_te, cpu_ok, timeout)
    try:
        # Each probe has its own timeout; this one only guards against a wedged script.
        proc = subprocess.run(
            argv,
            capture_output=True,
            text=True,
            timeout=timeout * 12 + 60,
            env=dict(env) if env is not None else None,
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        return HostReport(host, error=f"{shlex.join(argv)}: {exc}")
    return report_from_output(host, proc.returncode, proc.stdout, proc.stderr)


# Where `env check` and `setup` keep the script on a node (relative to the user's home).
NODE_SCRIPT = "megafleet/bin/check_megatron_env.py"


def remote_command(
    venv: str,
    workdirs: Sequence[str] = (),
    require_te: bool = False,
    cpu_ok: bool = False,
    timeout: float | None = None,
) -> str:
    """The shell command a node runs: the check with the venv's python when that venv exists
    (before `megafleet setup`, the system python3). Relative paths are under $HOME."""

    def home_path(path: str) -> str:
        if path == "~" or path.startswith("~/"):
            path = path[2:]
        return shlex.quote(path) if path.startswith("/") else '"$HOME"/' + shlex.quote(path)

    flags = shlex.join(script_argv("python", "script", workdirs, require_te, cpu_ok, timeout)[2:])
    return (
        f'V={home_path(venv)}; if [ -x "$V/bin/python" ]; then P="$V/bin/python"; '
        f'else P=python3; fi; exec "$P" {home_path(NODE_SCRIPT)} {flags}'
    )


def check_host(
    runner,
    venv: str,
    workdirs: Sequence[str] = (),
    require_te: bool = False,
    cpu_ok: bool = False,
    timeout: float = 180,
) -> HostReport:
    """Upload the script to one host (a Runner) and run it there."""
    put = runner.put(resources.check_script_path(), "~/" + NODE_SCRIPT)
    if not put.ok:
        return HostReport(runner.name, error=put.message or put.describe(), reached=put.reached)
    res = runner.run(
        remote_command(venv, workdirs, require_te, cpu_ok, timeout), timeout=timeout * 12 + 60
    )
    if not res.reached or res.error not in (None, "exit"):
        return HostReport(
            runner.name,
            error=res.message or res.describe(lines=3),
            exit_code=res.exit_code,
            reached=res.reached,
        )
    return report_from_output(runner.name, res.exit_code, res.stdout, res.stderr)


def check_hosts(
    hosts,
    pool=None,
    venv: str | None = None,
    workdirs: Sequence[str] = (),
    require_te: bool = False,
    cpu_ok: bool = False,
    timeout: float = 180,
) -> list[HostReport]:
    """The check on every host at once (inventory Hosts through `pool`, or Runners), one
    HostReport each in the order given. `venv` defaults to the job config's launch.venv."""
    from megafleet.runner import run_on_hosts

    if venv is None:
        from remote_runtime.spec.config import JobConfig

        venv = JobConfig().launch.venv
    results = run_on_hosts(
        hosts,
        lambda r: check_host(r, venv, workdirs, require_te, cpu_ok, timeout),
        pool=pool,
        timeout=None,
    )
    return [
        res.value
        if res.ok and isinstance(res.value, HostReport)
        else HostReport(name, error=res.message or res.describe(lines=3), reached=res.reached)
        for name, res in results.items()
    ]
