"""Fail-fast for a multi-node run: `python -m megafleet.jobs.watcher RUN_DIR` (node side, stdlib).

One watcher runs beside the job on every node (started detached with it, by watch.sh). Node 0's
watcher also runs the coordinator: a small TCP service on the master address at `watcher_port`
(default master_port + 1, checked reachable before launch like the master port). No node ever
needs an SSH key to another node.

Every HEARTBEAT seconds each node's watcher observes its own job (launch shell alive? exit_code
written? did node.log or logging.jsonl grow?) and reports it to the coordinator in one line of
JSON, authenticated with an HMAC keyed by the run's token (in the 0600 env file only). The reply
says `continue`, `stop` or `done`. The coordinator declares the run failed, records the first
failure in failure.json (node, reason, exit code, the node's last log lines) and answers `stop`
to everyone when:

- a node's job exits non-zero, or its launch shell vanishes without an exit code;
- a node has not reported for min(stall_timeout, 120) seconds (machine down, network cut);
- no running node made log progress for `stall_timeout` seconds (a hang: NCCL waits forever).

On `stop` a watcher stops its own job (SIGTERM to torchrun and every worker, SIGKILL after
`stop_grace`) and says why in watcher_stop.json. A worker that cannot reach the coordinator for
min(stall_timeout, 120) seconds stops its own job too (node 0 is gone, so the collectives can
never finish).
A stop asked for by the user (`stop_requested`) is not a failure. Watchers exit once every node
has finished; the coordinator keeps answering `done` for a few seconds before it exits.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import socket
import sys
import threading
import time
from pathlib import Path

from megafleet.jobs import layout as L
from megafleet.jobs import nodectl, proctree

HEARTBEAT = 1.0
LINGER = 5.0
SILENCE_MAX = 120.0  # a node unheard of this long (or stall_timeout, if shorter) has failed
FINAL = ("exited", "lost")


def log(msg: str) -> None:
    print(f"{time.strftime('%Y-%m-%d %H:%M:%S')} {msg}", flush=True)


def sign(token: str, payload: dict) -> str:
    body = json.dumps(payload, sort_keys=True)
    mac = hmac.new(token.encode(), body.encode(), hashlib.sha256).hexdigest()
    return json.dumps({"body": body, "mac": mac}) + "\n"


def verify(token: str, line: str) -> dict | None:
    try:
        wrapper = json.loads(line)
        body, mac = wrapper["body"], wrapper["mac"]
    except (ValueError, KeyError, TypeError):
        return None
    good = hmac.new(token.encode(), body.encode(), hashlib.sha256).hexdigest()
    return json.loads(body) if hmac.compare_digest(good, str(mac)) else None


class NodeWatch:
    """This node's job, as its watcher sees it."""

    def __init__(self, run_dir: Path, record: dict):
        self.run_dir, self.record = run_dir, record
        self.rank = record["node_rank"]
        self.marker = None
        self.last_progress = time.monotonic()

    def observe(self) -> dict:
        marker = nodectl.progress_marker(self.run_dir, self.record)
        now = time.monotonic()
        if marker != self.marker:
            self.marker, self.last_progress = marker, now
        code = nodectl.read_exit_code(self.run_dir)
        pid, _ = nodectl.launch_shell(self.run_dir)
        alive = nodectl.shell_alive(self.run_dir)
        state = (
            "running" if alive else "exited" if code is not None else "lost" if pid else "starting"
        )
        report = {
            "node": self.rank,
            "state": state,
            "exit_code": code,
            "idle_s": round(now - self.last_progress, 1),
            "user_stop": (self.run_dir / L.STOP_REQUESTED).exists(),
        }
        if state in FINAL and code != 0:
            report["tail"] = nodectl.recent_lines(self.run_dir, self.record, 15)
            report["cause"] = nodectl.read_json(self.run_dir / L.EXIT_CAUSE)
        if state in FINAL:
            self.end_stragglers()
        return report

    def end_stragglers(self) -> None:
        """Processes of the run still alive after its launch shell ended (the shell was killed
        before it could end them itself): nothing may outlive the run."""
        left = nodectl.find_run(self.run_dir, self.record)
        if left:
            log(f"ending {len(left)} process(es) left after the job ended: {sorted(left)}")
            proctree.terminate(lambda: nodectl.find_run(self.run_dir, self.record), 5)

    def stop_job(self, reason: str) -> dict:
        log(f"stopping this node's job: {reason}")
        result = proctree.terminate(
            lambda: nodectl.find_run(self.run_dir, self.record),
            float(self.record.get("stop_grace", 30)),
            spare=nodectl.spared(self.run_dir),
        )
        nodectl.write_json(
            self.run_dir / L.WATCHER_STOP, {"reason": reason, "time": time.time(), **result}
        )
        log(f"stopped: {result}")
        return result


