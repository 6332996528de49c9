"""`megafleet env check`: is the Megatron training environment sound, and the same everywhere?

Today it checks this machine (`--local`), with one or more interpreters (`--python`, each shown
as its own column, so two venvs can be compared). Checking the inventory's hosts plugs in here
once the SSH runner lands: upload `resources.check_script_path()`, run
`envcheck.script_argv(<host venv python>, <uploaded path>, ...)` on every host and turn each
result into `envcheck.report_from_output(host, exit_code, stdout, stderr)`; everything after
that (findings, table, JSON, exit code) is shared with the local mode below.
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
@click.option("--local", "local", is_flag=True,
              help="Check this machine (the fleet's hosts need the SSH runner, not wired yet).")
@click.option("--python", "pythons", multiple=True, metavar="PATH",
              help="Interpreter to check with (repeatable; default: python3 on PATH).")
@click.option("--workdir", "workdirs", multiple=True, metavar="DIR",
              help="Check free disk space in DIR (repeatable; default: current directory).")
@click.option("--require-te", is_flag=True, help="Fail when transformer-engine is missing.")
@click.option("--cpu-ok", is_flag=True, help="Accept machines without CUDA GPUs (CPU smoke runs).")
@click.option("--timeout", type=click.FloatRange(min=1), default=180.0, show_default=True,
              help="Seconds each package probe may take.")
@json_option
@click.pass_context
def check(ctx: click.Context, local: bool, pythons: tuple[str, ...], workdirs: tuple[str, ...],
          require_te: bool, cpu_ok: bool, timeout: float, as_json: bool) -> None:
    """Check torch, GPUs, driver, CUDA, cuDNN/NCCL headers, transformer-engine, megatron-core
    and friends, and show how to fix what is missing. Exit 0 when every required check passes
    (and hosts agree), 1 when one fails, 4 when a host produced no report."""
    if not local:
        raise UsageError("checking the inventory's hosts is not available yet; use --local to "
                         "check this machine",
                         hint="megafleet env check --local --python /path/to/venv/bin/python")
    interpreters = [_interpreter(p) for p in pythons] or [_interpreter("python3")]
    if len(set(interpreters)) != len(interpreters):
        raise UsageError("--python: the same interpreter is given twice")
    reports = []
    for python in interpreters:
        label = "local" if len(interpreters) == 1 else f"local:{python}"
        if not as_json:
            ui.err_console.print(f"[dim]checking {label} ...[/dim]")
        reports.append(envcheck.run_local(python, label, workdirs, require_te, cpu_ok, timeout))
    findings = envcheck.findings_for(reports)
    if as_json:
        ui.emit_json(envcheck.fleet_json(reports, findings))
    else:
        envcheck.render(reports, findings)
    ctx.exit(envcheck.exit_code_for(reports, findings))


def _interpreter(value: str) -> str:
    path = value if os.sep in value else shutil.which(value)
    if not path or not os.path.isfile(path) or not os.access(path, os.X_OK):
        raise UsageError(f"--python {value}: no such executable")
    return os.path.abspath(path)
