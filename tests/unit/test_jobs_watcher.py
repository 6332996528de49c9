"""The fail-fast watcher's coordinator: when a run counts as failed, who failed first, and the
authenticated heartbeat protocol over real TCP."""

from __future__ import annotations

import json
import socket
import threading
import time

from megafleet.jobs import watcher
from megafleet.jobs.watcher import Coordinator, send, sign, verify


def coord(tmp_path, nnodes=2, stall=30.0) -> Coordinator:
    rec = {
        "run_id": "r1",
        "nnodes": nnodes,
        "stall_timeout": stall,
        "hosts": ["a", "b", "c"][:nnodes],
    }
    return Coordinator(tmp_path, rec)


def hb(node, state="running", code=None, idle=0.0, **kw):
    return {
        "node": node,
        "state": state,
        "exit_code": code,
        "idle_s": idle,
        "user_stop": False,
        **kw,
    }


def test_a_non_zero_exit_fails_the_run_and_everyone_is_told_to_stop(tmp_path):
    c = coord(tmp_path)
    assert c.report(hb(0))["action"] == "continue"
    reply = c.report(hb(1, "exited", 1, tail=["Traceback", "boom"]))
    assert reply == {"action": "stop", "reason": "fail-fast: node 1 (b) exited with code 1"}
    failure = json.loads((tmp_path / "failure.json").read_text())
    assert (failure["node"], failure["host"], failure["exit_code"], failure["tail"]) == (
        1,
        "b",
        1,
        ["Traceback", "boom"],
    )
    assert c.report(hb(0))["action"] == "stop"
    c.report(hb(0, "exited", 143))  # stopped by its watcher: not a new failure
    assert c.failure["node"] == 1
    assert c.report(hb(1, "exited", 1))["action"] == "done"
    assert json.loads((tmp_path / "watch.json").read_text())["done"] is True


def test_the_first_node_to_report_a_failure_is_named(tmp_path):
    c = coord(tmp_path, nnodes=3)
    c.report(hb(0))
    c.report(hb(2, "lost"))
    c.report(hb(1, "exited", 1))
    assert c.failure["node"] == 2 and "without an exit code" in c.failure["reason"]


def test_a_silent_node_and_a_hung_run_are_failures(tmp_path):
    c = coord(tmp_path, stall=0.3)
    c.report(hb(0))
    time.sleep(0.4)
    c.report(hb(0))  # node 1 never reported
    assert c.failure["node"] == 1 and "sent no report for 0.3s" in c.failure["reason"]

    c = coord(tmp_path, stall=5)
    c.report(hb(0, idle=6))
    c.report(hb(1, idle=2))
    assert c.failure is None  # node 1 still makes progress
    c.report(hb(1, idle=5.5))
    assert c.failure["node"] is None and "no log progress on any node for 5s" in c.failure["reason"]


def test_success_and_a_user_stop_are_not_failures(tmp_path):
    c = coord(tmp_path)
    c.report(hb(0, "exited", 0))
    assert c.report(hb(1, "exited", 0))["action"] == "done" and c.failure is None
    c = coord(tmp_path)
    (tmp_path / "stop_requested").write_text("1")
    c.report(hb(0))
    assert c.report(hb(1, "exited", 143))["action"] == "stop" and c.failure is None
    assert c.stop_reason() == "stopped by the user"


def test_heartbeats_are_authenticated_over_tcp(tmp_path, monkeypatch):
    monkeypatch.setattr(watcher, "LINGER", 0.2)
    c = coord(tmp_path)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = threading.Thread(target=c.serve, args=("127.0.0.1", port, "key"), daemon=True)
    server.start()
    deadline = time.monotonic() + 5
    reply = None
    while reply is None and time.monotonic() < deadline:
        reply = send(("127.0.0.1", port), "key", {**hb(1), "run_id": "r1"}, timeout=1)
        time.sleep(0.05)
    assert reply == {"action": "continue"} and c.nodes[1]["state"] == "running"
    assert send(("127.0.0.1", port), "wrong-key", {**hb(1, "exited", 1), "run_id": "r1"}) is None
    assert send(("127.0.0.1", port), "key", {**hb(1, "exited", 1), "run_id": "other"}) is None
    assert c.failure is None  # neither forged report counted
    assert verify("key", sign("key", {"a": 1})) == {"a": 1}
    assert verify("key", sign("key", {"a": 1}).replace('\\"a\\": 1', '\\"a\\": 2')) is None
    # the run ends: the server stops (LINGER later) instead of outliving the test and, 30 s on,
    # reporting the silent nodes as failed into the terminal
    for rank in (0, 1):
        c.report(hb(rank, "exited", 0))
    server.join(5)
    assert not server.is_alive()
