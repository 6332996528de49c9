"""The project wheel that nodes install: the operator's own code, byte for byte.

Built here without a build backend (no hatchling, pip or network needed), from a checkout or
from an installed megafleet alike: the `megafleet` and `remote_runtime` packages plus the files
pyproject.toml force-includes under `megafleet/_bundled/` (the check script, templates, skill).
The archive is reproducible (sorted entries, fixed timestamps and modes), so its sha256 changes
exactly when the code does; node setup records that sha256 and reinstalls when it differs.

The wheel declares no dependencies: a node gets torch, megatron-core and the rest from setup's
own steps, and the operator-only packages (click, rich, paramiko, boto3, ...) never land there.
"""

from __future__ import annotations

import base64
import hashlib
import importlib.util
import io
import zipfile
from pathlib import Path

from megafleet import __version__, resources

PACKAGES = ("megafleet", "remote_runtime")
SKIP_DIRS = {"__pycache__"}
SKIP_SUFFIXES = (".pyc", ".pyo", ".mfpart", ".swp")
ZIP_TIME = (1980, 1, 1, 0, 0, 0)


def wheel_name(version: str = __version__) -> str:
    return f"megafleet-{version}-py3-none-any.whl"


def _package_dir(name: str) -> Path:
    spec = importlib.util.find_spec(name)  # locates without importing
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError(f"cannot find the {name} package to build the node wheel")
    return Path(list(spec.submodule_search_locations)[0])


def _tree(root: Path) -> list[tuple[str, Path]]:
    if root.is_file():
        return [("", root)]
    out = []
    for p in sorted(root.rglob("*")):
        rel = p.relative_to(root)
        if (
            not p.is_file()
            or SKIP_DIRS & set(rel.parts)
            or p.name.endswith(SKIP_SUFFIXES)
            or any(part.startswith(".") for part in rel.parts)
        ):
            continue
        out.append((rel.as_posix(), p))
    return out


def project_files() -> dict[str, Path]:
    """{path inside the wheel: file} for every file the node wheel carries."""
    files: dict[str, Path] = {}
    for name in PACKAGES:
        for rel, path in _tree(_package_dir(name)):
            files[f"{name}/{rel}"] = path
    for repo_rel, bundled in resources._LAYOUT.items():
        src = resources.resource_path(repo_rel)
        if not src.exists():
            continue
        for rel, path in _tree(src):
            arc = f"megafleet/_bundled/{bundled}" + (f"/{rel}" if rel else "")
            files.setdefault(arc, path)
    return dict(sorted(files.items()))


def _metadata(version: str) -> dict[str, bytes]:
    dist = f"megafleet-{version}.dist-info"
    return {
        f"{dist}/METADATA": (
            f"Metadata-Version: 2.1\nName: megafleet\nVersion: {version}\n"
            "Summary: megafleet node runtime (built by megafleet setup from the "
            "operator's code)\nRequires-Python: >=3.10\n"
        ).encode(),
        f"{dist}/WHEEL": (
            b"Wheel-Version: 1.0\nGenerator: megafleet.setup.wheel\n"
            b"Root-Is-Purelib: true\nTag: py3-none-any\n"
        ),
    }


def _record_line(arc: str, data: bytes) -> str:
    digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
    return f"{arc},sha256={digest},{len(data)}"


def wheel_bytes(version: str = __version__) -> bytes:
    entries = {arc: path.read_bytes() for arc, path in project_files().items()}
    entries.update(_metadata(version))
    record_arc = f"megafleet-{version}.dist-info/RECORD"
    record = "\n".join([_record_line(a, d) for a, d in entries.items()] + [f"{record_arc},,", ""])
    entries[record_arc] = record.encode()
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:
        for arc, data in entries.items():
            info = zipfile.ZipInfo(arc, ZIP_TIME)
            info.external_attr = 0o644 << 16
            info.compress_type = zipfile.ZIP_DEFLATED
            zf.writestr(info, data)
    return buf.getvalue()


def build_project_wheel(dest_dir: str | Path) -> tuple[Path, str]:
    """Write the node wheel into `dest_dir`; returns (path, sha256). Rewrites only on change."""
    data = wheel_bytes()
    sha = hashlib.sha256(data).hexdigest()
    dest = Path(dest_dir) / wheel_name()
    dest.parent.mkdir(parents=True, exist_ok=True)
    if not dest.exists() or hashlib.sha256(dest.read_bytes()).hexdigest() != sha:
        tmp = dest.with_name(dest.name + ".tmp")
        tmp.write_bytes(data)
        tmp.replace(dest)
    return dest, sha
