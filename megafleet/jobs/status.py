"""`megafleet status`: every node's state, the run's progress from logging.jsonl, GPU use, and
after a fail-fast stop, which node failed first with its last log lines."""

from __future__ import annotations

import shlex
import time

from megafleet.errors import MegafleetError
from megafleet.jobs.access import ask_nodes
from megafleet.jobs.records import RunRecord
from remote_runtime.spec.layout import PROGRESS_FIELDS, STATUS_EXTRA_FIELDS


def run_status(run: RunRecord, lines: int = 20, pool=None) -> dict:
    """Ask every node (in parallel); update and save the record's state. Returns
    {"run": record dict, "state", "exit_code", "failure", "nodes": [per node], "progress"}."""
    results = ask_nodes(
        run, lambda n: f"status {shlex.quote(n.run_dir)} --lines {lines}", pool=pool
    )
    nodes = [_node_info(node, results[node.host]) for node in run.nodes]
    if run.state == "stopping" and _finish_stop(run, nodes, pool):
        return run_status(run, lines, pool)
    derive_state(run, nodes)
    run.save()
    head = next((n for n in nodes if n["node_rank"] == 0), {})
    return {
        "run": run.to_dict(),
        "state": run.state,
        "exit_code": run.exit_code,
        "failure": run.failure,
        "nodes": nodes,
        "progress": progress(head.get("metrics"), head.get("loss_curve")),
    }


def _node_info(node, res) -> dict:
    info = dict(res.value) if res.ok and isinstance(res.value, dict) else {}
    if res.reached:
        node.last_contact = time.time()
    else:
        info["state"] = "unreachable"
    info.update(
        {
            "host": node.host,
            "node_rank": node.rank,
            "ranks": node.ranks,
            "reachable": res.reached,
            "last_contact": node.last_contact,
            "error": None if res.ok else (res.message or res.describe()),
        }
    )
    if not info.get("ok", False) and res.ok:
        info["error"] = info.get("error") or "no status"
    return info


def _finish_stop(run: RunRecord, nodes: list[dict], pool) -> bool:
    """A `stop` that could not reach every node left the run `stopping`: once those nodes
    answer again, stop what still runs there. True when that stop finished."""
    back = [n["host"] for n in nodes if n["reachable"] and n["host"] in run.stop_pending]
    if not back:
        return False
    from megafleet.jobs.stop import stop_run

    try:
        stop_run(run, pool=pool, nodes=[n for n in run.nodes if n.host in back])
    except MegafleetError:
        return False  # still not everywhere: the run stays `stopping`
    return True


def derive_state(run: RunRecord, nodes: list[dict]) -> None:
    """The run's state from its nodes' (SKILL.md, "Monitor"). With a node unreachable, only
    what the reachable ones know (node 0's watcher verdict) changes it."""
    reachable = [n for n in nodes if n.get("reachable", True) and not n.get("error")]
    watch = next((n.get("watch") for n in reachable if n.get("node_rank") == 0), None) or {}
    failure = next((n.get("failure") for n in reachable if n.get("failure")), None) or watch.get(
        "failure"
    )
    if failure:
        run.failure = failure
    states = [n.get("state") for n in reachable]
    if len(reachable) < len(nodes):
        # Unreachable nodes: say what the reachable ones know (the watcher's verdict), no more.
        if (
            run.state != "stopping"
            and run.failure
            and not any(s in ("running", "starting") for s in states)
        ):
            run.state, run.exit_code = "failed", run.failure.get("exit_code") or 1
        return
    if states and all(s == "not started" for s in states):
        if run.state == "launching" and run.launcher_gone():
            run.state, run.exit_code = "failed", 1
            run.failure = {
                "node": None,
                "host": None,
                "time": run.updated,
                "exit_code": None,
                "tail": [],
                "reason": "the launch was interrupted before the job started on any node",
            }
        elif run.state == "stopping":
            run.state, run.exit_code = "stopped", 0
        return
    if any(s in ("running", "starting") for s in states):
        run.state = "stopping" if run.state == "stopping" else "running"
        return
    codes = [n.get("exit_code") for n in reachable if n.get("state") != "not started"]
    stopped = run.state == "stopping" or any(n.get("stop_requested") for n in reachable)
    bad = [c for c in codes if c != 0]
    if run.failure and not stopped:
        run.state, run.exit_code = (
            "failed",
            run.failure.get("exit_code") or next((c for c in bad if c), 1),
        )
    elif stopped:  # stopped by the user: the run's exit code is 0 (what it did until then stays)
        run.state, run.exit_code = "stopped", 0
    elif not bad:
        run.state, run.exit_code = "succeeded", 0
    elif all(c is None for c in bad):
        run.state, run.exit_code = "lost", 1
    else:
        run.state, run.exit_code = "failed", next(c for c in bad if c)


def progress(metrics: dict | None, curve: list | None = None) -> dict | None:
    """The run's progress from the last logging.jsonl line (fields documented by the runtime),
    with the first logged loss and the loss curve ([step, loss], at most 60 points)."""
    if not metrics:
        return None
    curve = curve or []
    return {
        **{k: metrics.get(k) for k in PROGRESS_FIELDS + STATUS_EXTRA_FIELDS},
        "first_loss": curve[0][1] if curve else None,
        "loss_curve": curve,
    }


SPARK = "▁▂▃▄▅▆▇█"


def sparkline(values: list[float], width: int = 40) -> str:
    """A terminal loss curve: one block character per point (at most `width`, evenly picked)."""
    if not values:
        return ""
    if len(values) > width:
        values = [values[round(i * (len(values) - 1) / (width - 1))] for i in range(width)]
    low, high = min(values), max(values)
    span = (high - low) or 1.0
    return "".join(SPARK[min(len(SPARK) - 1, int((v - low) / span * len(SPARK)))] for v in values)


def plot_loss(curve: list, path: str, title: str) -> str:
    """Write the loss curve as a PNG with matplotlib; returns the path. Raises ImportError
    where matplotlib is not installed (it is not a megafleet dependency)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot([s for s, _ in curve], [v for _, v in curve])
    ax.set(xlabel="step", ylabel="loss", title=title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
