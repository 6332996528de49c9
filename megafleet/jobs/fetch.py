"""`megafleet fetch`: bring a run's Hugging Face checkpoint home from the node that wrote it
(the node of global rank 0), with progress, resume and sha256 checks (megafleet.jobs.sync).

A checkpoint counts only when complete: the runtime writes `trainer_state.json` last. By default
only the Hugging Face model (or adapter) comes home; the optimizer and RNG state under
`megatron_state/` (hundreds of GB for a 30B model) only with `with_state`."""

from __future__ import annotations

import shlex
from pathlib import Path

from megafleet.errors import UsageError
from megafleet.jobs.access import ask_nodes, pool_for, runners_for
from megafleet.jobs.records import RunRecord
from megafleet.jobs.sync import RemoteFile, download
from remote_runtime.spec.layout import STATE_DIR, checkpoint_name


def writer_node(run: RunRecord):
    return next((n for n in run.nodes if 0 in n.ranks), run.nodes[0])


def default_destination(run: RunRecord, step: int) -> Path:
    return Path.cwd() / "checkpoints" / run.run_id / checkpoint_name(step)


def find_checkpoint(run: RunRecord, which: str = "latest", pool=None) -> dict:
    """The node's answer for checkpoint `which` (latest or a step): path and file manifest."""
    node = writer_node(run)
    res = ask_nodes(
        run,
        lambda n: f"checkpoints {shlex.quote(n.run_dir)} --pick {shlex.quote(str(which))}",
        timeout=3600,
        pool=pool,
        nodes=[node],
    )[node.host]
    res.check()
    info = res.value
    if not info.get("picked"):
        done = [c["step"] for c in info.get("checkpoints", []) if c["complete"]]
        partial = [c["step"] for c in info.get("checkpoints", []) if not c["complete"]]
        what = "no complete checkpoint" if which == "latest" else f"no complete checkpoint {which}"
        raise UsageError(
            f"run {run.run_id}: {what} in {node.host}:{info.get('output_dir')}"
            + (f" (complete: {', '.join(map(str, done))})" if done else "")
            + (f" (being written: {', '.join(map(str, partial))})" if partial else ""),
            hint="checkpoints appear every save_steps and at the end of training; "
            "see `megafleet status " + run.run_id + "`",
        )
    return info["picked"]


def fetch_checkpoint(
    run: RunRecord,
    which: str = "latest",
    to: str | Path | None = None,
    bars=None,
    pool=None,
    with_state: bool = False,
) -> dict:
    """Download checkpoint `which` into `to` (default ./checkpoints/<run>/checkpoint-<step>);
    files already there with the right sha256 are skipped, partial ones continued. Without
    `with_state`, `megatron_state/` stays on the node."""
    picked = find_checkpoint(run, which, pool)
    dest = Path(to).expanduser() if to else default_destination(run, picked["step"])
    node = writer_node(run)
    state = [f for f in picked["files"] if f["rel"].startswith(STATE_DIR + "/")]
    wanted = picked["files"] if with_state else [f for f in picked["files"] if f not in state]
    files = [
        RemoteFile(f"{picked['path']}/{f['rel']}", dest / f["rel"], f["size"], f["sha256"])
        for f in wanted
    ]
    cb = (
        bars.bar(f"fetch checkpoint-{picked['step']} from {node.host}", sum(f.size for f in files))
        if bars
        else None
    )
    with pool_for(run, pool) as p:
        report = download(runners_for(run, p, [node])[node.host], files, cb)
    return {
        "run_id": run.run_id,
        "host": node.host,
        "step": picked["step"],
        "path": str(dest),
        "remote_path": picked["path"],
        "files": len(files),
        "with_state": with_state,
        "state_left_on_node": {
            "files": 0 if with_state else len(state),
            "bytes": 0 if with_state else sum(f["size"] for f in state),
        },
        **report.to_dict(),
    }
