"""Node-side helpers of a run, run with the node's venv python (stdlib only):

    python -m megafleet.jobs.nodectl manifest            < {"files": [{"path", "size"}]}
    python -m megafleet.jobs.nodectl write RUN_DIR       < {"files": [{"name", "text", "mode"}],
                                                            "new_attempt": bool}
    python -m megafleet.jobs.nodectl started RUN_DIR     (wait for the launch shell, record it)
    python -m megafleet.jobs.nodectl status RUN_DIR [--lines N]
    python -m megafleet.jobs.nodectl stop RUN_DIR [--grace S] [--mark-only]
    python -m megafleet.jobs.nodectl reap RUN_DIR --exit-code RC   (launch.sh, after torchrun)
    python -m megafleet.jobs.nodectl follow RUN_DIR [--follow] [--lines N]
    python -m megafleet.jobs.nodectl checkpoints RUN_DIR [--pick latest|STEP]
    python -m megafleet.jobs.nodectl listen --host A --ports P,Q [--seconds S] [--expect N]
    python -m megafleet.jobs.nodectl connect --host A --ports P,Q [--timeout S]

Each prints one JSON document on stdout, except `follow`, which streams node.log on stdout
and every worker's output, each worker line tagged `[rankN]:` (a `\\r`-terminated progress
update comes out as its own line starting with `\\r`), and ends with
`__megafleet_end__ {json}` on stderr; it writes a keepalive line to stderr every few seconds,
so it notices (broken pipe) when the operator has gone and exits.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import select
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

from megafleet.hostinfo import parse_gpus
from megafleet.jobs import layout as L
from megafleet.jobs import proctree
from megafleet.transfer import file_sha256  # the operator hashes with the same function
from remote_runtime.spec.layout import CHECKPOINT_PREFIX, checkpoint_step

END_MARK = "__megafleet_end__"
KEEPALIVE = "__megafleet_keepalive__"
PART = ".mfpart"


# -- reading a run directory (also used by the watcher) ------------------------------------------


def read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def write_json(path: Path, data: dict) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=1))
    os.replace(tmp, path)


def read_exit_code(run_dir: Path) -> int | None:
    try:
        return int((run_dir / L.EXIT_CODE).read_text().strip())
    except (OSError, ValueError):
        return None


def launch_shell(run_dir: Path) -> tuple[int | None, int | None]:
    """(pid, start ticks) of the launch shell, from started.json or the bare pid file."""
    started = read_json(run_dir / L.STARTED) or {}
    if started.get("pid"):
        return started["pid"], started.get("start_ticks")
    try:
        return int((run_dir / L.PID).read_text().strip()), None
    except (OSError, ValueError):
        return None, None


def shell_alive(run_dir: Path) -> bool:
    return proctree.live_root(*launch_shell(run_dir)) is not None


def output_dir(run_dir: Path, record: dict) -> Path:
    out = Path(os.path.expanduser(record.get("output_dir") or "output"))
    return out if out.is_absolute() else run_dir / out


def collapse_cr(line: str) -> str:
    """What a terminal shows for a line holding `\\r` progress updates: the last non-empty part."""
    parts = [p for p in line.split("\r") if p.strip()]
    return parts[-1] if parts else ""


def tail_lines(path: Path, n: int, max_bytes: int = 256 * 1024) -> list[str]:
    try:
        with open(path, "rb") as f:
            f.seek(0, 2)
            size = f.tell()
            f.seek(max(0, size - max_bytes))
            data = f.read()
    except OSError:
        return []
    lines = data.decode(errors="replace").splitlines()
    return [collapse_cr(x) for x in lines[-n:]] if n else []


def last_metrics(path: Path) -> tuple[dict | None, int]:
    """The last complete JSON line of logging.jsonl and the number of lines; the eval_* fields
    of the last record that has them are added, with `eval_step` naming its step."""
    try:
        data = path.read_bytes()
    except OSError:
        return None, 0
    lines = [x for x in data.split(b"\n") if x.strip()]
    last = None
    for raw in reversed(lines):
        try:
            record = json.loads(raw)
        except ValueError:
            continue
        if last is None:
            last = record
        if "eval_loss" in record:
            last.update(
                {k: v for k, v in record.items() if k.startswith("eval_")},
                eval_step=record.get("step"),
            )
            break
    return last, len(lines)


def loss_curve(path: Path, points: int = 60) -> list[list]:
    """[step, loss] pairs of logging.jsonl, at most `points` of them (first and last kept)."""
    try:
        raw = path.read_bytes().split(b"\n")
    except OSError:
        return []
    curve = []
    for line in raw:
        try:
            rec = json.loads(line)
        except ValueError:
            continue
        if isinstance(rec, dict) and isinstance(rec.get("loss"), (int, float)):
            curve.append([rec.get("step"), rec["loss"]])
    if len(curve) <= points:
        return curve
    every = (len(curve) - 1) / (points - 1)
    return [curve[round(i * every)] for i in range(points)]


def rank_logs(run_dir: Path, record: dict) -> list[tuple[Path, int | None]]:
    """Each worker's stdout and stderr file with its global rank (torchrun --redirects 3 writes
    torchrun-logs/<id>/attempt_<n>/<local rank>/{stdout,stderr}.log)."""
    ranks = record.get("ranks") or []
    out = []
    for d in sorted((run_dir / L.TORCHRUN_LOGS).glob("*/attempt_*/*")):
        if not d.name.isdigit():
            continue
        local = int(d.name)
        rank = ranks[local] if local < len(ranks) else None
        out += [(d / name, rank) for name in ("stdout.log", "stderr.log") if (d / name).exists()]
    return out


def progress_marker(run_dir: Path, record: dict) -> tuple[int, ...]:
    """Sizes of node.log, every worker log and logging.jsonl: any growth is progress."""
    files = [run_dir / L.NODE_LOG, output_dir(run_dir, record) / L.METRICS_FILE]
    files += [p for p, _ in rank_logs(run_dir, record)]
    sizes = []
    for p in files:
        try:
            sizes.append(p.stat().st_size)
        except OSError:
            sizes.append(0)
    return tuple(sizes)


def last_output_age(run_dir: Path, record: dict) -> float | None:
    """Seconds since any log of this node (or logging.jsonl) last grew."""
    files = [run_dir / L.NODE_LOG, output_dir(run_dir, record) / L.METRICS_FILE]
    mtimes = []
    for p in files + [p for p, _ in rank_logs(run_dir, record)]:
        try:
            mtimes.append(p.stat().st_mtime)
        except OSError:
            pass
    return round(time.time() - max(mtimes), 1) if mtimes else None


def recent_lines(run_dir: Path, record: dict, n: int) -> list[str]:
    """The last `n` lines of node.log and of each worker's stdout and stderr, tagged; the files in
    the order they were last written (node.log's "torchrun exited" line comes after the
    workers' last lines), so the tail reads in time order file by file."""
    sources = [(run_dir / L.NODE_LOG, None)] + rank_logs(run_dir, record)

    def written(src):
        try:
            return src[0].stat().st_mtime
        except OSError:
            return 0.0

    out = []
    for path, rank in sorted(sources, key=written):
        tag = "" if rank is None else f"[rank{rank}] "
        out += [f"{tag}{line}" for line in tail_lines(path, n)]
    return out


def _nvidia_smi(*args: str) -> str | None:
    """What `nvidia-smi ARGS` prints; None where there is no nvidia-smi or it fails."""
    if not shutil.which("nvidia-smi"):
        return None
    try:
        out = subprocess.run(["nvidia-smi", *args], capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout if out.returncode == 0 else None


_USAGE_FIELDS = ("index", "utilization.gpu", "memory.used", "memory.total")


def gpu_usage() -> list[dict] | None:
    """Per-GPU utilisation and memory from nvidia-smi; None where there is none (or it fails)."""
    text = _nvidia_smi(f"--query-gpu={','.join(_USAGE_FIELDS)}", "--format=csv,noheader,nounits")
    try:
        rows = parse_gpus(text, _USAGE_FIELDS) if text is not None else None
    except ValueError:
        return None
    if rows is None:
        return None
    keys = ("index", "util", "mem_used_mib", "mem_total_mib")
    return [
        {k: row[f] for k, f in zip(keys, _USAGE_FIELDS)}
        for row in rows
        if all(isinstance(row[f], int) for f in _USAGE_FIELDS)
    ]


def gpu_holders(pids: set[int]) -> list[int] | None:
    """Which of `pids` nvidia-smi lists as holding GPU memory (None: no nvidia-smi answer)."""
    text = _nvidia_smi("--query-compute-apps=pid", "--format=csv,noheader")
    if text is None:
        return None
    listed = {int(x) for x in text.split() if x.strip().isdigit()}
    return sorted(listed & pids)


def node_state(run_dir: Path, record: dict, procs: dict | None = None) -> str:
    """running | exited | stopped | lost (no process, no exit code) | starting. Processes left
    after the launch shell has ended (being reaped) do not make a node `running`."""
    code = read_exit_code(run_dir)
    if procs is None:
        procs = find_run(run_dir, record)
    if procs and (code is None or shell_alive(run_dir)):
        return "running"
    if code is not None:
        return "exited"
    if (run_dir / L.STOP_REQUESTED).exists():
        return "stopped"
    return "lost" if launch_shell(run_dir)[0] else "starting"


def spared(run_dir: Path) -> set[int]:
    """Processes a stop does not SIGTERM (SIGKILL after the grace period still reaches them):
    the launch shell (it writes the exit code); torchrun, which ends by itself, with the workers'
    exit code, once they have saved and exited (a SIGTERMed torchrun exits 1 and SIGTERMs the
    workers' process groups in turn); and the workers' own children (the helper processes of a
    checkpoint being saved: the launch shell ends what is left of them after torchrun)."""
    pid, ticks = launch_shell(run_dir)
    if proctree.live_root(pid, ticks) is None:
        return {pid} if pid else set()
    procs = proctree.all_procs(os.getuid())
    runners = {
        p.pid for p in procs.values() if p.ppid == pid and "torch.distributed.run" in p.cmdline
    }
    workers = {p.pid for p in procs.values() if p.ppid in runners}
    helpers = set().union(*(proctree.descendants(w, procs) for w in workers)) if workers else set()
    return {pid} | runners | helpers


def find_run(run_dir: Path, record: dict, watchers: bool = False) -> dict:
    pid, ticks = launch_shell(run_dir)
    tags = (proctree.RUN_TAG, proctree.WATCH_TAG) if watchers else (proctree.RUN_TAG,)
    return proctree.run_processes(record["run_id"], pid, ticks, tags=tags)


# -- commands -----------------------------------------------------------------------------------


def cmd_manifest(_args) -> dict:
    """Size and sha256 of each file (hashed only when its size is the expected one) and of a
    partial copy beside it."""
    wanted = json.load(sys.stdin)["files"]
    out = []
    for f in wanted:
        path, expected = os.path.expanduser(f["path"]), f.get("size")
        info = {
            "path": f["path"],
            "size": None,
            "sha256": None,
            "part_size": None,
            "part_sha256": None,
        }
        if os.path.isfile(path):
            info["size"] = os.path.getsize(path)
            if expected is None or info["size"] == expected:
                info["sha256"] = file_sha256(path)
        part = path + PART
        if os.path.isfile(part):
            info["part_size"] = os.path.getsize(part)
            if expected is None or info["part_size"] <= expected:
                info["part_sha256"] = file_sha256(part)
        out.append(info)
    return {"files": out}


def new_attempt(run_dir: Path) -> str | None:
    """Move the previous launch's state files to attempts/<n>/ (a resumed run starts clean)."""
    present = [n for n in L.PER_ATTEMPT if (run_dir / n).exists()]
    if not present:
        return None
    n = 1
    while (run_dir / L.ATTEMPTS / str(n)).exists():
        n += 1
    dest = run_dir / L.ATTEMPTS / str(n)
    dest.mkdir(parents=True)
    for name in present:
        os.replace(run_dir / name, dest / name)
    return str(dest)


def cmd_write(args) -> dict:
    """Write the run directory's files, each atomically and with its mode from the start (the
    env file is 0600 before a byte of it is written)."""
    run_dir = Path(os.path.expanduser(args.run_dir))
    run_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    request = json.load(sys.stdin)
    if request.get("new_attempt") and find_run(
        run_dir, read_json(run_dir / L.RUN_JSON) or {"run_id": "?"}
    ):
        return {"ok": False, "error": "the run's processes are still running here"}
    archived = new_attempt(run_dir) if request.get("new_attempt") else None
    written = []
    for f in request["files"]:
        target = run_dir / f["name"]
        tmp = target.with_name(target.name + ".tmp")
        tmp.unlink(missing_ok=True)
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, int(f.get("mode", 0o644)))
        with os.fdopen(fd, "w") as out:
            out.write(f["text"])
        os.chmod(tmp, int(f.get("mode", 0o644)))
        os.replace(tmp, target)
        written.append(f["name"])
    return {"ok": True, "written": written, "archived": archived}


def cmd_started(args) -> dict:
    """Wait for the launch shell's pid file; record pid, pgid, session and start time."""
    run_dir = Path(args.run_dir)
    deadline = time.monotonic() + args.wait
    while not (run_dir / L.PID).exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    pid, _ = launch_shell(run_dir)
    p = proctree.read_proc(pid) if pid else None
    if p is None:
        code = read_exit_code(run_dir)
        return {
            "ok": code == 0 if code is not None else False,
            "pid": pid,
            "exit_code": code,
            "log_tail": tail_lines(run_dir / L.NODE_LOG, 20),
            "error": "the launch script did not start" if pid is None else "it exited at once",
        }
    info = {
        "ok": True,
        "pid": p.pid,
        "pgid": p.pgid,
        "sid": p.sid,
        "start_ticks": p.start_ticks,
        "start_time": proctree.start_epoch(p),
    }
    write_json(run_dir / L.STARTED, info)
    return info


def cmd_status(args) -> dict:
    run_dir = Path(args.run_dir)
    record = read_json(run_dir / L.RUN_JSON)
    if record is None:
        return not_started(run_dir)
    procs = find_run(run_dir, record)
    metrics, count = last_metrics(output_dir(run_dir, record) / L.METRICS_FILE)
    log = run_dir / L.NODE_LOG
    watchers = proctree.run_processes(record["run_id"], tags=(proctree.WATCH_TAG,))
    return {
        "ok": True,
        "node_rank": record.get("node_rank"),
        "state": node_state(run_dir, record, procs),
        "exit_code": read_exit_code(run_dir),
        "processes": len(procs),
        "cause": read_json(run_dir / L.EXIT_CAUSE),
        "started": read_json(run_dir / L.STARTED),
        "stop_requested": (run_dir / L.STOP_REQUESTED).exists(),
        "log_bytes": log.stat().st_size if log.exists() else 0,
        "log_age_s": last_output_age(run_dir, record),
        "log_tail": recent_lines(run_dir, record, args.lines),
        "metrics": metrics,
        "metrics_lines": count,
        "loss_curve": loss_curve(output_dir(run_dir, record) / L.METRICS_FILE),
        "watcher_alive": bool(watchers),
        "watcher_stop": read_json(run_dir / L.WATCHER_STOP),
        "watch": read_json(run_dir / L.WATCH_STATE),
        "failure": read_json(run_dir / L.FAILURE),
        "gpus": gpu_usage(),
        "time": time.time(),
    }


def cmd_stop(args) -> dict:
    """Mark the run as stopped by the user, then TERM it (torchrun, every worker, the watcher),
    KILL what is left after the grace period, and check nothing is left."""
    run_dir = Path(args.run_dir)
    record = read_json(run_dir / L.RUN_JSON)
    if record is None:
        return {**not_started(run_dir), "terminated": [], "killed": [], "left": []}
    if not (run_dir / L.STOP_REQUESTED).exists():
        (run_dir / L.STOP_REQUESTED).write_text(f"{time.time()}\n")
    if args.mark_only:
        return {"ok": True, "marked": True}
    seen: set[int] = set()

    def find():
        found = find_run(run_dir, record, watchers=True)
        seen.update(found)
        return found

    result = proctree.terminate(find, args.grace, spare=spared(run_dir))
    (run_dir / L.ENV_FILE).unlink(missing_ok=True)  # forwarded secrets end with the run
    holders = gpu_holders(seen)
    return {
        "ok": not result["left"] and not holders,
        **result,
        "gpu_holders": holders,
        "gpu_checked": holders is not None,
        "exit_code": read_exit_code(run_dir),
    }


def not_started(run_dir: Path) -> dict:
    """A node the launch never reached (it died or was cut off before writing run.json)."""
    return {
        "ok": True,
        "state": "not started",
        "exit_code": None,
        "processes": 0,
        "note": f"no run record at {run_dir / L.RUN_JSON}: the launch never started the job here",
    }


def cmd_reap(args) -> dict:
    """Run by launch.sh once torchrun has ended: end every process of the run it left behind
    (orphaned workers, multiprocessing helpers, dataloader workers), then record why it ended."""
    from megafleet.jobs import exitcause

    run_dir = Path(args.run_dir)
    record = read_json(run_dir / L.RUN_JSON) or {"run_id": "?"}
    result = proctree.terminate(lambda: find_run(run_dir, record), args.grace)
    if result["terminated"] or result["killed"]:
        print(
            f"megafleet: ended {len(result['terminated']) + len(result['killed'])} process(es) "
            f"torchrun left behind",
            file=sys.stderr,
            flush=True,
        )
    if args.exit_code != 0:
        write_json(run_dir / L.EXIT_CAUSE, exitcause.from_log(args.exit_code, run_dir / L.NODE_LOG))
    return {"ok": not result["left"], **result}


def split_segments(data: bytes) -> tuple[list[bytes], bytes]:
    """Complete lines from `data` (a `\\r`-ended progress update becomes b'\\r' + text), and the
    incomplete rest (a trailing `\\r` waits: it may be half of `\\r\\n`)."""
    out, last = [], 0
    for m in re.finditer(rb"([^\r\n]*)(\r\n|\n|\r(?!$))", data):
        text, end = m.group(1), m.group(2)
        if end != b"\r":
            out.append(text)
        elif text.strip():
            out.append(b"\r" + text)
        last = m.end()
    return out, data[last:]


class Source:
    """One log file being followed: node.log (rank None) or a worker's stdout/stderr."""

    def __init__(self, path: Path, rank: int | None, lines: int | None):
        self.path, self.rank = path, rank
        self.tag = b"" if rank is None else L.RANK_PREFIX.format(rank=rank).encode()
        self.offset, self.pending = _start_offset(path, lines), b""

    def read(self) -> list[bytes]:
        data = _read_from(self.path, self.offset)
        self.offset += len(data)
        if not data:
            return []
        lines, self.pending = split_segments(self.pending + data)
        return [b"\r" + self.tag + x[1:] if x.startswith(b"\r") else self.tag + x for x in lines]

    def rest(self) -> list[bytes]:
        text = self.pending.replace(b"\r", b"\n").strip(b"\n")
        self.pending = b""
        return [self.tag + text] if text else []


def cmd_follow(args) -> None:
    run_dir = Path(args.run_dir)
    record = read_json(run_dir / L.RUN_JSON) or {"run_id": "?"}
    sources = {run_dir / L.NODE_LOG: Source(run_dir / L.NODE_LOG, None, args.lines)}
    last_alive, last_check, ended = time.monotonic(), 0.0, False
    give_up = time.monotonic() + 60  # a launch that never wrote its pid file
    out, err = sys.stdout.buffer, sys.stderr
    while True:
        for path, rank in rank_logs(run_dir, record):
            if path not in sources:
                sources[path] = Source(path, rank, args.lines)
        lines = [x for src in sources.values() for x in src.read()]
        if lines:
            out.write(b"".join(x + b"\n" for x in lines))
            out.flush()
            continue
        if not args.follow or ended:
            break
        now = time.monotonic()
        if now - last_check > 1.0:
            last_check = now
            known = read_exit_code(run_dir) is not None or launch_shell(run_dir)[0] is not None
            ended = (known and not shell_alive(run_dir)) or (not known and now > give_up)
            if ended:
                continue  # one more read: the last bytes written before the end
        if now - last_alive > args.keepalive:
            err.write(KEEPALIVE + "\n")
            err.flush()
            last_alive = now
        time.sleep(0.2)
    rest = [x for src in sources.values() for x in src.rest()]
    if rest:
        out.write(b"".join(x + b"\n" for x in rest))
        out.flush()
    end = {
        "exit_code": read_exit_code(run_dir),
        "stop_requested": (run_dir / L.STOP_REQUESTED).exists(),
        "watcher_stop": read_json(run_dir / L.WATCHER_STOP),
        "node_rank": record.get("node_rank"),
    }
    err.write(f"{END_MARK} {json.dumps(end)}\n")
    err.flush()


def _start_offset(log: Path, lines: int | None) -> int:
    if not lines:
        return 0
    try:
        size = log.stat().st_size
        with open(log, "rb") as f:
            f.seek(max(0, size - 1024 * 1024))
            data = f.read()
    except OSError:
        return 0
    cut = data.rstrip(b"\n")
    for _ in range(lines):
        i = cut.rfind(b"\n")
        if i < 0:
            return size - len(data)
        cut = cut[:i]
    return size - len(data) + len(cut) + 1


def _read_from(path: Path, offset: int, limit: int = 1 << 20) -> bytes:
    try:
        with open(path, "rb") as f:
            f.seek(offset)
            return f.read(limit)
    except OSError:
        return b""


def cmd_checkpoints(args) -> dict:
    run_dir = Path(args.run_dir)
    record = read_json(run_dir / L.RUN_JSON) or {}
    out_dir = output_dir(run_dir, record)
    found = []
    for d in out_dir.glob(f"{CHECKPOINT_PREFIX}*") if out_dir.is_dir() else []:
        step = checkpoint_step(d.name)
        if step is not None and d.is_dir():
            found.append(
                {"step": step, "path": str(d), "complete": (d / L.TRAINER_STATE).is_file()}
            )
    found.sort(key=lambda c: c["step"])
    result = {"ok": True, "output_dir": str(out_dir), "checkpoints": found, "picked": None}
    complete = [c for c in found if c["complete"]]
    if args.pick:
        pick = (
            complete[-1]
            if args.pick == "latest" and complete
            else next((c for c in complete if str(c["step"]) == args.pick), None)
        )
        if pick:
            root = Path(pick["path"])
            pick["files"] = [
                {
                    "rel": p.relative_to(root).as_posix(),
                    "size": p.stat().st_size,
                    "sha256": file_sha256(str(p)),
                }
                for p in sorted(root.rglob("*"))
                if p.is_file()
            ]
        result["picked"] = pick
    return result


def cmd_listen(args) -> dict:
    """Listen on the ports for `seconds`; report who connected (the master-port check)."""
    socks = {}
    for port in args.ports:
        s = socket.socket(socket.AF_INET6 if ":" in args.host else socket.AF_INET)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((args.host, port))
        except OSError as exc:
            return {
                "ok": False,
                "port": port,
                "error": exc.strerror or str(exc),
                "errno": exc.errno,
            }
        s.listen(64)
        socks[s] = port
    print(json.dumps({"ready": True}), flush=True)
    peers: dict[int, list[str]] = {p: [] for p in args.ports}
    deadline = time.monotonic() + args.seconds
    while time.monotonic() < deadline and any(len(v) < args.expect for v in peers.values()):
        ready, _, _ = select.select(list(socks), [], [], 0.2)
        for s in ready:
            conn, addr = s.accept()
            peers[socks[s]].append(addr[0])
            conn.close()
    return {"ok": True, "connections": {str(k): v for k, v in peers.items()}}


def cmd_connect(args) -> dict:
    results = {}
    for port in args.ports:
        try:
            socket.create_connection((args.host, port), timeout=args.timeout).close()
            results[str(port)] = "ok"
        except socket.timeout:
            results[str(port)] = f"no answer within {args.timeout:g}s"
        except OSError as exc:
            results[str(port)] = exc.strerror or str(exc)
    return {"ok": all(v == "ok" for v in results.values()), "results": results}


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m megafleet.jobs.nodectl")
    sub = ap.add_subparsers(dest="cmd", required=True)
    sub.add_parser("manifest")
    p = sub.add_parser("write")
    p.add_argument("run_dir")
    p = sub.add_parser("started")
    p.add_argument("run_dir")
    p.add_argument("--wait", type=float, default=15)
    p = sub.add_parser("status")
    p.add_argument("run_dir")
    p.add_argument("--lines", type=int, default=20)
    p = sub.add_parser("stop")
    p.add_argument("run_dir")
    p.add_argument("--grace", type=float, default=30)
    p.add_argument("--mark-only", action="store_true")
    p = sub.add_parser("reap")
    p.add_argument("run_dir")
    p.add_argument("--exit-code", type=int, required=True)
    p.add_argument("--grace", type=float, default=5)
    p = sub.add_parser("follow")
    p.add_argument("run_dir")
    p.add_argument("--follow", action="store_true")
    p.add_argument("--lines", type=int, default=None)
    p.add_argument("--keepalive", type=float, default=5)
    p = sub.add_parser("checkpoints")
    p.add_argument("run_dir")
    p.add_argument("--pick", default=None)
    ports = lambda s: [int(x) for x in s.split(",") if x]  # noqa: E731
    p = sub.add_parser("listen")
    p.add_argument("--host", required=True)
    p.add_argument("--ports", type=ports, required=True)
    p.add_argument("--seconds", type=float, default=15)
    p.add_argument("--expect", type=int, default=1)
    p = sub.add_parser("connect")
    p.add_argument("--host", required=True)
    p.add_argument("--ports", type=ports, required=True)
    p.add_argument("--timeout", type=float, default=5)
    return ap


COMMANDS = {
    "manifest": cmd_manifest,
    "write": cmd_write,
    "started": cmd_started,
    "status": cmd_status,
    "stop": cmd_stop,
    "reap": cmd_reap,
    "follow": cmd_follow,
    "checkpoints": cmd_checkpoints,
    "listen": cmd_listen,
    "connect": cmd_connect,
}


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        result = COMMANDS[args.cmd](args)
    except BrokenPipeError:  # the operator went away (Ctrl-C on `megafleet logs -f`)
        return 0
    if result is not None:
        print(json.dumps(result), flush=True)
        return 0 if result.get("ok", True) else 3
    return 0


if __name__ == "__main__":
    sys.exit(main())
