"""`megafleet stop`: stop a run on every node and prove nothing of it is left.

Two rounds, both on all nodes at once: first every node's run is marked `stop_requested` (so no
watcher takes the stop for a failure), then each node SIGTERMs torchrun, every worker (found by
process tree and by the run's environment tag, see megafleet.jobs.proctree) and its watcher,
SIGKILLs what is left after the grace period, and checks that no process of the run remains and
that none of them holds GPU memory (where nvidia-smi exists).
"""

from __future__ import annotations

import shlex

from megafleet.errors import RemoteCommandError
from megafleet.jobs.access import ask_nodes, nodectl
from megafleet.jobs.records import RunRecord


def stop_plan(run: RunRecord, grace: float) -> dict:
    """What `stop` would run where (for --dry-run)."""
    return {"run_id": run.run_id, "grace_s": grace, "nodes": [
        {"host": n.host, "commands": [nodectl(n, f"stop {shlex.quote(n.run_dir)} --mark-only"),
                                      nodectl(n, f"stop {shlex.quote(n.run_dir)} --grace {grace:g}")]}
        for n in run.nodes]}


def stop_run(run: RunRecord, grace: float | None = None, pool=None) -> dict:
    """Stop the run everywhere; returns {"ok", "nodes": {host: {terminated, killed, left, ...}}}.
    Raises RemoteCommandError (after trying every node) when a process survived or a node
    could not be reached."""
    grace = float(run.stop_grace if grace is None else grace)
    marks = ask_nodes(run, lambda n: f"stop {shlex.quote(n.run_dir)} --mark-only", pool=pool)
    reachable = [n for n in run.nodes if marks[n.host].reached]
    results = ask_nodes(run, lambda n: f"stop {shlex.quote(n.run_dir)} --grace {grace:g}",
                        timeout=grace + 120, pool=pool, nodes=reachable)
    report, problems = {}, []
    for node in run.nodes:
        res = results.get(node.host, marks[node.host])
        value = res.value if isinstance(res.value, dict) else {}
        report[node.host] = {**value, "error": None if res.ok else (res.message or res.describe())}
        if not res.reached:
            problems.append(f"{node.host}: not reachable ({res.message}); its processes may still run")
        elif value.get("left"):
            problems.append(f"{node.host}: processes still alive after SIGKILL: {value['left']}")
        elif value.get("gpu_holders"):
            problems.append(f"{node.host}: processes still hold GPU memory: {value['gpu_holders']}")
        elif not res.ok:
            problems.append(f"{node.host}: {res.describe()}")
    run.state = "stopped"
    run.save()
    out = {"ok": not problems, "run_id": run.run_id, "grace_s": grace, "nodes": report,
           "problems": problems}
    if problems:
        err = RemoteCommandError("stop did not finish cleanly:\n  " + "\n  ".join(problems),
                                 hint=f"run `megafleet stop {run.run_id}` again once the hosts answer; "
                                 "`megafleet status` shows what is left")
        err.report = out
        raise err
    return out

