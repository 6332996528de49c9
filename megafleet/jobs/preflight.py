"""Which machines a job runs on, and the facts a launch needs from them before anything starts:
node order (node 0 = master), each node's home, venv python and megafleet version, GPU count,
the master address, and a check that every worker reaches the master's ports.

The master address is node 0's `private_address` from the inventory, else the address of node
0's interface that routes to the workers (`ip route get WORKER` on node 0): an address the nodes
share, never the public address the operator may use to reach node 0.
"""

from __future__ import annotations

import ipaddress
import json
import os
import re
import shlex
import sys
import threading
from dataclasses import dataclass

from megafleet import __version__, paths
from megafleet.errors import FieldProblem, MegafleetError, UsageError, ValidationError
from megafleet.inventory import Host, Inventory
from megafleet.jobs.records import LOCAL_HOST
from megafleet.runner import LocalRunner, Runner, SSHRunner, run_on_hosts

PORT_CHECK_SECONDS = 20.0
CONNECT_TIMEOUT = 5.0


class PortBlocked(MegafleetError):
    """A worker cannot reach the master's port (or the port is taken on node 0)."""


@dataclass
class Target:
    """One node of a launch: its rank, inventory host (None in local mode) and runner."""

    rank: int
    name: str
    host: Host | None
    runner: Runner

    @property
    def local(self) -> bool:
        return self.host is None

    @property
    def peer_address(self) -> str:
        """How the other nodes (node 0) reach this one."""
        return self.host.private_address or self.host.address if self.host else "127.0.0.1"


@dataclass
class NodeFacts:
    home: str
    python: str
    version: str | None
    gpus: int
    detail: str = ""  # what the version probe printed when it failed
    cores: int = 0  # CPU cores (nproc), 0 when unknown


def select_targets(
    names: list[str] | None, local: bool = False, inventory: Inventory | None = None, pool=None
) -> list[Target]:
    """The nodes in order (node 0 first): `names` from --hosts or launch.hosts, all inventory
    hosts when empty, or this machine alone (`local`, or hosts == ["local"])."""
    if local or names == [LOCAL_HOST]:
        from megafleet.jobs.access import local_runner

        return [Target(0, LOCAL_HOST, None, local_runner())]
    inv = inventory or Inventory.load()
    if not names and not len(inv):
        raise UsageError(
            f"no hosts in the inventory ({inv.path})",
            hint="add one with `megafleet hosts add NAME USER@ADDRESS`, or run on this "
            "machine with `megafleet launch --local ...`",
        )
    hosts = inv.select(names or None)
    if pool is None:
        from megafleet.ssh.connection import ConnectionPool

        pool = ConnectionPool(inv.jump_for)
    return [Target(i, h.name, h, SSHRunner(h, pool)) for i, h in enumerate(hosts)]


def venv_python(venv: str, home: str) -> str:
    path = venv[2:] if venv.startswith("~/") else venv
    base = path if path.startswith("/") else f"{home.rstrip('/')}/{path}"
    return f"{base.rstrip('/')}/bin/python"


GPU_COUNT = """n=$(nvidia-smi -L 2>/dev/null | grep -c '^GPU'); echo "gpus=${n:-0}"\n"""
PROBE = 'echo "home=$HOME"\n' + GPU_COUNT + 'echo "cores=$(nproc 2>/dev/null || echo 0)"\n'


def _values(stdout: str) -> dict[str, str]:
    return dict(line.split("=", 1) for line in stdout.splitlines() if "=" in line)


def probe_nodes(targets: list[Target], venv: str) -> dict[str, NodeFacts]:
    """Home, python, megafleet version and GPU count of every node, in parallel; a node that
    cannot be reached raises (exit code 3) naming it."""

    def probe(runner: Runner) -> NodeFacts:
        if isinstance(runner, LocalRunner):
            return NodeFacts(
                str(paths.home()),
                sys.executable,
                __version__,
                _gpu_count(runner),
                cores=os.cpu_count() or 0,
            )
        r = runner.run(PROBE, timeout=60).check()
        vals = _values(r.stdout)
        python = venv_python(venv, vals["home"])
        v = runner.run(
            f"{shlex.quote(python)} -c 'import megafleet; print(megafleet.__version__)'", timeout=60
        )
        version = v.stdout.strip().splitlines()[-1] if v.ok and v.stdout.strip() else None
        detail = "" if version else (v.stderr.strip().splitlines() or [""])[-1]
        cores = vals.get("cores", "0").strip()
        return NodeFacts(
            vals["home"],
            python,
            version,
            int(vals.get("gpus") or 0),
            detail,
            int(cores) if cores.isdigit() else 0,
        )

    results = run_on_hosts([t.runner for t in targets], probe)
    for r in results.values():
        r.check()
    return {name: r.value for name, r in results.items()}


