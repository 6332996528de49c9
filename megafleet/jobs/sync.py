"""Incremental, resumable file copies between the operator and a node, checked by sha256.

Upload: the node reports the size and sha256 of each target file and of any `.mfpart` left by
an interrupted copy (`nodectl manifest`); a file whose size and sha256 match is skipped, a part
that is a prefix of the local file (same sha256 as the local file's first bytes) is continued
from where it stopped, anything else is sent whole. Afterwards the node hashes what arrived; a
mismatch is an error. Download (`fetch`) mirrors this with the local `.mfpart`.

Local hashes of big files are cached in $MEGAFLEET_HOME/hash-cache.json by (path, size, mtime).
"""

from __future__ import annotations

import json
import os
import shlex
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from megafleet import paths
from megafleet.errors import RemoteCommandError
from megafleet.runner import Runner
from megafleet.transfer import PART, file_sha256

CACHE_MIN_BYTES = 1 << 20
Progress = Callable[[int, int], None]


@dataclass
class FileCopy:
    local: Path
    remote: str  # absolute path on the node
    size: int
    sha256: str


@dataclass
class SyncReport:
    sent: list[str] = field(default_factory=list)  # remote paths copied (whole or resumed)
    skipped: list[str] = field(default_factory=list)  # already there, same size and sha256
    resumed: dict[str, int] = field(default_factory=dict)  # remote path -> bytes already there
    bytes_sent: int = 0
    bytes_total: int = 0

    def to_dict(self) -> dict:
        return {
            "sent": self.sent,
            "skipped": self.skipped,
            "resumed": self.resumed,
            "bytes_sent": self.bytes_sent,
            "bytes_total": self.bytes_total,
        }


def local_sha256(path: Path) -> str:
    """sha256 of a local file, from the cache when its size and mtime are unchanged."""
    st = path.stat()
    if st.st_size < CACHE_MIN_BYTES:
        return file_sha256(path)
    cache_path = paths.home() / "hash-cache.json"
    try:
        cache = json.loads(cache_path.read_text())
    except (OSError, ValueError):
        cache = {}
    key = str(path.resolve())
    hit = cache.get(key)
    if hit and hit[0] == st.st_size and hit[1] == st.st_mtime_ns:
        return hit[2]
    digest = file_sha256(path)
    cache[key] = [st.st_size, st.st_mtime_ns, digest]
    try:
        paths.ensure_home()
        tmp = cache_path.with_suffix(".tmp")
        tmp.write_text(json.dumps(cache))
        os.replace(tmp, cache_path)
    except OSError:
        pass
    return digest


def plan_tree(src: Path, remote_base: str) -> list[FileCopy]:
    """A FileCopy for a file, or for every file under a directory (hidden files included)."""
    src = src.expanduser()
    if src.is_file():
        return [FileCopy(src, remote_base, src.stat().st_size, local_sha256(src))]
    files = sorted(p for p in src.rglob("*") if p.is_file())
    return [
        FileCopy(
            p,
            f"{remote_base.rstrip('/')}/{p.relative_to(src).as_posix()}",
            p.stat().st_size,
            local_sha256(p),
        )
        for p in files
    ]


def remote_manifest(runner: Runner, python: str, files: list[dict]) -> dict[str, dict]:
    """{path: {size, sha256, part_size, part_sha256}} from `nodectl manifest` on the node."""
    if not files:
        return {}
    r = runner.run(
        f"{shlex.quote(python)} -m megafleet.jobs.nodectl manifest",
        timeout=3600,
        stdin=json.dumps({"files": files}),
    ).check()
    try:
        return {f["path"]: f for f in json.loads(r.stdout.strip().splitlines()[-1])["files"]}
    except (ValueError, KeyError, IndexError):
        raise RemoteCommandError(
            f"{runner.name}: unexpected manifest output", hint=r.describe()
        ) from None


def upload(
    runner: Runner,
    python: str,
    copies: list[FileCopy],
    progress: Progress | None = None,
    dry_run: bool = False,
) -> SyncReport:
    """Bring `copies` to the node incrementally (see the module docstring)."""
    report = SyncReport(bytes_total=sum(c.size for c in copies))
    have = remote_manifest(runner, python, [{"path": c.remote, "size": c.size} for c in copies])
    todo: list[tuple[FileCopy, int]] = []
    for c in copies:
        there = have.get(c.remote, {})
        if there.get("size") == c.size and there.get("sha256") == c.sha256:
            report.skipped.append(c.remote)
            continue
        part = there.get("part_size") or 0
        offset = (
            part
            if 0 < part <= c.size and there.get("part_sha256") == file_sha256(c.local, part)
            else 0
        )
        todo.append((c, offset))
    done_before = sum(c.size for c in copies if c.remote in report.skipped)
    moved = done_before + sum(off for _, off in todo)
    if progress:
        progress(moved, report.bytes_total)
    for c, offset in todo:
        if dry_run:
            report.sent.append(c.remote)
            continue
        base = moved - offset

        def file_progress(done, _total, base=base):
            if progress:
                progress(base + done, report.bytes_total)

        res = runner.put_from(c.local, c.remote, offset, file_progress)
        res.check()
        report.sent.append(c.remote)
        if offset:
            report.resumed[c.remote] = offset
        report.bytes_sent += res.value or 0
        moved = base + c.size
    if todo and not dry_run:
        _verify(runner, python, [c for c, _ in todo])
    return report


def _verify(runner: Runner, python: str, copies: list[FileCopy]) -> None:
    have = remote_manifest(runner, python, [{"path": c.remote, "size": c.size} for c in copies])
    bad = [c.remote for c in copies if have.get(c.remote, {}).get("sha256") != c.sha256]
    if bad:
        raise RemoteCommandError(
            f"{runner.name}: {len(bad)} uploaded file(s) differ from the local "
            f"copy (sha256): {', '.join(bad[:5])}",
            hint="launch again: the files are sent again from the start",
        )


@dataclass
class RemoteFile:
    remote: str
    local: Path
    size: int
    sha256: str


def download(
    runner: Runner, files: list[RemoteFile], progress: Progress | None = None
) -> SyncReport:
    """Fetch `files` (whose size and sha256 the node reported) incrementally and verify them."""
    report = SyncReport(bytes_total=sum(f.size for f in files))
    moved = 0
    for f in files:
        if (
            f.local.is_file()
            and f.local.stat().st_size == f.size
            and local_sha256(f.local) == f.sha256
        ):
            report.skipped.append(f.remote)
            moved += f.size
            continue
        part = f.local.with_name(f.local.name + PART)
        offset = part.stat().st_size if part.is_file() and part.stat().st_size <= f.size else 0
        base = moved

        def file_progress(done, _total, base=base):
            if progress:
                progress(base + done, report.bytes_total)

        res = runner.get_from(f.remote, f.local, offset, file_progress)
        res.check()
        if local_sha256(f.local) != f.sha256 and offset:  # the part was not a prefix: once more
            f.local.unlink()
            res = runner.get_from(f.remote, f.local, 0, file_progress).check()
            offset = 0
        if local_sha256(f.local) != f.sha256:
            raise RemoteCommandError(
                f"{runner.name}: {f.remote} arrived with a different sha256",
                hint="fetch again; if it persists, the file changed on the node",
            )
        report.sent.append(f.remote)
        if offset:
            report.resumed[f.remote] = offset
        report.bytes_sent += res.value or 0
        moved = base + f.size
        if progress:
            progress(moved, report.bytes_total)
    return report
