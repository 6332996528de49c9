"""Small host-side agreements between ranks (stop flags, metrics), kept off the GPU stream.

A gloo group over all ranks carries them even when the training traffic is NCCL, so asking
"did any rank get SIGTERM?" never waits for queued GPU work.
"""

from __future__ import annotations

from datetime import timedelta

import torch

_CPU_GROUP = None


def cpu_group():
    """A gloo group over all ranks (the world group itself when training already uses gloo)."""
    global _CPU_GROUP
    if _CPU_GROUP is None:
        if torch.distributed.get_backend() == "gloo":
            _CPU_GROUP = torch.distributed.group.WORLD
        else:
            # Long timeout: rank 0 may tokenize a large dataset while the others wait here.
            _CPU_GROUP = torch.distributed.new_group(backend="gloo", timeout=timedelta(hours=4))
    return _CPU_GROUP


def any_rank(flag: bool) -> bool:
    """True on every rank when the flag is set on at least one."""
    if torch.distributed.get_world_size() == 1:
        return flag
    t = torch.tensor([1 if flag else 0], dtype=torch.int32)
    torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX, group=cpu_group())
    return bool(t.item())


def barrier() -> None:
    torch.distributed.barrier(group=cpu_group())
