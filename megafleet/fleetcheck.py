"""`megafleet hosts check`: probe every host in parallel, then judge the fleet as a whole.

    report = check_fleet(inventory.select(None), pool)   # {"hosts": [...], "findings": [...],
                                                          #  "summary": {...}}
Per host: reachability and SSH latency, then the facts of megafleet.hostinfo (one round trip).
Fleet findings: unreachable hosts, hosts without GPUs, mixed GPU models, counts or drivers,
nvidia-smi failing. `exit_code(report)` maps the result to megafleet's documented exit codes.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass

from megafleet.errors import EXIT_FAILED, EXIT_OK, EXIT_UNREACHABLE
from megafleet.hostinfo import DEFAULT_WORKDIR, parse_probe, probe_script
from megafleet.runner import Result, Runner, SSHRunner, run_on_hosts

PROBE_TIMEOUT = 60.0


@dataclass
class Finding:
    level: str  # "error" | "warning" | "info"
    code: str  # stable identifier for agents, e.g. "mixed_gpu_models"
    message: str
    hosts: list[str]


def probe_host(runner: Runner, workdir: str = DEFAULT_WORKDIR) -> dict:
    """Facts of one host (raises SSHError if it cannot be reached, RemoteCommandError if the
    probe fails)."""
    facts: dict = {}
    if isinstance(runner, SSHRunner):
        conn = runner.connection()
        facts["latency_ms"] = round(min(conn.ping() for _ in range(3)) * 1000, 2)
        facts["connect_ms"] = round(conn.connect_seconds * 1000, 1)
        facts["host_key"] = conn.host_key
        facts["host_key_pinned_now"] = conn.pinned_now
        facts["via"] = conn.jump.host.name if conn.jump else None
        facts["sftp"] = conn.has_sftp()
    res = runner.run("sh -s", stdin=probe_script(workdir), timeout=PROBE_TIMEOUT).check()
    facts.update(parse_probe(res.stdout))
    return facts


def check_fleet(hosts, pool=None, workdir: str = DEFAULT_WORKDIR) -> dict:
    """Probe `hosts` (inventory Hosts or Runners) in parallel; return the JSON-ready report."""
    started = time.monotonic()
    results = run_on_hosts(hosts, lambda r: probe_host(r, workdir), pool=pool)
    by_name = {getattr(h, "name", None): h for h in hosts}
    rows = [_row(name, res, by_name.get(name)) for name, res in results.items()]
    reachable = sum(1 for r in rows if r["reachable"])
    return {
        "workdir": workdir,
        "hosts": rows,
        "findings": [asdict(f) for f in fleet_findings(rows)],
        "summary": {
            "total": len(rows),
            "reachable": reachable,
            "unreachable": len(rows) - reachable,
            "seconds": round(time.monotonic() - started, 2),
        },
    }


def _row(name: str, res: Result, host) -> dict:
    row = {
        "name": name,
        "address": getattr(host, "address", None),
        "user": getattr(host, "user", None),
        "reachable": res.reached,
        "ok": res.ok,
        "error": None,
    }
    if not res.ok:
        row["error"] = {
            "kind": res.error,
            "message": res.message or res.describe(),
            "hint": res.hint,
        }
        if res.error == "exit":
            row["error"]["message"] = res.describe(lines=10)
    if isinstance(res.value, dict):
        row.update(res.value)
    return row


def fleet_findings(rows: list[dict]) -> list[Finding]:
    """Problems of the fleet as a whole (and per-host ones worth a line of their own)."""
    out: list[Finding] = []
    down = [r for r in rows if not r["reachable"]]
    for r in down:
        out.append(
            Finding("error", "unreachable", f"{r['name']}: {r['error']['message']}", [r["name"]])
        )
    failed = [r for r in rows if r["reachable"] and not r["ok"]]
    for r in failed:
        out.append(
            Finding("error", "probe_failed", f"{r['name']}: {r['error']['message']}", [r["name"]])
        )
    up = [r for r in rows if r["ok"]]
    for r in up:
        if r.get("gpu_status") == "error":
            out.append(
                Finding(
                    "error",
                    "nvidia_smi_failed",
                    f"{r['name']}: nvidia-smi is installed but failed: {r['gpu_error']}",
                    [r["name"]],
                )
            )
    out += transfer_findings(up)
    no_gpu = [r["name"] for r in up if r.get("gpu_status") == "none"]
    if no_gpu:
        out.append(
            Finding(
                "warning",
                "no_gpus",
                f"no NVIDIA GPU found (nvidia-smi absent or lists none) on: {', '.join(no_gpu)}",
                no_gpu,
            )
        )
    with_gpu = [r for r in up if r.get("gpus")]
    out += _mixed(
        with_gpu,
        "mixed_gpu_models",
        "GPU models",
        lambda r: ", ".join(sorted({g["name"] for g in r["gpus"]})),
    )
    out += _mixed(with_gpu, "mixed_gpu_counts", "GPU counts", lambda r: str(len(r["gpus"])))
    out += _mixed(
        with_gpu, "mixed_drivers", "NVIDIA drivers", lambda r: r.get("driver_version") or "?"
    )
    return out


NO_SFTP_FIX = (
    "to use SFTP instead, add `Subsystem sftp internal-sftp` to /etc/ssh/sshd_config "
    "and reload sshd (`systemctl reload ssh`)"
)


def transfer_findings(rows: list[dict]) -> list[Finding]:
    """Hosts without an SFTP server (files stream over the exec channel instead), and hosts that
    present one host key (two inventory entries for one machine, or cloned images)."""
    out = []
    no_sftp = [r["name"] for r in rows if r.get("sftp") is False]
    if no_sftp:
        out.append(
            Finding(
                "info",
                "no_sftp",
                f"no SFTP subsystem in sshd on {', '.join(no_sftp)}: "
                "file transfers stream over the SSH exec channel instead (same resume "
                f"and sha256 checks); {NO_SFTP_FIX}",
                no_sftp,
            )
        )
    by_key: dict[str, list[str]] = {}
    for r in rows:
        if r.get("host_key"):
            by_key.setdefault(r["host_key"], []).append(r["name"])
    for key, names in by_key.items():
        if len(names) > 1:
            out.append(
                Finding(
                    "warning",
                    "shared_host_key",
                    f"{', '.join(names)} present the same host key ({key}): one machine "
                    "listed twice (a job would run two nodes on it), or machines cloned "
                    "from one image with its host keys; remove the duplicate entry, or "
                    "regenerate the host keys on the clones",
                    names,
                )
            )
    return out


def _mixed(rows: list[dict], code: str, what: str, key) -> list[Finding]:
    groups: dict[str, list[str]] = {}
    for r in rows:
        groups.setdefault(key(r), []).append(r["name"])
    if len(groups) < 2:
        return []
    detail = "; ".join(f"{k}: {', '.join(v)}" for k, v in groups.items())
    return [
        Finding(
            "warning",
            code,
            f"mixed {what} across hosts ({detail})",
            [n for v in groups.values() for n in v],
        )
    ]


def exit_code(report: dict) -> int:
    """3 if any host was unreachable, 1 if another error-level finding, else 0."""
    if report["summary"]["unreachable"]:
        return EXIT_UNREACHABLE
    if any(f["level"] == "error" for f in report["findings"]):
        return EXIT_FAILED
    return EXIT_OK
