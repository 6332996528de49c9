"""The wizard's last steps: show the job and the command, confirm, save, set up, launch, follow.

Order of changes (each only after the previous step succeeded):
1. "save" / "save and launch" confirmed -> `state.commit`: inventory, host keys, job file;
2. nodes without megafleet at this version in launch.venv -> `megafleet setup` on them, only
   after its own confirmation (the plan of each host is shown first);
3. the launch (`launch_job`): run record here, uploads and run directories on the nodes;
4. logs followed until the run ends; Ctrl-C detaches and the run goes on.
"""

from __future__ import annotations

from pathlib import Path

from rich.markup import escape

from megafleet import ui
from megafleet.errors import EXIT_INTERRUPTED, MegafleetError, ValidationError
from megafleet.wizard.ask import Asker
from megafleet.wizard.state import WizardState


def free_job_name(base: str = "job.yaml") -> str:
    stem, n, name = base[:-5], 1, base
    while Path(name).exists():
        n += 1
        name = f"{stem}-{n}.yaml"
    return name


def _job_file_problem(text: str) -> str | None:
    p = Path(text.strip()).expanduser()
    if not text.strip().endswith((".yaml", ".yml")):
        return "a .yaml file name"
    if p.exists():
        return f"{text.strip()} exists: choose another name (the wizard never overwrites)"
    if not p.absolute().parent.is_dir():
        return f"{p.absolute().parent} is not a directory"
    return None


def review(ask: Asker, state: WizardState, dry_run: bool) -> str:
    """Show the job and its command; "launch", "save" or "dry-run" (cancel raises)."""
    from megafleet.templates import job_file_text

    text = job_file_text(state.job)
    ui.info("\n[bold]The job file[/bold] (the same schema `megafleet render` and the runtime use):")
    ui.plain(text.rstrip("\n"))
    name = ask.text(
        "job_file",
        "Save the job as:",
        default=free_job_name(),
        validate=_job_file_problem,
        path=True,
    ).strip()
    state.job_file = Path(name).expanduser().absolute()
    ui.hint(f"megafleet launch {name}", title="The command that runs it (now or any time later)")
    what = ask.select(
        "confirm",
        "Go ahead?",
        [
            ("launch", f"Save {name} and launch now"),
            ("save", f"Save {name} only (launch later)"),
            ("cancel", "Cancel (nothing is written)"),
        ],
        default="launch",
    )
    if what == "cancel":
        raise KeyboardInterrupt
    if dry_run:
        ui.info(
            "dry run: would write "
            + ", ".join(
                ([f"the inventory (+{', '.join(state.added)})"] if state.added else []) + [name]
            )
        )
        return "dry-run"
    for line in state.commit(text):
        ui.check_row("ok", f"wrote {escape(line)}")
    if what == "save":
        ui.hint(f"megafleet launch {name}", title="Launch it with")
    return what


# -- environment ---------------------------------------------------------------------------------


def prepare_nodes(ask: Asker, state: WizardState) -> bool:
    """True when every node can run the job (setting them up if the user agrees)."""
    if state.mode == "local":
        from megafleet.demo import check_runtime_installed

        check_runtime_installed()
        ui.check_row("ok", "this machine has the training runtime (torch, megatron-core, ...)")
        return True
    from megafleet.jobs import preflight as P

    venv = state.job.launch.venv
    targets = P.select_targets(state.nodes, inventory=state.inventory, pool=state.pool)
    with ui.err_console.status("checking the nodes' environment ..."):
        facts = P.probe_nodes(targets, venv)
    try:
        P.check_versions(facts, venv)
    except ValidationError as exc:
        for p in exc.problems:
            ui.check_row("warn", f"{p.field}: not set up", escape(p.message))
        return setup_nodes(ask, state, [t.host for t in targets])
    ui.check_row(
        "ok",
        f"every node runs this megafleet in {venv}",
        "megafleet env check shows the whole environment",
    )
    return True


def setup_nodes(ask: Asker, state: WizardState, hosts: list) -> bool:
    from megafleet.setup import setup_hosts
    from megafleet.setup.request import SetupOptions
    from megafleet.setup.view import SetupProgress, show_plan, show_results

    names = [h.name for h in hosts]
    options = SetupOptions(venv=state.job.launch.venv)
    with ui.err_console.status("planning the setup ..."):
        planned = setup_hosts(hosts, options, pool=state.pool, dry_run=True)
    show_plan(planned)
    question = (
        f"Set up {', '.join(names)} now (a venv at {options.venv} with torch, "
        "megatron-core, transformers and this megafleet; takes minutes)?"
    )
    if not ask.confirm("setup", question, default=True):
        ui.info(f"Not set up. The job is saved in {state.job_file}.")
        ui.hint(
            f"megafleet setup --hosts {','.join(names)}",
            f"megafleet launch {state.job_file}",
            title="When you are ready",
        )
        return False
    with SetupProgress(names) as progress:
        results = setup_hosts(hosts, options, pool=state.pool, on_event=progress.on_event)
        for host, result in results.items():
            progress.finish(host, result)
    show_results(results)
    failed = [h for h, r in results.items() if r.status != "ok"]
    if failed:
        raise MegafleetError(
            f"setup did not finish on {', '.join(failed)}",
            hint=f"fix what is shown above, then: megafleet setup --hosts "
            f"{','.join(failed)} && megafleet launch {state.job_file}",
        )
    return True


# -- launch and logs -----------------------------------------------------------------------------


def launch(state: WizardState):
    from megafleet.cli.jobs_view import show_started
    from megafleet.jobs.launch import LaunchOptions, launch_job

    local = state.mode == "local"
    opts = LaunchOptions(
        local=local,
        hosts=None if local else state.nodes,
        inventory=None if local else state.inventory,
        pool=None if local else state.pool,
        say=lambda m: ui.err_console.print(f"[dim]{escape(m)}[/dim]"),
    )
    ui.err_console.print("[dim]checking the nodes, the master port and the job ...[/dim]")
    with ui.TransferBars() as bars:
        run = launch_job(state.job, opts, bars)
    show_started(run)
    return run


def follow(ask: Asker, run) -> int:
    """Stream every node's log until the run ends; its exit code (130 when detached)."""
    from megafleet.jobs.logs import follow_logs

    if not ask.confirm(
        "follow", "Follow the logs now? (Ctrl-C detaches; the run goes on)", default=True
    ):
        return 0
    try:
        code, result = follow_logs(
            run,
            lambda line: ui.log_line(
                line.prefix.ljust(7), ui.node_colour(line.node), line.text, dim=line.progress
            ),
        )
    except KeyboardInterrupt:
        ui.err_console.print(f"[yellow]detached[/yellow]: run {run.run_id} keeps running")
        ui.hint(
            f"megafleet logs {run.run_id} -f",
            f"megafleet stop {run.run_id}",
            title="To follow it again, or stop it",
        )
        return EXIT_INTERRUPTED
    for host, why in result.errors.items():
        ui.err_console.print(f"[red]{escape(host)}:[/red] no log stream: {escape(str(why))}")
    ok = code == 0
    ui.check_row(
        "ok" if ok else "fail",
        f"run {run.run_id} " + ("succeeded" if ok else "failed"),
        "" if code is None else f"exit code {code}",
    )
    ui.hint(
        *([f"megafleet fetch {run.run_id}"] if ok else [f"megafleet status {run.run_id}"]),
        f"megafleet logs {run.run_id}",
    )
    return code if code is not None else 4
