"""Fake venvs for the environment-check tests: a real venv (made by `python -m venv`), holding
stand-ins for packages a CI machine cannot have (a CUDA torch, transformer-engine) and the
`site-packages/nvidia/{cudnn,nccl}` header layout of NVIDIA's wheels.

The stand-ins expose exactly the attributes the check script's probes read, with the values a
GPU machine reports; everything else in the check runs for real.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]
SCRIPT = REPO_ROOT / "scripts" / "check_megatron_env.py"
SCHEMA = REPO_ROOT / "scripts" / "check_megatron_env.schema.json"

FAKE_TORCH = """\
__version__ = {version!r}


class version:
    cuda = {cuda!r}


class backends:
    class cudnn:
        @staticmethod
        def version():
            return {cudnn!r}


class _Props:
    def __init__(self, name, major, minor, mib):
        self.name, self.major, self.minor = name, major, minor
        self.total_memory = mib * 1024 * 1024


class cuda:
    _gpus = {gpus!r}

    class nccl:
        @staticmethod
        def version():
            return {nccl!r}

    @staticmethod
    def get_arch_list():
        return {arch!r}

    @staticmethod
    def is_available():
        return bool(cuda._gpus)

    @staticmethod
    def device_count():
        return len(cuda._gpus)

    @staticmethod
    def get_device_properties(i):
        return _Props(*cuda._gpus[i])
"""


def make_venv(root: Path, python: str | None = None) -> Path:
    """A real, empty venv (no pip: creating it takes a tenth of a second)."""
    subprocess.run([python or sys.executable, "-m", "venv", "--without-pip", str(root)], check=True)
    return root


def site_packages(venv: Path) -> Path:
    (sp,) = sorted(venv.glob("lib/python3*/site-packages"))
    return sp


def write_module(sp: Path, dotted: str, source: str) -> None:
    parts = dotted.split(".")
    pkg = sp.joinpath(*parts)
    pkg.mkdir(parents=True, exist_ok=True)
    for i in range(1, len(parts)):
        init = sp.joinpath(*parts[:i], "__init__.py")
        if not init.exists():
            init.write_text("")
    (pkg / "__init__.py").write_text(source)


def write_fake_torch(
    sp: Path,
    version: str = "2.11.0+cu130",
    cuda: str | None = "13.0",
    cudnn: int | None = 91002,
    nccl=(2, 27, 7),
    arch=("sm_80", "sm_90", "sm_100", "sm_120"),
    gpus=(("NVIDIA H200", 9, 0, 143771), ("NVIDIA H200", 9, 0, 143771)),
) -> None:
    write_module(
        sp,
        "torch",
        FAKE_TORCH.format(
            version=version,
            cuda=cuda,
            cudnn=cudnn,
            nccl=tuple(nccl),
            arch=list(arch),
            gpus=[tuple(g) for g in gpus],
        ),
    )


def write_fake_version_package(sp: Path, module: str, version: str) -> None:
    write_module(sp, module, f"__version__ = {version!r}\n")


def write_nvidia_headers(
    sp: Path,
    cudnn: str | None = "9.10.2",
    nccl: str | None = "2.27.7",
    cudnn_dir: str = "cudnn",
    nccl_dir: str = "nccl",
) -> dict:
    """NVIDIA's wheel layout: nvidia/<dir>/include/<header> and nvidia/<dir>/lib/lib*.so.N."""
    made = {}
    if cudnn:
        major, minor, patch = cudnn.split(".")
        root = sp / "nvidia" / cudnn_dir
        (root / "include").mkdir(parents=True, exist_ok=True)
        (root / "lib").mkdir(parents=True, exist_ok=True)
        (root / "include" / "cudnn.h").write_text('#include "cudnn_version.h"\n')
        (root / "include" / "cudnn_version.h").write_text(
            f"#define CUDNN_MAJOR {major}\n#define CUDNN_MINOR {minor}\n"
            f"#define CUDNN_PATCHLEVEL {patch}\n"
        )
        (root / "lib" / f"libcudnn.so.{major}").write_bytes(b"")
        made["cudnn"] = root
    if nccl:
        major, minor, patch = nccl.split(".")
        root = sp / "nvidia" / nccl_dir
        (root / "include").mkdir(parents=True, exist_ok=True)
        (root / "lib").mkdir(parents=True, exist_ok=True)
        (root / "include" / "nccl.h").write_text(
            f"#define NCCL_MAJOR {major}\n#define NCCL_MINOR {minor}\n#define NCCL_PATCH {patch}\n"
            '#define NCCL_SUFFIX ""\n'
        )
        (root / "lib" / f"libnccl.so.{major}").write_bytes(b"")
        made["nccl"] = root
    return made


def run_script(
    python: str | Path,
    *args: str,
    env: dict | None = None,
    cwd: Path | None = None,
    timeout: float = 300,
) -> subprocess.CompletedProcess:
    return subprocess.run(
        [str(python), str(SCRIPT), *args],
        capture_output=True,
        text=True,
        env=env,
        cwd=cwd,
        timeout=timeout,
    )


def run_json(python: str | Path, *args: str, **kw) -> tuple[subprocess.CompletedProcess, dict]:
    proc = run_script(python, "--json", *args, **kw)
    try:
        return proc, json.loads(proc.stdout)
    except json.JSONDecodeError:
        raise AssertionError(f"not JSON (rc={proc.returncode}):\n{proc.stdout}\n{proc.stderr}")


def checks_by_id(report: dict) -> dict:
    return {c["id"]: c for c in report["checks"]}


def schema_validator():
    import jsonschema

    return jsonschema.Draft202012Validator(json.loads(SCHEMA.read_text()))