class Coordinator:
    """Node 0's view of every node; decides when the run has failed."""

    def __init__(self, run_dir: Path, record: dict):
        self.run_dir, self.record = run_dir, record
        self.nnodes = int(record["nnodes"])
        self.stall = float(record.get("stall_timeout", 900))
        self.silence = min(self.stall, SILENCE_MAX)
        self.started = time.monotonic()
        self.nodes: dict[int, dict] = {}
        self.failure: dict | None = None
        self.lock = threading.Lock()
        self.done_at: float | None = None

    def report(self, msg: dict) -> dict:
        with self.lock:
            node = int(msg["node"])
            msg["seen"] = time.monotonic()
            msg["time"] = time.time()
            self.nodes[node] = {**self.nodes.get(node, {}), **msg}
            self.evaluate()
            return self.reply()

    def reply(self) -> dict:
        if self.done_at is not None:
            return {"action": "done"}
        if self.failure or self.user_stop():
            return {"action": "stop", "reason": self.stop_reason()}
        return {"action": "continue"}

    def user_stop(self) -> bool:
        return (self.run_dir / L.STOP_REQUESTED).exists() or any(
            n.get("user_stop") for n in self.nodes.values()
        )

    def stop_reason(self) -> str:
        if self.failure:
            where = (
                f"node {self.failure['node']} ({self.failure.get('host')})"
                if self.failure.get("node") is not None
                else "the run"
            )
            return f"fail-fast: {where} {self.failure['reason']}"
        return "stopped by the user"

    def evaluate(self) -> None:
        now = time.monotonic()
        if self.failure is None and not self.user_stop():
            self.failure = self.find_failure(now)
            if self.failure:
                nodectl.write_json(self.run_dir / L.FAILURE, self.failure)
                log(f"run failed: {self.failure['reason']} (node {self.failure['node']})")
        finished = [
            k
            for k in range(self.nnodes)
            if self.nodes.get(k, {}).get("state") in FINAL
            or (self.failure or self.user_stop())
            and self.missing(k, now)
        ]
        if len(finished) == self.nnodes and self.done_at is None:
            self.done_at = now
            log("every node has finished")
        self.save()

    def missing(self, k: int, now: float) -> bool:
        seen = self.nodes.get(k, {}).get("seen", self.started)
        return now - seen > self.silence

    def find_failure(self, now: float) -> dict | None:
        hosts = self.record.get("hosts") or []
        exits = sorted(
            (n["seen"], k)
            for k, n in self.nodes.items()
            if n.get("state") in FINAL and n.get("exit_code") != 0
        )
        if exits:
            k = exits[0][1]
            n = self.nodes[k]
            reason = (
                (n.get("cause") or {}).get("text") or f"exited with code {n['exit_code']}"
                if n.get("exit_code") is not None
                else "lost its launch process without an exit code (killed?)"
            )
            return self._failure(k, hosts, reason, n)
        for k in range(self.nnodes):
            if self.missing(k, now) and self.nodes.get(k, {}).get("state") not in FINAL:
                return self._failure(
                    k,
                    hosts,
                    f"sent no report for {self.silence:g}s (machine down or network cut?)",
                    self.nodes.get(k, {}),
                )
        running = [n for n in self.nodes.values() if n.get("state") == "running"]
        if (
            len(self.nodes) == self.nnodes
            and running
            and all(n.get("idle_s", 0) >= self.stall for n in running)
        ):
            return {
                "node": None,
                "host": None,
                "time": time.time(),
                "exit_code": None,
                "tail": [],
                "reason": f"made no log progress on any node for {self.stall:g}s (hung?)",
            }
        return None

    @staticmethod
    def _failure(k: int, hosts: list, reason: str, n: dict) -> dict:
        return {
            "node": k,
            "host": hosts[k] if k < len(hosts) else None,
            "reason": reason,
            "exit_code": n.get("exit_code"),
            "time": n.get("time", time.time()),
            "tail": n.get("tail", []),
            "cause": n.get("cause"),
        }

    def save(self) -> None:
        nodes = {
            str(k): {key: v for key, v in n.items() if key not in ("seen", "tail")}
            for k, n in sorted(self.nodes.items())
        }
        nodectl.write_json(
            self.run_dir / L.WATCH_STATE,
            {
                "nodes": nodes,
                "failure": self.failure,
                "user_stop": self.user_stop(),
                "done": self.done_at is not None,
                "updated": time.time(),
            },
        )

    def serve(self, host: str, port: int, token: str) -> None:
        """Answer heartbeats until done + LINGER (runs in a thread)."""
        srv = self._bind(host, port)
        srv.settimeout(0.5)
        while self.done_at is None or time.monotonic() - self.done_at < LINGER:
            with self.lock:
                self.evaluate()
            try:
                conn, _ = srv.accept()
            except socket.timeout:
                continue
            threading.Thread(target=self._answer, args=(conn, token), daemon=True).start()
        srv.close()

    def _bind(self, host: str, port: int) -> socket.socket:
        while True:
            srv = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)
            srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                srv.bind((host, port))
                srv.listen(64)
                log(f"coordinator listening on {host}:{port}")
                return srv
            except OSError as exc:
                srv.close()
                log(f"cannot listen on {host}:{port} ({exc}); retrying")
                time.sleep(1)

    def _answer(self, conn: socket.socket, token: str) -> None:
        with conn:
            conn.settimeout(5)
            try:
                line = conn.makefile("r").readline()
                msg = verify(token, line)
                if msg is None or msg.get("run_id") != self.record["run_id"]:
                    return  # not ours: no answer
                conn.sendall(sign(token, self.report(msg)).encode())
            except OSError:
                pass


