"""What `megafleet setup` shows: live per-host progress, the results, failures with the end of
their log and the known fix, the environment check table, and the dry-run plan."""

from __future__ import annotations

import threading
import time

from rich.markup import escape
from rich.table import Table

from megafleet import ui

TAIL_SHOWN = 30
STATE_STATUS = {"done": "ok", "skipped": "skip", "failed": "fail", "running": "info"}


class SetupProgress:
    """Per-host progress from the node agents' events. On a terminal: a live table (host,
    step n/N, elapsed, the latest log line); elsewhere one line per step change; `quiet`
    (--json) shows nothing."""

    def __init__(self, hosts: list[str], quiet: bool = False):
        self.lock = threading.Lock()
        now = time.monotonic()
        self.rows = {
            h: {
                "started": now,
                "step": "connecting",
                "n": 0,
                "of": 0,
                "state": "running",
                "activity": "",
                "ended": None,
            }
            for h in hosts
        }
        self.quiet = quiet
        self.live = None if quiet or not ui.is_terminal() else ui.live(self.render)

    def __enter__(self):
        if self.live:
            self.live.__enter__()
        return self

    def __exit__(self, *exc):
        if self.live:
            self.live.__exit__(*exc)

    def finish(self, host: str, result) -> None:
        """Show how the host ended (the live table's last frame stays on screen)."""
        with self.lock:
            row = self.rows[host]
            row["ended"] = time.monotonic()
            if result.status != "ok":
                row.update(
                    state="failed",
                    activity=result.status
                    + (": " + (result.failed or {}).get("step", "") if result.failed else ""),
                )
            else:
                row.update(state="done", activity="set up")

    def on_event(self, host: str, ev: dict) -> None:
        with self.lock:
            row = self.rows.setdefault(host, {"started": time.monotonic(), "ended": None})
            kind = ev.get("ev")
            if kind == "start":
                row["of"] = len(ev.get("steps", []))
            elif kind == "upload":
                row["activity"] = f"{ev['done'] / 2**20:.0f}/{ev['total'] / 2**20:.0f} MiB"
            elif kind == "activity":
                row["activity"] = ev.get("line", "")
            elif kind == "step":
                row.update(
                    step=ev["id"],
                    n=ev.get("n", 0),
                    of=ev.get("of", row.get("of", 0)),
                    state=ev["state"],
                    activity=ev.get("detail") or "",
                )
                if self.live is None and not self.quiet:
                    self._print_step(host, ev)

    def _print_step(self, host: str, ev: dict) -> None:
        where = f"[{ev['n']}/{ev['of']}] " if ev.get("of") else ""
        label = f"{escape(host)}  {where}{escape(ev['id'])}"
        if ev["state"] == "running":
            ui.info(f"  {label} ... {escape(ev.get('reason') or '')}")
        else:
            took = f" ({ev['seconds']:.1f}s)" if ev.get("seconds") else ""
            ui.check_row(
                STATE_STATUS.get(ev["state"], "info"),
                f"{label} {ev['state']}{took}",
                escape(ev.get("detail") or ev.get("message") or ""),
            )

    def render(self) -> Table:
        t = Table(title="megafleet setup", title_justify="left", header_style="bold")
        for col in ("host", "step", "state", "elapsed", "activity"):
            t.add_column(col, overflow="ellipsis", no_wrap=True)
        now = time.monotonic()
        with self.lock:
            for host, row in self.rows.items():
                elapsed = (row["ended"] or now) - row["started"]
                step = f"{row['n']}/{row['of']} {row['step']}" if row.get("of") else row["step"]
                state = f"{ui.symbol(STATE_STATUS.get(row['state'], 'info'))} {row['state']}"
                t.add_row(
                    escape(host),
                    escape(step),
                    state,
                    f"{elapsed:5.0f}s",
                    escape((row.get("activity") or "")[-70:]),
                )
        return t


# ---------------------------------------------------------------------------------- results

RESULT_STATUS = {
    "ok": "ok",
    "check_failed": "fail",
    "failed": "fail",
    "locked": "fail",
    "unreachable": "fail",
    "error": "fail",
    "planned": "info",
}


