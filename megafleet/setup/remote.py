"""Run the node agent on hosts through the runners: probe, upload, plan or run the setup.

The agent's source (megafleet/setup/node/*.py and scripts/check_megatron_env.py) travels on
the command's stdin with the request; `BOOTSTRAP` (a `python3 -c` one-screen program) loads it
as the package `megafleet_node` and calls `agent.main`. Nothing is copied to the node for a
probe or a dry run, and the node always runs exactly this operator's code.
"""

from __future__ import annotations

import functools
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from megafleet import resources
from megafleet.runner import Result, Runner, quote
from megafleet.setup.artifacts import Artifacts, missing_on_node, upload
from megafleet.setup.fixes import context_for, match_known_problem
from megafleet.setup.node.core import EVENT_MARK
from megafleet.setup.request import SetupOptions, build_request

OnEvent = Callable[[str, dict], None]
NODE_MODULES = ("core", "context", "steps", "agent")
PROBE_TIMEOUT = 180.0

BOOTSTRAP = """\
import json, sys, types
if sys.version_info < (3, 8):
    sys.exit("megafleet setup needs python >= 3.8 on the node, this is " + sys.version.split()[0])
d = json.loads(sys.stdin.read())
pkg = types.ModuleType("megafleet_node")
pkg.__path__ = []
sys.modules["megafleet_node"] = pkg
for name, source in d["modules"]:
    full = "megafleet_node." + name
    m = types.ModuleType(full)
    m.__package__, m.__file__ = "megafleet_node", "<%s>" % full
    sys.modules[full] = m
    setattr(pkg, name, m)
    exec(compile(source, m.__file__, "exec"), m.__dict__)
    if name == "check":
        pkg.CHECK = m
sys.exit(sys.modules["megafleet_node.agent"].main(d["request"], {"check": d["modules"][0][1]}))
"""


@functools.lru_cache(maxsize=1)
def node_modules() -> tuple[tuple[str, str], ...]:
    """(name, source) of the check script and the agent's modules, in load order."""
    here = Path(__file__).resolve().parent / "node"
    mods = [("check", resources.check_script_path().read_text())]
    return tuple(mods + [(n, (here / f"{n}.py").read_text()) for n in NODE_MODULES])


def agent_command(base_python: str) -> str:
    return f"{quote(base_python)} -c {quote(BOOTSTRAP)}"


def parse_events(text: str) -> list[dict]:
    out = []
    for line in text.splitlines():
        if line.startswith(EVENT_MARK):
            try:
                out.append(json.loads(line[len(EVENT_MARK) :]))
            except ValueError:
                continue
    return out


def run_agent(
    runner: Runner,
    request: dict,
    base_python: str,
    on_event: Callable[[dict], None] | None = None,
    timeout: float | None = PROBE_TIMEOUT,
) -> tuple[Result, list[dict]]:
    """Run the agent once; returns (the command's Result, its events). Events also go to
    `on_event` as they arrive."""
    payload = json.dumps({"modules": node_modules(), "request": request})

    def on_output(stream: str, line: str) -> None:
        if on_event and stream == "stdout" and line.startswith(EVENT_MARK):
            try:
                on_event(json.loads(line[len(EVENT_MARK) :]))
            except ValueError:
                pass

    res = runner.run(
        agent_command(base_python),
        timeout=timeout,
        stdin=payload,
        on_output=on_output if on_event else None,
    )
    res.command = f"megafleet setup agent ({request['mode']}) with {base_python}"
    return res, parse_events(res.stdout)


def _last(events: list[dict], kind: str) -> dict | None:
    return next((e for e in reversed(events) if e.get("ev") == kind), None)


@dataclass
class HostSetupResult:
    """One host's setup (or dry run): what each step did, and on failure why and the fix."""

    host: str
    status: str  # ok | check_failed | failed | locked | unreachable | error | planned
    steps: list[dict] = field(default_factory=list)
    failed: dict | None = None  # step, title, message, exit_code, command, tail, fix
    known_problem: dict | None = None  # {id, title, fix} when the log matches one
    log: str | None = None
    venv: str | None = None
    python: str | None = None
    report: Any = None  # envcheck.HostReport from the final check
    facts: dict | None = None
    plan: list[dict] | None = None
    uploads: dict = field(default_factory=dict)  # {"files": n, "bytes": b, "sent": b}
    seconds: float = 0.0
    message: str | None = None
    hint: str | None = None

    @property
    def ok(self) -> bool:
        return self.status in ("ok", "planned")

    def needs(self) -> list[str]:
        """Steps a setup would run (plus "upload" when files must be sent)."""
        todo = ["upload"] if self.uploads.get("files") else []
        return todo + [s["id"] for s in self.plan or [] if s["state"] != "skip"]

    def to_dict(self) -> dict:
        d = {
            k: getattr(self, k)
            for k in (
                "host",
                "status",
                "steps",
                "failed",
                "known_problem",
                "log",
                "venv",
                "python",
                "facts",
                "plan",
                "uploads",
                "seconds",
                "message",
                "hint",
            )
        }
        d["ok"] = self.ok
        d["report"] = self.report.to_dict() if self.report is not None else None
        return d


