"""One interface for running commands and moving files: on a host over SSH, on this machine, or
nowhere (dry run). Everything returns `Result` objects instead of raising, so a caller working
on many hosts sees every host's outcome; `Result.check()` raises when a caller wants that.

    runner = SSHRunner(host, pool=ConnectionPool(inventory.jump_for))
    r = runner.run("nvidia-smi -L", timeout=30)
    if not r.ok:
        print(r.describe())          # host, command, exit code, last lines of output
    runner.put("data.jsonl", "megafleet/data/data.jsonl", progress=cb)   # SFTP, atomic rename

    results = run_on_hosts(inventory.select(None), "uname -m", pool=pool)   # in parallel
    results = run_on_hosts(hosts, lambda r: parse(r.run(SCRIPT).check().stdout), pool=pool)

Commands run in the remote user's login shell, as with `ssh host CMD`. `env` is sent over the
channel's stdin, not on the command line, so values never show up in the remote process list.
A command still running at its timeout has its whole process group killed on the host
(TERM, then KILL after 2 s): nothing is left running there.
"""

from __future__ import annotations

import concurrent.futures as cf
import os
import re
import shlex
import signal
import subprocess
import threading
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Union

from megafleet.errors import MegafleetError, RemoteCommandError
from megafleet.transfer import (
    Progress,
    local_copy,
    local_copy_from,
    sftp_get,
    sftp_get_from,
    sftp_put,
    sftp_put_from,
)

DEFAULT_TIMEOUT = 300.0  # seconds; None means no limit
OnOutput = Callable[[str, str], None]  # (stream "stdout"|"stderr", one line without newline)

# Result.error values
EXIT, TIMEOUT, DISCONNECTED, TRANSFER, INTERNAL = (
    "exit",
    "timeout",
    "disconnected",
    "transfer",
    "internal",
)


@dataclass
class Result:
    """The outcome of one command (or transfer, or function) on one host.

    `error` is None on success, else one of: "exit" (non-zero exit code), "timeout" (stopped and
    killed at the timeout), "unreachable", "auth", "host_key", "identity" (never started: see
    megafleet.ssh.errors), "disconnected", "transfer", "internal" (a bug or unexpected error).
    """

    host: str
    command: str
    exit_code: int | None = None
    stdout: str = ""
    stderr: str = ""
    duration: float = 0.0
    error: str | None = None
    message: str | None = None  # why, for errors other than "exit"
    hint: str | None = None  # what to do about it
    value: Any = None  # what a function given to run_on_hosts returned
    dry_run: bool = False

    @property
    def ok(self) -> bool:
        return self.error is None

    @property
    def reached(self) -> bool:
        """The host was reached and authenticated (whatever the command did)."""
        return self.error not in ("unreachable", "auth", "host_key", "identity")

    def tail(self, lines: int = 20) -> str:
        """The last `lines` lines of stderr and stdout (stderr first: errors usually live there)."""
        parts = []
        for name, text in (("stderr", self.stderr), ("stdout", self.stdout)):
            tail = text.rstrip("\n").splitlines()[-lines:]
            if tail:
                parts.append(f"--- last {len(tail)} lines of {name} ---\n" + "\n".join(tail))
        return "\n".join(parts)

    def describe(self, lines: int = 20) -> str:
        """A failure report: host, command, exit code / reason, and the end of the output."""
        if self.ok:
            return f"{self.host}: `{self.command}` succeeded in {self.duration:.1f}s"
        if self.error == EXIT:
            head = f"{self.host}: `{self.command}` exited with code {self.exit_code}"
        else:
            head = f"{self.host}: `{self.command}` failed ({self.error}): {self.message}"
        tail = self.tail(lines)
        return (
            head
            + (f" after {self.duration:.1f}s" if self.duration else "")
            + ("\n" + tail if tail else "")
        )

    def check(self) -> "Result":
        """Return self if ok, else raise: SSHError kinds as UnreachableError (exit code 3),
        everything else as RemoteCommandError (exit code 4), with `describe()` as message."""
        if self.ok:
            return self
        if not self.reached:
            from megafleet.ssh import errors

            cls = {
                "auth": errors.AuthFailed,
                "host_key": errors.HostKeyChanged,
                "identity": errors.IdentityProblem,
            }.get(self.error, errors.HostUnreachable)
            raise cls(self.host, self.message or self.error, self.hint)
        raise RemoteCommandError(self.describe(), hint=self.hint)

    def to_dict(self) -> dict:
        d = {
            k: getattr(self, k)
            for k in (
                "host",
                "command",
                "exit_code",
                "stdout",
                "stderr",
                "duration",
                "error",
                "message",
                "hint",
            )
        }
        d["ok"] = self.ok
        return d

    @classmethod
    def from_exception(
        cls, host: str, command: str, exc: BaseException, started: float
    ) -> "Result":
        from megafleet.ssh.errors import SSHError

        if isinstance(exc, SSHError):
            return cls(
                host,
                command,
                error=exc.kind,
                message=exc.reason,
                hint=exc.hint,
                duration=time.monotonic() - started,
            )
        if isinstance(exc, MegafleetError):
            return cls(
                host,
                command,
                error=INTERNAL,
                message=exc.message,
                hint=exc.hint,
                duration=time.monotonic() - started,
            )
        hint = ssh_layer_hint(host, exc) if _is_io_error(exc) else None
        return cls(
            host,
            command,
            error=INTERNAL,
            message=f"{type(exc).__name__}: {exc}",
            stderr="".join(traceback.format_exception(exc)),
            hint=hint,
            duration=time.monotonic() - started,
        )


