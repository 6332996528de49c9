"""`megafleet launch | logs | status | runs | stop | fetch`: a job's life on the fleet.

    megafleet launch job.yaml [--hosts a,b] [-- --train_iters 100 ...]
    megafleet launch --hosts a,b -- --model DIR --dataset data.jsonl --train_iters 100
    megafleet launch --local -- ...                 (this machine, no SSH)
    megafleet resume RUN [-- --train_iters 2000]    (same nodes, from the newest checkpoint)
    megafleet logs RUN -f          megafleet status RUN      megafleet stop RUN
    megafleet fetch RUN [--checkpoint latest|N] [--to DIR]

RUN is a run id, a unique prefix of one, or `last`. Exit codes: see README; `logs -f` exits
with the run's own exit code once it has ended on every node.
"""

from __future__ import annotations

import sys

import click

from megafleet import ui
from megafleet.cli import dry_run_option, json_option, yes_option
from megafleet.errors import EXIT_INTERRUPTED, UsageError

RUN_HELP = "A run id, a unique prefix of one, or `last`."


def _confirm(yes: bool, question: str) -> None:
    ui.confirm(yes, question, default=True, cancelled="cancelled; nothing was started")


def job_from_args(args: tuple[str, ...]):
    """`[JOB.yaml] [sft|pt] [--flag value ...]` -> JobConfig (flags override the file)."""
    from megafleet.jobs.launch import config_problems
    from remote_runtime.spec.config import TASKS, ConfigError
    from remote_runtime.spec.flags import job_from_argv

    rest = list(args)
    job_file = (
        rest.pop(0) if rest and not rest[0].startswith("-") and rest[0] not in TASKS else None
    )
    task = rest.pop(0) if rest and rest[0] in TASKS else None
    if job_file is None and not rest:
        raise UsageError(
            "give a job file or runtime flags",
            hint="megafleet launch job.yaml, or megafleet launch -- --model DIR "
            "--dataset data.jsonl --train_iters 100",
        )
    try:
        return job_from_argv((["--config", job_file] if job_file else []) + rest, task=task)
    except ConfigError as exc:
        raise config_problems(exc) from None


@click.command("launch", context_settings={"ignore_unknown_options": True})
@click.argument("args", nargs=-1, type=click.UNPROCESSED, metavar="[JOB.yaml] [-- RUNTIME FLAGS]")
@click.option(
    "--hosts",
    "hosts",
    help="Comma-separated inventory hosts, node 0 first (default: launch.hosts, else every host).",
)
@click.option("--local", is_flag=True, help="Run on this machine, without SSH.")
@click.option("--follow", "-f", is_flag=True, help="Follow the logs once started.")
@click.option(
    "--entry-module",
    default="remote_runtime",
    hidden=True,
    help="The module torchrun runs (`-m MODULE TASK --config job.yaml`); for tests and "
    "for developing the runtime.",
)
@json_option
@dry_run_option
@yes_option
def launch(args, hosts, local, follow, entry_module, as_json, dry_run, yes) -> None:
    """Validate a job, upload its data, and start it on every node (node 0 is the master).

    The job comes from a job file and/or runtime flags after `--` (Megatron-SWIFT names, e.g.
    `--model DIR --dataset a.jsonl --train_iters 100 --nproc_per_node 8`); flags win. Before
    anything changes on a node it checks the nodes' megafleet version, the master address and
    that every worker reaches the master port, and runs the runtime's dry run.
    """
    from megafleet.cli import jobs_view
    from megafleet.jobs.launch import LaunchOptions, plan_launch

    job = job_from_args(args)
    say = (lambda m: None) if as_json else (lambda m: ui.err_console.print(f"[dim]{m}[/dim]"))
    opts = LaunchOptions(
        hosts=hosts.split(",") if hosts else None, local=local, say=say, entry_module=entry_module
    )
    say("checking the nodes ...")
    plan = plan_launch(job, opts)
    if dry_run:
        ui.emit_json(plan.describe()) if as_json else jobs_view.show_plan(plan, dry_run=True)
        return
    _start_and_report(plan, "start", yes, as_json, follow, say)


@click.command("resume", context_settings={"ignore_unknown_options": True})
@click.argument("run_ref", metavar="RUN")
@click.argument("args", nargs=-1, type=click.UNPROCESSED, metavar="[-- RUNTIME FLAGS]")
@click.option("--follow", "-f", is_flag=True, help="Follow the logs once started.")
@json_option
@yes_option
def resume(run_ref, args, follow, as_json, yes) -> None:
    """Continue a stopped, failed or finished run from its newest complete checkpoint.

    Same run id, same hosts in the same order, same run directories; the job recorded at its
    launch, with runtime flags after `--` on top (e.g. a larger --train_iters) and
    checkpoint.resume=auto. A changed layout (hosts, processes per node, parallel sizes) is
    refused. The log says "resumed from ... at step N" (or that there was nothing to resume)."""
    from megafleet.jobs.launch import plan_launch
    from megafleet.jobs.records import RunRecord
    from megafleet.jobs.resume import check_not_running, resume_job, resume_options

    previous = RunRecord.load(run_ref)
    job = resume_job(previous, list(args))
    say = (lambda m: None) if as_json else (lambda m: ui.err_console.print(f"[dim]{m}[/dim]"))
    check_not_running(previous)
    say(
        f"resuming run {previous.run_id} (launch {previous.attempt + 1}) on "
        f"{', '.join(n.host for n in previous.nodes)} ..."
    )
    plan = plan_launch(job, resume_options(previous, say))
    _start_and_report(plan, "resume", yes, as_json, follow, say)