def _unreached(host: str, res: Result, started: float) -> HostSetupResult:
    status = "unreachable" if not res.reached else "error"
    message = res.message if not res.reached else res.describe(lines=10)
    return HostSetupResult(
        host, status, message=message, hint=res.hint, seconds=round(time.monotonic() - started, 2)
    )


def plan_host(runner: Runner, options: SetupOptions, art: Artifacts) -> HostSetupResult:
    """The dry run for one host: every step's state and exact commands; changes nothing."""
    started = time.monotonic()
    req = _request(options, art, "plan")
    req["hash_files"] = True
    res, events = run_agent(runner, req, options.base_python)
    ev = _last(events, "plan")
    if ev is None:
        return _unreached(runner.name, res, started)
    todo = missing_on_node(art, ev["facts"].get("files") or {})
    return HostSetupResult(
        runner.name,
        "planned",
        facts=ev["facts"],
        plan=ev["steps"],
        venv=ev["facts"]["venv"],
        uploads={
            "files": len(todo),
            "bytes": sum(f.size for f, _ in todo),
            "names": [f.name for f, _ in todo],
        },
        seconds=round(time.monotonic() - started, 2),
    )


def setup_host(
    runner: Runner,
    options: SetupOptions,
    art: Artifacts,
    on_event: OnEvent | None = None,
    timeout: float | None = None,
) -> HostSetupResult:
    """Probe, upload what is missing, run the steps; never raises for remote failures."""
    started = time.monotonic()
    tell = (lambda ev: on_event(runner.name, ev)) if on_event else (lambda ev: None)
    tell({"ev": "step", "id": "upload", "title": "upload", "state": "running", "n": 0})
    req = _request(options, art, "probe")
    req["hash_files"] = True
    res, events = run_agent(runner, req, options.base_python)
    probe = _last(events, "probe")
    if probe is None:
        return _unreached(runner.name, res, started)
    todo = missing_on_node(art, probe["facts"].get("files") or {})
    total = sum(f.size for f, _ in todo)
    sent, failed = upload(runner, todo, _throttled(tell))
    uploads = {"files": len(todo), "bytes": total, "sent": sent}
    if failed is not None:
        out = _unreached(runner.name, failed, started)
        out.status, out.uploads = ("unreachable" if not failed.reached else "failed"), uploads
        return out
    tell(
        {
            "ev": "step",
            "id": "upload",
            "state": "done",
            "n": 0,
            "detail": f"{len(todo)} file(s), {total / 2**20:.1f} MiB" if todo else "up to date",
        }
    )
    res, events = run_agent(
        runner, _request(options, art, "run"), options.base_python, on_event=tell, timeout=timeout
    )
    out = _from_result_event(runner.name, res, _last(events, "result"), options)
    out.facts, out.uploads = probe["facts"], uploads
    out.seconds = round(time.monotonic() - started, 2)
    return out


def _throttled(tell: Callable[[dict], None], every: float = 0.25):
    """Upload progress as events, at most every `every` seconds (and at the end)."""
    last = [0.0]

    def progress(done: int, total: int) -> None:
        now = time.monotonic()
        if done >= total or now - last[0] >= every:
            last[0] = now
            tell({"ev": "upload", "done": done, "total": total})

    return progress


def _request(options: SetupOptions, art: Artifacts, mode: str) -> dict:
    return build_request(
        options,
        mode,
        {"name": art.project.name, "sha256": art.project.sha256},
        art.wheelhouse_request(),
        art.check_sha256,
    )


def _from_result_event(
    host: str, res: Result, ev: dict | None, options: SetupOptions
) -> HostSetupResult:
    if ev is None:  # the agent died without a result: killed, disconnected, or a crash
        out = _unreached(host, res, time.monotonic())
        if res.reached:
            out.status = "failed"
            out.message = f"the setup stopped before it finished: {res.describe(lines=10)}"
            out.hint = "run `megafleet setup` again: finished steps are skipped"
        return out
    out = HostSetupResult(
        host,
        ev["status"],
        steps=ev.get("steps", []),
        failed=ev.get("failed"),
        log=ev.get("log"),
        venv=ev.get("venv"),
        python=ev.get("python"),
        message=ev.get("message"),
    )
    if ev["status"] == "locked":
        holder = ev.get("holder") or {}
        out.message = (
            f"another megafleet setup is running on {host} (pid {holder.get('pid', '?')}"
            f", started {holder.get('started', '?')})"
        )
        out.hint = "wait for it to finish, then run setup again"
    if ev.get("report") is not None:
        out.report = _host_report(host, ev["report"])
    if out.failed and not out.failed.get("check_failed"):
        ctx = context_for(out.failed, out.venv, ev.get("python_version"), options.wheelhouse)
        out.known_problem = match_known_problem(out.failed.get("tail") or [], ctx)
    return out


def _host_report(host: str, report: dict):
    from megafleet import envcheck

    problems = envcheck.validate_report(report, host)
    if problems:
        return envcheck.HostReport(host, error="; ".join(str(p) for p in problems[:3]))
    return envcheck.HostReport(host, report=report, exit_code=report["summary"]["exit_code"])