class Runner:
    """Runs commands and moves files on one machine. Subclasses: SSHRunner, LocalRunner,
    DryRunRunner. `name` is the host name used in results."""

    name: str = "?"

    def run(
        self,
        cmd: str,
        timeout: float | None = DEFAULT_TIMEOUT,
        env: dict[str, str] | None = None,
        stdin: str | bytes | None = None,
        on_output: OnOutput | None = None,
    ) -> Result:
        """Run `cmd` in a shell; never raises for remote failures (see Result.error)."""
        raise NotImplementedError

    def put(self, local: str | Path, remote: str, progress: Progress | None = None) -> Result:
        """Copy a file or directory tree to the host. `remote` may start with `~/` or be relative
        (to the home directory). Files arrive atomically (written aside, then renamed).
        `progress(done_bytes, total_bytes)` is called as data moves."""
        raise NotImplementedError

    def get(self, remote: str, local: str | Path, progress: Progress | None = None) -> Result:
        """Copy a file or directory tree from the host (the mirror of put)."""
        raise NotImplementedError

    def put_from(
        self, local: str | Path, remote: str, offset: int = 0, progress: Progress | None = None
    ) -> Result:
        """Upload one file, continuing a partial `remote.mfpart` that holds its first `offset`
        bytes (see megafleet.transfer); `Result.value` is the number of bytes sent."""
        raise NotImplementedError

    def get_from(
        self, remote: str, local: str | Path, offset: int = 0, progress: Progress | None = None
    ) -> Result:
        """Download one file, continuing a partial `local.mfpart` (the mirror of put_from)."""
        raise NotImplementedError

    def close(self) -> None:
        """Release this runner's connection (no-op where there is none)."""

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


ENV_KEY = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
ENV_END = "__megafleet_env_end__"
PID_MARK = "__megafleet_pid__="


def _env_lines(env: dict[str, str] | None) -> bytes:
    from megafleet.errors import UsageError

    if not env:
        return b""
    out = []
    for k, v in env.items():
        v = str(v)
        if not ENV_KEY.match(k) or "\n" in v or "\0" in v:
            raise UsageError(
                f"environment variable {k!r}: names are letters, digits and _, values one line"
            )
        out.append(f"{k}={v}\n")
    return "".join(out + [ENV_END + "\n"]).encode()


def wrap_command(cmd: str, with_env: bool) -> str:
    """The remote shell text: report the shell's pid (sshd makes it a session and process
    group leader, so its pid names the whole group for a kill at timeout), read `KEY=value`
    lines from stdin into the environment if asked, then run `cmd`."""
    lines = [f"printf '%s\\n' \"{PID_MARK}$$\" >&2"]
    if with_env:
        lines.append(
            f'while IFS= read -r __mf_kv && [ "$__mf_kv" != {ENV_END} ]; do '
            'export "$__mf_kv"; done; unset __mf_kv'
        )
    return "\n".join(lines + [cmd])