def _gpu_count(runner: Runner) -> int:
    r = runner.run(GPU_COUNT, timeout=30)
    return int(_values(r.stdout).get("gpus") or 0) if r.ok else 0


def check_versions(facts: dict[str, NodeFacts], venv: str) -> None:
    """Every node must run the operator's megafleet version: one error listing every node."""
    problems = []
    for name, f in facts.items():
        if f.version is None:
            problems.append(
                FieldProblem(
                    name,
                    f"no megafleet in {f.python} (launch.venv={venv})"
                    + (f": {f.detail}" if f.detail else ""),
                )
            )
        elif f.version != __version__:
            problems.append(
                FieldProblem(
                    name, f"megafleet {f.version} is installed, this machine has {__version__}"
                )
            )
    if problems:
        raise ValidationError(
            problems,
            hint="run `megafleet setup` to install this version on the "
            "nodes (or set launch.venv to the environment it made)",
        )


def nproc_per_node(requested: int | None, device: str, facts: dict[str, NodeFacts]) -> int:
    """launch.nproc_per_node, else the nodes' GPU count (which must agree), else 1 (CPU)."""
    if requested:
        return requested
    if device == "cpu":
        return 1
    counts = {name: f.gpus for name, f in facts.items()}
    if len(set(counts.values())) > 1:
        shown = ", ".join(f"{n} has {c}" for n, c in counts.items())
        raise UsageError(
            f"the nodes have different GPU counts ({shown})",
            hint="set launch.nproc_per_node (--nproc_per_node N) to use N GPUs per node",
        )
    return max(next(iter(counts.values()), 0), 1)


def master_address(targets: list[Target]) -> str:
    """See the module docstring. Raises when node 0 cannot say how it reaches the workers."""
    if len(targets) == 1:
        return "127.0.0.1"
    node0 = targets[0]
    if node0.host.private_address:
        return node0.host.private_address
    cmd = "; ".join(f"ip -o route get {shlex.quote(t.peer_address)}" for t in targets[1:])
    r = node0.runner.run(cmd, timeout=30)
    sources = re.findall(r"\bsrc\s+(\S+)", r.stdout)
    if not r.ok or len(sources) != len(targets) - 1:
        raise UsageError(
            f"{node0.name}: cannot find the address it reaches the other nodes from "
            f"(`ip route get` said: {(r.stderr or r.stdout).strip()[:200]})",
            hint=f"set private_address for {node0.name} in the inventory "
            f"(megafleet hosts add {node0.name} ... --private-address ADDR --replace)",
        )
    return sources[0]


def interfaces_to_master(targets: list[Target], addr: str) -> dict[str, str | None]:
    """Per node, the network interface it reaches the master through (node 0: the one holding
    the master address). torch's gloo (and NCCL's bootstrap) pick an interface from the host
    name otherwise, which often resolves to 127.0.0.1: fine on one machine, fatal across two."""
    if len(targets) == 1:
        return {targets[0].name: None}
    a = shlex.quote(addr)
    cmd = (
        f"ip -o addr show | awk -v a={a} "
        f'\'{{split($4, p, "/"); if (p[1] == a) print "addr " $2}}\'; '
        f"ip -o route get {a}"
    )

    def find(runner: Runner) -> str | None:
        r = runner.run(cmd, timeout=30)
        held = re.search(r"^addr (\S+)", r.stdout, re.M)
        routed = re.search(r"\bdev\s+(\S+)", r.stdout)
        name = held.group(1) if held else routed.group(1) if routed else None
        return None if name == "lo" else name

    results = run_on_hosts([t.runner for t in targets], find)
    return {name: r.value if r.ok else None for name, r in results.items()}


