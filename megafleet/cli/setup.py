"""`megafleet setup`: install a working Megatron stack on every host (or this machine).

Exit codes: 0 every host set up and its environment check passed; 1 a check failed (or hosts
differ in torch / CUDA / NCCL / TE / megatron-core); 2 bad arguments; 3 a host could not be
reached; 4 a step failed on a host (or another setup held its lock).
"""

from __future__ import annotations

import click

from megafleet import ui
from megafleet.cli import dry_run_option, json_option, yes_option
from megafleet.errors import EXIT_FAILED, EXIT_OK, EXIT_REMOTE, EXIT_UNREACHABLE, UsageError

STEP_CHOICES = ("venv", "torch", "packages", "project", "te", "apex", "flash_attn", "check", "all")


@click.command("setup")
@click.option("--hosts", "names", help="Comma-separated host names (default: every host).")
@click.option("--local", is_flag=True, help="Set up this machine instead of the inventory's hosts.")
@click.option(
    "--with-te", is_flag=True, help="Also build transformer-engine (venv-local cuDNN/NCCL)."
)
@click.option("--with-apex", is_flag=True, help="Also build apex with its CUDA extensions.")
@click.option(
    "--with-flash-attn",
    is_flag=True,
    help="Also install flash-attn (the newest transformer-engine accepts).",
)
@click.option(
    "--venv",
    metavar="PATH",
    help="The venv on each host (default: ~/megafleet/venv; "
    "relative paths are under the host user's home).",
)
@click.option(
    "--wheelhouse",
    metavar="DIR",
    type=click.Path(file_okay=False),
    help="Install offline from this folder of wheels (uploaded incrementally).",
)
@click.option(
    "--build-wheelhouse",
    "build_dir",
    metavar="DIR",
    type=click.Path(file_okay=False),
    help="Only download every wheel the nodes need into DIR (on a connected machine).",
)
@click.option(
    "--python-version",
    metavar="X.Y",
    help="With --build-wheelhouse: the nodes' Python (default: this Python's).",
)
@click.option(
    "--platform",
    "platforms",
    multiple=True,
    metavar="TAG",
    help="With --build-wheelhouse: wheel platform tags (default: manylinux x86_64).",
)
@click.option(
    "--torch", "torch_spec", metavar="SPEC", help="torch requirement (default: torch>=2.6)."
)
@click.option(
    "--torch-index",
    metavar="cpu|cu130|...|URL",
    help="PyTorch wheel index (default: chosen from each host's NVIDIA driver).",
)
@click.option(
    "--base-python",
    default="python3",
    show_default=True,
    metavar="PATH",
    help="The host's Python the venv is made from.",
)
@click.option(
    "--installer",
    type=click.Choice(["auto", "uv", "pip"]),
    default="auto",
    show_default=True,
    help="auto: uv when the host has it, else python -m venv + pip.",
)
@click.option(
    "--max-jobs",
    type=click.IntRange(min=1),
    metavar="N",
    help="Parallel compile jobs for TE/apex/flash-attn (default: from cores and memory).",
)
@click.option(
    "--force",
    multiple=True,
    type=click.Choice(STEP_CHOICES),
    metavar="STEP",
    help="Redo a step even if it is done (repeatable; all = every step).",
)
@click.option(
    "--timeout",
    type=float,
    default=10.0,
    show_default=True,
    help="Seconds to wait for each host to answer.",
)
@json_option
@dry_run_option
@yes_option
def setup(
    names,
    local,
    with_te,
    with_apex,
    with_flash_attn,
    venv,
    wheelhouse,
    build_dir,
    python_version,
    platforms,
    torch_spec,
    torch_index,
    base_python,
    installer,
    max_jobs,
    force,
    timeout,
    as_json,
    dry_run,
    yes,
) -> None:
    """Install a working Megatron stack on every host, in parallel.

    Steps, each skipped when already done with the same inputs (a second run takes seconds;
    an interrupted run resumes): venv, torch for the host's driver, megatron-core +
    transformers + safetensors + tokenizers, this megafleet (as a wheel of your code), the
    optional transformer-engine / apex / flash-attn builds, and the environment check.
    Logs, lock and marker live on each host under ~/megafleet/setup/.
    """
    if build_dir:
        _build_wheelhouse(
            build_dir,
            python_version,
            platforms,
            torch_spec,
            torch_index,
            as_json,
            names or local or wheelhouse,
        )
        return
    if python_version or platforms:
        raise UsageError("--python-version and --platform go with --build-wheelhouse")
    from megafleet.setup.request import SetupOptions

    options = SetupOptions(
        with_te=with_te,
        with_apex=with_apex,
        with_flash_attn=with_flash_attn,
        wheelhouse=wheelhouse,
        base_python=base_python,
        installer=installer,
        torch_index=torch_index,
        max_jobs=max_jobs,
        force=tuple(force),
    )
    if venv:
        options.venv = venv
    if torch_spec:
        options.torch_spec = torch_spec
    options.validate()
    targets, pool = _targets(names, local, timeout)
    try:
        if not dry_run:
            _confirm(
                yes,
                f"set up {len(targets)} host(s) ({', '.join(_name(t) for t in targets)})"
                f" in {options.venv}?",
            )
        code = _run(targets, pool, options, dry_run, as_json)
    finally:
        if pool is not None:
            pool.close()
    click.get_current_context().exit(code)


