"""Is an instance's SSH server reachable from this machine? A TCP connect that waits for the
server's `SSH-` banner, with a timeout: no login, no key, nothing written to known_hosts (the
SSH layer does all that later, in `megafleet hosts check`).

The probe is a plain function `(address, port, timeout) -> error text or None`, so tests and
the wizard can pass their own (moto's instance addresses are made up).
"""

from __future__ import annotations

import concurrent.futures as cf
import socket
from typing import Callable

from megafleet.ec2.checks import Reach
from megafleet.ec2.discover import Instance

Probe = Callable[[str, int, float], "str | None"]


def ssh_banner_probe(address: str, port: int, timeout: float) -> str | None:
    """None when an SSH server answers at address:port within `timeout`, else why not."""
    try:
        with socket.create_connection((address, port), timeout=timeout) as sock:
            sock.settimeout(timeout)
            banner = sock.recv(256)
    except socket.timeout:
        return f"no answer within {timeout:g}s"
    except OSError as exc:
        return exc.strerror or str(exc)
    if not banner.startswith(b"SSH-"):
        return f"port {port} answered, but not as an SSH server"
    return None


def target_for(inst: Instance, host=None) -> tuple[str | None, int, str]:
    """(address, port, why not) where megafleet would connect: the inventory's address and port
    when the instance is there, else its public IP (then public DNS, then private IP) on 22.
    A host behind a jump host is not probed from here (address None)."""
    if host is not None and host.jump_host:
        return None, host.port, f"behind jump host {host.jump_host}: megafleet hosts check"
    if host is not None:
        return host.address, host.port, ""
    address = inst.public_ip or inst.public_dns or inst.private_ip
    return address, 22, "" if address else "no address"


def probe_instances(
    instances: list[Instance],
    hosts: dict | None = None,
    timeout: float = 5.0,
    probe: Probe = ssh_banner_probe,
) -> dict[str, Reach]:
    """Reach of every running instance, probed in parallel."""
    running = [i for i in instances if i.state == "running"]
    targets = {i.id: target_for(i, (hosts or {}).get(i.id)) for i in running}
    out: dict[str, Reach] = {}
    if not targets:
        return out
    with cf.ThreadPoolExecutor(max_workers=min(32, len(targets))) as pool:
        futures = {
            iid: pool.submit(probe, addr, port, timeout)
            for iid, (addr, port, _) in targets.items()
            if addr
        }
        for iid, (addr, port, why_not) in targets.items():
            if not addr:
                out[iid] = Reach("not_checked", None, why_not)
                continue
            error = futures[iid].result()
            out[iid] = Reach("unreachable" if error else "ok", f"{addr}:{port}", error or "")
    return out


def not_checked(instances: list[Instance], why: str) -> dict[str, Reach]:
    return {i.id: Reach("not_checked", None, why) for i in instances if i.state == "running"}