class LineSplitter:
    """Collects a stream's bytes and hands complete lines to `on_output` as they arrive.

    With `strip_pid`, the wrapper's pid line is taken out of the stream (lines a login
    script printed before it pass through); `pid` is -1 if it never came (e.g. cmd did not
    parse), None while still waiting.
    """

    HEAD_LIMIT = 65536

    def __init__(self, stream: str, on_output: OnOutput | None, strip_pid: bool = False):
        self.stream, self.on_output = stream, on_output
        self.chunks: list[bytes] = []
        self.pending = b""  # an incomplete last line, for on_output
        self.head = b""  # bytes held back while looking for the pid line
        self.pid: int | None = None if strip_pid else -1

    def feed(self, data: bytes) -> None:
        if self.pid is None:
            self.head += data
            while self.pid is None and b"\n" in self.head:
                line, _, self.head = self.head.partition(b"\n")
                text = line.decode(errors="replace")
                if text.startswith(PID_MARK) and text[len(PID_MARK) :].isdigit():
                    self.pid = int(text[len(PID_MARK) :])
                else:
                    self._emit(line + b"\n")
            if self.pid is None and len(self.head) < self.HEAD_LIMIT:
                return
            if self.pid is None:
                self.pid = -1
            data, self.head = self.head, b""
        self._emit(data)

    def _emit(self, data: bytes) -> None:
        if not data:
            return
        self.chunks.append(data)
        if self.on_output is None:
            return
        self.pending += data
        *lines, self.pending = self.pending.split(b"\n")
        for line in lines:
            self.on_output(self.stream, line.decode(errors="replace"))

    def text(self) -> str:
        """All output so far (flushes a last line without newline to on_output)."""
        if self.head:
            head, self.head = self.head, b""
            self._emit(head)
        if self.on_output and self.pending:
            self.on_output(self.stream, self.pending.decode(errors="replace"))
            self.pending = b""
        return b"".join(self.chunks).decode(errors="replace")


class SSHRunner(Runner):
    """A host over SSH, through a ConnectionPool (the process-wide pool by default; pass
    `pool=ConnectionPool(inventory.jump_for)` so jump hosts resolve by inventory name)."""

    def __init__(self, host, pool=None):
        from megafleet.ssh.connection import default_pool

        self.host = host
        self.name = host.name
        self.pool = pool or default_pool()

    def connection(self):
        """The pooled Connection (connects on first use; raises SSHError)."""
        return self.pool.get(self.host)

    def run(self, cmd, timeout=DEFAULT_TIMEOUT, env=None, stdin=None, on_output=None):
        started = time.monotonic()
        try:
            env_bytes = _env_lines(env)
            conn, chan = self._open_channel()
            chan.exec_command(wrap_command(cmd, bool(env_bytes)))
        except Exception as exc:
            res = Result.from_exception(self.name, cmd, exc, started)
            if res.error == INTERNAL and _is_io_error(exc):  # a pooled connection went stale
                self.pool.drop(self.host)
                res.error, res.stderr = DISCONNECTED, ""
                res.hint = (
                    "the connection broke; the next command reconnects; if it keeps "
                    f"failing, run `megafleet hosts check {self.name}`"
                )
            return res
        from megafleet.ssh.channel import pump

        return pump(self, conn, chan, cmd, started, timeout, env_bytes, stdin, on_output)

    def _open_channel(self):
        conn = self.connection()
        try:
            return conn, conn.transport.open_session(timeout=self.pool.connect_timeout)
        except Exception as exc:
            if not _is_io_error(exc):
                raise
        self.pool.drop(self.host)  # the pooled connection died unnoticed: reconnect once
        conn = self.connection()
        return conn, conn.transport.open_session(timeout=self.pool.connect_timeout)

    def put(self, local, remote, progress=None):
        return self._transfer(
            f"put {local} -> {remote}", (sftp_put, "exec_put"), local, remote, progress
        )

    def get(self, remote, local, progress=None):
        return self._transfer(
            f"get {remote} -> {local}", (sftp_get, "exec_get"), remote, local, progress
        )

    def put_from(self, local, remote, offset=0, progress=None):
        return self._transfer(
            f"put {local} -> {remote} from byte {offset}",
            (sftp_put_from, "exec_put_from"),
            local,
            remote,
            progress,
            offset,
        )

    def get_from(self, remote, local, offset=0, progress=None):
        return self._transfer(
            f"get {remote} -> {local} from byte {offset}",
            (sftp_get_from, "exec_get_from"),
            remote,
            local,
            progress,
            offset,
        )

    def _transfer(self, label, fns, src, dst, progress, *offset):
        """`fns`: the SFTP function, and the name of its megafleet.ssh.streamcopy mirror for
        hosts without an SFTP server."""
        from megafleet.ssh import streamcopy

        started = time.monotonic()
        try:
            conn = self.connection()
            if conn.has_sftp():
                with conn.sftp_lock:
                    moved = fns[0](conn.sftp(), src, dst, *offset, progress)
            else:
                moved = getattr(streamcopy, fns[1])(conn, src, dst, *offset, progress)
        except Exception as exc:
            res = Result.from_exception(self.name, label, exc, started)
            if res.error == INTERNAL and _is_io_error(exc):
                res.error, res.stderr = TRANSFER, ""  # I/O trouble, not a bug: no traceback
                res.hint = res.hint or ssh_layer_hint(self.name, exc)
            return res
        return Result(
            self.name, label, exit_code=0, duration=time.monotonic() - started, value=moved
        )

    def close(self):
        self.pool.drop(self.host)