def _start_and_report(plan, verb: str, yes: bool, as_json: bool, follow: bool, say) -> None:
    """Show the plan, confirm, upload and start every node, report the run; follow its logs."""
    from megafleet.cli import jobs_view
    from megafleet.jobs.launch import start_run

    if not as_json:
        jobs_view.show_plan(plan)
    _confirm(yes, f"{verb} run {plan.run.run_id} on {len(plan.run.nodes)} node(s)?")
    with ui.TransferBars(enabled=not as_json) as bars:
        run = start_run(plan, bars, say)
    if as_json:
        ui.emit_json({"run": run.to_dict(), "notes": plan.notes})
    else:
        jobs_view.show_started(run)
    if follow:
        _follow(run, None, None, as_json)


@click.command("logs")
@click.argument("run_ref", metavar="RUN", default="last")
@click.option(
    "--follow",
    "-f",
    is_flag=True,
    help="Keep streaming until the run ends; exit with its exit code.",
)
@click.option("--node", type=int, help="Only this node (by node rank).")
@click.option(
    "--lines", "-n", type=click.IntRange(min=1), help="Start with the last N lines of each node."
)
@json_option
def logs(run_ref, follow, node, lines, as_json) -> None:
    """Show the logs of every node at once, each line tagged `nK rR` (node, global rank).

    With --json: JSON Lines, one object per log line ({node, host, rank, text, progress}),
    the last one {"end": true, "exit_code": ...}. Ctrl-C detaches; the job keeps running."""
    from megafleet.jobs.logs import stream_logs
    from megafleet.jobs.records import RunRecord

    run = RunRecord.load(run_ref)
    if follow:
        _follow(run, node, lines, as_json)
        return
    result = stream_logs(run, _printer(as_json), node=node, lines=lines)
    _stream_errors(result, as_json)
    if as_json:
        from megafleet.jobs.status import run_status

        state = run_status(run) if not result.errors else {"state": run.state, "exit_code": None}
        ui.emit_json_line(
            {
                "end": True,
                "exit_code": state["exit_code"],
                "state": state["state"],
                "errors": result.errors,
            }
        )


def _printer(as_json: bool):
    def show(line) -> None:
        if as_json:
            ui.emit_json_line(line.to_dict())
        else:
            ui.log_line(
                line.prefix.ljust(7), ui.node_colour(line.node), line.text, dim=line.progress
            )

    return show


def _stream_errors(result, as_json: bool) -> None:
    if result.errors and not as_json:
        for host, why in result.errors.items():
            ui.err_console.print(f"[red]{host}:[/red] no log stream: {why}")


def _follow(run, node, lines, as_json) -> None:
    from megafleet.jobs.logs import follow_logs

    try:
        code, result = follow_logs(run, _printer(as_json), node=node, lines=lines)
    except KeyboardInterrupt:
        ui.err_console.print(
            f"[yellow]detached[/yellow]: run {run.run_id} keeps running "
            f"(megafleet stop {run.run_id} stops it)"
        )
        sys.exit(EXIT_INTERRUPTED)
    _stream_errors(result, as_json)
    if node is not None:
        code = (result.ends.get(run.node(node).host) or {}).get("exit_code")
    if as_json:
        ui.emit_json_line(
            {"end": True, "exit_code": code, "state": run.state, "errors": result.errors}
        )
    else:
        ui.err_console.print(
            f"run {run.run_id}: {run.state}" + (f", exit code {code}" if code is not None else "")
        )
    click.get_current_context().exit(code if code is not None else 4)


@click.command("status")
@click.argument("run_ref", metavar="[RUN]", required=False)
@click.option(
    "--lines",
    "-n",
    type=click.IntRange(min=0),
    default=10,
    show_default=True,
    help="Last log lines shown for a failed node.",
)
@click.option(
    "--plot",
    "plot",
    type=click.Path(dir_okay=False),
    metavar="FILE.png",
    help="Also draw the loss curve into a PNG (needs matplotlib).",
)
@json_option
def status(run_ref, lines, plot, as_json) -> None:
    """A run's state on every node: running or exit code, step, first and last loss with a
    loss curve, tokens/s, ETA, GPU use. Without RUN: the recorded runs."""
    from megafleet.cli import jobs_view
    from megafleet.jobs.records import RunRecord
    from megafleet.jobs.status import run_status

    if not run_ref:
        _list_runs(as_json)
        return
    report = run_status(RunRecord.load(run_ref), lines=max(lines, 1))
    if plot:
        report["plot"] = _plot(report, plot)
    ui.emit_json(report) if as_json else jobs_view.show_status(report, lines)
    if plot and not as_json:
        ui.info(report["plot"]["message"])