def send(addr: tuple[str, int], token: str, msg: dict, timeout: float = 5) -> dict | None:
    """One heartbeat to the coordinator; its verified reply, or None."""
    try:
        with socket.create_connection(addr, timeout=timeout) as s:
            s.sendall(sign(token, msg).encode())
            return verify(token, s.makefile("r").readline())
    except OSError:
        return None


def watch(run_dir: Path) -> int:
    record = nodectl.read_json(run_dir / L.RUN_JSON)
    token = os.environ.get(L.WATCH_TOKEN_VAR, "")
    if not record or not token:
        log(f"no run record in {run_dir} or no {L.WATCH_TOKEN_VAR}; nothing to watch")
        return 2
    me = NodeWatch(run_dir, record)
    coord = None
    if me.rank == 0:
        coord = Coordinator(run_dir, record)
        host = "127.0.0.1" if int(record["nnodes"]) == 1 else record["master_addr"]
        threading.Thread(
            target=coord.serve, args=(host, int(record["watcher_port"]), token), daemon=True
        ).start()
    addr = (record["master_addr"], int(record["watcher_port"]))
    stall = float(record.get("stall_timeout", 900))
    silence = min(stall, SILENCE_MAX)
    last_contact, stopped = time.monotonic(), False
    log(f"watching node {me.rank} of run {record['run_id']} (stall timeout {stall:g}s)")
    while True:
        report = {**me.observe(), "run_id": record["run_id"]}
        reply = coord.report(report) if coord else send(addr, token, report)
        now = time.monotonic()
        if reply is not None:
            last_contact = now
            if reply["action"] == "stop" and not stopped and report["state"] not in FINAL:
                if not report["user_stop"]:
                    me.stop_job(reply.get("reason", "stop"))
                stopped = True
            if reply["action"] == "done":
                break
        elif now - last_contact > silence:
            if report["state"] not in FINAL and not stopped:
                me.stop_job(
                    f"fail-fast: lost contact with the watcher on node 0 ({addr[0]}:{addr[1]}) "
                    f"for {silence:g}s"
                )
            break
        time.sleep(HEARTBEAT)
    if coord:  # let the other watchers hear `done`
        time.sleep(LINGER)
    log("watcher done")
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1:
        print("usage: python -m megafleet.jobs.watcher RUN_DIR", file=sys.stderr)
        return 2
    return watch(Path(argv[0]))


if __name__ == "__main__":
    sys.exit(main())
