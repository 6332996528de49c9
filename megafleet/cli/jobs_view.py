"""How the job commands look on a terminal (tables and hints; the data comes from
megafleet.jobs)."""

from __future__ import annotations

import time

from rich.markup import escape

from megafleet import ui


def _bytes(n: int | None) -> str:
    if n is None:
        return ""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def _duration(s: float | None) -> str:
    if s is None:
        return ""
    s = int(s)
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{s % 3600 // 60:02d}m"


def _ranks(ranks: list[int]) -> str:
    if not ranks:
        return ""
    return str(ranks[0]) if len(ranks) == 1 else f"{ranks[0]}-{ranks[-1]}"


def show_plan(plan, dry_run: bool = False) -> None:
    run = plan.run
    title = (
        f"{'would start' if dry_run else 'run'} {run.run_id}: {run.task} on {len(run.nodes)} "
        f"node(s) × {run.nproc_per_node} process(es) = world size {run.world_size}; master "
        f"{run.master_addr}:{run.master_port}, watcher port {run.watcher_port}"
    )
    rows = []
    for n in run.nodes:
        copies = plan.copies.get(n.host, [])
        rows.append(
            (
                n.rank,
                n.host,
                _ranks(n.ranks),
                n.run_dir,
                f"{len(copies)} file(s), {_bytes(sum(c.size for c in copies))}" if copies else "-",
            )
        )
    ui.show(
        ui.table(title, ["node", "host", "ranks", "run directory", "upload (if changed)"], rows)
    )
    for note in plan.notes:
        ui.check_row("info", note)
    if plan.ports:
        ui.check_row(
            "ok",
            f"every worker reaches {run.master_addr} on ports "
            f"{run.master_port} and {run.watcher_port}",
        )
    if plan.resolved:
        par = plan.resolved.get("parallel", {})
        ui.check_row(
            "ok",
            "the runtime's dry run accepts the job",
            " ".join(f"{k}={v}" for k, v in par.items() if k.endswith("_size")),
        )
    if dry_run:
        node = run.nodes[0]
        from megafleet.jobs.node_scripts import launch_script

        ui.info(f"[bold]launch.sh on {escape(node.host)}:[/bold]")
        ui.info(escape(launch_script(run, node)))
        ui.info("dry run: nothing was uploaded or started")


def show_started(run) -> None:
    for n in run.nodes:
        ui.check_row(
            "ok", f"node {n.rank} ({n.host}) started", f"pid {n.pid}, ranks {_ranks(n.ranks)}"
        )
    ui.info(f"run [bold]{run.run_id}[/bold] is running")
    ui.hint(
        f"megafleet logs {run.run_id} -f",
        f"megafleet status {run.run_id}",
        f"megafleet stop {run.run_id}",
        f"megafleet fetch {run.run_id}",
    )


def show_runs(records) -> None:
    if not records:
        ui.info("no runs yet")
        ui.hint("megafleet launch job.yaml")
        return
    rows = [
        (
            r.run_id,
            time.strftime("%Y-%m-%d %H:%M", time.localtime(r.created)),
            r.task,
            ", ".join(n.host for n in r.nodes),
            r.world_size,
            r.state,
            "" if r.exit_code is None else r.exit_code,
        )
        for r in records
    ]
    ui.show(
        ui.table(
            f"{len(records)} run(s) (last known state)",
            ["run", "started", "task", "hosts", "world", "state", "exit"],
            rows,
        )
    )


def _contact(n: dict) -> str:
    t = n.get("last_contact")
    return "last contact " + (
        time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(t)) if t else "never"
    )


def _node_row(n: dict) -> tuple:
    if not n.get("reachable", True):
        return (
            n["node_rank"],
            n["host"],
            _ranks(n["ranks"]),
            f"[red]unreachable[/red] ({_contact(n)})",
            "",
            "",
            "",
            "",
            "",
            "",
        )
    if n.get("error"):
        return (
            n["node_rank"],
            n["host"],
            _ranks(n["ranks"]),
            f"[red]{escape(str(n['error']))}[/red]",
            "",
            "",
            "",
            "",
            "",
            "",
        )
    m = n.get("metrics") or {}
    step = f"{m.get('step')}/{m.get('train_iters')}" if m.get("step") is not None else ""
    loss = f"{m['loss']:.4g}" if isinstance(m.get("loss"), (int, float)) else ""
    if isinstance(m.get("eval_loss"), (int, float)):
        loss += f" (eval {m['eval_loss']:.4g} @{m.get('eval_step')})"
    tps = f"{m['tokens_per_s']:.0f}" if isinstance(m.get("tokens_per_s"), (int, float)) else ""
    gpus = n.get("gpus")
    gpu = ", ".join(f"{g['util']}% {g['mem_used_mib'] / 1024:.1f}G" for g in gpus) if gpus else "-"
    state = n.get("state", "?")
    if state == "exited":
        state = "exited 0" if n.get("exit_code") == 0 else f"[red]exited {n.get('exit_code')}[/red]"
        if (n.get("cause") or {}).get("signal"):
            state += f" [red]({escape(n['cause']['text'].split(': ', 1)[-1])})[/red]"
    elif state == "running":
        state = "[green]running[/green]"
    return (
        n["node_rank"],
        n["host"],
        _ranks(n["ranks"]),
        state,
        step,
        loss,
        tps,
        _duration(m.get("eta_s")),
        gpu,
        _duration(n.get("log_age_s")),
    )


