"""File and directory copies for the runners: over SFTP for hosts, plain copies for local mode.

Every file is written beside its destination as `NAME.mfpart` and renamed into place when
complete, so a reader never sees half a file and an interrupted copy leaves no truncated
target. File permission bits are kept. `progress(done_bytes, total_bytes)` reports the whole
transfer (all files), for progress bars. Remote paths may start with `~/` or be relative:
both mean the user's home directory (SFTP starts there).

Resumable single-file copies (`*_put_from`, `*_get_from`) continue a `NAME.mfpart` left by an
interrupted copy: the caller checks that the part is a prefix of the source (megafleet.jobs.sync
compares sha256 of both) and passes its length as `offset`; only the rest moves.
"""

from __future__ import annotations

import hashlib
import os
import posixpath
import shutil
import stat
from pathlib import Path
from typing import Callable

Progress = Callable[[int, int], None]
PART = ".mfpart"
CHUNK = 1 << 20
_generation = [0]  # bumped by cancel_transfers(); a copy started before it stops


class TransferCancelled(Exception):
    """The operator interrupted (Ctrl-C) while a copy ran in a worker thread."""


def cancel_transfers() -> None:
    """Stop every resumable copy running now (in any thread) at its next chunk; each leaves its
    `.mfpart`, which the next copy continues. Called on Ctrl-C by megafleet.runner.run_on_hosts."""
    _generation[0] += 1


def remote_path(path: str) -> str:
    """SFTP does not expand `~`: `~/x` and `x` are both home-relative."""
    if path == "~":
        return "."
    return path[2:] if path.startswith("~/") else path


class _Meter:
    def __init__(self, total: int, progress: Progress | None):
        self.total, self.progress, self.done = total, progress, 0
        self._file_done = 0

    def start_file(self) -> None:
        self._file_done = 0

    def callback(self, transferred: int, _size: int) -> None:
        self.done += transferred - self._file_done
        self._file_done = transferred
        if self.progress:
            self.progress(self.done, self.total)


def _local_tree(src: Path) -> list[tuple[Path, str]]:
    """(file, relative posix path) for a file or every file under a directory."""
    if src.is_file():
        return [(src, "")]
    return sorted((p, p.relative_to(src).as_posix()) for p in src.rglob("*") if p.is_file())


def sftp_put(sftp, local: str | Path, remote: str, progress: Progress | None = None) -> int:
    """Upload a file or directory tree; returns the bytes sent."""
    src, dst = Path(local).expanduser(), remote_path(remote)
    if not src.exists():
        raise FileNotFoundError(f"local path {src} does not exist")
    files = _local_tree(src)
    meter = _Meter(sum(p.stat().st_size for p, _ in files), progress)
    if src.is_dir():
        _sftp_makedirs(sftp, dst)
        for d in sorted({posixpath.dirname(rel) for _, rel in files} - {""}):
            _sftp_makedirs(sftp, posixpath.join(dst, d))
    else:
        _sftp_makedirs(sftp, posixpath.dirname(dst))
    for path, rel in files:
        target = posixpath.join(dst, rel) if rel else dst
        meter.start_file()
        sftp.put(str(path), target + PART, callback=meter.callback, confirm=True)
        sftp.chmod(target + PART, stat.S_IMODE(path.stat().st_mode))
        sftp.posix_rename(target + PART, target)
    return meter.done


def _sftp_makedirs(sftp, path: str) -> None:
    if path in ("", ".", "/"):
        return
    try:
        if stat.S_ISDIR(sftp.stat(path).st_mode):
            return
        raise NotADirectoryError(f"remote {path} exists and is not a directory")
    except FileNotFoundError:
        pass
    _sftp_makedirs(sftp, posixpath.dirname(path.rstrip("/")))
    try:
        sftp.mkdir(path)
    except OSError:
        if not stat.S_ISDIR(sftp.stat(path).st_mode):  # made meanwhile by a parallel copy is fine
            raise


def _remote_tree(sftp, src: str) -> list[tuple[str, str, int]]:
    """(remote file, relative path, size) for a file or every file under a directory."""
    st = sftp.stat(src)
    if not stat.S_ISDIR(st.st_mode):
        return [(src, "", st.st_size)]
    out = []
    for entry in sftp.listdir_attr(src):
        full = posixpath.join(src, entry.filename)
        if stat.S_ISDIR(entry.st_mode):
            out += [
                (f, posixpath.join(entry.filename, rel), size)
                for f, rel, size in _remote_tree(sftp, full)
            ]
        elif stat.S_ISREG(entry.st_mode):
            out.append((full, entry.filename, entry.st_size))
    return sorted(out)


