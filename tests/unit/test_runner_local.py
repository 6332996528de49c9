"""The runner contract on this machine (LocalRunner), the dry run, Results and run_on_hosts."""

import time

import pytest

from megafleet.errors import RemoteCommandError, UnreachableError
from megafleet.runner import PID_MARK, DryRunRunner, LineSplitter, LocalRunner, Result, run_on_hosts
from megafleet.ssh.errors import AuthFailed


def test_run_collects_output_exit_code_and_duration():
    r = LocalRunner().run("echo out; echo err >&2; exit 3")
    assert (r.exit_code, r.stdout, r.stderr, r.error) == (3, "out\n", "err\n", "exit")
    assert not r.ok and r.reached and r.duration > 0


def test_env_stdin_and_streamed_lines():
    lines = []
    r = LocalRunner().run(
        "echo \"$GREETING\"; cat; printf 'no newline'",
        env={"GREETING": "hi there"},
        stdin="from stdin\n",
        on_output=lambda s, line: lines.append((s, line)),
    )
    assert r.ok and r.stdout == "hi there\nfrom stdin\nno newline"
    assert lines == [("stdout", "hi there"), ("stdout", "from stdin"), ("stdout", "no newline")]


def test_timeout_kills_the_whole_process_group(tmp_path):
    pidfile = tmp_path / "child.pid"
    start = time.monotonic()
    r = LocalRunner().run(f"sleep 300 & echo $! > {pidfile}; wait", timeout=1)
    assert r.error == "timeout" and "killed" in r.message and r.exit_code is None
    assert time.monotonic() - start < 5
    assert not alive(int(pidfile.read_text()))


def alive(pid: int) -> bool:
    """Running (a zombie waiting for a reaper does not count)."""
    try:
        state = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state not in ("Z", "X")


def test_put_and_get_copy_trees_and_report_progress(tmp_path):
    src = tmp_path / "src"
    (src / "sub").mkdir(parents=True)
    (src / "a.txt").write_text("a" * 10)
    (src / "sub" / "b.bin").write_bytes(b"b" * 5)
    (src / "sub" / "b.bin").chmod(0o640)
    seen = []
    r = LocalRunner().put(src, str(tmp_path / "dst"), progress=lambda d, t: seen.append((d, t)))
    assert r.ok and r.value == 15 and seen[-1] == (15, 15)
    assert (tmp_path / "dst" / "sub" / "b.bin").read_bytes() == b"b" * 5
    assert (tmp_path / "dst" / "sub" / "b.bin").stat().st_mode & 0o777 == 0o640
    assert not list((tmp_path / "dst").rglob("*.mfpart"))
    missing = LocalRunner().get(str(tmp_path / "nope"), tmp_path / "x")
    assert missing.error == "transfer" and "does not exist" in missing.message


def test_dry_run_records_and_changes_nothing(tmp_path):
    d = DryRunRunner("gpu1")
    assert d.run(f"rm -rf {tmp_path}", env={"SECRET": "x"}).ok
    d.put("a", "b")
    assert tmp_path.exists()
    assert d.calls == [("run", f"rm -rf {tmp_path}", ("SECRET",)), ("put", "a", "b")]
    assert d.commands() == [f"rm -rf {tmp_path}"]


def test_failure_description_names_host_command_code_and_last_lines():
    r = LocalRunner("gpu7").run("for i in $(seq 1 50); do echo line$i; done; exit 2")
    text = r.describe(lines=5)
    assert text.startswith("gpu7: `for i in") and "exited with code 2" in text
    assert "line50" in text and "line45" not in text
    with pytest.raises(RemoteCommandError) as e:
        r.check()
    assert e.value.exit_code == 4 and "line50" in e.value.message


def test_unreachable_results_raise_the_ssh_error_on_check():
    r = Result.from_exception(
        "gpu1", "true", AuthFailed("gpu1", "refused key /k"), time.monotonic()
    )
    assert (r.error, r.reached) == ("auth", False)
    with pytest.raises(UnreachableError, match="gpu1: refused key /k"):
        r.check()


def test_run_on_hosts_returns_every_hosts_result_even_when_some_fail():
    def task(runner):
        if runner.name == "b":
            raise AuthFailed("b", "no")
        if runner.name == "c":
            raise ValueError("a bug")
        return runner.run("echo $((6*7))").stdout.strip()

    res = run_on_hosts([LocalRunner("a"), LocalRunner("b"), LocalRunner("c")], task)
    assert list(res) == ["a", "b", "c"]
    assert res["a"].ok and res["a"].value == "42"
    assert res["b"].error == "auth" and not res["b"].reached
    assert res["c"].error == "internal" and "ValueError: a bug" in res["c"].message


def test_run_on_hosts_runs_in_parallel():
    start = time.monotonic()
    res = run_on_hosts([LocalRunner(str(i)) for i in range(4)], "sleep 1")
    assert all(r.ok for r in res.values())
    assert time.monotonic() - start < 2.5


def test_the_pid_line_is_taken_out_of_stderr_wherever_it_comes():
    lines = []
    s = LineSplitter("stderr", lambda _, line: lines.append(line), strip_pid=True)
    for chunk in (
        b"motd noise\n" + PID_MARK.encode()[:5],
        PID_MARK.encode()[5:] + b"4242\nerr",
        b"or\ntail",
    ):
        s.feed(chunk)
    assert s.pid == 4242 and s.text() == "motd noise\nerror\ntail"
    assert lines == ["motd noise", "error", "tail"]
    never = LineSplitter("stderr", None, strip_pid=True)
    never.feed(b"sh: syntax error\n")
    assert never.pid is None and never.text() == "sh: syntax error\n"
