"""Run records on the operator: `$MEGAFLEET_HOME/runs/<run-id>/run.json` (+ job.yaml, the job
as given, and node-job.yaml, the job as the nodes run it).

A record holds everything `logs`, `status`, `stop` and `fetch` need to find the run again from a
new terminal or after a restart: each node's host (a copy of its inventory entry, so editing the
inventory later does not lose the run), run directory, python, global ranks, launch pid, process
group and start time; the master address and ports; timeouts; the last known state. Secrets
are never stored here (only the names of forwarded variables).
"""

from __future__ import annotations

import json
import os
import secrets
import socket
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

from megafleet import paths
from megafleet.errors import UsageError

STATES = ("launching", "running", "stopping", "succeeded", "failed", "stopped", "lost")
LOCAL_HOST = "local"


@dataclass
class NodeInfo:
    rank: int  # node rank (0 = master)
    host: str  # inventory name, or "local"
    run_dir: str  # absolute path on the node
    python: str  # the node's venv python
    ranks: list[int] = field(default_factory=list)  # global ranks of its processes
    host_entry: dict | None = None  # the inventory entry at launch time (None for local)
    ifname: str | None = None  # the interface towards the master (GLOO/NCCL_SOCKET_IFNAME)
    pid: int | None = None  # the launch shell (session and process-group leader)
    pgid: int | None = None
    start_time: float | None = None  # unix seconds
    start_ticks: int | None = None  # /proc start time, to tell a reused pid apart
    last_contact: float | None = None  # when `status`/`stop` last reached the node (unix s)


@dataclass
class RunRecord:
    run_id: str
    created: float
    task: str
    nodes: list[NodeInfo]
    master_addr: str
    master_port: int
    watcher_port: int
    nproc_per_node: int
    world_size: int
    entry: list[str]  # what torchrun runs after its own options
    output_dir: str  # as the nodes see it: relative to the run dir, or absolute
    stall_timeout: int
    stop_grace: int
    local: bool = False
    env_names: list[str] = field(default_factory=list)  # forwarded variables (names only)
    model: str = ""  # the model path as the nodes see it
    uploads: list[dict] = field(default_factory=list)  # per node: files sent / skipped, bytes
    state: str = "launching"
    exit_code: int | None = None
    failure: dict | None = None  # the first failure the watcher recorded
    updated: float = 0.0
    attempt: int = 1  # launches of this run: 1 + each `megafleet resume`
    launcher: dict | None = None  # {"host", "pid", "start_ticks"} of the launching process
    stop_pending: list[str] = field(default_factory=list)  # hosts `stop` could not reach yet

    # -- files --------------------------------------------------------------------------------
    @property
    def dir(self) -> Path:
        return paths.runs_dir() / self.run_id

    def save(self) -> Path:
        self.updated = time.time()
        self.dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        tmp = self.dir / "run.json.tmp"
        tmp.write_text(json.dumps(self.to_dict(), indent=2))
        os.replace(tmp, self.dir / "run.json")
        return self.dir / "run.json"

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "RunRecord":
        known = {f.name for f in fields(cls)}
        data = {k: v for k, v in data.items() if k in known}
        data["nodes"] = [
            NodeInfo(**{k: v for k, v in n.items() if k in {f.name for f in fields(NodeInfo)}})
            for n in data.get("nodes", [])
        ]
        return cls(**data)

    @classmethod
    def load(cls, ref: str) -> "RunRecord":
        """A run by id, unique id prefix, or `last`."""
        run_id = resolve_run_id(ref)
        path = paths.runs_dir() / run_id / "run.json"
        try:
            return cls.from_dict(json.loads(path.read_text()))
        except (OSError, ValueError, TypeError) as exc:
            raise UsageError(f"run {run_id}: cannot read {path} ({exc})") from None

    def mark_launcher(self) -> None:
        """Remember this process as the one launching the run (a launch killed half-way is
        then recognised: its process is gone while the record still says `launching`)."""
        self.launcher = {
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "start_ticks": _start_ticks(os.getpid()),
        }

    def launcher_gone(self) -> bool:
        """True when the process that launched the run has ended (on this machine)."""
        if not self.launcher or self.launcher.get("host") != socket.gethostname():
            return bool(self.launcher) and time.time() - self.updated > 3600
        return _start_ticks(self.launcher["pid"]) != self.launcher.get("start_ticks")

    @property
    def finished(self) -> bool:
        return self.state in ("succeeded", "failed", "stopped", "lost")

    def node(self, rank: int) -> NodeInfo:
        for n in self.nodes:
            if n.rank == rank:
                return n
        raise UsageError(f"run {self.run_id} has no node {rank} (nodes 0-{len(self.nodes) - 1})")


def _start_ticks(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            return int(f.read().decode(errors="replace").rsplit(")", 1)[1].split()[19])
    except (OSError, ValueError, IndexError):
        return None


def new_run_id(now: float | None = None) -> str:
    """`YYYYmmdd-HHMMSS-xxxx`: sorts by time, unique enough to type a prefix."""
    return time.strftime("%Y%m%d-%H%M%S", time.localtime(now)) + "-" + secrets.token_hex(2)


def run_ids() -> list[str]:
    root = paths.runs_dir()
    if not root.is_dir():
        return []
    return sorted(p.name for p in root.iterdir() if (p / "run.json").is_file())


def resolve_run_id(ref: str) -> str:
    ids = run_ids()
    if not ids:
        raise UsageError("no runs recorded yet", hint="start one with: megafleet launch JOB.yaml")
    if ref in ("last", "latest"):
        return ids[-1]
    if ref in ids:
        return ref
    matches = [i for i in ids if i.startswith(ref)]
    if len(matches) == 1:
        return matches[0]
    if matches:
        raise UsageError(f"run {ref!r} is ambiguous: {', '.join(matches[:5])}")
    raise UsageError(
        f"no run {ref!r} in {paths.runs_dir()}",
        hint=f"recent runs: {', '.join(ids[-3:])} (megafleet runs)",
    )


def list_runs() -> list[RunRecord]:
    out = []
    for run_id in run_ids():
        try:
            out.append(RunRecord.load(run_id))
        except UsageError:
            continue
    return out