def sftp_get(sftp, remote: str, local: str | Path, progress: Progress | None = None) -> int:
    """Download a file or directory tree; returns the bytes received."""
    src, dst = remote_path(remote), Path(local).expanduser()
    files = _remote_tree(sftp, src)
    meter = _Meter(sum(size for _, _, size in files), progress)
    for path, rel, _ in files:
        target = dst / rel if rel else dst
        target.parent.mkdir(parents=True, exist_ok=True)
        part = target.with_name(target.name + PART)
        meter.start_file()
        sftp.get(path, str(part), callback=meter.callback)
        os.chmod(part, stat.S_IMODE(sftp.stat(path).st_mode))
        os.replace(part, target)
    return meter.done


def local_copy(src: Path, dst: Path, progress: Progress | None = None) -> int:
    """The local-mode mirror of sftp_put/sftp_get."""
    if not src.exists():
        raise FileNotFoundError(f"{src} does not exist")
    files = _local_tree(src)
    meter = _Meter(sum(p.stat().st_size for p, _ in files), progress)
    for path, rel in files:
        target = dst / rel if rel else dst
        target.parent.mkdir(parents=True, exist_ok=True)
        part = target.with_name(target.name + PART)
        shutil.copy2(path, part)
        os.replace(part, target)
        meter.start_file()
        size = path.stat().st_size
        meter.callback(size, size)
    return meter.done


def file_sha256(path: str | Path, limit: int | None = None) -> str:
    """sha256 of a file's first `limit` bytes (all of it when None)."""
    h = hashlib.sha256()
    left = limit
    with open(path, "rb") as f:
        while left is None or left > 0:
            chunk = f.read(CHUNK if left is None else min(CHUNK, left))
            if not chunk:
                break
            h.update(chunk)
            if left is not None:
                left -= len(chunk)
    return h.hexdigest()


def _pump(src, dst, offset: int, size: int, progress: Progress | None) -> int:
    """Copy src (already at `offset`) to dst; report offset+moved of size; return bytes moved."""
    moved, generation = 0, _generation[0]
    for chunk in iter(lambda: src.read(CHUNK), b""):
        if _generation[0] != generation:
            raise TransferCancelled(f"interrupted after {offset + moved} of {size} bytes")
        dst.write(chunk)
        moved += len(chunk)
        if progress:
            progress(offset + moved, size)
    return moved


def sftp_put_from(
    sftp, local: str | Path, remote: str, offset: int = 0, progress: Progress | None = None
) -> int:
    """Upload one file, continuing `remote.mfpart` from `offset` bytes; returns bytes sent."""
    src, dst = Path(local).expanduser(), remote_path(remote)
    size = src.stat().st_size
    _sftp_makedirs(sftp, posixpath.dirname(dst))
    part = dst + PART
    with open(src, "rb") as f, sftp.open(part, "ab" if offset else "wb") as out:
        out.set_pipelined(True)
        f.seek(offset)
        moved = _pump(f, out, offset, size, progress)
    if sftp.stat(part).st_size != size:
        raise OSError(f"{dst}: remote size {sftp.stat(part).st_size} after upload, expected {size}")
    sftp.chmod(part, stat.S_IMODE(src.stat().st_mode))
    sftp.posix_rename(part, dst)
    return moved


def sftp_get_from(
    sftp, remote: str, local: str | Path, offset: int = 0, progress: Progress | None = None
) -> int:
    """Download one file, continuing `local.mfpart` from `offset` bytes; returns bytes received."""
    src, dst = remote_path(remote), Path(local).expanduser()
    size = sftp.stat(src).st_size
    dst.parent.mkdir(parents=True, exist_ok=True)
    part = dst.with_name(dst.name + PART)
    with sftp.open(src, "rb") as f, open(part, "ab" if offset else "wb") as out:
        f.seek(offset)
        f.prefetch(size)
        moved = _pump(f, out, offset, size, progress)
    if part.stat().st_size != size:
        raise OSError(f"{dst}: local size {part.stat().st_size} after download, expected {size}")
    os.chmod(part, stat.S_IMODE(sftp.stat(src).st_mode))
    os.replace(part, dst)
    return moved


def local_copy_from(
    src: str | Path, dst: str | Path, offset: int = 0, progress: Progress | None = None
) -> int:
    """The local-mode mirror of sftp_put_from/sftp_get_from."""
    src, dst = Path(src).expanduser(), Path(dst).expanduser()
    size = src.stat().st_size
    dst.parent.mkdir(parents=True, exist_ok=True)
    part = dst.with_name(dst.name + PART)
    with open(src, "rb") as f, open(part, "ab" if offset else "wb") as out:
        f.seek(offset)
        moved = _pump(f, out, offset, size, progress)
    os.chmod(part, stat.S_IMODE(src.stat().st_mode))
    os.replace(part, dst)
    return moved
