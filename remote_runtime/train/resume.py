"""Which checkpoint a run resumes from, on every node, and what each node still needs of it.

Without a shared filesystem each node holds its own copy of `checkpoint-<step>/`: the optimizer
shards and RNG states of its own ranks and `trainer_state.json` (written by every node's local
leader), while only rank 0's node has the Hugging Face weights, the tokenizer files and the
optimizer checkpoint's metadata. Resuming therefore

1. agrees on one step: `auto` takes the newest step complete on every node; a checkpoint
   directory names a step, which each node finds in its own output_dir;
2. sends every node the files of rank 0's copy that it lacks (the weights, the optimizer
   checkpoint's metadata and rank 0's shard file, which holds the items all ranks share), over
   the process group (gloo), before the model is built. The other ranks' shards never move.

A changed layout (world size, TP/PP/CP/DP) is refused later, by load_training_state.
"""

from __future__ import annotations

import os
import socket
from pathlib import Path

import torch

from remote_runtime.spec.layout import STATE_DIR, checkpoint_step
from remote_runtime.spec.layout import TRAINER_STATE as STATE_FILE
from remote_runtime.train.checkpoint import ResumeError, complete_checkpoints
from remote_runtime.train.collectives import cpu_group

CHUNK = 64 << 20


def _gather(obj) -> list:
    out = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(out, obj, group=cpu_group())
    return out


def _say(dist, message: str) -> None:
    if dist.rank == 0:
        print(message, flush=True)


def find_resume_step(resume: str | None, output_dir: str | Path, dist) -> Path | None:
    """This rank's copy of the checkpoint to resume from, or None to start at step 0; every
    rank gets the same step. `resume`: None, "auto" or a checkpoint-<step> directory."""
    if not resume:
        return None
    output_dir = Path(output_dir)
    if resume == "auto":
        path = _auto(output_dir, dist)
    else:
        path = _named(Path(resume).expanduser(), output_dir, dist)
    if path is not None:
        share_missing_files(path, dist)
    return path


def _auto(output_dir: Path, dist) -> Path | None:
    mine = {step: str(p) for step, p in complete_checkpoints(output_dir)}
    everyone = _gather((socket.gethostname(), sorted(mine)))
    common = set.intersection(*(set(steps) for _, steps in everyone))
    if not common:
        if not any(steps for _, steps in everyone):
            _say(
                dist,
                f"checkpoint.resume=auto: no complete checkpoint in {output_dir}: nothing to "
                "resume, starting at step 0",
            )
            return None
        lacking = sorted({host for host, steps in everyone if not steps})
        raise ResumeError(
            f"checkpoint.resume=auto: no checkpoint is complete on every node "
            f"({', '.join(lacking)} have none in {output_dir}); resume on the nodes "
            "(same hosts, same order) that wrote it"
        )
    step = max(common)
    newest = max(max(steps) for _, steps in everyone)
    if newest != step:
        _say(
            dist,
            f"checkpoint.resume=auto: checkpoint-{newest} is not complete on every node; "
            f"taking checkpoint-{step}",
        )
    return Path(mine[step]).resolve()


def _named(path: Path, output_dir: Path, dist) -> Path:
    named = checkpoint_step(path.name) is not None
    local = (
        path
        if (path / STATE_FILE).is_file()
        else (
            output_dir / path.name
            if named and (output_dir / path.name / STATE_FILE).is_file()
            else None
        )
    )
    everyone = _gather((socket.gethostname(), dist.rank, None if local is None else str(local)))
    missing = [f"{host} (rank {rank})" for host, rank, found in everyone if found is None]
    if missing:
        raise ResumeError(
            f"checkpoint.resume: {path} is not a complete checkpoint (no {STATE_FILE}) "
            f"on {', '.join(missing)}, nor {path.name} in that node's "
            f"checkpoint.output_dir; use `auto` or resume on the nodes that wrote it"
        )
    return local.resolve()


def _listing(root: Path) -> list[tuple[str, int]]:
    """Rank 0's files that other nodes may lack: everything but the per-rank RNG states. That
    includes rank 0's optimizer shard file (`__0_*.distcp`): the distributed checkpoint stores
    the items every rank shares (saved once, by rank 0) there, and every rank reads them."""
    out = []
    for p in sorted(root.rglob("*")):
        rel = p.relative_to(root).as_posix()
        if not p.is_file() or rel.startswith(f"{STATE_DIR}/rng/"):
            continue
        out.append((rel, p.stat().st_size))
    return out


def share_missing_files(path: Path, dist) -> list[str]:
    """Send each node the files of rank 0's copy of the checkpoint that its copy lacks
    (collective). Returns the files this rank wrote."""
    if torch.distributed.get_world_size() == 1:
        return []
    box = [_listing(path) if dist.rank == 0 else None]
    torch.distributed.broadcast_object_list(box, src=0, group=cpu_group())
    leader = dist.local_rank == 0
    lacking = [rel for rel, size in box[0] if leader and not _has(path / rel, size)]
    wanted = sorted(set().union(*map(set, _gather(lacking))))
    sizes = dict(box[0])
    if wanted:
        _say(
            dist,
            f"resume: sending {len(wanted)} file(s) of {path.name} "
            f"({sum(sizes[r] for r in wanted) / 2**20:.1f} MiB) to the nodes that lack them",
        )
    for rel in wanted:
        _broadcast_file(path / rel, sizes[rel], dist.rank == 0, rel in lacking)
    return [rel for rel in wanted if rel in lacking]


def _has(path: Path, size: int) -> bool:
    try:
        return path.stat().st_size == size
    except OSError:
        return False


def _broadcast_file(path: Path, size: int, sender: bool, keep: bool) -> None:
    tmp = path.with_name(path.name + ".resume-tmp")
    if keep:
        path.parent.mkdir(parents=True, exist_ok=True)
    src = open(path, "rb") if sender else None
    dst = open(tmp, "wb") if keep else None
    try:
        for offset in range(0, size, CHUNK):
            n = min(CHUNK, size - offset)
            buf = (
                torch.frombuffer(bytearray(src.read(n)), dtype=torch.uint8)
                if sender
                else torch.empty(n, dtype=torch.uint8)
            )
            torch.distributed.broadcast(buf, src=0, group=cpu_group())
            if dst:
                dst.write(buf.numpy().tobytes())
    finally:
        for f in (src, dst):
            if f:
                f.close()
    if keep:
        os.replace(tmp, path)
