"""Node-side job helpers on this machine: nodectl (manifest, write, follow, status, checkpoints,
listen/connect), proctree (finding and stopping a run's processes, orphans included)."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

from megafleet.jobs import nodectl, proctree
from megafleet.jobs.nodectl import collapse_cr, split_segments
from megafleet.transfer import file_sha256

REPO = Path(__file__).resolve().parents[2]


def nodectl_cli(*args, stdin: str | None = None, timeout: float = 30, text: bool = True):
    return subprocess.run(
        [sys.executable, "-m", "megafleet.jobs.nodectl", *args],
        input=stdin,
        capture_output=True,
        text=text,
        timeout=timeout,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )


def follow_lines(*args) -> tuple[list[str], str]:
    """nodectl follow's stdout lines (split on \\n only: \\r is data) and its stderr."""
    out = nodectl_cli("follow", *args, text=False)
    return out.stdout.decode().split("\n")[:-1], out.stderr.decode()


def make_run_dir(tmp_path: Path, run_id="r1", **record) -> Path:
    d = tmp_path / "run"
    d.mkdir()
    (d / "run.json").write_text(
        json.dumps(
            {
                "run_id": run_id,
                "node_rank": 0,
                "nnodes": 1,
                "ranks": [4, 5],
                "output_dir": "output",
                **record,
            }
        )
    )
    return d


def test_split_segments_keeps_lines_and_marks_progress_updates():
    lines, rest = split_segments(b"a\nb\r\n10%\r20%\rdone\npart\r")
    assert lines == [b"a", b"b", b"\r10%", b"\r20%", b"done"] and rest == b"part\r"
    assert split_segments(rest + b"\n") == ([b"part"], b"")
    assert collapse_cr("10%\r20%\r ") == "20%" and collapse_cr("plain") == "plain"


def test_manifest_hashes_files_and_partial_copies(tmp_path):
    f = tmp_path / "a.bin"
    f.write_bytes(b"x" * 1000)
    (tmp_path / "b.bin.mfpart").write_bytes(b"y" * 10)
    out = nodectl_cli(
        "manifest",
        stdin=json.dumps(
            {
                "files": [
                    {"path": str(f), "size": 1000},
                    {"path": str(f), "size": 5},
                    {"path": str(tmp_path / "b.bin"), "size": 20},
                ]
            }
        ),
    )
    a, a_wrong_size, b = json.loads(out.stdout)["files"]
    assert a["size"] == 1000 and a["sha256"] == file_sha256(f)
    assert a_wrong_size["sha256"] is None  # not hashed: it cannot match
    assert b["size"] is None and b["part_size"] == 10 and b["part_sha256"]


def test_write_creates_the_env_file_private_from_the_start(tmp_path):
    d = tmp_path / "runs" / "x"
    out = nodectl_cli(
        "write",
        str(d),
        stdin=json.dumps(
            {
                "files": [
                    {"name": "env", "text": "HF_TOKEN='s'\n", "mode": 0o600},
                    {"name": "launch.sh", "text": "#!/bin/sh\n", "mode": 0o755},
                ]
            }
        ),
    )
    assert out.returncode == 0, out.stderr
    assert oct((d / "env").stat().st_mode & 0o777) == "0o600"
    assert oct((d / "launch.sh").stat().st_mode & 0o777) == "0o755"
    assert not list(d.glob("*.tmp"))


def test_follow_merges_node_log_and_rank_files_and_reports_the_end(tmp_path):
    d = make_run_dir(tmp_path)
    (d / "node.log").write_text("torchrun says hi\n")
    ranks = d / "torchrun-logs" / "none_x" / "attempt_0"
    for local, text in ((0, "loss 1\n"), (1, "bar 1\rbar 2\rbar 3\n")):
        (ranks / str(local)).mkdir(parents=True)
        (ranks / str(local) / "stdout.log").write_text(text)
        (ranks / str(local) / "stderr.log").write_text("")
    (d / "exit_code").write_text("0\n")
    dead = subprocess.Popen(["true"])
    dead.wait()
    (d / "pid").write_text(f"{dead.pid}\n")
    lines, err = follow_lines(str(d), "--follow")
    assert lines == [
        "torchrun says hi",
        "[rank4]:loss 1",
        "\r[rank5]:bar 1",
        "\r[rank5]:bar 2",
        "[rank5]:bar 3",
    ]
    end = [x for x in err.splitlines() if x.startswith(nodectl.END_MARK)]
    assert json.loads(end[0].split(" ", 1)[1])["exit_code"] == 0
    (d / "node.log").write_text("one\ntwo\nthree\n")
    assert follow_lines(str(d), "--lines", "1")[0] == [
        "three",
        "[rank4]:loss 1",
        "\r[rank5]:bar 1",
        "\r[rank5]:bar 2",
        "[rank5]:bar 3",
    ]


