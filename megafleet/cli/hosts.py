"""`megafleet hosts add|list|remove|check|trust`: the inventory of SSH hosts.

The inventory lives in `./megafleet.yaml` (project) or `$MEGAFLEET_HOME/hosts.yaml` (user's);
see megafleet.inventory for the format. `check` exits 3 when a host is unreachable, 1 when
another error-level problem is found, 0 otherwise (warnings included).
"""

from __future__ import annotations

from pathlib import Path

import click

from megafleet import ui
from megafleet.cli import dry_run_option, json_option, yes_option
from megafleet.errors import UsageError
from megafleet.inventory import Host, Inventory, parse_target


@click.group("hosts")
def hosts() -> None:
    """Manage and check the SSH hosts megafleet uses."""


def _pool(inv: Inventory, timeout: float):
    from megafleet.ssh.connection import ConnectionPool

    return ConnectionPool(inv.jump_for, connect_timeout=timeout)


@hosts.command("add")
@click.argument("name")
@click.argument("target", metavar="[USER@]ADDRESS[:PORT]")
@click.option("--user", "-u", help="Login user (default: from TARGET, else your local user).")
@click.option("--port", "-p", type=int, help="SSH port (default 22).")
@click.option("--identity-file", "-i", type=click.Path(), help="Private key to log in with.")
@click.option("--private-address", help="Address the nodes use to reach this host.")
@click.option(
    "--jump-host", "-J", help="Reach it through this host (inventory name or user@host:port)."
)
@click.option("--tag", "tags", multiple=True, metavar="KEY=VALUE", help="A label (repeatable).")
@click.option("--replace", is_flag=True, help="Overwrite a host of the same name.")
@click.option("--check", "check_now", is_flag=True, help="Check the host right away.")
@json_option
@dry_run_option
@yes_option
def add(
    name,
    target,
    user,
    port,
    identity_file,
    private_address,
    jump_host,
    tags,
    replace,
    check_now,
    as_json,
    dry_run,
    yes,
) -> None:
    """Add a host to the inventory.

    Fields and the identity file are validated first; nothing is written on errors. With
    --check the host is checked first and written only when the check passes.
    """
    inv = Inventory.load()
    host = _host_from_args(
        name, target, user, port, identity_file, private_address, jump_host, tags
    )
    if identity_file:
        _check_identity(host)
    inv.add(host, replace=replace)
    if dry_run:
        _report(
            {
                "dry_run": True,
                "would_write": str(inv.path),
                "host": {"name": name, **host.to_dict()},
            },
            as_json,
            f"would add {name} ({host.target}) to {inv.path}",
        )
        return
    if check_now:  # check before writing: a host that fails its check is not added
        from megafleet.ssh.known_hosts import KnownHosts

        pins = KnownHosts().path
        pinned_before = pins.read_bytes() if pins.exists() else None
        code = _run_check(inv, [host], as_json, timeout=10.0, exit_on_failure=False)
        if code:  # nor is the host key it offered kept
            if pinned_before is None:
                pins.unlink(missing_ok=True)
            else:
                pins.write_bytes(pinned_before)
            ui.err_console.print(
                f"[red]not added[/red]: {name} failed its check; {inv.path} is "
                "unchanged (fix the problem above and run the same command again)"
            )
            click.get_current_context().exit(code)
        inv.save()
        if not as_json:
            ui.check_row("ok", f"added {name} ({host.target}) to {inv.path}")
        return
    path = inv.save()
    _report(
        {"added": name, "inventory": str(path), "host": host.to_dict()},
        as_json,
        f"added {name} ({host.target}) to {path}",
    )
    if not as_json:
        ui.hint(f"megafleet hosts check --hosts {name}")


def _host_from_args(
    name, target, user, port, identity_file, private_address, jump_host, tags
) -> Host:
    try:
        t_user, address, t_port = parse_target(target)
    except ValueError as exc:
        raise UsageError(f"TARGET: {exc}", hint="write it as [user@]address[:port]") from None
    if t_port is not None and port is not None and t_port != port:
        raise UsageError(f"port {t_port} in TARGET contradicts --port {port}")
    tag_map = {}
    for t in tags:
        key, sep, value = t.partition("=")
        if not sep or not key:
            raise UsageError(f"--tag {t!r}: write tags as KEY=VALUE")
        tag_map[key] = value
    host = Host(
        name=name,
        address=address,
        port=next((p for p in (port, t_port) if p is not None), 22),
        identity_file=str(Path(identity_file).expanduser().absolute()) if identity_file else None,
        private_address=private_address,
        jump_host=jump_host,
        tags=tag_map,
    )
    if user or t_user:
        host.user = user or t_user
    return host


def _check_identity(host: Host) -> None:
    """A bad key is an input error now; a locked key not in the agent only a warning."""
    from megafleet.ssh.errors import IdentityProblem
    from megafleet.ssh.keys import load_identity

    try:
        load_identity(host.identity_file, host.name)
    except IdentityProblem as exc:
        if exc.problem == "passphrase":
            ui.warn(f"{exc.reason}\n  before connecting, run: {exc.hint}")
            return
        raise UsageError(f"--identity-file: {exc.reason}", hint=exc.hint) from None


