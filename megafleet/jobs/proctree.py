"""Find and stop every process of a run on this machine, unprivileged and without cgroups.

Node-side (stdlib only). torchrun starts each worker in a session of its own, so signalling
torchrun's process group misses the workers, and a worker whose torchrun died is re-parented to
init, so walking the tree from the launch shell misses it too. A run's processes are found by
both ways at once:

- the tree: every descendant of the launch shell (its pid is in `<run dir>/pid`, its start time
  recorded so a reused pid is never taken for it);
- a tag: the launch script exports `MEGAFLEET_RUN_ID=<run id>` (the watcher gets
  `MEGAFLEET_WATCH_RUN=<run id>`), which every descendant inherits; `/proc/PID/environ` of the
  user's own processes is readable without privileges, orphans included.
"""

from __future__ import annotations

import os
import signal
import time
from dataclasses import dataclass

RUN_TAG = "MEGAFLEET_RUN_ID"
WATCH_TAG = "MEGAFLEET_WATCH_RUN"
CLK_TCK = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


@dataclass
class Proc:
    pid: int
    ppid: int
    pgid: int
    sid: int
    state: str
    start_ticks: int  # since boot, as in /proc/PID/stat field 22
    cmdline: str


def read_proc(pid: int) -> Proc | None:
    """One process from /proc, or None if it is gone."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read().decode(errors="replace")
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            cmd = f.read().replace(b"\0", b" ").decode(errors="replace").strip()
    except OSError:
        return None
    rest = stat.rsplit(")", 1)[1].split()  # the command name may hold spaces and parentheses
    return Proc(pid, int(rest[1]), int(rest[2]), int(rest[3]), rest[0], int(rest[19]), cmd)


def all_procs(uid: int | None = None) -> dict[int, Proc]:
    """Every live process (of `uid` only, when given)."""
    out = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        if uid is not None:
            try:
                if os.stat(f"/proc/{entry}").st_uid != uid:
                    continue
            except OSError:
                continue
        p = read_proc(int(entry))
        if p is not None and p.state != "Z":  # a zombie holds nothing; its parent reaps it
            out[p.pid] = p
    return out


def has_tag(pid: int, name: str, value: str) -> bool:
    needle = f"{name}={value}".encode()
    try:
        with open(f"/proc/{pid}/environ", "rb") as f:
            return needle in f.read().split(b"\0")
    except OSError:  # another user's process, or gone
        return False


def boot_time() -> float:
    with open("/proc/stat") as f:
        for line in f:
            if line.startswith("btime "):
                return float(line.split()[1])
    return 0.0


def start_epoch(p: Proc) -> float:
    """A process's start time as unix seconds."""
    return boot_time() + p.start_ticks / CLK_TCK


def descendants(root: int, procs: dict[int, Proc]) -> set[int]:
    children: dict[int, list[int]] = {}
    for p in procs.values():
        children.setdefault(p.ppid, []).append(p.pid)
    out, todo = set(), [root]
    while todo:
        for c in children.get(todo.pop(), []):
            if c not in out:
                out.add(c)
                todo.append(c)
    return out


def live_root(pid: int | None, start_ticks: int | None) -> Proc | None:
    """The launch shell if it still runs (same pid and same start time)."""
    if not pid:
        return None
    p = read_proc(pid)
    if p is None or p.state == "Z" or (start_ticks is not None and p.start_ticks != start_ticks):
        return None
    return p


def run_processes(
    run_id: str,
    root_pid: int | None = None,
    root_ticks: int | None = None,
    tags: tuple[str, ...] = (RUN_TAG,),
    exclude: set[int] = frozenset(),
) -> dict[int, Proc]:
    """The run's live processes on this machine: the launch shell's tree plus every process
    carrying one of `tags` = run_id. `exclude` (e.g. the caller and its parents) is left out."""
    procs = all_procs(os.getuid())
    found: set[int] = set()
    root = live_root(root_pid, root_ticks)
    if root is not None:
        found |= {root.pid} | descendants(root.pid, procs)
    for pid in procs:
        if pid not in found and any(has_tag(pid, t, run_id) for t in tags):
            found.add(pid)
            found |= descendants(pid, procs)
    me = {os.getpid(), os.getppid()}
    return {pid: procs[pid] for pid in found - set(exclude) - me if pid in procs}


def signal_all(pids, sig: int) -> list[int]:
    """Send `sig` to each pid; return the pids that received it."""
    sent = []
    for pid in pids:
        try:
            os.kill(pid, sig)
            sent.append(pid)
        except (ProcessLookupError, PermissionError):
            pass
    return sent


def terminate(find, grace: float, spare: set[int] = frozenset(), poll: float = 0.2) -> dict:
    """Stop what `find()` returns: SIGTERM to all but `spare` (the launch shell and torchrun: they
    end by themselves once the workers have, see nodectl.spared), SIGKILL to everything left after
    `grace` seconds, then wait up to 10 s for the processes to vanish.
    Returns {"terminated", "killed", "left"}."""
    termed = signal_all([p for p in find() if p not in spare], signal.SIGTERM)
    deadline = time.monotonic() + grace
    left = find()
    while left and time.monotonic() < deadline:
        time.sleep(poll)
        left = find()
    killed = signal_all(list(left), signal.SIGKILL) if left else []
    deadline = time.monotonic() + 10
    while left and time.monotonic() < deadline:
        time.sleep(poll)
        left = find()
    return {"terminated": sorted(termed), "killed": sorted(killed), "left": sorted(left)}
