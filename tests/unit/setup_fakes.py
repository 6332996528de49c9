"""Fakes for the node-setup tests: a venv laid out like one holding a CUDA torch from NVIDIA's
wheels (torch/version.py, dist-info, site-packages/nvidia/{cudnn,nccl}/include and lib), and a
CUDA toolkit root with an `nvcc` STUB. No GPU, no real CUDA: only what the TE build planning
reads (paths, headers, version macros) is faked; the planning code itself runs for real."""

from __future__ import annotations

from pathlib import Path

from tests.unit.envcheck_fakes import make_venv, site_packages, write_nvidia_headers


def fake_cuda_venv(
    root: Path, torch_version: str = "2.11.0+cu130", cuda: str | None = "13.0", headers: bool = True
) -> tuple[Path, Path]:
    """(venv, site-packages) of a real venv holding a fake CUDA torch and NVIDIA's headers."""
    venv = make_venv(root)
    sp = site_packages(venv)
    (sp / "torch").mkdir()
    (sp / "torch" / "version.py").write_text(
        f"__version__ = {torch_version!r}\ncuda: Optional[str] = {cuda!r}\n"
    )
    dist = sp / f"torch-{torch_version}.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text(
        f"Metadata-Version: 2.1\nName: torch\nVersion: {torch_version}\n"
    )
    if headers:
        write_nvidia_headers(sp)
    return venv, sp


def fake_cuda_home(root: Path) -> Path:
    """A CUDA toolkit root as find_cuda_home() recognises it, with a STUB nvcc."""
    (root / "bin").mkdir(parents=True)
    (root / "include").mkdir()
    (root / "include" / "cuda_runtime.h").write_text("/* stub */\n")
    nvcc = root / "bin" / "nvcc"
    nvcc.write_text("#!/bin/sh\necho 'Cuda compilation tools, release 13.0, V13.0.88'\n")
    nvcc.chmod(0o755)
    return root