def _report(payload: dict, as_json: bool, text: str) -> None:
    if as_json:
        ui.emit_json(payload)
    else:
        ui.check_row("ok", text)


@hosts.command("list")
@json_option
def list_hosts(as_json) -> None:
    """List the hosts in the inventory."""
    inv = Inventory.load()
    if as_json:
        ui.emit_json(
            {"inventory": str(inv.path), "hosts": [{"name": h.name, **h.to_dict()} for h in inv]}
        )
        return
    if not len(inv):
        ui.info(f"no hosts in {inv.path}")
        ui.hint("megafleet hosts add NAME USER@ADDRESS -i ~/.ssh/id_ed25519")
        return
    rows = [
        (
            h.name,
            h.target,
            h.identity_file or "(agent / ~/.ssh)",
            h.private_address or "",
            h.jump_host or "",
            ", ".join(f"{k}={v}" for k, v in h.tags.items()),
        )
        for h in inv
    ]
    ui.show(
        ui.table(
            f"{len(inv)} host(s) in {inv.path}",
            ["name", "target", "identity", "private address", "jump host", "tags"],
            rows,
        )
    )


@hosts.command("remove")
@click.argument("name")
@click.option("--forget-key", is_flag=True, help="Also drop its pinned host key.")
@dry_run_option
@yes_option
def remove(name, forget_key, dry_run, yes) -> None:
    """Remove a host from the inventory."""
    inv = Inventory.load()
    host = inv.get(name)
    if dry_run:
        ui.info(f"would remove {name} ({host.target}) from {inv.path}")
        return
    _confirm(yes, f"remove {name} ({host.target}) from {inv.path}?")
    inv.remove(name)
    inv.save()
    if forget_key:
        from megafleet.ssh.known_hosts import KnownHosts, host_id

        KnownHosts().forget(host_id(host.address, host.port))
    ui.check_row("ok", f"removed {name} from {inv.path}")


def _confirm(yes: bool, question: str) -> None:
    ui.confirm(yes, question, default=False)


@hosts.command("check")
@click.option("--hosts", "names", help="Comma-separated host names (default: all).")
@click.option(
    "--workdir",
    default="~/megafleet",
    show_default=True,
    help="Remote work directory whose free disk space is reported.",
)
@click.option(
    "--timeout",
    type=float,
    default=10.0,
    show_default=True,
    help="Seconds to wait for each host to answer.",
)
@json_option
def check(names, workdir, timeout, as_json) -> None:
    """Check every host in parallel (reachability, system, GPUs, limits).

    Reports reachability and SSH latency, user and passwordless sudo, OS and arch, CPUs,
    memory, free disk in the work dir, python3, GPUs (nvidia-smi), CUDA driver version,
    /dev/shm, ulimit -n/-l, private IPv4 addresses and EFA devices, then fleet-wide findings.
    Exit code 3 if a host is unreachable, 1 if another error was found, else 0.
    """
    inv = Inventory.load()
    selected = inv.select(names.split(",") if names else None)
    if not selected:
        raise UsageError(
            f"no hosts in {inv.path}",
            hint="megafleet hosts add NAME USER@ADDRESS -i ~/.ssh/id_ed25519",
        )
    _run_check(inv, selected, as_json, timeout, workdir)


def _run_check(
    inv: Inventory,
    selected: list[Host],
    as_json: bool,
    timeout: float,
    workdir: str = "~/megafleet",
    exit_on_failure: bool = True,
) -> int:
    from megafleet.cli.hosts_view import show_report
    from megafleet.fleetcheck import check_fleet, exit_code

    pool = _pool(inv, timeout)
    try:
        if as_json:
            report = check_fleet(selected, pool, workdir)
        else:
            with ui.err_console.status(f"checking {len(selected)} host(s)..."):
                report = check_fleet(selected, pool, workdir)
    finally:
        pool.close()
    report["inventory"] = str(inv.path)
    if as_json:
        ui.emit_json(report)
    else:
        show_report(report)
    code = exit_code(report)
    if code and exit_on_failure:
        click.get_current_context().exit(code)
    return code


@hosts.command("trust")
@click.argument("name")
@click.option("--replace", is_flag=True, help="Replace a different key pinned for this host.")
@click.option(
    "--fingerprint",
    metavar="SHA256:...",
    help="Only trust the key if it has this fingerprint (checked out of band).",
)
@click.option("--timeout", type=float, default=10.0, show_default=True)
@json_option
@dry_run_option
@yes_option
def trust(name, replace, fingerprint, timeout, as_json, dry_run, yes) -> None:
    """Pin the host key a host offers now.

    Use it deliberately, e.g. after the machine was rebuilt: check the fingerprint out of
    band and pass it with --fingerprint.
    """
    from megafleet.cli.hosts_view import trust_host

    inv = Inventory.load()
    pool = _pool(inv, timeout)
    try:
        trust_host(
            inv,
            inv.get(name),
            pool,
            replace=replace,
            fingerprint=fingerprint,
            as_json=as_json,
            dry_run=dry_run,
            confirm=lambda q: _confirm(yes, q),
        )
    finally:
        pool.close()
