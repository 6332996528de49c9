"""`megafleet env check`: is the Megatron training environment sound, and the same everywhere?

Over the inventory's hosts (the default): the script is uploaded to ~/megafleet/bin/ on every
host and run in parallel with the venv's python (`--venv`, default the job config's
launch.venv, ~/megafleet/venv) or the system python3 where that venv does not exist yet.
`--local` checks this machine with one or more interpreters (`--python`, each its own column,
so two venvs can be compared). Either way one host × check table, with the facts that differ
between hosts (torch, CUDA, NCCL, transformer-engine, megatron-core, GPU models) flagged.
"""

from __future__ import annotations

import os
import shutil

import click

from megafleet import envcheck, ui
from megafleet.cli import json_option
from megafleet.errors import UsageError


@click.group()
def env() -> None:
    """Check the Megatron training environment."""


@env.command("check")
@click.option("--hosts", "names", help="Comma-separated host names (default: every host).")
@click.option("--local", "local", is_flag=True, help="Check this machine instead of the hosts.")
@click.option(
    "--venv",
    metavar="PATH",
    help="The venv on each host (default: ~/megafleet/venv; "
    "relative paths are under the host user's home; system python3 if it is absent).",
)
@click.option(
    "--python",
    "pythons",
    multiple=True,
    metavar="PATH",
    help="With --local: interpreter to check with (repeatable; default: python3).",
)
@click.option(
    "--workdir",
    "workdirs",
    multiple=True,
    metavar="DIR",
    help="Check free disk space in DIR (repeatable; default: current / home directory).",
)
@click.option("--require-te", is_flag=True, help="Fail when transformer-engine is missing.")
@click.option("--cpu-ok", is_flag=True, help="Accept machines without CUDA GPUs (CPU smoke runs).")
@click.option(
    "--timeout",
    type=click.FloatRange(min=1),
    default=180.0,
    show_default=True,
    help="Seconds each package probe may take.",
)
@click.option(
    "--connect-timeout",
    type=float,
    default=10.0,
    show_default=True,
    help="Seconds to wait for each host to answer.",
)
@json_option
@click.pass_context
def check(
    ctx: click.Context,
    names,
    local: bool,
    venv,
    pythons: tuple[str, ...],
    workdirs: tuple[str, ...],
    require_te: bool,
    cpu_ok: bool,
    timeout: float,
    connect_timeout: float,
    as_json: bool,
) -> None:
    """Check torch, GPUs, driver, CUDA, cuDNN/NCCL headers, transformer-engine, megatron-core
    and friends, and show how to fix what is missing. Exit 0 when every required check passes
    and hosts agree, 1 when one fails or hosts differ, 3 when a host is unreachable, 4 when a
    host produced no report."""
    if local:
        if names or venv:
            raise UsageError(
                "--hosts and --venv are for the inventory's hosts, not --local",
                hint="with --local, pick interpreters with --python",
            )
        reports = _local_reports(pythons, workdirs, require_te, cpu_ok, timeout, as_json)
    else:
        if pythons:
            raise UsageError("--python goes with --local; on hosts, choose the venv with --venv")
        reports = _host_reports(
            names, venv, workdirs, require_te, cpu_ok, timeout, connect_timeout, as_json
        )
    findings = envcheck.findings_for(reports)
    if as_json:
        ui.emit_json(envcheck.fleet_json(reports, findings))
    else:
        envcheck.render(reports, findings)
    ctx.exit(envcheck.exit_code_for(reports, findings))


def _local_reports(pythons, workdirs, require_te, cpu_ok, timeout, as_json):
    interpreters = [_interpreter(p) for p in pythons] or [_interpreter("python3")]
    if len(set(interpreters)) != len(interpreters):
        raise UsageError("--python: the same interpreter is given twice")
    reports = []
    for python in interpreters:
        label = "local" if len(interpreters) == 1 else f"local:{python}"
        if not as_json:
            ui.err_console.print(f"[dim]checking {label} ...[/dim]")
        reports.append(envcheck.run_local(python, label, workdirs, require_te, cpu_ok, timeout))
    return reports


def _host_reports(names, venv, workdirs, require_te, cpu_ok, timeout, connect_timeout, as_json):
    from megafleet.inventory import Inventory
    from megafleet.ssh.connection import ConnectionPool

    inv = Inventory.load()
    selected = inv.select(names.split(",") if names else None)
    if not selected:
        raise UsageError(
            f"no hosts in {inv.path}",
            hint="add one with `megafleet hosts add`, or check this machine with "
            "`megafleet env check --local`",
        )
    pool = ConnectionPool(inv.jump_for, connect_timeout=connect_timeout)
    try:
        if as_json:
            return envcheck.check_hosts(selected, pool, venv, workdirs, require_te, cpu_ok, timeout)
        with ui.err_console.status(f"checking {len(selected)} host(s) ..."):
            return envcheck.check_hosts(selected, pool, venv, workdirs, require_te, cpu_ok, timeout)
    finally:
        pool.close()


def _interpreter(value: str) -> str:
    path = value if os.sep in value else shutil.which(value)
    if not path or not os.path.isfile(path) or not os.access(path, os.X_OK):
        raise UsageError(f"--python {value}: no such executable")
    return os.path.abspath(path)