def _plot(report: dict, path: str) -> dict:
    """The loss curve as a PNG, or why not (no matplotlib here, no loss logged yet)."""
    from megafleet.jobs.status import plot_loss

    curve = (report.get("progress") or {}).get("loss_curve") or []
    if not curve:
        return {"path": None, "message": "no PNG written: the run has logged no loss yet"}
    try:
        plot_loss(curve, path, f"run {report['run']['run_id']}")
    except ImportError:
        return {
            "path": None,
            "message": "no PNG written: matplotlib is not installed here "
            "(pip install matplotlib); the sparkline above shows the same curve",
        }
    return {"path": path, "message": f"loss curve written to {path}"}


@click.command("runs")
@json_option
def runs(as_json) -> None:
    """List the recorded runs (last known state; `megafleet status RUN` asks the nodes)."""
    _list_runs(as_json)


def _list_runs(as_json: bool) -> None:
    from megafleet.cli import jobs_view
    from megafleet.jobs.records import list_runs

    records = list_runs()
    if as_json:
        ui.emit_json({"runs": [r.to_dict() for r in records]})
    else:
        jobs_view.show_runs(records)


@click.command("stop")
@click.argument("run_ref", metavar="RUN")
@click.option(
    "--grace",
    type=click.FloatRange(min=0),
    help="Seconds between SIGTERM and SIGKILL (default: the job's launch.stop_grace).",
)
@json_option
@dry_run_option
@yes_option
def stop(run_ref, grace, as_json, dry_run, yes) -> None:
    """Stop a run on every node: SIGTERM to every worker and the watcher (the workers save a
    checkpoint, torchrun then ends), SIGKILL to what is left after the grace period, then check
    that nothing of the run is left (nor holds GPU memory). A node that cannot be reached is
    named and the run stays `stopping` until `stop` reaches it."""
    from megafleet.cli import jobs_view
    from megafleet.errors import MegafleetError
    from megafleet.jobs.records import RunRecord
    from megafleet.jobs.stop import stop_plan, stop_run

    run = RunRecord.load(run_ref)
    if dry_run:
        plan = stop_plan(run, run.stop_grace if grace is None else grace)
        ui.emit_json(plan) if as_json else jobs_view.show_stop_plan(plan)
        return
    _confirm(yes, f"stop run {run.run_id} on {', '.join(n.host for n in run.nodes)}?")
    try:
        report = stop_run(run, grace)
    except MegafleetError as exc:
        if as_json and getattr(exc, "report", None):
            ui.emit_json({**exc.report, "error": exc.message, "hint": exc.hint})
            click.get_current_context().exit(exc.exit_code)
        raise
    ui.emit_json(report) if as_json else jobs_view.show_stopped(report)


@click.command("fetch")
@click.argument("run_ref", metavar="RUN")
@click.option(
    "--checkpoint", default="latest", show_default=True, help="`latest` or a step number."
)
@click.option(
    "--to",
    "to",
    type=click.Path(file_okay=False),
    help="Destination directory (default: ./checkpoints/RUN/checkpoint-STEP).",
)
@click.option(
    "--with-state",
    is_flag=True,
    help="Also bring the optimizer and RNG state "
    "(megatron_state/: large; node 0's shards only), e.g. to resume elsewhere.",
)
@json_option
def fetch(run_ref, checkpoint, to, with_state, as_json) -> None:
    """Download a Hugging Face checkpoint (the model, or the adapter) from the node that wrote it
    (resumable, sha256-checked). The optimizer state stays on the node unless --with-state."""
    from megafleet.jobs.fetch import fetch_checkpoint
    from megafleet.jobs.records import RunRecord

    if checkpoint != "latest" and not checkpoint.isdigit():
        raise UsageError(f"--checkpoint {checkpoint!r}: give `latest` or a step number")
    run = RunRecord.load(run_ref)
    with ui.TransferBars(enabled=not as_json) as bars:
        report = fetch_checkpoint(run, checkpoint, to, bars, with_state=with_state)
    if as_json:
        ui.emit_json(report)
        return
    ui.check_row(
        "ok",
        f"checkpoint-{report['step']} of run {run.run_id} in {report['path']}",
        f"{report['files']} files, {report['bytes_sent']} bytes fetched, "
        f"{len(report['skipped'])} already there; sha256 verified",
    )
    left = report["state_left_on_node"]
    if left["files"]:
        ui.info(
            f"optimizer state ({left['files']} files, {left['bytes'] / 2**20:.1f} MiB) left on "
            f"{report['host']}; add --with-state to bring it too"
        )