def is_public(address: str) -> bool:
    try:
        return ipaddress.ip_address(address).is_global
    except ValueError:
        return False


def check_ports(
    targets: list[Target], facts: dict[str, NodeFacts], addr: str, ports: list[int]
) -> dict:
    """Listen on `ports` at `addr` on node 0 and connect from every worker. Raises PortBlocked
    naming the node, port and reason, with the fix. Returns {worker: {port: "ok"}}."""
    node0 = targets[0]
    py0 = shlex.quote(facts[node0.name].python)
    port_list = ",".join(map(str, ports))
    ready = threading.Event()
    box: dict = {}

    def on_line(stream, line):
        if stream == "stdout" and '"ready"' in line:
            ready.set()

    def listen():
        box["r"] = node0.runner.run(
            f"{py0} -m megafleet.jobs.nodectl listen --host {shlex.quote(addr)} --ports {port_list}"
            f" --seconds {PORT_CHECK_SECONDS if len(targets) > 1 else 0}"
            f" --expect {len(targets) - 1}",
            timeout=PORT_CHECK_SECONDS + 30,
            on_output=on_line,
        )
        ready.set()

    t = threading.Thread(target=listen, daemon=True)
    t.start()
    ready.wait(PORT_CHECK_SECONDS + 30)
    if "r" in box:  # ended before anyone connected: it could not listen
        _listen_failed(node0, box["r"], addr, ports)
    results = run_on_hosts(
        [x.runner for x in targets[1:]], lambda r: _connect(r, facts, addr, port_list)
    )
    bad = {}
    for name, res in results.items():
        if not res.reached:
            res.check()
        answers = res.value["results"] if res.ok and res.value else {}
        failed = (
            {p: why for p, why in answers.items() if why != "ok"}
            if answers
            else {port_list: res.message or res.describe()}
        )
        if failed:
            bad[name] = failed
    if not bad:  # everyone connected, so the listener is done: make sure it listened fine
        t.join(PORT_CHECK_SECONDS + 30)
        if "r" in box and not box["r"].ok:
            _listen_failed(node0, box["r"], addr, ports)
    if bad:
        lines = [
            f"{w} cannot reach {node0.name} at {addr}:{p}: {why}"
            for w, f in bad.items()
            for p, why in f.items()
        ]
        raise PortBlocked(
            "master port check failed before launch:\n  " + "\n  ".join(lines),
            hint=f"allow TCP {'/'.join(map(str, ports))} from the other nodes to "
            f"{node0.name} ({addr}): a firewall rule, or on EC2 an inbound rule in the "
            "security group from the group itself; or choose free, open ports with "
            "--master_port N (the watcher uses N+1 unless --watcher_port is set)",
            exit_code=3,
        )
    return {name: r.value["results"] for name, r in results.items()}


def _connect(runner: Runner, facts: dict[str, NodeFacts], addr: str, port_list: str) -> dict:
    py = shlex.quote(facts[runner.name].python)
    r = runner.run(
        f"{py} -m megafleet.jobs.nodectl connect --host {shlex.quote(addr)} "
        f"--ports {port_list} --timeout {CONNECT_TIMEOUT:g}",
        timeout=60,
    )
    if not r.reached:
        r.check()
    try:
        return json.loads(r.stdout.strip().splitlines()[-1])
    except (ValueError, IndexError):
        raise MegafleetError(r.describe()) from None


def _listen_failed(node0: Target, res, addr: str, ports: list[int]) -> None:
    if not res.reached:
        res.check()
    try:
        info = json.loads(res.stdout.strip().splitlines()[-1])
    except (ValueError, IndexError):
        raise MegafleetError(
            f"{node0.name}: the port check could not run", hint=res.describe()
        ) from None
    if info.get("ok"):
        return
    raise PortBlocked(
        f"{node0.name}: cannot listen on {addr}:{info.get('port')} "
        f"({info.get('error')}): another job may be using it",
        hint="choose another port with --master_port N (or launch.master_port), or "
        f"stop what uses it (ss -ltnp on {node0.name})",
        exit_code=3,
    )
