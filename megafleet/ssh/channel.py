"""Drive one remote command's channel: feed stdin, collect output, enforce the timeout.

Why a loop of our own instead of `exec_command(...).read()`: the timeout must hold even when
the command never writes anything, output must stream to a callback for live logs, and a
command past its timeout must be killed on the host, not merely abandoned (closing the channel
does not stop it: sshd leaves a process that ignores its closed pipes running).
"""

from __future__ import annotations

import select
import threading
import time

from megafleet.runner import DISCONNECTED, EXIT, TIMEOUT, LineSplitter, Result

EXIT_GRACE = (
    1.0  # after the exit status, wait this long for EOF (a background child may hold the pipes)
)
KILL_WAIT = 3.0


def pump(runner, conn, chan, cmd, started, timeout, env_bytes, stdin, on_output) -> Result:
    """Run the already-started command on `chan` to completion or timeout; return its Result."""
    out = LineSplitter("stdout", on_output)
    err = LineSplitter("stderr", on_output, strip_pid=True)
    payload = env_bytes + (stdin.encode() if isinstance(stdin, str) else (stdin or b""))
    threading.Thread(target=_feed, args=(chan, payload), daemon=True).start()
    deadline = started + timeout if timeout else None
    finished = False
    try:
        state = _collect(chan, out, err, deadline)
        if state == TIMEOUT:
            killed = _kill_group(conn, err.pid)
            _collect(chan, out, err, time.monotonic() + KILL_WAIT)
        finished = True
    finally:
        if not finished:  # KeyboardInterrupt or a bug: do not leave the command running
            _kill_group(conn, err.pid)
        chan.close()
    res = Result(
        runner.name, cmd, stdout=out.text(), stderr=err.text(), duration=time.monotonic() - started
    )
    if state == TIMEOUT:
        res.error = TIMEOUT
        res.message = f"still running after {timeout:g}s; " + (
            "its process group was killed on the host"
            if killed
            else "could not kill it on the host (the connection may be gone)"
        )
    elif state == DISCONNECTED:
        res.error = DISCONNECTED
        res.message = "the connection closed before the command finished"
        res.hint = "the host may have rebooted or lost its network; run `megafleet hosts check`"
    else:
        res.exit_code = chan.recv_exit_status()
        if res.exit_code != 0:
            res.error = EXIT
    return res


def _collect(chan, out: LineSplitter, err: LineSplitter, deadline: float | None) -> str:
    """Read until the command is done ("done"), the channel dies ("disconnected") or the
    deadline passes ("timeout")."""
    exit_seen = None
    while True:
        got = _drain(chan, out, err)
        now = time.monotonic()
        if chan.exit_status_ready():
            exit_seen = exit_seen or now
            if chan.eof_received or chan.closed or now - exit_seen > EXIT_GRACE:
                _drain(chan, out, err)
                return "done"
        elif chan.closed:
            _drain(chan, out, err)
            return DISCONNECTED
        if deadline is not None and now >= deadline:
            return TIMEOUT
        if not got:
            wait = 0.1 if deadline is None else max(0.0, min(0.1, deadline - now))
            select.select([chan], [], [], wait)


def _drain(chan, out: LineSplitter, err: LineSplitter) -> bool:
    got = False
    while chan.recv_ready():
        out.feed(chan.recv(65536))
        got = True
    while chan.recv_stderr_ready():
        err.feed(chan.recv_stderr(65536))
        got = True
    return got


def _feed(chan, payload: bytes) -> None:
    try:
        if payload:
            chan.sendall(payload)
        chan.shutdown_write()
    except (OSError, EOFError, Exception):  # the command exited or the channel closed first
        pass


def _kill_group(conn, pid: int | None) -> bool:
    """TERM the command's process group, KILL it after 2 s if it is still there."""
    if not pid or pid <= 1:
        return False
    script = (
        f"kill -s TERM -- -{pid} 2>/dev/null; i=0; "
        f"while kill -s 0 -- -{pid} 2>/dev/null && [ $i -lt 20 ]; do sleep 0.1; i=$((i+1)); done; "
        f"kill -s KILL -- -{pid} 2>/dev/null; true"
    )
    try:
        chan = conn.transport.open_session(timeout=5)
        chan.exec_command(script)
        chan.settimeout(10)
        chan.recv_exit_status() if chan.status_event.wait(10) else None
        chan.close()
        return True
    except Exception:
        return False
