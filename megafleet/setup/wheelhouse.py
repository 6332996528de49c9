"""`megafleet setup --build-wheelhouse DIR`: every wheel a node needs, fetched on a connected
machine for the node's Python and platform, plus the project wheel; `--wheelhouse DIR` then
installs from it with no index at all.

`pip download` runs with this machine's pip configuration on purpose (a mirror or a local
find-links folder is how a connected machine reaches packages); the nodes' installs are the
ones isolated from configuration. A manifest (megafleet-wheelhouse.json) records the inputs:
building again with the same inputs, when every file is still there, downloads nothing.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

from megafleet.errors import MegafleetError
from megafleet.jobs.sync import local_sha256
from megafleet.setup.request import node_requirements, torch_requirement
from megafleet.setup.wheel import build_project_wheel

MANIFEST = "megafleet-wheelhouse.json"
DEFAULT_PLATFORMS = (
    "manylinux_2_28_x86_64",
    "manylinux_2_17_x86_64",
    "manylinux2014_x86_64",
    "linux_x86_64",
)
PYTORCH_INDEX = "https://download.pytorch.org/whl/%s"


def download_argv(
    dest: Path,
    python_version: str,
    platforms,
    requirements,
    index_url=None,
    find_links: Path | None = None,
) -> list[str]:
    argv = [
        sys.executable,
        "-m",
        "pip",
        "download",
        "--dest",
        str(dest),
        "--only-binary=:all:",
        "--python-version",
        python_version,
        "--implementation",
        "cp",
    ]
    for p in platforms:
        argv += ["--platform", p]
    if index_url:
        argv += ["--index-url", index_url]
    if find_links:
        argv += ["--find-links", str(find_links)]
    return argv + list(requirements)


def _pip(argv: list[str]) -> None:
    proc = subprocess.run(argv, capture_output=True, text=True)
    if proc.returncode != 0:
        tail = "\n".join((proc.stderr or proc.stdout).strip().splitlines()[-15:])
        raise MegafleetError(
            f"pip download failed ({proc.returncode}):\n{tail}",
            hint="check the requirement, --python-version and --platform; the "
            "machine building a wheelhouse needs access to its index",
        )


def _up_to_date(dest: Path, inputs: dict) -> bool:
    try:
        manifest = json.loads((dest / MANIFEST).read_text())
    except (OSError, ValueError):
        return False
    if manifest.get("inputs") != inputs:
        return False
    return all(
        (dest / name).is_file() and (dest / name).stat().st_size == size
        for name, (size, _sha) in manifest.get("files", {}).items()
    )


def build_wheelhouse(
    dest: str | Path,
    python_version: str | None = None,
    platforms=DEFAULT_PLATFORMS,
    torch_spec: str | None = None,
    torch_index: str | None = None,
) -> dict:
    """Fill `dest`; returns {"dir", "files", "bytes", "downloaded", "seconds", "inputs"}."""
    started = time.monotonic()
    dest = Path(dest).expanduser().absolute()
    dest.mkdir(parents=True, exist_ok=True)
    python_version = python_version or "%d.%d" % sys.version_info[:2]
    inputs = {
        "python_version": python_version,
        "platforms": list(platforms),
        "torch": torch_spec or torch_requirement(),
        "torch_index": torch_index,
        "requirements": node_requirements(),
    }
    downloaded = not _up_to_date(dest, inputs)
    if downloaded:
        reqs = inputs["requirements"]
        if torch_index:  # torch (and its CUDA wheels) from PyTorch's index, the rest from PyPI
            url = torch_index if "://" in torch_index else PYTORCH_INDEX % torch_index
            _pip(download_argv(dest, python_version, platforms, [inputs["torch"]], url))
            _pip(
                download_argv(
                    dest, python_version, platforms, reqs + [_pinned_torch(dest)], find_links=dest
                )
            )
        else:
            _pip(download_argv(dest, python_version, platforms, [inputs["torch"]] + reqs))
    build_project_wheel(dest)
    files = {
        p.name: [p.stat().st_size, local_sha256(p)]
        for p in sorted(dest.iterdir())
        if p.is_file() and p.name != MANIFEST and not p.name.endswith(".tmp")
    }
    (dest / MANIFEST).write_text(
        json.dumps(
            {
                "format": 1,
                "inputs": inputs,
                "files": files,
                "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            },
            indent=1,
        )
    )
    return {
        "dir": str(dest),
        "files": len(files),
        "bytes": sum(s for s, _ in files.values()),
        "downloaded": downloaded,
        "seconds": round(time.monotonic() - started, 1),
        "inputs": inputs,
    }


def _pinned_torch(dest: Path) -> str:
    wheels = sorted(dest.glob("torch-*.whl"))
    if not wheels:
        raise MegafleetError(f"no torch wheel arrived in {dest}")
    return "torch==" + wheels[-1].name.split("-")[1]
