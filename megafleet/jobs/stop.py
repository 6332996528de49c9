"""`megafleet stop`: stop a run on every node and prove nothing of it is left.

Two rounds, both on all nodes at once: first every node's run is marked `stop_requested` (so no
watcher takes the stop for a failure), then each node SIGTERMs every worker (found by process
tree and by the run's environment tag, see megafleet.jobs.proctree) and its watcher, but not
torchrun nor the workers' helper processes (nodectl.spared), SIGKILLs what is left after the
grace period, and checks that no process of the run remains and
that none of them holds GPU memory (where nvidia-smi exists).
"""

from __future__ import annotations

import shlex
import time

from megafleet.errors import RemoteCommandError
from megafleet.jobs.access import ask_nodes, nodectl
from megafleet.jobs.records import RunRecord


def stop_plan(run: RunRecord, grace: float) -> dict:
    """What `stop` would run where (for --dry-run)."""
    return {
        "run_id": run.run_id,
        "grace_s": grace,
        "nodes": [
            {
                "host": n.host,
                "commands": [
                    nodectl(n, f"stop {shlex.quote(n.run_dir)} --mark-only"),
                    nodectl(n, f"stop {shlex.quote(n.run_dir)} --grace {grace:g}"),
                ],
            }
            for n in run.nodes
        ],
    }


def stop_run(run: RunRecord, grace: float | None = None, pool=None, nodes=None) -> dict:
    """Stop the run everywhere (or on `nodes`); returns {"ok", "nodes": {host: {terminated,
    killed, left, ...}}}. Raises RemoteCommandError (after trying every node) when a process
    survived or a node could not be reached; the run then stays `stopping`, with the hosts
    still to stop in `stop_pending` (`status` finishes the stop once they answer again)."""
    grace = float(run.stop_grace if grace is None else grace)
    nodes = run.nodes if nodes is None else nodes
    marks = ask_nodes(
        run, lambda n: f"stop {shlex.quote(n.run_dir)} --mark-only", pool=pool, nodes=nodes
    )
    reachable = [n for n in nodes if marks[n.host].reached]
    results = ask_nodes(
        run,
        lambda n: f"stop {shlex.quote(n.run_dir)} --grace {grace:g}",
        timeout=grace + 120,
        pool=pool,
        nodes=reachable,
    )
    report, problems, pending = {}, [], []
    for node in nodes:
        res = results.get(node.host, marks[node.host])
        value = res.value if isinstance(res.value, dict) else {}
        report[node.host] = {**value, "error": None if res.ok else (res.message or res.describe())}
        problem = _problem(node, res, value)
        if problem:
            problems.append(problem)
            pending.append(node.host)
        if res.reached:
            node.last_contact = time.time()
    others = [h for h in run.stop_pending if h not in {n.host for n in nodes}]
    run.stop_pending = others + pending
    run.state = "stopping" if run.stop_pending else "stopped"
    if not run.stop_pending:
        run.exit_code = 0
    run.save()
    out = {
        "ok": not problems,
        "run_id": run.run_id,
        "grace_s": grace,
        "nodes": report,
        "problems": problems,
        "state": run.state,
    }
    if problems:
        err = RemoteCommandError(
            "stop did not finish cleanly:\n  " + "\n  ".join(problems),
            hint=f"the run stays `stopping`; run `megafleet stop {run.run_id}` "
            "again once the hosts answer (`megafleet status` also finishes "
            "the stop then)",
        )
        err.report = out
        raise err
    return out


def _problem(node, res, value: dict) -> str | None:
    if not res.reached:
        last = (
            time.strftime("%H:%M:%S", time.localtime(node.last_contact))
            if node.last_contact
            else "never"
        )
        return (
            f"{node.host}: not reachable ({res.message}; last contact {last}); its job may "
            "still run until its own watcher stops it"
        )
    if value.get("left"):
        return f"{node.host}: processes still alive after SIGKILL: {value['left']}"
    if value.get("gpu_holders"):
        return f"{node.host}: processes still hold GPU memory: {value['gpu_holders']}"
    if not res.ok:
        return f"{node.host}: {res.describe()}"
    return None