def ssh_layer_hint(host: str, exc: BaseException) -> str:
    """What to do about a transfer that failed below megafleet (paramiko, socket, disk)."""
    if isinstance(exc, FileNotFoundError) or "No such file" in str(exc):
        return f"check the path: it does not exist (on {host} or here)"
    if isinstance(exc, PermissionError) or "Permission denied" in str(exc):
        return f"check the permissions of the path on {host} (and here) for the SSH user"
    if isinstance(exc, OSError) and "No space left" in str(exc):
        return f"free disk space (on {host} or here) and run the command again"
    return (
        f"the SSH connection to {host} failed ({type(exc).__name__}: {exc}); run the command "
        f"again (copies resume), and `megafleet hosts check {host}` if it keeps failing"
    )


def _is_io_error(exc: BaseException) -> bool:
    return isinstance(exc, (OSError, EOFError)) or type(exc).__module__.startswith("paramiko")


class LocalRunner(Runner):
    """This machine, through /bin/sh, with the same contract as SSHRunner (local mode, demo)."""

    def __init__(self, name: str = "local", env: dict[str, str] | None = None):
        self.name = name
        self.env = dict(env or {})  # added to every command's environment (e.g. PYTHONPATH)

    def run(self, cmd, timeout=DEFAULT_TIMEOUT, env=None, stdin=None, on_output=None):
        started = time.monotonic()
        try:
            full_env = {**os.environ, **self.env, **{k: str(v) for k, v in (env or {}).items()}}
            proc = subprocess.Popen(
                ["/bin/sh", "-c", cmd],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                env=full_env,
                start_new_session=True,
            )
        except Exception as exc:
            return Result.from_exception(self.name, cmd, exc, started)
        out, err = LineSplitter("stdout", on_output), LineSplitter("stderr", on_output)
        readers = [
            threading.Thread(target=_drain, args=(proc.stdout, out), daemon=True),
            threading.Thread(target=_drain, args=(proc.stderr, err), daemon=True),
        ]
        for t in readers:
            t.start()
        _feed_stdin(proc.stdin, stdin)
        try:
            code = proc.wait(timeout=timeout)
            timed_out = False
        except subprocess.TimeoutExpired:
            _kill_local_group(proc)
            code, timed_out = None, True
        for t in readers:
            t.join(5)
        res = Result(
            self.name,
            cmd,
            exit_code=code,
            stdout=out.text(),
            stderr=err.text(),
            duration=time.monotonic() - started,
        )
        if timed_out:
            res.error, res.message = TIMEOUT, f"still running after {timeout:g}s; killed"
        elif code != 0:
            res.error = EXIT
        return res

    def put(self, local, remote, progress=None):
        return self._copy(f"put {local} -> {remote}", local, remote, progress)

    def get(self, remote, local, progress=None):
        return self._copy(f"get {remote} -> {local}", remote, local, progress)

    def put_from(self, local, remote, offset=0, progress=None):
        return self._copy(
            f"put {local} -> {remote} from byte {offset}", local, remote, progress, offset
        )

    def get_from(self, remote, local, offset=0, progress=None):
        return self._copy(
            f"get {remote} -> {local} from byte {offset}", remote, local, progress, offset
        )

    def _copy(self, label, src, dst, progress, offset=None):
        started = time.monotonic()
        try:
            if offset is None:
                moved = local_copy(Path(src).expanduser(), Path(str(dst)).expanduser(), progress)
            else:
                moved = local_copy_from(src, dst, offset, progress)
        except OSError as exc:
            return Result(
                self.name,
                label,
                error=TRANSFER,
                message=str(exc),
                duration=time.monotonic() - started,
            )
        return Result(
            self.name, label, exit_code=0, value=moved, duration=time.monotonic() - started
        )