def show_status(report: dict, lines: int) -> None:
    run = report["run"]
    t = ui.table(
        f"run {run['run_id']}: {report['state']}"
        + (f", exit code {report['exit_code']}" if report["exit_code"] is not None else ""),
        [
            "node",
            "host",
            "ranks",
            "state",
            "step",
            "loss",
            "tok/s",
            "ETA",
            "GPU util/mem",
            "log age",
        ],
        [],
    )
    for n in report["nodes"]:
        t.add_row(*[str(v) for v in _node_row(n)])
    ui.show(t)
    _show_loss(report.get("progress"))
    failure = report.get("failure")
    if failure:
        where = (
            f"node {failure['node']} ({failure.get('host')})"
            if failure.get("node") is not None
            else "the run"
        )
        ui.check_row(
            "fail",
            f"{where} failed first: {failure['reason']}",
            time.strftime("%H:%M:%S", time.localtime(failure.get("time", 0))),
        )
        for line in (failure.get("tail") or [])[-lines:]:
            ui.info(f"    [dim]{escape(line)}[/dim]")
    stops = [(n["host"], n["watcher_stop"]) for n in report["nodes"] if n.get("watcher_stop")]
    for host, ws in stops:
        ui.check_row("warn", f"{host} was stopped by the watcher", ws.get("reason", ""))
    for n in report["nodes"]:
        if not n.get("reachable", True):
            ui.check_row(
                "warn",
                f"{n['host']} is unreachable ({_contact(n)})",
                "its own watcher stops its job after losing contact with node 0",
            )
    if report["state"] == "stopping":
        ui.hint(
            f"megafleet stop {run['run_id']}  (again, once "
            f"{', '.join(run.get('stop_pending') or ['every node'])} answer)"
        )
    if report["state"] == "running":
        ui.hint(f"megafleet logs {run['run_id']} -f", f"megafleet stop {run['run_id']}")
    elif report["state"] in ("succeeded", "stopped"):
        ui.hint(f"megafleet fetch {run['run_id']}")
    elif report["state"] == "failed" and not failure:
        for n in report["nodes"]:
            if n.get("exit_code") not in (0, None) and n.get("log_tail"):
                ui.info(f"[bold]last lines of {escape(n['host'])}:[/bold]")
                for line in n["log_tail"][-lines:]:
                    ui.info(f"    [dim]{escape(line)}[/dim]")


def _show_loss(progress: dict | None) -> None:
    from megafleet.jobs.status import sparkline

    curve = (progress or {}).get("loss_curve") or []
    if not curve:
        return
    (first_step, first), (last_step, last) = curve[0], curve[-1]
    ui.info(
        f"loss {first:.4g} (step {first_step}) → {last:.4g} (step {last_step})  "
        f"{sparkline([v for _, v in curve])}"
    )


def show_stop_plan(plan: dict) -> None:
    ui.info(f"would stop run {plan['run_id']} (SIGTERM, SIGKILL after {plan['grace_s']:g}s):")
    for n in plan["nodes"]:
        for cmd in n["commands"]:
            ui.info(f"  {escape(n['host'])}: [cyan]{escape(cmd)}[/cyan]")


def show_stopped(report: dict) -> None:
    ui.info(f"run {report['run_id']}: {report.get('state', 'stopped')}")
    for host, r in report["nodes"].items():
        detail = f"{len(r.get('terminated', []))} terminated, {len(r.get('killed', []))} killed" + (
            "" if r.get("gpu_checked") else "; no GPUs to check"
        )
        ui.check_row("ok", f"{host}: nothing of the run is left", detail)
    ui.info(f"run {report['run_id']} stopped")
