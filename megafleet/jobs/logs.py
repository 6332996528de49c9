"""`megafleet logs`: every node's log at once, each line tagged with its node and global rank.

Each node streams its logs through `nodectl follow` over its own SSH channel: node.log (the
launch script's and torchrun's own lines) and every worker's stdout/stderr file (torchrun
`--redirects 3`), each worker line tagged `[rankN]:` with its global rank by `nodectl`
(`layout.RANK_PREFIX`). Lines reach the caller from one thread, in arrival order; lines without
a tag come from torchrun or the launch script. A `\\r` progress update (a bar redrawn in place)
arrives as its own line and is passed on at most every PROGRESS_EVERY seconds per node, so bars
stay readable when several nodes draw at once. Ctrl-C raises KeyboardInterrupt in the caller;
the job keeps running (the followers notice the closed channel and exit).
"""

from __future__ import annotations

import json
import queue
import re
import shlex
import threading
import time
from dataclasses import asdict, dataclass
from typing import Callable

from megafleet.jobs.access import nodectl, pool_for, runners_for
from megafleet.jobs.nodectl import END_MARK, collapse_cr
from megafleet.jobs.records import NodeInfo, RunRecord

RANK_RE = re.compile(r"^\[rank(\d+)\]:")
PROGRESS_EVERY = 2.0


@dataclass
class LogLine:
    node: int
    host: str
    rank: int | None  # global rank, None for torchrun's and the launch script's own lines
    text: str
    progress: bool = False  # a `\r` update of a progress bar

    def to_dict(self) -> dict:
        return asdict(self)

    @property
    def prefix(self) -> str:
        return f"n{self.node}" + (f" r{self.rank}" if self.rank is not None else "")


def parse_line(node: int, host: str, raw: str) -> LogLine:
    progress = raw.startswith("\r")
    text = collapse_cr(raw) if "\r" in raw else raw
    m = RANK_RE.match(text)
    rank = int(m.group(1)) if m else None
    return LogLine(node, host, rank, text[m.end() :] if m else text, progress)


@dataclass
class StreamResult:
    ends: dict  # host -> the follower's end report (exit code, stop/watcher info)
    errors: dict  # host -> why its stream failed (unreachable, ...)


def stream_logs(
    run: RunRecord,
    on_line: Callable[[LogLine], None],
    follow: bool = False,
    node: int | None = None,
    lines: int | None = None,
    pool=None,
) -> StreamResult:
    """Pass every log line of the run's nodes (or node `node`) to `on_line`; with `follow`,
    keep going until each node's job has ended."""
    nodes = [run.node(node)] if node is not None else run.nodes
    with pool_for(run, pool) as p:
        return _stream(run, nodes, runners_for(run, p, nodes), on_line, follow, lines)


def _stream(run, nodes, runners, on_line, follow, lines) -> StreamResult:
    q: queue.Queue = queue.Queue()
    ends: dict = {}
    for n in nodes:
        threading.Thread(
            target=_follow_one,
            args=(n, runners[n.host], follow, lines, q, ends),
            daemon=True,
            name=f"logs-{n.host}",
        ).start()
    errors: dict = {}
    held: dict[str, tuple[float, LogLine | None]] = {}
    pending = len(nodes)
    while pending:
        try:
            kind, n, payload = q.get(timeout=0.5)
        except queue.Empty:
            _flush_held(held, on_line)
            continue
        if kind == "done":
            pending -= 1
            if not payload.ok and n.host not in ends:
                errors[n.host] = payload.message or payload.describe()
            _flush_held(held, on_line, n.host, force=True)
            continue
        line = parse_line(n.rank, n.host, payload)
        if not line.progress:
            held.pop(n.host, None)  # the bar's last state ends with a newline: shown below
            on_line(line)
            continue
        last, _ = held.get(n.host, (0.0, None))
        if time.monotonic() - last >= PROGRESS_EVERY:
            on_line(line)
            held[n.host] = (time.monotonic(), None)
        else:
            held[n.host] = (last, line)
    return StreamResult(ends, errors)


def _follow_one(
    n: NodeInfo, runner, follow: bool, lines: int | None, q: queue.Queue, ends: dict
) -> None:
    def on_output(stream: str, text: str) -> None:
        if stream == "stdout":
            q.put(("line", n, text))
        elif text.startswith(END_MARK):
            try:
                ends[n.host] = json.loads(text[len(END_MARK) :])
            except ValueError:
                pass

    args = (
        f"follow {shlex.quote(n.run_dir)}"
        + (" --follow" if follow else "")
        + (f" --lines {lines}" if lines else "")
    )
    try:
        res = runner.run(nodectl(n, args), timeout=None, on_output=on_output)
    except Exception as exc:  # a bug must not hang the reader: report it as this node's error
        from megafleet.runner import INTERNAL, Result

        res = Result(n.host, "follow", error=INTERNAL, message=str(exc))
    q.put(("done", n, res))


def _flush_held(held: dict, on_line, host: str | None = None, force: bool = False) -> None:
    now = time.monotonic()
    for h, (last, line) in list(held.items()):
        if line is not None and (h == host and force or now - last >= PROGRESS_EVERY):
            on_line(line)
            held[h] = (now, None)


def follow_logs(
    run: RunRecord,
    on_line: Callable[[LogLine], None],
    node: int | None = None,
    lines: int | None = None,
    pool=None,
) -> tuple[int | None, StreamResult]:
    """Follow until the run ends everywhere; return (the run's exit code, stream result). The
    exit code comes from the nodes' final status (see megafleet.jobs.status.derive_state)."""
    from megafleet.jobs.status import run_status

    result = stream_logs(run, on_line, follow=True, node=node, lines=lines, pool=pool)
    if result.errors:
        return None, result
    status = run_status(run, pool=pool)
    return status["exit_code"], result