def show_results(results: dict) -> None:
    """Summary table, then each failure (step, log tail, fix), then the check table."""
    rows = []
    for r in results.values():
        ran = sum(1 for s in r.steps if s.get("state") == "done")
        skipped = sum(1 for s in r.steps if s.get("state") == "skipped")
        steps = f"{ran} run, {skipped} skipped" if r.steps else "-"
        result = f"{ui.symbol(RESULT_STATUS.get(r.status, 'fail'))} {r.status}"
        rows.append(
            (
                escape(r.host),
                result,
                steps,
                f"{r.seconds:.1f}s",
                escape(r.venv or ""),
                escape(r.log or ""),
            )
        )
    ui.show(
        ui.table(
            f"Setup of {len(results)} host(s)",
            ["host", "result", "steps", "time", "venv", "log on the host"],
            rows,
        )
    )
    for r in results.values():
        if r.status not in ("ok", "check_failed"):
            show_failure(r)
    reports = [r.report for r in results.values() if r.report is not None]
    if reports:
        from megafleet import envcheck

        envcheck.render(reports, envcheck.findings_for(reports))


def show_failure(r) -> None:
    f = r.failed or {}
    if not f:
        ui.check_row("fail", f"{r.host}: {r.message or r.status}")
        if r.hint:
            ui.info(f"    [bold]fix:[/bold] {escape(r.hint)}")
        return
    ui.check_row(
        "fail",
        f"{r.host}: step {f.get('step')} ({f.get('title')}) failed",
        escape(f.get("message") or ""),
    )
    tail = (f.get("tail") or [])[-TAIL_SHOWN:]
    if tail:
        ui.info(f"    [dim]last {len(tail)} lines of {escape(r.log or 'the log')}:[/dim]")
        for line in tail:
            ui.plain("    | " + line)
    fix = (r.known_problem or {}).get("fix") or f.get("fix")
    if r.known_problem:
        ui.info(f"    [bold]known problem:[/bold] {escape(r.known_problem['title'])}")
    if fix:
        for i, line in enumerate(fix.splitlines()):
            ui.info(("    [bold]fix:[/bold] " if i == 0 else "         ") + escape(line))
    ui.info("    then run `megafleet setup` again: finished steps are skipped")


# -------------------------------------------------------------------------------- dry run

PLAN_STATUS = {"skip": "skip", "run": "info", "recheck": "info", "blocked": "warn"}


def show_plan(results: dict) -> None:
    for r in results.values():
        if r.status != "planned":
            show_failure(r)
            continue
        f = r.facts or {}
        gpus = (
            f"{len(f['gpus'])}× {f['gpus'][0]}, driver {f.get('driver')}"
            if f.get("gpus")
            else "no GPU"
        )
        ui.info(
            f"[bold]{escape(r.host)}[/bold]: venv {escape(r.venv or '')} (python "
            f"{f.get('venv_python') or 'none yet'}), base {escape(str(f.get('base_python')))}"
            f" {f.get('base_python_version') or ''}, installer {f.get('installer')}, {gpus}"
        )
        up = r.uploads
        if up.get("files"):
            ui.info(f"  would upload {up['files']} file(s), {up['bytes'] / 2**20:.1f} MiB")
        for step in r.plan or []:
            ui.check_row(
                PLAN_STATUS.get(step["state"], "info"),
                f"{step['id']}: {step['state']}",
                escape(step.get("detail") or step.get("reason") or ""),
            )
            _plan_step(step)


def _plan_step(step: dict) -> None:
    if step.get("note"):
        ui.info(f"    [dim]{escape(step['note'])}[/dim]")
    bp = step.get("build_plan")
    if bp:
        for lib in ("cudnn", "nccl"):
            loc = bp.get(lib)
            ui.info(
                f"    {lib}: "
                + (
                    escape(f"{loc['include_dir']} ({loc['source']}, {loc.get('version') or '?'})")
                    if loc
                    else "[yellow]not found[/yellow]"
                )
            )
        if bp.get("missing"):
            ui.info(f"    missing: {escape(', '.join(bp['missing']))}")
    for cmd in step.get("commands") or []:
        if "write" in cmd:
            ui.plain(f"    write {cmd['write']}: {cmd['content'].strip()}")
            continue
        extra = {
            k: v
            for k, v in cmd["env"].items()
            if k not in ("PIP_DISABLE_PIP_VERSION_CHECK", "PIP_NO_INPUT", "PYTHONUNBUFFERED")
        }
        for k, v in extra.items():
            ui.plain(f"    env {k}={v}")
        if cmd.get("unset"):
            ui.plain(f"    unset {' '.join(cmd['unset'])}")
        ui.plain(f"    $ {cmd['shell']}")
    if step.get("blocked"):
        ui.info(f"    [yellow]cannot run now:[/yellow] {escape(step['blocked']['message'])}")
        if step["blocked"].get("fix"):
            ui.plain("    fix: " + step["blocked"]["fix"])