def _name(t) -> str:
    return getattr(t, "name", "?")


def _targets(names, local, timeout):
    if local:
        if names:
            raise UsageError("--local and --hosts exclude each other")
        from megafleet.runner import LocalRunner

        return [LocalRunner("local")], None
    from megafleet.inventory import Inventory
    from megafleet.ssh.connection import ConnectionPool

    inv = Inventory.load()
    selected = inv.select(names.split(",") if names else None)
    if not selected:
        raise UsageError(
            f"no hosts in {inv.path}",
            hint="add one: megafleet hosts add NAME USER@ADDRESS, or use --local",
        )
    return selected, ConnectionPool(inv.jump_for, connect_timeout=timeout)


def _confirm(yes: bool, question: str) -> None:
    ui.confirm(yes, question, default=True)


def _run(targets, pool, options, dry_run: bool, as_json: bool) -> int:
    from megafleet.setup import setup_hosts
    from megafleet.setup.artifacts import prepare
    from megafleet.setup.view import SetupProgress, show_plan, show_results

    art = prepare(options.wheelhouse)
    if dry_run:
        results = setup_hosts(targets, options, pool=pool, dry_run=True, artifacts=art)
        code = _exit_code(results)
        if as_json:
            ui.emit_json(
                {
                    "dry_run": True,
                    "ok": code == EXIT_OK,
                    "exit_code": code,
                    "hosts": {h: r.to_dict() for h, r in results.items()},
                }
            )
        else:
            show_plan(results)
        return code
    progress = SetupProgress([_name(t) for t in targets], quiet=as_json)
    with progress:
        results = setup_hosts(
            targets, options, pool=pool, artifacts=art, on_event=progress.on_event
        )
        for host, result in results.items():
            progress.finish(host, result)
    findings = _findings(results)
    code = _exit_code(results, findings)
    if as_json:
        ui.emit_json(
            {
                "ok": code == EXIT_OK,
                "exit_code": code,
                "hosts": {h: r.to_dict() for h, r in results.items()},
                "findings": [f.to_dict() for f in findings],
            }
        )
    else:
        show_results(results)
        if code == EXIT_OK:
            ui.hint(_check_hint(targets, options, results))
    return code


def _check_hint(targets, options, results) -> str:
    if _name(targets[0]) == "local":
        python = next(iter(results.values())).python
        return f"megafleet env check --local --python {python}"
    from megafleet.setup.request import default_venv

    venv = "" if options.venv == default_venv() else f" --venv {options.venv}"
    return f"megafleet env check{venv}"


def _findings(results):
    from megafleet import envcheck

    return envcheck.findings_for([r.report for r in results.values() if r.report is not None])


def _exit_code(results, findings=()) -> int:
    statuses = {r.status for r in results.values()}
    if "unreachable" in statuses:
        return EXIT_UNREACHABLE
    if statuses & {"failed", "locked", "error"}:
        return EXIT_REMOTE
    if "check_failed" in statuses or any(f.severity == "fail" for f in findings):
        return EXIT_FAILED
    return EXIT_OK


def _build_wheelhouse(
    build_dir, python_version, platforms, torch_spec, torch_index, as_json, conflicting
) -> None:
    from megafleet.setup.wheelhouse import DEFAULT_PLATFORMS, build_wheelhouse

    if conflicting:
        raise UsageError(
            "--build-wheelhouse only prepares the folder: run setup --wheelhouse "
            "DIR afterwards (without --hosts/--local/--wheelhouse here)"
        )
    if not as_json:
        ui.err_console.print(f"[dim]downloading wheels into {build_dir} ...[/dim]")
    summary = build_wheelhouse(
        build_dir, python_version, platforms or DEFAULT_PLATFORMS, torch_spec, torch_index
    )
    if as_json:
        ui.emit_json(summary)
        return
    ui.check_row(
        "ok",
        f"wheelhouse {summary['dir']}: {summary['files']} files, "
        f"{summary['bytes'] / 2**20:.0f} MiB for Python "
        f"{summary['inputs']['python_version']}",
        "downloaded" if summary["downloaded"] else "already complete",
    )
    ui.hint(f"megafleet setup --wheelhouse {summary['dir']}")