def _drain(pipe, splitter: LineSplitter) -> None:
    for chunk in iter(lambda: pipe.read1(65536), b""):
        splitter.feed(chunk)


def _feed_stdin(pipe, data) -> None:
    def feed():
        try:
            if data:
                pipe.write(data.encode() if isinstance(data, str) else data)
        except BrokenPipeError:
            pass
        finally:
            try:
                pipe.close()
            except BrokenPipeError:
                pass

    threading.Thread(target=feed, daemon=True).start()


def _kill_local_group(proc: subprocess.Popen) -> None:
    for sig, wait in ((signal.SIGTERM, 2.0), (signal.SIGKILL, 5.0)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=wait)
            return
        except subprocess.TimeoutExpired:
            continue


class DryRunRunner(Runner):
    """Records what would run and changes nothing; every call succeeds with empty output.
    `calls` holds ("run", cmd, env keys) / ("put", local, remote) / ("get", remote, local)."""

    def __init__(self, name: str = "dry-run"):
        self.name = name
        self.calls: list[tuple] = []

    def run(self, cmd, timeout=DEFAULT_TIMEOUT, env=None, stdin=None, on_output=None):
        self.calls.append(("run", cmd, tuple(sorted(env or {}))))
        return Result(self.name, cmd, exit_code=0, dry_run=True)

    def put(self, local, remote, progress=None):
        self.calls.append(("put", str(local), remote))
        return Result(self.name, f"put {local} -> {remote}", exit_code=0, dry_run=True)

    def get(self, remote, local, progress=None):
        self.calls.append(("get", remote, str(local)))
        return Result(self.name, f"get {remote} -> {local}", exit_code=0, dry_run=True)

    def put_from(self, local, remote, offset=0, progress=None):
        self.calls.append(("put", str(local), remote))
        return Result(self.name, f"put {local} -> {remote}", exit_code=0, value=0, dry_run=True)

    def get_from(self, remote, local, offset=0, progress=None):
        self.calls.append(("get", remote, str(local)))
        return Result(self.name, f"get {remote} -> {local}", exit_code=0, value=0, dry_run=True)

    def commands(self) -> list[str]:
        return [c[1] for c in self.calls if c[0] == "run"]


Task = Union[str, Callable[[Runner], Any]]


def run_on_hosts(
    hosts: Iterable,
    task: Task,
    *,
    pool=None,
    timeout: float | None = DEFAULT_TIMEOUT,
    env: dict[str, str] | None = None,
    max_workers: int = 32,
) -> dict[str, Result]:
    """Run `task` on every host at once; return {host name: Result} in the order given.

    `hosts` holds inventory Hosts (run through SSHRunner with `pool`) or ready Runners.
    `task` is a shell command, or a function of a Runner: its Result is used as is; any other
    return value becomes `Result.value` of a successful Result; an exception becomes a failed
    Result (SSHError kinds keep their kind). One host failing never hides the others.
    """
    runners = [h if isinstance(h, Runner) else SSHRunner(h, pool=pool) for h in hosts]
    label = task if isinstance(task, str) else getattr(task, "__name__", "function")

    def one(runner: Runner) -> Result:
        started = time.monotonic()
        try:
            if isinstance(task, str):
                return runner.run(task, timeout=timeout, env=env)
            value = task(runner)
        except Exception as exc:
            return Result.from_exception(runner.name, label, exc, started)
        if isinstance(value, Result):
            return value
        return Result(
            runner.name, label, exit_code=0, value=value, duration=time.monotonic() - started
        )

    if not runners:
        return {}
    ex = cf.ThreadPoolExecutor(
        max_workers=min(max_workers, len(runners)), thread_name_prefix="megafleet-host"
    )
    try:
        futures = [ex.submit(one, r) for r in runners]
        return {r.name: f.result() for r, f in zip(runners, futures)}
    except BaseException:  # Ctrl-C: stop the copies now instead of waiting for them to finish
        from megafleet.transfer import cancel_transfers

        cancel_transfers()
        ex.shutdown(wait=False, cancel_futures=True)
        raise
    finally:
        ex.shutdown(wait=False)


def quote(value: str) -> str:
    """Shell-quote one word for a remote command."""
    return shlex.quote(str(value))
