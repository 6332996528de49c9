"""What the operator sends to nodes before a setup: the project wheel and, for offline
installs, a wheelhouse, uploaded incrementally (a file the node has with the same size and
sha256 is not sent again)."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from megafleet import paths, resources
from megafleet.errors import UsageError
from megafleet.jobs.sync import local_sha256
from megafleet.setup.request import NODE_WHEELHOUSE, NODE_WHEELS


@dataclass
class LocalFile:
    name: str
    path: Path
    size: int
    sha256: str


@dataclass
class Artifacts:
    """The project wheel (always) and the wheelhouse (offline installs), with checksums."""

    project: LocalFile
    check_sha256: str
    wheelhouse: list[LocalFile] | None = None
    wheelhouse_dir: Path | None = None
    notes: list[str] = field(default_factory=list)

    @property
    def wheelhouse_digest(self) -> str | None:
        if self.wheelhouse is None:
            return None
        listing = [[f.name, f.sha256] for f in self.wheelhouse]
        return hashlib.sha256(json.dumps(listing).encode()).hexdigest()[:16]

    def wheelhouse_request(self) -> dict | None:
        if self.wheelhouse is None:
            return None
        return {"files": [f.name for f in self.wheelhouse], "digest": self.wheelhouse_digest}

    def uploads(self) -> list[tuple[LocalFile, str]]:
        """(file, remote path) for everything a node needs."""
        out = [(self.project, f"~/{NODE_WHEELS}/{self.project.name}")]
        out += [(f, f"~/{NODE_WHEELHOUSE}/{f.name}") for f in self.wheelhouse or []]
        return out


def _local(path: Path) -> LocalFile:
    return LocalFile(path.name, path, path.stat().st_size, local_sha256(path))


def prepare(wheelhouse: str | Path | None = None, build_dir: Path | None = None) -> Artifacts:
    """Build the project wheel (into MEGAFLEET_HOME/cache/node-wheel) and list the wheelhouse."""
    from megafleet.setup.wheel import build_project_wheel

    wheel, _ = build_project_wheel(build_dir or paths.home() / "cache" / "node-wheel")
    check_sha = local_sha256(resources.check_script_path())
    art = Artifacts(_local(wheel), check_sha)
    if wheelhouse is not None:
        folder = Path(wheelhouse).expanduser()
        if not folder.is_dir():
            raise UsageError(f"--wheelhouse {wheelhouse}: no such folder")
        # The project wheel travels on its own (always this operator's build), so a changed
        # checkout does not change the wheelhouse and re-trigger the install steps.
        files = sorted(
            p
            for p in folder.iterdir()
            if p.is_file()
            and p.name.endswith((".whl", ".tar.gz", ".zip"))
            and not p.name.startswith("megafleet-")
        )
        if not files:
            raise UsageError(
                f"--wheelhouse {wheelhouse}: no wheels in it",
                hint=f"megafleet setup --build-wheelhouse {wheelhouse}",
            )
        art.wheelhouse, art.wheelhouse_dir = [_local(p) for p in files], folder
    return art


def missing_on_node(art: Artifacts, node_files: dict) -> list[tuple[LocalFile, str]]:
    """The uploads whose file the node lacks or holds with another size or sha256.
    `node_files` is the probe's {"wheels": {name: [size, sha]}, "wheelhouse": {...}}."""
    have = {f"~/{NODE_WHEELS}/{n}": v for n, v in (node_files.get("wheels") or {}).items()}
    have.update(
        {f"~/{NODE_WHEELHOUSE}/{n}": v for n, v in (node_files.get("wheelhouse") or {}).items()}
    )
    return [(f, remote) for f, remote in art.uploads() if have.get(remote) != [f.size, f.sha256]]


def upload(
    runner, todo: list[tuple[LocalFile, str]], progress: Callable[[int, int], None] | None = None
):
    """Send the files; returns (bytes sent, a failed Result or None)."""
    total = sum(f.size for f, _ in todo)
    sent = 0
    for f, remote in todo:
        base = sent
        res = runner.put(
            f.path,
            remote,
            progress=(lambda done, _t, b=base: progress(b + done, total)) if progress else None,
        )
        if not res.ok:
            return sent, res
        sent += f.size
    return sent, None
