"""File copies over the exec channel, for hosts whose sshd has no SFTP subsystem (minimal and
hardened images): the same contract as megafleet.transfer's `sftp_*` functions (atomic
`NAME.mfpart` then rename, permission bits kept, resume from `offset`, progress callbacks), with
`cat`, `tail -c`, `stat` and `mv` on the host instead of an SFTP server.

Downloads print a marker line first and the file's bytes after it, so whatever a login script
prints on stdout before the command runs never ends up in the file.
"""

from __future__ import annotations

import os
import posixpath
import shlex
import stat
from pathlib import Path

from megafleet.transfer import CHUNK, PART, Progress, _local_tree, remote_path

MARK = b"__megafleet_stream__\n"
TIMEOUT = 60.0  # seconds without any data moving before a copy counts as stuck


class StreamCopyError(OSError):
    """The host's side of a streamed copy failed (its shell said why)."""


def _q(path: str) -> str:
    return shlex.quote(path)


def _open(conn, script: str):
    chan = conn.transport.open_session(timeout=TIMEOUT)
    chan.settimeout(TIMEOUT)
    chan.exec_command(script)
    return chan


def _finish(chan, what: str) -> bytes:
    """Wait for the command's exit; raise StreamCopyError with its stderr when it failed."""
    code = chan.recv_exit_status()
    err = b""
    while chan.recv_stderr_ready():
        err += chan.recv_stderr(65536)
    chan.close()
    if code != 0:
        said = err.decode(errors="replace").strip()
        raise StreamCopyError(f"{what}: {said or f'exit code {code}'}")
    return err


def exec_put_from(
    conn, local: str | Path, remote: str, offset: int = 0, progress: Progress | None = None
) -> int:
    """Upload one file, continuing `remote.mfpart` from `offset`; returns bytes sent."""
    src, dst = Path(local).expanduser(), remote_path(remote)
    size, mode = src.stat().st_size, stat.S_IMODE(src.stat().st_mode)
    part = dst + PART
    script = (
        f"set -e; mkdir -p {_q(posixpath.dirname(dst) or '.')}; "
        f"cat {'>>' if offset else '>'} {_q(part)}; s=$(wc -c < {_q(part)}); "
        f'if [ "$s" -ne {size} ]; then echo "remote size $s after upload, expected '
        f'{size}" >&2; exit 3; fi; chmod {mode:o} {_q(part)}; mv -f {_q(part)} {_q(dst)}'
    )
    chan = _open(conn, script)
    moved = 0
    try:
        with open(src, "rb") as f:
            f.seek(offset)
            for chunk in iter(lambda: f.read(CHUNK), b""):
                chan.sendall(chunk)
                moved += len(chunk)
                if progress:
                    progress(offset + moved, size)
        chan.shutdown_write()
    except OSError:  # the host's side ended early: its stderr says why, when it says anything
        _finish(chan, f"upload to {dst}")
        raise
    _finish(chan, f"upload to {dst}")
    return moved


def exec_get_from(
    conn,
    remote: str,
    local: str | Path,
    offset: int = 0,
    progress: Progress | None = None,
    size: int | None = None,
    mode: int | None = None,
) -> int:
    """Download one file, continuing `local.mfpart` from `offset`; returns bytes received."""
    src, dst = remote_path(remote), Path(local).expanduser()
    if size is None or mode is None:
        ((size, mode, _),) = _remote_stats(conn, src)
    dst.parent.mkdir(parents=True, exist_ok=True)
    part = dst.with_name(dst.name + PART)
    chan = _open(
        conn,
        f"set -e; test -r {_q(src)}; printf '%s\\n' {MARK.decode().strip()}; "
        f"exec tail -c +{offset + 1} {_q(src)}",
    )
    moved, head = 0, b""
    with open(part, "ab" if offset else "wb") as out:
        for data in iter(lambda: chan.recv(CHUNK), b""):
            if head is not None:  # still looking for the marker
                head += data
                if MARK not in head:
                    continue
                data, head = head.split(MARK, 1)[1], None
            out.write(data)
            moved += len(data)
            if progress:
                progress(offset + moved, size)
    _finish(chan, f"download of {src}")
    if part.stat().st_size != size:
        raise StreamCopyError(
            f"{dst}: local size {part.stat().st_size} after download, expected {size}"
        )
    os.chmod(part, mode)
    os.replace(part, dst)
    return moved


def _remote_stats(conn, src: str) -> list[tuple[int, int, str]]:
    """(size, mode, relative path) of a file ("" as path), or of every file under a directory."""
    chan = _open(
        conn,
        f"if [ -d {_q(src)} ]; then cd {_q(src)} && find . -type f -exec stat -c "
        f"'%s %a %n' {{}} +; else stat -c '%s %a %n' {_q(src)}; fi",
    )
    out = b""
    for data in iter(lambda: chan.recv(65536), b""):
        out += data
    _finish(chan, f"listing {src}")
    rows = []
    for line in out.decode(errors="replace").splitlines():
        parts = line.split(" ", 2)
        if len(parts) == 3 and parts[0].isdigit():
            rel = parts[2][2:] if parts[2].startswith("./") else ""
            rows.append((int(parts[0]), int(parts[1], 8), rel))
    if not rows:
        raise StreamCopyError(f"remote {src}: no such file or directory")
    return sorted(rows, key=lambda r: r[2])


class _Total:
    """Progress over several files: each file's callback reports its own bytes."""

    def __init__(self, total: int, progress: Progress | None):
        self.total, self.progress, self.base = total, progress, 0

    def file(self, done: int, _size: int) -> None:
        if self.progress:
            self.progress(self.base + done, self.total)


def exec_put(conn, local: str | Path, remote: str, progress: Progress | None = None) -> int:
    """Upload a file or directory tree (the exec-channel mirror of sftp_put)."""
    src, dst = Path(local).expanduser(), remote_path(remote)
    if not src.exists():
        raise FileNotFoundError(f"local path {src} does not exist")
    files = _local_tree(src)
    meter = _Total(sum(p.stat().st_size for p, _ in files), progress)
    for path, rel in files:
        meter.base += exec_put_from(
            conn, path, posixpath.join(dst, rel) if rel else dst, 0, meter.file
        )
    return meter.base


def exec_get(conn, remote: str, local: str | Path, progress: Progress | None = None) -> int:
    """Download a file or directory tree (the exec-channel mirror of sftp_get)."""
    src, dst = remote_path(remote), Path(local).expanduser()
    files = _remote_stats(conn, src)
    meter = _Total(sum(size for size, _, _ in files), progress)
    for size, mode, rel in files:
        meter.base += exec_get_from(
            conn,
            posixpath.join(src, rel) if rel else src,
            dst / rel if rel else dst,
            0,
            meter.file,
            size,
            mode,
        )
    return meter.base
