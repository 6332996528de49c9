"""`megafleet status`: every node's state, the run's progress from logging.jsonl, GPU use, and
after a fail-fast stop, which node failed first with its last log lines."""

from __future__ import annotations

import shlex

from megafleet.jobs.access import ask_nodes
from megafleet.jobs.records import RunRecord
from remote_runtime.spec.layout import PROGRESS_FIELDS


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
            "failure": run.failure, "nodes": nodes,
            "progress": progress(head.get("metrics"), head.get("loss_curve"))}


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


def progress(metrics: dict | None, curve: list | None = None) -> dict | None:
    """The run's progress from the last logging.jsonl line (fields documented by the runtime),
    with the first logged loss and the loss curve ([step, loss], at most 60 points)."""
    if not metrics:
        return None
    curve = curve or []
    return {**{k: metrics.get(k) for k in PROGRESS_FIELDS},
            "first_loss": curve[0][1] if curve else None, "loss_curve": curve}


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
