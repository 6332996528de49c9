"""Presentation and the trust flow for `megafleet hosts` (kept apart from the option parsing)."""

from __future__ import annotations

from rich.markup import escape

from megafleet import ui
from megafleet.errors import UsageError

SYSTEM = ["host", "ssh", "user", "sudo", "os / arch", "cpus", "mem GiB", "GPUs", "driver / CUDA"]
LIMITS = [
    "host",
    "disk free GiB",
    "/dev/shm GiB",
    "python3",
    "nofile / memlock",
    "private IPv4",
    "EFA",
]


def _gpus(row: dict) -> str:
    if row.get("gpu_status") == "none":
        return "none"
    if row.get("gpu_status") == "error":
        return "[red]nvidia-smi failed[/red]"
    names: dict[str, int] = {}
    for g in row.get("gpus", []):
        names[g["name"]] = names.get(g["name"], 0) + 1
    mem = {g.get("memory.total") for g in row.get("gpus", [])}
    one = next(iter(mem)) if len(mem) == 1 else None
    per = f" ({one // 1024} GiB)" if isinstance(one, int) else ""
    return ", ".join(f"{n}x {name}" for name, n in names.items()) + per


def _system_cells(row: dict) -> list:
    if not row["ok"]:
        return [row["name"], ui.styled_status("fail")] + [""] * (len(SYSTEM) - 2)
    via = f" via {row['via']}" if row.get("via") else ""
    os_name = (
        f"{row['os_id']} {row.get('os_version') or ''}".strip()
        if row.get("os_id")
        else row.get("os")
    )
    return [
        row["name"],
        f"{ui.symbol('ok')} {row.get('latency_ms', 0):.1f} ms{via}",
        row.get("user"),
        "yes" if row.get("sudo") else "no",
        f"{os_name} / {row.get('arch')}",
        row.get("cpus"),
        row.get("memory_gib"),
        _gpus(row),
        f"{row.get('driver_version') or '-'} / {row.get('cuda_driver_version') or '-'}",
    ]


def _limit_cells(row: dict) -> list:
    return [
        row["name"],
        row.get("disk_free_gib"),
        row.get("shm_gib"),
        row.get("python3") or "[yellow]missing[/yellow]",
        f"{row.get('ulimit_nofile')} / {row.get('ulimit_memlock')}",
        ", ".join(row.get("private_ipv4") or []) or "-",
        ", ".join(row.get("efa_devices") or []) or "none",
    ]


def show_report(report: dict) -> None:
    """The `hosts check` report for people: a table, then why hosts failed, then findings."""
    s = report["summary"]
    ui.show(
        ui.table(
            f"{s['reachable']}/{s['total']} host(s) reachable ({s['seconds']:.1f}s)",
            SYSTEM,
            [_system_cells(r) for r in report["hosts"]],
        )
    )
    ok = [r for r in report["hosts"] if r["ok"]]
    if ok:
        ui.show(
            ui.table(
                f"free disk in {report.get('workdir', 'the work dir')}, limits, network",
                LIMITS,
                [_limit_cells(r) for r in ok],
            )
        )
    pinned = [r["name"] for r in report["hosts"] if r.get("host_key_pinned_now")]
    if pinned:
        ui.check_row(
            "info",
            f"first connection to {', '.join(pinned)}: host keys pinned",
            "fingerprints: --json",
        )
    for f in report["findings"]:
        ui.check_row(
            {"error": "fail", "warning": "warn"}.get(f["level"], "info"), escape(f["message"])
        )
        hint = next(
            (
                r["error"].get("hint")
                for r in report["hosts"]
                if f["hosts"] == [r["name"]] and r.get("error")
            ),
            None,
        )
        if hint and f["level"] == "error":
            ui.info(f"    fix: {escape(hint)}")
    if not report["findings"]:
        ui.check_row("ok", "no problems found")


def trust_host(
    inv,
    host,
    pool,
    *,
    replace: bool,
    fingerprint: str | None,
    as_json: bool,
    dry_run: bool,
    confirm,
) -> None:
    """Fetch the key `host` offers and pin it, refusing silent replacement of a pinned key."""
    from megafleet.ssh.connection import fetch_host_key
    from megafleet.ssh.errors import HostKeyChanged
    from megafleet.ssh.known_hosts import KnownHosts, describe_key, host_id

    jump_host = inv.jump_for(host)
    key = fetch_host_key(host, pool.get(jump_host) if jump_host else None, pool.connect_timeout)
    store, hid = KnownHosts(), host_id(host.address, host.port)
    pinned = store.lookup(hid)
    offered = describe_key(key)
    if fingerprint and fingerprint != key.fingerprint:
        raise HostKeyChanged(
            host.name,
            f"{host.address}:{host.port} offers {offered}, not the "
            f"expected {fingerprint}; nothing was trusted",
        )
    result = {
        "host": host.name,
        "key": offered,
        "known_hosts": str(store.path),
        "previous": [describe_key(k) for k in pinned.values()],
        "dry_run": dry_run,
    }
    if pinned.get(key.get_name()) == key:
        result["action"] = "already_trusted"
        return _say(result, as_json, f"{host.name}: {offered} is already trusted")
    if pinned and not replace:
        raise UsageError(
            f"{host.name}: a different key is pinned ({', '.join(result['previous'])});"
            f" the host now offers {offered}",
            hint=f"megafleet hosts trust {host.name} --replace --fingerprint {key.fingerprint}",
        )
    result["action"] = "replace" if pinned else "pin"
    if dry_run:
        return _say(result, as_json, f"would pin {offered} for {host.name} in {store.path}")
    if not fingerprint and pinned:
        _confirm_replacement(host, offered, key.fingerprint)
    elif not fingerprint:
        confirm(f"trust {offered} for {host.name} ({host.address}:{host.port})?")
    store.pin(hid, key, replace=True)
    _say(result, as_json, f"{host.name}: pinned {offered} in {store.path}")


def _confirm_replacement(host, offered: str, fingerprint: str) -> None:
    """Replacing a pinned key takes the fingerprint, or a person who saw it: --yes is not enough."""
    import sys

    import click

    if not sys.stdin.isatty():
        raise UsageError(
            f"{host.name}: replacing a pinned host key needs --fingerprint (--yes "
            f"alone does not replace one); the host now offers {offered}",
            hint=f"check the fingerprint out of band (e.g. `ssh-keygen -lf "
            f"/etc/ssh/ssh_host_*_key.pub` on the console), then: megafleet hosts "
            f"trust {host.name} --replace --fingerprint {fingerprint}",
        )
    question = (
        f"{host.name} ({host.address}:{host.port}) now offers {offered}.\n"
        "Does this fingerprint match the one you checked out of band?"
    )
    if not click.confirm(question, default=False):
        raise UsageError("cancelled; the pinned key was kept")


def _say(result: dict, as_json: bool, text: str) -> None:
    if as_json:
        ui.emit_json(result)
    else:
        ui.check_row("ok", text)