def test_status_and_checkpoints_of_a_finished_node(tmp_path):
    d = make_run_dir(tmp_path)
    (d / "exit_code").write_text("3\n")
    (d / "pid").write_text("999999999\n")
    (d / "node.log").write_text("boom\n")
    out = d / "output"
    (out / "checkpoint-5").mkdir(parents=True)
    (out / "checkpoint-5" / "config.json").write_text("{}")
    (out / "checkpoint-5" / "trainer_state.json").write_text("{}")
    (out / "checkpoint-10").mkdir()  # still being written: no trainer_state.json
    (out / "logging.jsonl").write_text('{"step": 4, "loss": 2.0}\n{"step": 5, "loss": 1.5}\n{"ste')
    st = json.loads(nodectl_cli("status", str(d)).stdout)
    assert (st["state"], st["exit_code"], st["processes"]) == ("exited", 3, 0)
    assert st["metrics"] == {"step": 5, "loss": 1.5} and st["log_tail"] == ["boom"]
    ck = json.loads(nodectl_cli("checkpoints", str(d), "--pick", "latest").stdout)
    assert [c["step"] for c in ck["checkpoints"]] == [5, 10]
    assert ck["picked"]["step"] == 5
    assert sorted(f["rel"] for f in ck["picked"]["files"]) == ["config.json", "trainer_state.json"]
    assert json.loads(nodectl_cli("checkpoints", str(d), "--pick", "10").stdout)["picked"] is None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_listen_and_connect_check_ports(tmp_path):
    p1, p2 = _free_port(), _free_port()
    listener = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "megafleet.jobs.nodectl",
            "listen",
            "--host",
            "127.0.0.1",
            "--ports",
            f"{p1},{p2}",
            "--seconds",
            "10",
        ],
        stdout=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )
    assert json.loads(listener.stdout.readline()) == {"ready": True}
    ok = json.loads(nodectl_cli("connect", "--host", "127.0.0.1", "--ports", f"{p1},{p2}").stdout)
    assert ok == {"ok": True, "results": {str(p1): "ok", str(p2): "ok"}}
    done = json.loads(listener.stdout.readline())
    listener.wait(5)
    assert done["connections"] == {str(p1): ["127.0.0.1"], str(p2): ["127.0.0.1"]}
    refused = json.loads(nodectl_cli("connect", "--host", "127.0.0.1", "--ports", str(p1)).stdout)
    assert refused == {"ok": False, "results": {str(p1): "Connection refused"}}
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        taken = nodectl_cli(
            "listen", "--host", "127.0.0.1", "--ports", str(busy.getsockname()[1]), "--seconds", "0"
        )
    assert taken.returncode == 3 and json.loads(taken.stdout)["error"] == "Address already in use"


def _spawn_tagged(run_id: str, script: str) -> subprocess.Popen:
    return subprocess.Popen(
        ["/bin/sh", "-c", script],
        start_new_session=True,
        env={**os.environ, proctree.RUN_TAG: run_id},
    )


def test_run_processes_finds_the_tree_and_orphans_by_tag_and_terminate_stops_them():
    run_id = f"t{os.getpid()}"
    # a worker in a session of its own whose parent has exited (re-parented, like torchrun's
    # workers after torchrun dies), plus one that ignores SIGTERM
    shell = _spawn_tagged(run_id, "setsid sleep 300 & trap '' TERM; sleep 301 & wait")
    time.sleep(0.5)
    found = proctree.run_processes(run_id)
    cmds = sorted(p.cmdline for p in found.values())
    assert "sleep 300" in cmds and "sleep 301" in cmds and shell.pid in found
    other = proctree.run_processes("someone-else")
    assert shell.pid not in other
    start = time.monotonic()
    result = proctree.terminate(lambda: proctree.run_processes(run_id), grace=1.0)
    shell.wait(5)
    assert result["left"] == [] and set(found) <= set(result["terminated"]) | set(result["killed"])
    assert result["killed"], "sleep 301 ignores SIGTERM: it must have been killed"
    assert time.monotonic() - start < 5
    assert proctree.run_processes(run_id) == {}


def test_live_root_tells_a_reused_pid_apart():
    p = subprocess.Popen(["sleep", "30"])
    try:
        info = proctree.read_proc(p.pid)
        assert proctree.live_root(p.pid, info.start_ticks) is not None
        assert proctree.live_root(p.pid, info.start_ticks + 1) is None
        assert abs(proctree.start_epoch(info) - time.time()) < 30
    finally:
        p.send_signal(signal.SIGKILL)
        p.wait()
    assert proctree.live_root(p.pid, None) is None


TORCHRUN_SUMMARY = """\
torch.distributed.elastic.multiprocessing.errors.ChildFailedError:
============================================================
remote_runtime FAILED
------------------------------------------------------------
Root Cause (first observed failure):
[0]:
  time      : 2026-12-04_18:45:41
  host      : gpu2
  rank      : 9 (local_rank: 1)
  exitcode  : -9 (pid: 4242)
  error_file: <N/A>
  traceback : Signal 9 (SIGKILL) received by PID 4242
============================================================
"""


def test_the_exit_cause_names_the_rank_and_the_signal_from_torchruns_summary(monkeypatch):
    from megafleet.jobs import exitcause

    monkeypatch.setattr(exitcause, "oom_killed", lambda pid: pid == 4242)
    cause = exitcause.exit_cause(1, TORCHRUN_SUMMARY)
    assert (cause["rank"], cause["signal"], cause["oom"]) == (9, 9, True)
    assert cause["text"] == (
        "exited with code 1: rank 9 was killed by SIGKILL "
        "(killed by the kernel's out-of-memory killer)"
    )
    monkeypatch.setattr(exitcause, "oom_killed", lambda pid: None)  # dmesg not readable
    assert (
        "sends this signal; check the kernel log: dmesg"
        in exitcause.exit_cause(1, TORCHRUN_SUMMARY)["text"]
    )
    plain = exitcause.exit_cause(1, TORCHRUN_SUMMARY.replace("-9 (pid", "1 (pid"))
    assert plain["text"] == "exited with code 1: rank 9 failed first" and plain["signal"] is None
    assert exitcause.exit_cause(137, "")["text"].startswith(
        "exited with code 137: torchrun was killed by SIGKILL (the kernel's out-of-memory killer"
    )
