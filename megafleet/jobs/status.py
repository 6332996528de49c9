"""`megafleet status`: every node's state, the run's progress from logging.jsonl, GPU use, and
after a fail-fast stop, which node failed first with its last log lines."""

from __future__ import annotations

import shlex

from megafleet.jobs.access import ask_nodes
from megafleet.jobs.records import RunRecord
from remote_runtime.spec.layout import PROGRESS_FIELDS, STATUS_EXTRA_FIELDS


def run_status(run: RunRecord, lines: int = 20, pool=None) -> dict:
    """Ask every node (in parallel); update and save the record's state. Returns
    {"run": record dict, "state", "exit_code", "failure", "nodes": [per node], "progress"}."""
    results = ask_nodes(run, lambda n: f"status {shlex.quote(n.run_dir)} --lines {lines}", pool=pool)
    nodes = []
    for node in run.nodes:
        res = results[node.host]
        info = dict(res.value) if res.ok and isinstance(res.value, dict) else {}
        info.update({"host": node.host, "node_rank": node.rank, "ranks": node.ranks,
                     "reachable": res.reached, "error": None if res.ok else (res.message or res.describe())})
        if not info.get("ok", False) and res.ok:
            info["error"] = info.get("error") or "no status"
        nodes.append(info)
    derive_state(run, nodes)
    run.save()
    head = next((n for n in nodes if n["node_rank"] == 0), {})
    return {"run": run.to_dict(), "state": run.state, "exit_code": run.exit_code,
            "failure": run.failure, "nodes": nodes, "progress": progress(head.get("metrics"))}


def derive_state(run: RunRecord, nodes: list[dict]) -> None:
    """The run's state from its nodes' (see README "Run states")."""
    if any(not n.get("reachable", True) or n.get("error") for n in nodes):
        return  # keep the last known state
    states = [n.get("state") for n in nodes]
    codes = [n.get("exit_code") for n in nodes]
    watch = next((n.get("watch") for n in nodes if n.get("node_rank") == 0), None) or {}
    failure = next((n.get("failure") for n in nodes if n.get("failure")), None) or watch.get("failure")
    if failure:
        run.failure = failure
    if any(s in ("running", "starting") for s in states):
        run.state = "running"
        return
    stopped = any(n.get("stop_requested") for n in nodes)
    bad = [c for c in codes if c != 0]
    if run.failure and not stopped:
        run.state, run.exit_code = "failed", run.failure.get("exit_code") or next(
            (c for c in bad if c), 1)
    elif stopped:
        run.state, run.exit_code = "stopped", next((c for c in bad if c), 0 if not bad else 1)
    elif not bad:
        run.state, run.exit_code = "succeeded", 0
    elif all(c is None for c in bad):
        run.state, run.exit_code = "lost", 1
    else:
        run.state, run.exit_code = "failed", next(c for c in bad if c)


def progress(metrics: dict | None) -> dict | None:
    """The run's progress from the last logging.jsonl line (fields documented by the runtime)."""
    if not metrics:
        return None
    return {k: metrics.get(k) for k in PROGRESS_FIELDS + STATUS_EXTRA_FIELDS}
