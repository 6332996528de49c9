"""Reaching a recorded run's nodes again (from a new terminal, after a restart) and asking them
about it with `nodectl`."""

from __future__ import annotations

import json
import os
import shlex
import site
from contextlib import contextmanager
from pathlib import Path

from megafleet.errors import MegafleetError
from megafleet.inventory import Host, Inventory
from megafleet.jobs.records import LOCAL_HOST, NodeInfo, RunRecord
from megafleet.runner import LocalRunner, Result, Runner, SSHRunner, run_on_hosts


def local_runner() -> LocalRunner:
    """This machine as a node. Jobs started from a checkout (not an installed package) need the
    checkout on PYTHONPATH to import megafleet and remote_runtime in their own processes."""
    import megafleet

    root = str(Path(megafleet.__file__).resolve().parent.parent)
    installed = {
        str(Path(p).resolve()) for p in site.getsitepackages() + [site.getusersitepackages()]
    }
    parts = [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
    if root in installed or root in parts:
        return LocalRunner(LOCAL_HOST)
    return LocalRunner(LOCAL_HOST, env={"PYTHONPATH": os.pathsep.join([root] + parts)})


@contextmanager
def pool_for(run: RunRecord, pool=None):
    """The given ConnectionPool, or a new one (jump hosts resolved through the inventory) that
    is closed on leaving, Ctrl-C included (the nodes then see their channels close)."""
    if pool is not None or run.local:
        yield pool
        return
    from megafleet.ssh.connection import ConnectionPool

    own = ConnectionPool(_inventory().jump_for)
    try:
        yield own
    finally:
        own.close()


def _inventory() -> Inventory:
    try:
        return Inventory.load()
    except MegafleetError:
        return Inventory([])


def runners_for(run: RunRecord, pool, nodes: list[NodeInfo] | None = None) -> dict[str, Runner]:
    """{host name: Runner} for the run's nodes (pool: see pool_for). A host still in the
    inventory is reached as the inventory says now; one removed since, as recorded at launch."""
    nodes = run.nodes if nodes is None else nodes
    if run.local:
        return {n.host: local_runner() for n in nodes}
    inv = _inventory()
    return {
        n.host: SSHRunner(inv.hosts.get(n.host) or Host(name=n.host, **(n.host_entry or {})), pool)
        for n in nodes
    }


def nodectl(node: NodeInfo, args: str) -> str:
    """The shell command running `nodectl ARGS` with the node's python."""
    return f"{shlex.quote(node.python)} -m megafleet.jobs.nodectl {args}"


def ask_nodes(
    run: RunRecord, args_for, timeout: float = 120, pool=None, nodes: list[NodeInfo] | None = None
) -> dict[str, Result]:
    """Run `nodectl args_for(node)` on every node at once; Result.value = its JSON answer."""
    nodes = run.nodes if nodes is None else nodes
    by_host = {n.host: n for n in nodes}

    def one(runner: Runner):
        r = runner.run(
            nodectl(by_host[runner.name], args_for(by_host[runner.name])), timeout=timeout
        )
        try:
            r.value = json.loads(r.stdout.strip().splitlines()[-1])
        except (ValueError, IndexError):
            if r.ok:
                r.error, r.message = "internal", "nodectl printed no JSON"
        return r

    with pool_for(run, pool) as p:
        return run_on_hosts(list(runners_for(run, p, nodes).values()), one)
