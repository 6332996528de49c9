#!/usr/bin/env python3
"""Check that this machine can run megafleet's Megatron training runtime, and say how to fix it.

Standalone: standard library only, any Python >= 3.8. Run it with the Python of the venv that
will train (that is the environment being checked). Every package is imported in its own
subprocess with a timeout, so an import that hangs, raises or even segfaults becomes a failed
check instead of killing the report. Nothing is installed, cloned, downloaded or written
(probes run with PYTHONDONTWRITEBYTECODE=1 and the Hugging Face libraries in offline mode).

Usage:
  check_megatron_env.py [--json] [--require-te] [--cpu-ok] [--workdir DIR]... [--timeout S]
  check_megatron_env.py --print-te-env [--venv DIR] [--json]

  --json          one JSON document on stdout (schema below), nothing else there
  --require-te    transformer-engine becomes a required check (the runtime works without it)
  --cpu-ok        a machine without CUDA GPUs is acceptable (CPU smoke runs, CI): the GPU,
                  driver and CUDA checks become optional
  --workdir DIR   a directory whose free disk space is checked (repeatable; default: cwd)
  --timeout S     seconds each package probe may take (default 180)
  --print-te-env  print only the `export ...` lines needed to build transformer-engine
                  against this venv's cuDNN/NCCL headers (exit 1 when something is missing)
  --venv DIR      with --print-te-env: plan for that venv instead of this interpreter's

Exit codes: 0 every required check passed; 1 a required check failed (or, with
--print-te-env, a header or nvcc is missing); 2 usage error.

JSON document (JSON Schema: check_megatron_env.schema.json beside this script):
  schema        "megafleet.envcheck/1"; a change that breaks readers bumps the number
  script_version, created (UTC ISO 8601), duration_s
  host          {hostname, platform, machine, python: {executable, version, prefix, in_venv}}
  options       {require_te, cpu_ok, workdirs: [absolute paths], timeout_s}
  summary       {ok, exit_code, counts: {pass, warn, fail, skip}, failed_required: [check ids]}
  facts         flat, comparable values for cross-host comparison, each null when unknown:
                python, torch, torch_cuda, cuda_available, gpu_count,
                gpus: [{index, name, capability "9.0", memory_mib}], driver, driver_cuda,
                nvcc, cuda_home, cudnn_runtime, nccl_runtime, cudnn_headers, nccl_headers,
                transformer_engine, megatron_core, apex, flash_attn, transformers,
                safetensors, tokenizers, peft
  te_build_env  {vars: {NAME: value}, export_lines: [...], missing: [...],
                cudnn: location|null, nccl: location|null} where a location is
                {name, root, include_dir, lib_dir, header, version, source, libraries}
  checks        [{id, title, level: required|optional, status: pass|warn|fail|skip,
                detail (one line), fix (commands or advice with absolute paths, or null),
                data: {check-specific values}}]
  Check ids are stable; one id per check, except `disk.free:<absolute path>`, one per workdir.

Reusable from other tools (the operator loads this file with `megafleet.envcheck.
load_check_script()`; on a node, `--print-te-env [--venv DIR] [--json]` gives the same plan):
  plan_te_build(site_dirs)            the whole `te_build_env` section for a venv
  venv_site_packages(venv)            a venv's site-packages directories
  find_library_headers(name, site_dirs, environ, cuda_home, system_prefixes)
                                      cudnn.h / nccl.h, venv's nvidia/* wheels first
  find_cuda_home(environ, which)      (CUDA_HOME, nvcc, how found)
  te_build_env(cudnn, nccl, cuda_home, max_jobs, base_env), export_lines(vars)
  recommended_max_jobs(cpus, mem_available_bytes)
  te_flash_attn_limits(te_package_dir) the flash-attn range an installed TE accepts
  flash_attn_spec(limits, capabilities) that range as a pip version specifier
  driver_max_cuda(driver), cuda_driver_compat(driver, cuda), torch_index_for_cuda(cuda)
  parse_version(text), version_satisfies(version, spec), SUPPORTED_MEGATRON_CORE
  collect_report(Options(...))        the JSON document as a dict
"""

from __future__ import annotations

import argparse
import concurrent.futures
import datetime
import importlib
import json
import os
import platform
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import time
from dataclasses import asdict, dataclass, field
from typing import Callable, Dict, Iterable, List, Optional, Sequence, Tuple

SCHEMA_ID = "megafleet.envcheck/1"
SCRIPT_VERSION = "1.0"

MIN_PYTHON = (3, 10)  # megatron-core 0.16 and the runtime need 3.10+
# The one place the supported megatron-core range lives; pyproject's runtime extra must match
# (a unit test keeps them equal) and node setup reads it from here.
SUPPORTED_MEGATRON_CORE = ">=0.16,<0.17"
# The runtime's other requirements (pyproject's `runtime` extra; a unit test keeps them equal).
RUNTIME_REQUIREMENTS = {
    "torch": ">=2.6",
    "transformers": ">=4.56",
    "safetensors": ">=0.4",
    "tokenizers": ">=0.21",
}

DISK_FAIL_GIB = 10  # below this a checkpoint save fails
DISK_WARN_GIB = 100  # a 30B model's HF checkpoint alone is ~60 GB
SHM_FAIL_GIB = 1  # Docker's 64 MiB default breaks NCCL's shared-memory transport
SHM_WARN_GIB = 8
BUILD_JOB_MEMORY_GIB = 6  # peak RSS of one nvcc job compiling TE / flash-attn kernels
DEFAULT_PROBE_TIMEOUT = 180.0

# Linux x86_64 minimum driver of each CUDA toolkit's GA release (NVIDIA's CUDA release notes,
# "CUDA Toolkit and Corresponding Driver Versions"). Read as: a driver >= this supports that CUDA.
DRIVER_TABLE = (
    ("13.1", "590.44.01"),
    ("13.0", "580.65.06"),
    ("12.9", "575.51.03"),
    ("12.8", "570.26"),
    ("12.6", "560.28.03"),
    ("12.5", "555.42.02"),
    ("12.4", "550.54.14"),
    ("12.3", "545.23.06"),
    ("12.2", "535.54.03"),
    ("12.1", "530.30.02"),
    ("12.0", "525.60.13"),
    ("11.8", "520.61.05"),
    ("11.7", "515.43.04"),
    ("11.6", "510.39.01"),
    ("11.5", "495.29.05"),
    ("11.4", "470.42.01"),
    ("11.3", "465.19.01"),
    ("11.2", "460.27.03"),
    ("11.1", "455.23"),
    ("11.0", "450.36.06"),
)
# Minor-version compatibility: any CUDA X.y application runs on a driver of at least this
# version, except features that need PTX JIT or newer driver APIs.
MINOR_COMPAT_MIN_DRIVER = {11: "450.80.02", 12: "525.60.13", 13: "580.65.06"}
# PyTorch wheel indexes (https://download.pytorch.org/whl/<tag>), newest CUDA first.
TORCH_CUDA_INDEXES = (
    ("13.0", "cu130"),
    ("12.9", "cu129"),
    ("12.8", "cu128"),
    ("12.6", "cu126"),
    ("12.4", "cu124"),
    ("12.1", "cu121"),
    ("11.8", "cu118"),
)

SECRET_NAME = re.compile(r"KEY|SECRET|TOKEN|PASSW|CREDENTIAL|AUTH|PRIVATE|CERT", re.I)
REPORTED_ENV_PREFIXES = ("NCCL_", "TORCH_NCCL_", "FI_")

STATUSES = ("pass", "warn", "fail", "skip")
REQUIRED, OPTIONAL = "required", "optional"


# ------------------------------------------------------------------------------------ model


@dataclass
class Check:
    """One row of the report. `detail` is one line; `fix` may hold several command lines."""

    id: str
    title: str
    level: str
    status: str
    detail: str
    fix: Optional[str] = None
    data: Dict[str, object] = field(default_factory=dict)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["detail"] = " ".join(str(self.detail).split())  # the schema promises one line
        return d


@dataclass
class Options:
    require_te: bool = False
    cpu_ok: bool = False
    workdirs: List[str] = field(default_factory=list)
    timeout: float = DEFAULT_PROBE_TIMEOUT
    python: str = sys.executable
    site_dirs: Optional[List[str]] = None  # default: this interpreter's site-packages
    environ: Optional[Dict[str, str]] = None  # default: os.environ


def gpu_level(opts: Options) -> str:
    return OPTIONAL if opts.cpu_ok else REQUIRED


# --------------------------------------------------------------------------------- versions

_VERSION_RE = re.compile(
    r"^\s*v?(?:(\d+)!)?(\d+(?:\.\d+)*)"  # epoch, release
    r"(?:[-_.]?(a|alpha|b|beta|rc|c|pre|preview)[-_.]?(\d*))?"  # pre-release
    r"(?:-(\d+)|[-_.]?(?:post|rev|r)[-_.]?(\d*))?"  # post-release
    r"(?:[-_.]?dev[-_.]?(\d*))?"  # dev release
    r"(?:\+[a-z0-9._-]+)?\s*$",  # local version (ignored in comparisons)
    re.I,
)
_PRE_RANK = {"a": 0, "alpha": 0, "b": 1, "beta": 1, "rc": 2, "c": 2, "pre": 2, "preview": 2}


def parse_version(text: Optional[str]) -> Optional[tuple]:
    """A sortable key for a PEP 440 version ("2.11.0+cu130", "2.7.4.post1", "0.16.0rc0"), or
    None when `text` is not a version. Trailing zeros do not matter: 0.16 == 0.16.0."""
    if text is None:
        return None
    m = _VERSION_RE.match(str(text))
    if not m:
        return None
    epoch, release, pre_l, pre_n, post_a, post_b, dev = m.groups()
    nums = [int(x) for x in release.split(".")]
    while len(nums) > 1 and nums[-1] == 0:
        nums.pop()
    post = post_a if post_a is not None else post_b
    if pre_l:
        pre = (0, _PRE_RANK[pre_l.lower()], int(pre_n or 0))
    elif dev is not None and post is None:
        pre = (-1, 0, 0)  # 1.0.dev1 sorts before 1.0a1
    else:
        pre = (1, 0, 0)
    post_key = -1 if post is None else int(post or 0)
    dev_key = (1, 0) if dev is None else (0, int(dev or 0))
    return (int(epoch or 0), tuple(nums), pre, post_key, dev_key)


def version_satisfies(version: Optional[str], spec: str) -> bool:
    """Whether `version` meets a comma-separated specifier such as ">=0.16,<0.17" (operators
    >=, <=, >, <, ==, !=; == and != compare releases only). False for an unparsable version."""
    key = parse_version(version)
    if key is None:
        return False
    for part in [p.strip() for p in spec.split(",") if p.strip()]:
        m = re.match(r"^(>=|<=|==|!=|>|<)\s*(.+)$", part)
        if not m:
            raise ValueError("bad version specifier %r" % part)
        op, bound = m.group(1), parse_version(m.group(2))
        if bound is None:
            raise ValueError("bad version in specifier %r" % part)
        ok = {
            ">=": key >= bound,
            "<=": key <= bound,
            ">": key > bound,
            "<": key < bound,
            "==": key[:2] == bound[:2],
            "!=": key[:2] != bound[:2],
        }[op]
        if not ok:
            return False
    return True


def major_minor(version: Optional[str]) -> Optional[Tuple[int, int]]:
    m = re.match(r"^\s*(\d+)(?:\.(\d+))?", version or "")
    return (int(m.group(1)), int(m.group(2) or 0)) if m else None


def release_tuple(version: Optional[str]) -> Optional[Tuple[int, ...]]:
    m = re.match(r"^\s*(\d+(?:\.\d+)*)", version or "")
    return tuple(int(x) for x in m.group(1).split(".")) if m else None


# ------------------------------------------------------------------------ driver and CUDA


def driver_max_cuda(driver: Optional[str]) -> Optional[str]:
    """The newest CUDA ("13.0") whose GA minimum driver `driver` ("580.159.04") meets, per
    DRIVER_TABLE; None for an unknown or too old driver."""
    have = release_tuple(driver)
    if have is None:
        return None
    for cuda, minimum in DRIVER_TABLE:
        if have >= release_tuple(minimum):
            return cuda
    return None


def cuda_driver_compat(
    driver: Optional[str], cuda: Optional[str], driver_cuda: Optional[str] = None
) -> Tuple[str, str]:
    """(status, explanation) for running code built for CUDA `cuda` on driver `driver`.

    `driver_cuda` is the CUDA version the driver reports itself (nvidia-smi's header); it wins
    over the table, which cannot know drivers newer than this script."""
    want = major_minor(cuda)
    if want is None:
        return "skip", "no CUDA version to compare"
    if release_tuple(driver) is None:
        return "fail", "no NVIDIA driver found"
    supported = driver_cuda or driver_max_cuda(driver)
    have = major_minor(supported)
    if have is not None and have >= want:
        return "pass", "driver %s supports CUDA %s (needs %s)" % (driver, supported, cuda)
    floor = MINOR_COMPAT_MIN_DRIVER.get(want[0])
    if (
        have is not None
        and have[0] == want[0]
        and floor
        and release_tuple(driver) >= release_tuple(floor)
    ):
        return "warn", (
            "driver %s supports CUDA %s; CUDA %s code runs through minor-version "
            "compatibility (kernels that need PTX JIT may fail)" % (driver, supported, cuda)
        )
    return "fail", "driver %s supports CUDA %s at most, torch needs CUDA %s" % (
        driver,
        supported or "<11.0",
        cuda,
    )


def min_driver_for_cuda(cuda: str) -> Optional[str]:
    want = major_minor(cuda)
    for version, minimum in sorted(DRIVER_TABLE, key=lambda r: major_minor(r[0])):
        if major_minor(version) >= want:
            return minimum
    return None


def torch_index_for_cuda(max_cuda: Optional[str]) -> Optional[str]:
    """The newest PyTorch wheel index (cu130, cu128, ...) a driver supporting `max_cuda` runs."""
    have = major_minor(max_cuda)
    for cuda, tag in TORCH_CUDA_INDEXES:
        if have is not None and major_minor(cuda) <= have:
            return tag
    return None


def parse_arch(name: str) -> Optional[Tuple[str, int, int, str]]:
    """'sm_90a' -> ('sm', 9, 0, 'a'); 'compute_120' -> ('compute', 12, 0, '')."""
    m = re.match(r"^(sm|compute)_(\d+)(\d)([a-z]?)$", name.strip())
    return (m.group(1), int(m.group(2)), int(m.group(3)), m.group(4)) if m else None


def arch_coverage(arch_list: Sequence[str], capability: Tuple[int, int]) -> Tuple[str, str]:
    """Whether torch's compiled arch list runs on a GPU of `capability` (major, minor)."""
    major, minor = capability
    archs = [a for a in (parse_arch(x) for x in arch_list) if a]
    for kind, ma, mi, suffix in archs:
        if kind == "sm" and (ma, mi) == (major, minor):
            return "pass", "native kernels (sm_%d%d%s)" % (ma, mi, suffix)
    for kind, ma, mi, suffix in archs:
        if kind == "sm" and ma == major and mi < minor and suffix != "a":
            return "pass", "sm_%d%d kernels run on %d.%d" % (ma, mi, major, minor)
    for kind, ma, mi, suffix in archs:
        if kind == "compute" and (ma, mi) <= (major, minor) and not suffix:
            return "warn", "only PTX (compute_%d%d): JIT-compiled at first use" % (ma, mi)
    return "fail", "no kernels for sm_%d%d in torch's arch list" % (major, minor)


def decode_cudnn_version(value: object) -> Optional[str]:
    """torch.backends.cudnn.version() -> "9.10.2" (91002 since cuDNN 9, 8902 before)."""
    if not isinstance(value, int) or value <= 0:
        return None
    if value >= 90000:
        return "%d.%d.%d" % (value // 10000, value % 10000 // 100, value % 100)
    return "%d.%d.%d" % (value // 1000, value % 1000 // 100, value % 100)


def decode_nccl_version(value: object) -> Optional[str]:
    """torch.cuda.nccl.version() -> "2.27.7" (a tuple in new torch, 22707 or 2708 before)."""
    if isinstance(value, (list, tuple)) and value:
        return ".".join(str(x) for x in value[:3])
    if isinstance(value, int) and value > 0:
        if value >= 10000:
            return "%d.%d.%d" % (value // 10000, value % 10000 // 100, value % 100)
        return "%d.%d.%d" % (value // 1000, value % 1000 // 100, value % 100)
    return None


# ------------------------------------------------------------------------- nvidia-smi, nvcc

SMI_FIELDS = ("index", "name", "uuid", "memory.total", "driver_version", "compute_cap")


def parse_smi_csv(text: str, fields: Optional[Sequence[str]] = None) -> List[Dict[str, str]]:
    """Rows of `nvidia-smi --query-gpu=... --format=csv[,noheader][,nounits]` as dicts.

    Without `fields` the first line is the header; units in the header ("memory.total [MiB]")
    and in values ("143771 MiB") are dropped."""
    lines = [ln for ln in text.splitlines() if ln.strip()]
    if fields is None:
        if not lines:
            return []
        fields = [re.sub(r"\s*\[.*\]$", "", h.strip()) for h in lines[0].split(",")]
        lines = lines[1:]
    rows = []
    for line in lines:
        values = [v.strip() for v in line.split(",")]
        if len(values) != len(fields):
            continue
        row = {}
        for name, value in zip(fields, values):
            m = re.match(r"^(-?[\d.]+) (MiB|W|%|C)$", value)
            row[name] = m.group(1) if m else value
        rows.append(row)
    return rows


def parse_smi_header(text: str) -> Dict[str, Optional[str]]:
    """Driver and CUDA versions from plain `nvidia-smi` output."""
    drv = re.search(r"Driver Version:\s*([\d.]+)", text)
    cuda = re.search(r"CUDA Version:\s*([\d.]+)", text)
    return {"driver": drv.group(1) if drv else None, "cuda": cuda.group(1) if cuda else None}


def parse_proc_driver_version(text: str) -> Optional[str]:
    """The driver version from /proc/driver/nvidia/version ("... Kernel Module  580.159.04 ...")."""
    m = re.search(r"Kernel Module(?:\s+for\s+\S+)?\s+(\d+\.\d+(?:\.\d+)?)", text)
    return m.group(1) if m else None


def parse_nvcc_version(text: str) -> Optional[str]:
    """ "13.0" from `nvcc --version` ("Cuda compilation tools, release 13.0, V13.0.88")."""
    m = re.search(r"release\s+(\d+\.\d+)", text)
    return m.group(1) if m else None


# -------------------------------------------------------------------------- subprocesses


@dataclass
class CommandResult:
    returncode: Optional[int]  # None when it could not start or timed out
    stdout: str = ""
    stderr: str = ""
    error: Optional[str] = None  # why it did not run or finish

    @property
    def ok(self) -> bool:
        return self.returncode == 0


def describe_returncode(rc: Optional[int]) -> str:
    if rc is None:
        return "did not finish"
    if rc < 0:
        try:
            return "killed by %s" % signal.Signals(-rc).name
        except ValueError:
            return "killed by signal %d" % -rc
    return "exited with status %d" % rc


def run_command(
    argv: Sequence[str],
    timeout: float,
    env: Optional[Dict[str, str]] = None,
) -> CommandResult:
    """Run a command without a shell; never raises. On timeout its whole process group is
    killed (nvidia-smi on a wedged driver, an import that spawns helpers)."""
    try:
        proc = subprocess.Popen(
            list(argv),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            stdin=subprocess.DEVNULL,
            env=env,
            start_new_session=True,
        )
    except OSError as exc:
        return CommandResult(None, error="cannot run %s: %s" % (argv[0], exc.strerror or exc))
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except OSError:
            pass
        out, err = proc.communicate()
        return CommandResult(None, _text(out), _text(err), "timed out after %gs" % timeout)
    return CommandResult(proc.returncode, _text(out), _text(err))


def _text(data: Optional[bytes]) -> str:
    return (data or b"").decode("utf-8", "replace")


def tail(text: str, lines: int = 3, width: int = 300) -> str:
    kept = [ln.strip() for ln in text.strip().splitlines() if ln.strip()][-lines:]
    return " | ".join(kept)[-width:]


# --------------------------------------------------------------------------------- probes
# A probe is this same file run as `python check_megatron_env.py --probe KIND SPEC` by the
# interpreter under test. It reports through a private copy of stdout, one JSON line per step
# ("stage" when a step starts, then its value or its error), and sends everything the probed
# packages print to stderr. When it crashes, the steps before the crash are still known.

PROBE_MARK = "@@megafleet-probe "
PROBE_ENV = {
    "PYTHONDONTWRITEBYTECODE": "1",  # no __pycache__ writes: the check has no side effects
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "HF_HUB_DISABLE_TELEMETRY": "1",
    "PYTHONWARNINGS": "ignore",
}


class ProbeChannel:
    def __init__(self, stream):
        self.stream = stream

    def emit(self, key: str, value: object) -> None:
        self.stream.write(PROBE_MARK + json.dumps({"k": key, "v": value}, default=str) + "\n")
        self.stream.flush()

    def step(self, name: str, fn: Callable[[], object], record: bool = True):
        """Run one step; returns (ok, value). Its value (if `record`) or error is emitted."""
        self.emit("stage", name)
        try:
            value = fn()
        except BaseException as exc:  # a probe reports every failure, SystemExit included
            self.emit(
                "error",
                {
                    "stage": name,
                    "type": type(exc).__name__,
                    "message": " ".join(str(exc).split())[:500],
                },
            )
            return False, None
        self.emit("done", {"stage": name, "value": value if record else None})
        return True, value


def _dist_version(names: Sequence[str]) -> Optional[str]:
    import importlib.metadata as md

    for name in names:
        try:
            return md.version(name)
        except md.PackageNotFoundError:
            continue
    return None


def _module_version(module) -> Optional[str]:
    version = getattr(module, "__version__", None)
    return str(version) if version is not None else None


def probe_package(ch: ProbeChannel, spec: dict) -> None:
    """Import a package, read its version, then import each named compiled extension."""
    ch.step("dist_version", lambda: _dist_version(spec.get("dists") or [spec["module"]]))
    ok, module = ch.step("import", lambda: importlib.import_module(spec["module"]), record=False)
    if not ok:
        return
    ch.step("version", lambda: _module_version(module))
    ch.step("file", lambda: getattr(module, "__file__", None))
    for ext in spec.get("extensions", []):
        ch.step(
            "ext:" + ext, lambda ext=ext: getattr(importlib.import_module(ext), "__file__", None)
        )


def probe_torch(ch: ProbeChannel, spec: dict) -> None:
    ok, torch = ch.step("import", lambda: importlib.import_module("torch"), record=False)
    if not ok:
        return
    ch.step("version", lambda: torch.__version__)
    ch.step("file", lambda: torch.__file__)
    ch.step("cuda_build", lambda: torch.version.cuda)
    ch.step("cudnn", lambda: torch.backends.cudnn.version())
    ch.step("nccl", lambda: torch.cuda.nccl.version() if torch.version.cuda else None)
    ch.step("arch_list", lambda: list(torch.cuda.get_arch_list()))
    ok, available = ch.step("cuda_available", lambda: bool(torch.cuda.is_available()))
    ok, count = ch.step("device_count", lambda: int(torch.cuda.device_count()))
    for i in range(count or 0):
        ch.step("device:%d" % i, lambda i=i: _torch_device(torch, i))


def _torch_device(torch, index: int) -> dict:
    props = torch.cuda.get_device_properties(index)
    return {
        "index": index,
        "name": props.name,
        "capability": "%d.%d" % (props.major, props.minor),
        "memory_mib": int(props.total_memory // (1024 * 1024)),
    }


TE_DISTS = (
    "transformer_engine",
    "transformer-engine",
    "transformer_engine_torch",
    "transformer_engine_cu13",
    "transformer_engine_cu12",
)
# Where transformer-engine keeps its accepted flash-attn range, newest layout first.
TE_FLASH_FILES = (
    "pytorch/attention/dot_product_attention/utils.py",
    "pytorch/dot_product_attention/utils.py",
    "pytorch/attention.py",
    "pytorch/attention/__init__.py",
)


def te_flash_attn_limits(package_dir: str) -> Dict[str, Optional[str]]:
    """The flash-attn versions an installed transformer-engine accepts, read from its source
    (no import): {"min", "max", "min_blackwell", "file"}, values None when not found."""
    pattern = r"(?:_flash_attn_%s|\b%s)\s*=\s*PkgVersion\(\s*[\"']([^\"']+)[\"']"
    for rel in TE_FLASH_FILES:
        path = os.path.join(package_dir, rel)
        try:
            with open(path, encoding="utf-8", errors="replace") as fh:
                source = fh.read()
        except OSError:
            continue
        found = {
            key: re.search(pattern % (name, name), source)
            for key, name in (
                ("min", "version_required"),
                ("max", "max_version"),
                ("min_blackwell", "version_required_blackwell"),
            )
        }
        if found["max"] or found["min"]:
            limits = {k: (m.group(1) if m else None) for k, m in found.items()}
            limits["file"] = path
            return limits
    return {"min": None, "max": None, "min_blackwell": None, "file": None}


def flash_attn_spec(limits: Dict[str, Optional[str]], capabilities: Sequence[str] = ()) -> str:
    """The version specifier (">=2.1.1,<=2.8.1", "" when TE states none) for the flash-attn
    that transformer-engine's `limits` (te_flash_attn_limits) accept on GPUs of these compute
    capabilities ("9.0"): Blackwell (10.x and newer) needs TE's newer minimum."""
    low, high = limits.get("min"), limits.get("max")
    if limits.get("min_blackwell") and any(
        (major_minor(c) or (0, 0))[0] >= 10 for c in capabilities
    ):
        low = limits["min_blackwell"]
    return ",".join(s for s in (">=" + low if low else "", "<=" + high if high else "") if s)


def _te_package_dir() -> Optional[str]:
    import importlib.util

    spec = importlib.util.find_spec("transformer_engine")  # locates without importing
    if spec is None or not spec.submodule_search_locations:
        return None
    return list(spec.submodule_search_locations)[0]


def probe_te(ch: ProbeChannel, spec: dict) -> None:
    """transformer-engine: version, accepted flash-attn range, the torch extension and, on a
    GPU, one small causal attention call restricted to the fused (cuDNN) backend."""
    ch.step("dist_version", lambda: _dist_version(TE_DISTS))
    ok, package_dir = ch.step("package_dir", _te_package_dir)
    if ok and package_dir:
        ch.step("flash_limits", lambda: te_flash_attn_limits(package_dir))
    ok, te = ch.step("import", lambda: importlib.import_module("transformer_engine"), record=False)
    if not ok:
        return
    ch.step("version", lambda: _module_version(te))
    ok, _ = ch.step(
        "import_pytorch",
        lambda: importlib.import_module("transformer_engine.pytorch"),
        record=False,
    )
    if not ok:
        return
    ch.step(
        "extension",
        lambda: getattr(importlib.import_module("transformer_engine_torch"), "__file__", None),
    )
    ok, available = ch.step(
        "cuda_available", lambda: bool(importlib.import_module("torch").cuda.is_available())
    )
    if ok and available:
        ch.step("fused_attention", _te_fused_attention)


def _te_fused_attention() -> dict:
    # NVTE_FUSED_ATTN=1 with the flash and unfused backends off (set in the probe's
    # environment) makes TE use cuDNN's fused attention or raise.
    import torch
    import transformer_engine.pytorch as tep

    torch.manual_seed(0)
    seq, batch, heads, dim = 128, 2, 4, 64
    q, k, v = (
        torch.randn(seq, batch, heads, dim, device="cuda", dtype=torch.bfloat16) for _ in range(3)
    )
    attn = tep.DotProductAttention(heads, dim, attn_mask_type="causal", qkv_format="sbhd")
    out = attn(q, k, v)
    torch.cuda.synchronize()
    ref = torch.nn.functional.scaled_dot_product_attention(
        *(t.permute(1, 2, 0, 3).float() for t in (q, k, v)), is_causal=True
    )
    ref = ref.permute(2, 0, 1, 3).reshape(seq, batch, heads * dim)
    diff = float((out.float() - ref).abs().max())
    if not diff < 5e-2:
        raise RuntimeError("fused attention differs from torch SDPA by %g" % diff)
    return {"shape": list(out.shape), "max_abs_diff": diff}


PROBES = {"package": probe_package, "torch": probe_torch, "te": probe_te}


def probe_main(kind: str, spec_json: str) -> int:
    # Nothing beside this script may shadow a package being probed.
    here = os.path.dirname(os.path.abspath(__file__))
    sys.path[:] = [p for p in sys.path if p and os.path.abspath(p) != here]
    channel = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)  # what the probed packages print goes to stderr, not into the protocol
    PROBES[kind](ProbeChannel(channel), json.loads(spec_json))
    channel.flush()
    return 0


@dataclass
class ProbeResult:
    values: Dict[str, object] = field(default_factory=dict)
    errors: Dict[str, str] = field(default_factory=dict)
    crashed_in: Optional[str] = None  # the step that was running when the process died
    crash: Optional[str] = None  # "killed by SIGSEGV", "timed out after 180s", ...
    stderr_tail: str = ""

    def ok(self, step: str) -> bool:
        return step in self.values

    def absent(self, module: str) -> bool:
        """Whether the import failed because `module` itself is not installed (not because
        one of its dependencies is missing, and not because it crashed)."""
        top = re.escape(module.split(".")[0])
        return self.crash is None and bool(
            re.match(
                r"ModuleNotFoundError: No module named '%s(\.[\w.]+)?'$" % top,
                self.errors.get("import", ""),
            )
        )

    def failure(self, step: str) -> Optional[str]:
        """Why `step` did not succeed: its exception, or the crash that happened during it."""
        if step in self.errors:
            return self.errors[step]
        if self.crashed_in == step:
            return "%s while running this step" % self.crash + (
                " (%s)" % self.stderr_tail if self.stderr_tail else ""
            )
        return None


def parse_probe_output(stdout: str) -> ProbeResult:
    result = ProbeResult()
    running = None
    for line in stdout.splitlines():
        if not line.startswith(PROBE_MARK):
            continue
        try:
            msg = json.loads(line[len(PROBE_MARK) :])
        except ValueError:
            continue
        key, value = msg.get("k"), msg.get("v")
        if key == "stage":
            running = value
        elif key == "done":
            result.values[value["stage"]] = value["value"]
            running = None
        elif key == "error":
            result.errors[value["stage"]] = "%s: %s" % (value["type"], value["message"])
            running = None
    result.crashed_in = running
    return result


def run_probe(
    python: str,
    kind: str,
    spec: dict,
    timeout: float,
    extra_env: Optional[Dict[str, str]] = None,
    environ: Optional[Dict[str, str]] = None,
) -> ProbeResult:
    env = dict(os.environ if environ is None else environ)
    env.update(PROBE_ENV)
    env.update(extra_env or {})
    res = run_command(
        [python, os.path.abspath(__file__), "--probe", kind, json.dumps(spec)], timeout, env
    )
    result = parse_probe_output(res.stdout)
    if res.returncode != 0:
        result.crash = res.error or describe_returncode(res.returncode)
        result.stderr_tail = tail(res.stderr)
        if result.crashed_in is None:
            result.crashed_in = "start"
    return result


# (probe name, kind, spec); `extensions` are compiled modules imported after the package.
PACKAGE_PROBES = (
    ("torch", "torch", {}),
    ("transformer_engine", "te", {}),
    (
        "megatron_core",
        "package",
        {"module": "megatron.core", "dists": ["megatron-core", "megatron_core"]},
    ),
    (
        "apex",
        "package",
        {
            "module": "apex",
            "dists": ["apex"],
            "extensions": ["amp_C", "fused_layer_norm_cuda", "fused_weight_gradient_mlp_cuda"],
        },
    ),
    (
        "flash_attn",
        "package",
        {
            "module": "flash_attn",
            "dists": ["flash-attn", "flash_attn"],
            "extensions": ["flash_attn_2_cuda"],
        },
    ),
    ("transformers", "package", {"module": "transformers"}),
    ("safetensors", "package", {"module": "safetensors"}),
    ("tokenizers", "package", {"module": "tokenizers"}),
    ("peft", "package", {"module": "peft"}),
)
TE_PROBE_ENV = {"NVTE_FLASH_ATTN": "0", "NVTE_UNFUSED_ATTN": "0", "NVTE_FUSED_ATTN": "1"}


def run_package_probes(opts: Options) -> Dict[str, ProbeResult]:
    """All package probes, a few at a time (each imports torch: memory, not CPU, is the limit)."""
    workers = max(1, min(4, os.cpu_count() or 1))
    with concurrent.futures.ThreadPoolExecutor(max_workers=workers) as pool:
        futures = {
            name: pool.submit(
                run_probe,
                opts.python,
                kind,
                spec,
                opts.timeout,
                TE_PROBE_ENV if kind == "te" else None,
                opts.environ,
            )
            for name, kind, spec in PACKAGE_PROBES
        }
        return {name: f.result() for name, f in futures.items()}


# ------------------------------------------------------------------- headers and libraries


@dataclass
class LibraryLocation:
    """Where a library's headers (and shared objects) were found."""

    name: str  # "cudnn" or "nccl"
    root: str  # the directory to export as CUDNN_PATH (it holds include/)
    include_dir: str
    lib_dir: Optional[str]
    header: str
    version: Optional[str]
    source: str  # "venv", "$CUDNN_PATH", "CUDA_HOME", "system"
    libraries: List[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)


HEADER_SPECS = {
    "cudnn": {
        "header": "cudnn.h",
        "macros": ("CUDNN_MAJOR", "CUDNN_MINOR", "CUDNN_PATCHLEVEL"),
        "version_headers": (
            "cudnn_version.h",
            "cudnn_version_v9.h",
            "cudnn_version_v8.h",
            "cudnn.h",
        ),
        "lib": "libcudnn.so",
        "env": ("CUDNN_PATH", "CUDNN_HOME", "CUDNN_ROOT"),
    },
    "nccl": {
        "header": "nccl.h",
        "macros": ("NCCL_MAJOR", "NCCL_MINOR", "NCCL_PATCH"),
        "version_headers": ("nccl.h",),
        "lib": "libnccl.so",
        "env": ("NCCL_HOME", "NCCL_ROOT", "NCCL_PATH"),
    },
}


def venv_site_packages(venv: str) -> List[str]:
    """The site-packages directories of a venv (or any prefix), absolute, existing ones only."""
    import glob

    venv = os.path.abspath(os.path.expanduser(venv))
    found = []
    for pattern in ("lib/python3*/site-packages", "lib64/python3*/site-packages"):
        for path in sorted(glob.glob(os.path.join(venv, pattern))):
            real = os.path.realpath(path)
            if os.path.isdir(real) and real not in [os.path.realpath(f) for f in found]:
                found.append(path)
    return found


def interpreter_site_packages() -> List[str]:
    """This interpreter's site-packages (the venv's when run with the venv's Python)."""
    paths = sysconfig.get_paths()
    found = []
    for path in (paths.get("purelib"), paths.get("platlib")):
        if path and os.path.isdir(path) and path not in found:
            found.append(path)
    return found


def _multiarch_lib_dirs(prefix: str) -> List[str]:
    arch = sysconfig.get_config_var("MULTIARCH") or "%s-linux-gnu" % platform.machine()
    return [
        os.path.join(prefix, "lib", arch),
        os.path.join(prefix, "lib64"),
        os.path.join(prefix, "lib"),
    ]


def header_candidates(
    name: str,
    site_dirs: Sequence[str],
    environ: Dict[str, str],
    cuda_home: Optional[str] = None,
    system_prefixes: Sequence[str] = ("/usr/local", "/usr"),
) -> List[Tuple[str, List[str], str]]:
    """Where to look for a library, in order: (root, lib dirs, source). The venv's own
    `nvidia/<name>` wheel comes first, because that is the copy torch loads at run time; then
    other `nvidia/*` wheel layouts (cu13, cu12), the library's env vars, CUDA_HOME, the system."""
    out = []
    for sp in site_dirs:
        nvidia = os.path.join(sp, "nvidia")
        own = os.path.join(nvidia, name)
        out.append((own, [os.path.join(own, "lib")], "venv"))
        try:
            others = sorted(d for d in os.listdir(nvidia) if d != name)
        except OSError:
            others = []
        for d in others:
            root = os.path.join(nvidia, d)
            out.append((root, [os.path.join(root, "lib"), os.path.join(root, "lib64")], "venv"))
    for var in HEADER_SPECS[name]["env"]:
        value = environ.get(var)
        if value:
            root = os.path.expanduser(value)
            out.append((root, [os.path.join(root, "lib64"), os.path.join(root, "lib")], "$" + var))
    homes = [cuda_home] if cuda_home else []
    for home in homes + ["/usr/local/cuda"]:
        out.append((home, [os.path.join(home, "lib64"), os.path.join(home, "lib")], "CUDA_HOME"))
    for prefix in system_prefixes:
        out.append((prefix, _multiarch_lib_dirs(prefix), "system"))
    return out


def read_header_version(include_dir: str, name: str) -> Optional[str]:
    spec = HEADER_SPECS[name]
    for header in spec["version_headers"]:
        try:
            with open(os.path.join(include_dir, header), encoding="utf-8", errors="replace") as fh:
                text = fh.read()
        except OSError:
            continue
        parts = []
        for macro in spec["macros"]:
            m = re.search(r"#\s*define\s+%s\s+(\d+)" % macro, text)
            if not m:
                break
            parts.append(m.group(1))
        if len(parts) == 3:
            return ".".join(parts)
    return None


def _shared_objects(lib_dir: str, prefix: str) -> List[str]:
    try:
        return sorted(f for f in os.listdir(lib_dir) if f.startswith(prefix))
    except OSError:
        return []


def find_library_headers(
    name: str,
    site_dirs: Sequence[str],
    environ: Optional[Dict[str, str]] = None,
    cuda_home: Optional[str] = None,
    system_prefixes: Sequence[str] = ("/usr/local", "/usr"),
) -> Optional[LibraryLocation]:
    """Find cudnn.h / nccl.h (`name` "cudnn" or "nccl") and the matching shared library,
    searching the venv's `site-packages/nvidia/...` first (see header_candidates).
    Every returned path is absolute with `~` expanded."""
    spec = HEADER_SPECS[name]
    environ = dict(os.environ) if environ is None else environ
    for root, lib_dirs, source in header_candidates(
        name, site_dirs, environ, cuda_home, system_prefixes
    ):
        include_dir = os.path.join(root, "include")
        if not os.path.isfile(os.path.join(include_dir, spec["header"])):
            continue
        lib_dir, libraries = None, []
        for candidate in lib_dirs:
            libraries = _shared_objects(candidate, spec["lib"])
            if libraries:
                lib_dir = os.path.abspath(candidate)
                break
        return LibraryLocation(
            name=name,
            root=os.path.abspath(root),
            include_dir=os.path.abspath(include_dir),
            lib_dir=lib_dir,
            header=os.path.join(os.path.abspath(include_dir), spec["header"]),
            version=read_header_version(include_dir, name),
            source=source,
            libraries=libraries,
        )
    return None


def _is_cuda_root(path: str) -> bool:
    return os.path.isfile(os.path.join(path, "bin", "nvcc")) and (
        os.path.isfile(os.path.join(path, "include", "cuda_runtime.h"))
        or os.path.isdir(os.path.join(path, "targets"))
    )


def find_cuda_home(
    environ: Optional[Dict[str, str]] = None,
    which: Callable[[str], Optional[str]] = shutil.which,
) -> Tuple[Optional[str], Optional[str], str]:
    """(CUDA_HOME, nvcc path, how it was found). A CUDA root has bin/nvcc and the runtime
    headers; an `nvcc` on PATH that is a wrapper elsewhere does not make its parent a root."""
    environ = dict(os.environ) if environ is None else environ
    for var in ("CUDA_HOME", "CUDA_PATH"):
        value = environ.get(var)
        if value and _is_cuda_root(os.path.expanduser(value)):
            home = os.path.abspath(os.path.expanduser(value))
            return home, os.path.join(home, "bin", "nvcc"), "$" + var
    nvcc = which("nvcc")
    if nvcc:
        for path in (nvcc, os.path.realpath(nvcc)):
            home = os.path.dirname(os.path.dirname(os.path.abspath(path)))
            if _is_cuda_root(home):
                return home, os.path.join(home, "bin", "nvcc"), "nvcc on PATH"
    import glob

    versioned = sorted(
        glob.glob("/usr/local/cuda-*"),
        key=lambda p: release_tuple(p.rsplit("-", 1)[-1]) or (0,),
        reverse=True,
    )
    for home in ["/usr/local/cuda"] + versioned:
        if _is_cuda_root(home):
            return home, os.path.join(home, "bin", "nvcc"), "standard location"
    return None, nvcc, "not found"


def recommended_max_jobs(cpus: Optional[int], mem_available_bytes: Optional[int]) -> int:
    """Parallel compile jobs for TE / apex / flash-attn builds: one per core, but no more than
    available memory allows (each nvcc job peaks at about BUILD_JOB_MEMORY_GIB)."""
    jobs = max(1, cpus or 1)
    if mem_available_bytes:
        jobs = min(jobs, max(1, int(mem_available_bytes // (BUILD_JOB_MEMORY_GIB * 1024**3))))
    return jobs


def _path_list(*groups: Iterable[Optional[str]]) -> str:
    seen: List[str] = []
    for group in groups:
        for item in group:
            if item:
                item = os.path.expanduser(item)  # a literal ~ is never expanded by compilers
                if item not in seen:
                    seen.append(item)
    return ":".join(seen)


def te_build_env(
    cudnn: Optional[LibraryLocation],
    nccl: Optional[LibraryLocation],
    cuda_home: Optional[str],
    max_jobs: Optional[int] = None,
    base_env: Optional[Dict[str, str]] = None,
) -> Dict[str, str]:
    """The environment variables that let transformer-engine (and apex, flash-attn) build
    against the found cuDNN and NCCL: absolute paths, existing include/library search paths
    kept after ours (with `~` expanded). Keys appear in export order."""
    base = base_env or {}
    env: Dict[str, str] = {}
    if cuda_home:
        env["CUDA_HOME"] = cuda_home
    if cudnn:
        env["CUDNN_PATH"] = cudnn.root  # read by TE's CMake (cudnn-frontend's cuDNN.cmake)
        env["CUDNN_HOME"] = cudnn.root  # read by TE's runtime loader and older builds
    found = [x for x in (cudnn, nccl) if x]
    if found:
        includes = _path_list(
            [x.include_dir for x in found], base.get("CPLUS_INCLUDE_PATH", "").split(":")
        )
        libs = _path_list([x.lib_dir for x in found], base.get("LIBRARY_PATH", "").split(":"))
        env["CPLUS_INCLUDE_PATH"] = includes
        if libs:
            env["LIBRARY_PATH"] = libs
    env["NVTE_FRAMEWORK"] = "pytorch"  # build only the PyTorch extension
    if max_jobs:
        env["MAX_JOBS"] = str(max_jobs)
    return env


def export_lines(env: Dict[str, str]) -> List[str]:
    return ["export %s=%s" % (k, shlex.quote(v)) for k, v in env.items()]


def mem_available_bytes(meminfo: str = "/proc/meminfo") -> Optional[int]:
    try:
        with open(meminfo) as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def cpu_count() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def plan_te_build(site_dirs: Sequence[str], environ: Optional[Dict[str, str]] = None) -> dict:
    """Everything node setup needs to build transformer-engine in the venv of `site_dirs`:
    the JSON document's `te_build_env` section."""
    environ = dict(os.environ) if environ is None else environ
    cuda_home, _, _ = find_cuda_home(environ)
    cudnn = find_library_headers("cudnn", site_dirs, environ, cuda_home)
    nccl = find_library_headers("nccl", site_dirs, environ, cuda_home)
    max_jobs = recommended_max_jobs(cpu_count(), mem_available_bytes())
    env = te_build_env(cudnn, nccl, cuda_home, max_jobs, environ)
    missing = [
        what
        for what, have in (("cudnn.h", cudnn), ("nccl.h", nccl), ("nvcc", cuda_home))
        if not have
    ]
    return {
        "vars": env,
        "export_lines": export_lines(env),
        "missing": missing,
        "cudnn": cudnn.to_dict() if cudnn else None,
        "nccl": nccl.to_dict() if nccl else None,
    }


# ----------------------------------------------------------------- storage, network, env


def nearest_existing(path: str) -> str:
    path = os.path.abspath(os.path.expanduser(path))
    while not os.path.exists(path) and os.path.dirname(path) != path:
        path = os.path.dirname(path)
    return path


def fs_space(path: str) -> Tuple[int, int]:
    """(total, available to this user) bytes of the filesystem holding `path`."""
    st = os.statvfs(path)
    return st.f_blocks * st.f_frsize, st.f_bavail * st.f_frsize


def efa_devices(sysfs: str = "/sys/class/infiniband") -> List[str]:
    """RDMA devices driven by AWS's efa driver."""
    try:
        names = sorted(os.listdir(sysfs))
    except OSError:
        return []
    found = []
    for name in names:
        driver = os.path.realpath(os.path.join(sysfs, name, "device", "driver"))
        if os.path.basename(driver) == "efa" or name.startswith("efa"):
            found.append(name)
    return found


OFI_NCCL_DIRS = (
    "/opt/amazon/ofi-nccl/lib",
    "/opt/amazon/ofi-nccl/lib64",
    "/opt/aws-ofi-nccl/lib",
    "/opt/amazon/aws-ofi-nccl/lib",
    "/usr/local/lib",
    "/usr/lib/x86_64-linux-gnu",
    "/usr/lib/aarch64-linux-gnu",
)
OFI_NCCL_NAMES = ("libnccl-net-ofi.so", "libnccl-net-aws-ofi.so", "libnccl-net.so")
LIBFABRIC_DIRS = ("/opt/amazon/efa/lib", "/opt/amazon/efa/lib64")


def find_files(dirs: Iterable[str], names: Sequence[str]) -> List[str]:
    found = []
    for d in dirs:
        for name in names:
            path = os.path.join(d, name)
            if os.path.exists(path) and path not in found:
                found.append(path)
    return found


def reported_env(environ: Dict[str, str]) -> Dict[str, str]:
    """NCCL_*, TORCH_NCCL_* and FI_* variables that are set; secret-looking values redacted."""
    out = {}
    for name in sorted(environ):
        if name.startswith(REPORTED_ENV_PREFIXES):
            out[name] = "<redacted>" if SECRET_NAME.search(name) else environ[name]
    return out


# ------------------------------------------------------------------------- context / facts


@dataclass
class Context:
    """Everything gathered once and read by the checks."""

    opts: Options
    environ: Dict[str, str]
    probes: Dict[str, ProbeResult]
    smi: dict
    cuda_home: Optional[str]
    nvcc: Optional[str]
    nvcc_version: Optional[str]
    cuda_home_source: str
    te_plan: dict

    def probe(self, name: str) -> ProbeResult:
        return self.probes.get(name) or ProbeResult(crash="not run", crashed_in="start")

    @property
    def py(self) -> str:
        return self.opts.python

    def pip(self, args: str) -> str:
        return "%s -m pip install %s" % (shlex.quote(self.py), args)

    @property
    def torch_cuda(self) -> Optional[str]:
        return self.probe("torch").values.get("cuda_build")

    def gpus(self) -> List[dict]:
        t = self.probe("torch")
        return [
            t.values["device:%d" % i]
            for i in range(t.values.get("device_count") or 0)
            if isinstance(t.values.get("device:%d" % i), dict)
        ]

    def cuda_tag(self) -> str:
        """cu13 / cu12: the suffix of NVIDIA's wheels matching torch's CUDA."""
        mm = major_minor(self.torch_cuda)
        return "cu%d" % (mm[0] if mm else 12)


def query_nvidia_smi(timeout: float) -> dict:
    """GPUs, driver and the driver's CUDA version from nvidia-smi, or /proc for the driver."""
    info = {
        "found": bool(shutil.which("nvidia-smi")),
        "gpus": [],
        "driver": None,
        "driver_cuda": None,
        "error": None,
    }
    if info["found"]:
        q = run_command(
            ["nvidia-smi", "--query-gpu=" + ",".join(SMI_FIELDS), "--format=csv,noheader,nounits"],
            timeout,
        )
        if q.ok:
            info["gpus"] = parse_smi_csv(q.stdout, SMI_FIELDS)
        else:
            info["error"] = (
                q.error or tail(q.stdout + q.stderr, 2) or describe_returncode(q.returncode)
            )
        h = run_command(["nvidia-smi"], timeout)
        if h.ok:
            header = parse_smi_header(h.stdout)
            info["driver"], info["driver_cuda"] = header["driver"], header["cuda"]
    if info["gpus"] and not info["driver"]:
        info["driver"] = info["gpus"][0].get("driver_version")
    if not info["driver"]:
        try:
            with open("/proc/driver/nvidia/version") as fh:
                info["driver"] = parse_proc_driver_version(fh.read())
        except OSError:
            pass
    return info


def gather(opts: Options) -> Context:
    environ = dict(os.environ if opts.environ is None else opts.environ)
    site_dirs = opts.site_dirs if opts.site_dirs is not None else interpreter_site_packages()
    with concurrent.futures.ThreadPoolExecutor(max_workers=1) as pool:
        probes_future = pool.submit(run_package_probes, opts)
        smi = query_nvidia_smi(min(opts.timeout, 60))
        cuda_home, nvcc, source = find_cuda_home(environ)
        nvcc_version = None
        if nvcc:
            res = run_command([nvcc, "--version"], min(opts.timeout, 60))
            nvcc_version = parse_nvcc_version(res.stdout) if res.ok else None
        te_plan = plan_te_build(site_dirs, environ)
        probes = probes_future.result()
    return Context(opts, environ, probes, smi, cuda_home, nvcc, nvcc_version, source, te_plan)


def facts(ctx: Context) -> dict:
    t = ctx.probe("torch").values
    plan = ctx.te_plan

    def version(name: str) -> Optional[str]:
        v = ctx.probe(name).values
        return v.get("version") or (v.get("dist_version") if "import" in v else None)

    return {
        "python": platform.python_version(),
        "torch": t.get("version"),
        "torch_cuda": t.get("cuda_build"),
        "cuda_available": t.get("cuda_available"),
        "gpu_count": t.get("device_count"),
        "gpus": ctx.gpus() or [_smi_gpu(g) for g in ctx.smi["gpus"]],
        "driver": ctx.smi["driver"],
        "driver_cuda": ctx.smi["driver_cuda"] or driver_max_cuda(ctx.smi["driver"]),
        "nvcc": ctx.nvcc_version,
        "cuda_home": ctx.cuda_home,
        "cudnn_runtime": decode_cudnn_version(t.get("cudnn")),
        "nccl_runtime": decode_nccl_version(t.get("nccl")),
        "cudnn_headers": (plan["cudnn"] or {}).get("version"),
        "nccl_headers": (plan["nccl"] or {}).get("version"),
        "transformer_engine": version("transformer_engine"),
        "megatron_core": version("megatron_core"),
        "apex": version("apex"),
        "flash_attn": version("flash_attn"),
        "transformers": version("transformers"),
        "safetensors": version("safetensors"),
        "tokenizers": version("tokenizers"),
        "peft": version("peft"),
    }


def _smi_gpu(row: dict) -> dict:
    mem = row.get("memory.total")
    return {
        "index": int(row["index"]) if str(row.get("index", "")).isdigit() else None,
        "name": row.get("name"),
        "capability": row.get("compute_cap"),
        "memory_mib": int(float(mem)) if mem and re.match(r"^[\d.]+$", mem) else None,
    }


# ---------------------------------------------------------------------- checks: python/torch


def check_python(ctx: Context) -> List[Check]:
    v = sys.version_info
    ok = (v.major, v.minor) >= MIN_PYTHON
    detail = "Python %s at %s" % (platform.python_version(), sys.executable)
    fix = None
    if not ok:
        detail += "; megatron-core and the runtime need %d.%d+" % MIN_PYTHON
        fix = (
            "run this check with the Python of a venv built on Python >= %d.%d "
            "(`megafleet setup` creates one); %s is %s"
            % (MIN_PYTHON + (sys.executable, platform.python_version()))
        )
    return [
        Check(
            "python.version",
            "Python",
            REQUIRED,
            "pass" if ok else "fail",
            detail,
            fix,
            {"version": platform.python_version(), "executable": sys.executable},
        )
    ]


def torch_install_fix(ctx: Context) -> str:
    tag = torch_index_for_cuda(ctx.smi["driver_cuda"] or driver_max_cuda(ctx.smi["driver"]))
    if tag:
        return ctx.pip(
            "--force-reinstall torch --index-url https://download.pytorch.org/whl/%s" % tag
        )
    return (
        ctx.pip("torch") + "  (pick the CUDA build your driver supports: "
        "https://pytorch.org/get-started/locally/)"
    )


def check_torch(ctx: Context) -> List[Check]:
    t = ctx.probe("torch")
    level = gpu_level(ctx.opts)
    if not t.ok("version"):
        why = t.failure("import") or t.failure("start") or "not importable"
        missing = t.absent("torch")
        return [
            Check(
                "torch.import",
                "torch",
                REQUIRED,
                "fail",
                "torch is not installed" if missing else "import torch failed: " + why,
                torch_install_fix(ctx),
            ),
            Check("torch.cuda_build", "torch CUDA build", level, "skip", "no torch"),
            Check("torch.cuda_available", "torch.cuda.is_available()", level, "skip", "no torch"),
        ]
    version, wanted = t.values["version"], RUNTIME_REQUIREMENTS["torch"]
    ok = version_satisfies(version, wanted)
    checks = [
        Check(
            "torch.import",
            "torch",
            REQUIRED,
            "pass" if ok else "fail",
            "torch %s (%s)%s"
            % (
                version,
                os.path.dirname(t.values.get("file") or ""),
                "" if ok else ", the runtime needs torch%s" % wanted,
            ),
            None if ok else torch_install_fix(ctx),
            {"version": version},
        )
    ]
    cuda = t.values.get("cuda_build")
    if not cuda:
        checks.append(
            Check(
                "torch.cuda_build",
                "torch CUDA build",
                level,
                "fail",
                "torch %s is a CPU-only build (torch.version.cuda is None)" % t.values["version"],
                torch_install_fix(ctx),
            )
        )
    else:
        checks.append(
            Check(
                "torch.cuda_build",
                "torch CUDA build",
                level,
                "pass",
                "built for CUDA %s" % cuda,
                data={"cuda": cuda},
            )
        )
    checks.append(check_cuda_available(ctx, t, level))
    return checks


def check_cuda_available(ctx: Context, t: ProbeResult, level: str) -> Check:
    available, count = t.values.get("cuda_available"), t.values.get("device_count") or 0
    smi_gpus = len(ctx.smi["gpus"])
    visible = ctx.environ.get("CUDA_VISIBLE_DEVICES")
    note = "; CUDA_VISIBLE_DEVICES=%s" % visible if visible is not None else ""
    if available and count:
        return Check(
            "torch.cuda_available",
            "torch.cuda.is_available()",
            level,
            "pass",
            "True, %d GPU(s)%s" % (count, note),
            data={"device_count": count},
        )
    if "cuda_available" not in t.values:
        why = t.failure("cuda_available") or "not probed"
        return Check(
            "torch.cuda_available",
            "torch.cuda.is_available()",
            level,
            "fail",
            "torch.cuda.is_available() failed: " + why,
        )
    if not t.values.get("cuda_build"):
        return Check(
            "torch.cuda_available",
            "torch.cuda.is_available()",
            level,
            "fail",
            "False: torch is a CPU-only build" + note,
            torch_install_fix(ctx),
        )
    if smi_gpus:
        return Check(
            "torch.cuda_available",
            "torch.cuda.is_available()",
            level,
            "fail",
            "False although nvidia-smi lists %d GPU(s)%s: driver too old for torch's "
            "CUDA, or the devices are hidden" % (smi_gpus, note),
            "compare driver.cuda_compat below; check CUDA_VISIBLE_DEVICES and "
            "that /dev/nvidia* are accessible",
        )
    return Check(
        "torch.cuda_available",
        "torch.cuda.is_available()",
        level,
        "fail",
        "False: no NVIDIA GPU visible on this machine" + note,
        None if ctx.opts.cpu_ok else "run on a GPU machine, or pass --cpu-ok for a CPU smoke run",
    )


def check_gpus(ctx: Context) -> List[Check]:
    level = gpu_level(ctx.opts)
    gpus = ctx.gpus()
    t = ctx.probe("torch")
    if not gpus:
        smi = [_smi_gpu(g) for g in ctx.smi["gpus"]]
        where = (
            "nvidia-smi lists %s but torch sees none" % ", ".join(g["name"] or "?" for g in smi)
            if smi
            else "no GPU found (torch sees none%s)"
            % ("" if ctx.smi["found"] else ", nvidia-smi not installed")
        )
        fix = (
            "install a CUDA build of torch that this driver supports (see torch.cuda_build)"
            if smi
            else "run on a machine with an NVIDIA GPU and its driver (`nvidia-smi -L` "
            "lists it), or pass --cpu-ok for a CPU smoke run (then launch with --device cpu)"
        )
        gpu = Check("gpu.count", "GPUs", level, "fail", where, fix, data={"gpus": smi})
        arch = Check("gpu.arch", "torch kernels for these GPUs", level, "skip", "no GPU to check")
        return [gpu, arch]
    names = {}
    for g in gpus:
        names.setdefault("%s (sm_%s)" % (g["name"], g["capability"].replace(".", "")), []).append(g)
    detail = ", ".join("%dx %s" % (len(v), k) for k, v in names.items())
    gpu = Check(
        "gpu.count",
        "GPUs",
        level,
        "pass",
        "%d GPU(s): %s" % (len(gpus), detail),
        data={"gpus": gpus},
    )
    return [gpu, check_arch(ctx, gpus, t.values.get("arch_list") or [], level)]


def check_arch(ctx: Context, gpus: List[dict], arch_list: List[str], level: str) -> Check:
    worst, notes = "pass", []
    for cap in sorted({g["capability"] for g in gpus}):
        status, how = arch_coverage(arch_list, tuple(int(x) for x in cap.split(".")))
        notes.append("%s: %s" % (cap, how))
        worst = max(worst, status, key=("pass", "warn", "fail").index)
    fix = None
    if worst != "pass":
        fix = "install a torch build whose arch list includes these GPUs: " + torch_install_fix(ctx)
    return Check(
        "gpu.arch",
        "torch kernels for these GPUs",
        level,
        worst,
        "; ".join(notes) + " (torch arch list: %s)" % " ".join(arch_list),
        fix,
        {"arch_list": arch_list},
    )


# ---------------------------------------------------------------- checks: driver and CUDA


def check_driver(ctx: Context) -> List[Check]:
    level = gpu_level(ctx.opts)
    driver, smi = ctx.smi["driver"], ctx.smi
    if not driver:
        why = (
            "nvidia-smi not found and no /proc/driver/nvidia/version"
            if not smi["found"]
            else "nvidia-smi failed: %s" % (smi["error"] or "no driver version")
        )
        return [
            Check(
                "driver.version",
                "NVIDIA driver",
                level,
                "fail",
                why,
                None
                if ctx.opts.cpu_ok
                else "install the NVIDIA datacenter driver "
                "(e.g. `apt install nvidia-driver-580-server`) and reboot",
            ),
            Check("driver.cuda_compat", "driver supports torch's CUDA", level, "skip", "no driver"),
        ]
    supported = smi["driver_cuda"] or driver_max_cuda(driver)
    src = "nvidia-smi" if smi["driver_cuda"] else "driver table"
    checks = [
        Check(
            "driver.version",
            "NVIDIA driver",
            level,
            "pass",
            "driver %s, supports CUDA %s (%s)" % (driver, supported or "?", src),
            data={"driver": driver, "driver_cuda": supported},
        )
    ]
    cuda = ctx.torch_cuda
    if not cuda:
        checks.append(
            Check(
                "driver.cuda_compat",
                "driver supports torch's CUDA",
                level,
                "skip",
                "torch has no CUDA build to compare",
            )
        )
        return checks
    status, why = cuda_driver_compat(driver, cuda, smi["driver_cuda"])
    fix = None
    if status != "pass":
        fix = "either upgrade the driver to >= %s (CUDA %s), or install torch for CUDA %s: %s" % (
            min_driver_for_cuda(cuda) or "?",
            cuda,
            supported or "?",
            torch_install_fix(ctx),
        )
    checks.append(
        Check(
            "driver.cuda_compat",
            "driver supports torch's CUDA",
            level,
            status,
            why,
            fix,
            {"torch_cuda": cuda, "driver_cuda": supported},
        )
    )
    return checks


def check_nvcc(ctx: Context) -> List[Check]:
    """nvcc is needed only to build transformer-engine, apex or flash-attn: optional."""
    home, nvcc, version = ctx.cuda_home, ctx.nvcc, ctx.nvcc_version
    data = {"cuda_home": home, "nvcc": nvcc, "version": version, "found_by": ctx.cuda_home_source}
    want = major_minor(ctx.torch_cuda)
    set_home = ctx.environ.get("CUDA_HOME")
    if not nvcc or not version:
        tk = "%d-%d" % want if want else "13-0"
        return [
            Check(
                "cuda.nvcc",
                "nvcc and CUDA_HOME",
                OPTIONAL,
                "warn",
                "nvcc not found: transformer-engine, apex and flash-attn cannot be built here",
                "install the CUDA toolkit matching torch (e.g. `apt install "
                "cuda-toolkit-%s`), then export CUDA_HOME=/usr/local/cuda-%s"
                % (tk, tk.replace("-", ".")),
                data,
            )
        ]
    detail = "nvcc %s at %s, CUDA_HOME=%s (%s)" % (version, nvcc, home or "?", ctx.cuda_home_source)
    status, fix = "pass", None
    have = major_minor(version)
    if want and have and have[0] != want[0]:
        status = "warn"
        detail += (
            "; torch is built for CUDA %s: extension builds refuse a different major"
            % ctx.torch_cuda
        )
        fix = "install CUDA toolkit %d.x and export CUDA_HOME to it" % want[0]
    elif set_home and home and os.path.abspath(os.path.expanduser(set_home)) != home:
        status, fix = "warn", "export CUDA_HOME=%s" % shlex.quote(home)
        detail += "; $CUDA_HOME=%s is not a CUDA toolkit" % set_home
    elif not set_home and home:
        fix = "export CUDA_HOME=%s  (builds look for nvcc there)" % shlex.quote(home)
    return [Check("cuda.nvcc", "nvcc and CUDA_HOME", OPTIONAL, status, detail, fix, data)]


# ------------------------------------------------------------------ checks: cuDNN and NCCL


def check_cudnn_nccl_runtime(ctx: Context) -> List[Check]:
    t = ctx.probe("torch").values
    level = gpu_level(ctx.opts)
    out = []
    for lib, raw, decode in (
        ("cudnn", t.get("cudnn"), decode_cudnn_version),
        ("nccl", t.get("nccl"), decode_nccl_version),
    ):
        label = "cuDNN" if lib == "cudnn" else "NCCL"
        cid = "%s.runtime" % lib
        if not t.get("cuda_build"):
            out.append(
                Check(
                    cid,
                    "%s in torch" % label,
                    level,
                    "skip",
                    "torch has no CUDA build" if "version" in t else "no torch",
                )
            )
            continue
        version = decode(raw)
        if version:
            out.append(
                Check(
                    cid,
                    "%s in torch" % label,
                    level,
                    "pass",
                    "torch loads %s %s" % (label, version),
                    data={"version": version},
                )
            )
        else:
            out.append(
                Check(
                    cid,
                    "%s in torch" % label,
                    level,
                    "fail",
                    "torch reports no %s: %s" % (label, ctx.probe("torch").failure(lib) or "None"),
                    ctx.pip("nvidia-%s-%s" % (lib, ctx.cuda_tag())),
                )
            )
    return out


def check_headers(ctx: Context) -> List[Check]:
    """cudnn.h / nccl.h for building transformer-engine; optional (only builds need them)."""
    plan, out = ctx.te_plan, []
    t = ctx.probe("torch").values
    for lib, label in (("cudnn", "cuDNN"), ("nccl", "NCCL")):
        loc = plan[lib]
        cid = "%s.headers" % lib
        if not loc:
            out.append(
                Check(
                    cid,
                    "%s headers for building TE" % label,
                    OPTIONAL,
                    "warn",
                    "%s.h not found in the venv (site-packages/nvidia/%s) or the system"
                    % (lib, lib),
                    ctx.pip("nvidia-%s-%s" % (lib, ctx.cuda_tag()))
                    + "  (then run this check again for the export lines)",
                )
            )
            continue
        runtime = (decode_cudnn_version if lib == "cudnn" else decode_nccl_version)(t.get(lib))
        status, note = "pass", ""
        if runtime and loc["version"] and runtime.split(".")[0] != loc["version"].split(".")[0]:
            status = "warn"
            note = "; torch loads %s %s: a build would compile against another major" % (
                label,
                runtime,
            )
        if not loc["lib_dir"]:
            status, note = "warn", note + "; no lib%s.so* beside it" % lib
        out.append(
            Check(
                cid,
                "%s headers for building TE" % label,
                OPTIONAL,
                status,
                "%s %s headers in %s (%s)%s"
                % (label, loc["version"] or "?", loc["include_dir"], loc["source"], note),
                "\n".join(plan["export_lines"]),
                dict(loc),
            )
        )
    return out


# ------------------------------------------------------------------- checks: packages


def te_install_fix(ctx: Context) -> str:
    plan = ctx.te_plan
    lines = []
    absent = ["nvidia-%s-%s" % (lib, ctx.cuda_tag()) for lib in ("cudnn", "nccl") if not plan[lib]]
    if absent:
        lines.append(ctx.pip(" ".join(absent)))
        lines.append("# then run this check again: it prints the exports with the new headers")
    lines.extend(plan["export_lines"])
    lines.append(ctx.pip("cmake ninja pybind11 setuptools wheel"))
    lines.append(
        ctx.pip("--no-build-isolation 'transformer_engine[pytorch,core_%s]'" % ctx.cuda_tag())
    )
    return "\n".join(lines)


def check_transformer_engine(ctx: Context) -> List[Check]:
    p = ctx.probe("transformer_engine")
    level = REQUIRED if ctx.opts.require_te else OPTIONAL
    if not p.ok("import"):
        why = p.failure("import") or p.failure("start") or p.failure("package_dir") or "?"
        if p.absent("transformer_engine"):
            status = "fail" if ctx.opts.require_te else "warn"
            first = Check(
                "te.import",
                "transformer-engine",
                level,
                status,
                "transformer-engine is not installed (training uses the local layer spec)",
                te_install_fix(ctx),
            )
        else:
            first = Check(
                "te.import",
                "transformer-engine",
                level,
                "fail",
                "import transformer_engine failed: %s" % why,
                te_install_fix(ctx),
                {"dist_version": p.values.get("dist_version")},
            )
        return [
            first,
            Check("te.extension", "transformer-engine torch extension", level, "skip", "no TE"),
            Check(
                "te.fused_attention", "transformer-engine fused attention", level, "skip", "no TE"
            ),
        ]
    version = p.values.get("version") or p.values.get("dist_version")
    checks = [
        Check(
            "te.import",
            "transformer-engine",
            level,
            "pass",
            "transformer-engine %s" % version,
            data={"version": version, "flash_attn_limits": p.values.get("flash_limits")},
        )
    ]
    if not p.ok("import_pytorch") or not p.ok("extension"):
        why = p.failure("import_pytorch") or p.failure("extension") or "?"
        checks.append(
            Check(
                "te.extension",
                "transformer-engine torch extension",
                level,
                "fail",
                "transformer_engine.pytorch does not load: %s" % why,
                "rebuild it against this torch:\n"
                + te_install_fix(ctx).replace(
                    "--no-build-isolation", "--no-build-isolation --force-reinstall --no-cache-dir"
                ),
            )
        )
        checks.append(
            Check(
                "te.fused_attention",
                "transformer-engine fused attention",
                level,
                "skip",
                "the torch extension does not load",
            )
        )
        return checks
    checks.append(
        Check(
            "te.extension",
            "transformer-engine torch extension",
            level,
            "pass",
            "transformer_engine_torch loads (%s)" % p.values.get("extension"),
        )
    )
    checks.append(check_te_attention(ctx, p, level))
    return checks


def check_te_attention(ctx: Context, p: ProbeResult, level: str) -> Check:
    title = "transformer-engine fused attention"
    if not p.values.get("cuda_available"):
        return Check("te.fused_attention", title, level, "skip", "no CUDA GPU to run it on")
    if p.ok("fused_attention"):
        r = p.values["fused_attention"]
        return Check(
            "te.fused_attention",
            title,
            level,
            "pass",
            "causal bf16 attention on the cuDNN backend matches torch SDPA (max diff %.2g)"
            % r["max_abs_diff"],
            data=r,
        )
    return Check(
        "te.fused_attention",
        title,
        level,
        "fail",
        "fused attention failed: %s" % (p.failure("fused_attention") or "?"),
        "check cudnn.runtime above; TE's fused attention needs cuDNN >= 9 from "
        "nvidia-cudnn-%s in this venv" % ctx.cuda_tag(),
    )


def check_megatron_core(ctx: Context) -> List[Check]:
    p = ctx.probe("megatron_core")
    fix = ctx.pip("'megatron-core%s'" % SUPPORTED_MEGATRON_CORE)
    if not p.ok("import"):
        why = p.failure("import") or p.failure("start") or "?"
        detail = (
            "megatron-core is not installed"
            if p.absent("megatron.core")
            else "import megatron.core failed: %s" % why
        )
        return [Check("megatron_core.version", "megatron-core", REQUIRED, "fail", detail, fix)]
    version = p.values.get("version") or p.values.get("dist_version")
    where = os.path.dirname(os.path.dirname(p.values.get("file") or ""))
    ok = version_satisfies(version, SUPPORTED_MEGATRON_CORE)
    return [
        Check(
            "megatron_core.version",
            "megatron-core",
            REQUIRED,
            "pass" if ok else "fail",
            "megatron-core %s from %s%s"
            % (version, where, "" if ok else ", supported: %s" % SUPPORTED_MEGATRON_CORE),
            None if ok else fix,
            {"version": version, "supported": SUPPORTED_MEGATRON_CORE},
        )
    ]


def check_apex(ctx: Context) -> List[Check]:
    p = ctx.probe("apex")
    src = shlex.quote(os.path.join(sys.prefix, "src", "apex"))  # pip's own place for checkouts
    build = (
        "git clone https://github.com/NVIDIA/apex %s && cd %s && "
        "APEX_CPP_EXT=1 APEX_CUDA_EXT=1 %s" % (src, src, ctx.pip("-v --no-build-isolation ."))
    )
    if not p.ok("import"):
        why = p.failure("import") or p.failure("start") or "?"
        if p.absent("apex"):
            return [
                Check(
                    "apex.cuda_ext",
                    "apex",
                    OPTIONAL,
                    "skip",
                    "apex is not installed (not needed: the runtime uses torch's fused optimizers)",
                    build,
                )
            ]
        return [
            Check("apex.cuda_ext", "apex", OPTIONAL, "fail", "import apex failed: %s" % why, build)
        ]
    exts = PACKAGE_PROBES_BY_NAME["apex"]["extensions"]
    built = [e for e in exts if p.ok("ext:" + e)]
    missing = {e: p.failure("ext:" + e) or "?" for e in exts if e not in built}
    if not missing:
        return [
            Check(
                "apex.cuda_ext",
                "apex",
                OPTIONAL,
                "pass",
                "apex with CUDA extensions (%s)" % ", ".join(built),
                data={"extensions": built},
            )
        ]
    return [
        Check(
            "apex.cuda_ext",
            "apex",
            OPTIONAL,
            "warn",
            "apex without CUDA extensions %s: %s"
            % (", ".join(missing), "; ".join("%s: %s" % kv for kv in missing.items())[:300]),
            "rebuild apex with its extensions: " + build,
            {"extensions": built, "missing": sorted(missing)},
        )
    ]


def check_flash_attn(ctx: Context) -> List[Check]:
    p, te = ctx.probe("flash_attn"), ctx.probe("transformer_engine")
    limits = te.values.get("flash_limits") or {}
    te_version = te.values.get("version") or te.values.get("dist_version")
    spec = flash_attn_spec(limits, [g["capability"] for g in ctx.gpus()])
    install = "MAX_JOBS=%s %s" % (
        ctx.te_plan["vars"].get("MAX_JOBS", 4),
        ctx.pip("--no-build-isolation 'flash-attn%s'" % spec),
    )
    data = {"te_version": te_version, "accepted": spec or None}
    if not p.ok("import"):
        why = p.failure("import") or p.failure("start") or "?"
        if p.absent("flash_attn"):
            return [
                Check(
                    "flash_attn.version",
                    "flash-attn",
                    OPTIONAL,
                    "skip",
                    "flash-attn is not installed",
                    install,
                    data,
                )
            ]
        return [
            Check(
                "flash_attn.version",
                "flash-attn",
                OPTIONAL,
                "fail",
                "import flash_attn failed: %s" % why,
                install,
                data,
            )
        ]
    version = p.values.get("version") or p.values.get("dist_version")
    data["version"] = version
    if not p.ok("ext:flash_attn_2_cuda"):
        return [
            Check(
                "flash_attn.version",
                "flash-attn",
                OPTIONAL,
                "fail",
                "flash-attn %s: its CUDA extension does not load: %s"
                % (version, p.failure("ext:flash_attn_2_cuda")),
                install,
                data,
            )
        ]
    if not spec:
        why = "no transformer-engine to constrain it" if not te_version else "TE states no range"
        return [
            Check(
                "flash_attn.version",
                "flash-attn",
                OPTIONAL,
                "pass",
                "flash-attn %s (%s)" % (version, why),
                data=data,
            )
        ]
    ok = version_satisfies(version, spec)
    return [
        Check(
            "flash_attn.version",
            "flash-attn",
            OPTIONAL,
            "pass" if ok else "warn",
            "flash-attn %s %s transformer-engine %s's range %s"
            % (version, "is within" if ok else "is outside", te_version, spec)
            + ("" if ok else ": TE will not use it"),
            None if ok else install,
            data,
        )
    ]


PACKAGE_PROBES_BY_NAME = {name: spec for name, _, spec in PACKAGE_PROBES}


def check_plain_packages(ctx: Context) -> List[Check]:
    out = []
    for name, level in (
        ("transformers", REQUIRED),
        ("safetensors", REQUIRED),
        ("tokenizers", REQUIRED),
        ("peft", OPTIONAL),
    ):
        p = ctx.probe(name)
        cid = "%s.import" % name
        wanted = RUNTIME_REQUIREMENTS.get(name, "")
        dist = name + wanted
        if p.ok("import"):
            version = p.values.get("version") or p.values.get("dist_version")
            ok = not wanted or version_satisfies(version, wanted)
            out.append(
                Check(
                    cid,
                    name,
                    level,
                    "pass" if ok else "fail",
                    "%s %s%s" % (name, version, "" if ok else ", the runtime needs %s" % dist),
                    None if ok else ctx.pip("'%s'" % dist),
                    {"version": version},
                )
            )
            continue
        why = p.failure("import") or p.failure("start") or "?"
        absent = p.absent(name)
        status = "fail" if level == REQUIRED or not absent else "skip"
        out.append(
            Check(
                cid,
                name,
                level,
                status,
                "%s is not installed" % name if absent else "import %s failed: %s" % (name, why),
                ctx.pip("'%s'" % dist),
            )
        )
    return out


# -------------------------------------------------------------- checks: paths and system


def megatron_checkout_version(path: str) -> Optional[str]:
    """megatron-core's version in a Megatron-LM checkout, read from package_info.py."""
    try:
        with open(os.path.join(path, "megatron", "core", "package_info.py")) as fh:
            text = fh.read()
    except OSError:
        return None
    parts = [re.search(r"^%s\s*=\s*(\d+)" % k, text, re.M) for k in ("MAJOR", "MINOR", "PATCH")]
    if not all(parts):
        return None
    pre = re.search(r"^PRE_RELEASE\s*=\s*['\"]([^'\"]*)['\"]", text, re.M)
    return ".".join(m.group(1) for m in parts) + (pre.group(1) if pre else "")


def check_megatron_lm_path(ctx: Context) -> List[Check]:
    value = ctx.environ.get("MEGATRON_LM_PATH")
    if not value:
        return [Check("megatron_lm.path", "MEGATRON_LM_PATH", OPTIONAL, "skip", "not set")]
    path = os.path.abspath(os.path.expanduser(value))
    if not os.path.isfile(os.path.join(path, "megatron", "core", "__init__.py")):
        return [
            Check(
                "megatron_lm.path",
                "MEGATRON_LM_PATH",
                REQUIRED,
                "fail",
                "MEGATRON_LM_PATH=%s has no megatron/core package" % value,
                "point MEGATRON_LM_PATH at a Megatron-LM checkout, or unset it to use the "
                "installed megatron-core",
            )
        ]
    version = megatron_checkout_version(path)
    ok = version_satisfies(version, SUPPORTED_MEGATRON_CORE)
    return [
        Check(
            "megatron_lm.path",
            "MEGATRON_LM_PATH",
            REQUIRED,
            "pass" if ok else "fail",
            "Megatron-LM checkout at %s, megatron-core %s%s"
            % (path, version or "?", "" if ok else " (supported: %s)" % SUPPORTED_MEGATRON_CORE),
            None
            if ok
            else "check out a Megatron-LM release with core %s in %s"
            % (SUPPORTED_MEGATRON_CORE, path),
            {"path": path, "version": version},
        )
    ]


def check_disk(ctx: Context) -> List[Check]:
    out = []
    for workdir in ctx.opts.workdirs or [os.getcwd()]:
        path = os.path.abspath(os.path.expanduser(workdir))
        probe = nearest_existing(path)
        total, free = fs_space(probe)
        gib = free / 1024**3
        status = "fail" if gib < DISK_FAIL_GIB else "warn" if gib < DISK_WARN_GIB else "pass"
        where = path if probe == path else "%s (not created yet; measured at %s)" % (path, probe)
        out.append(
            Check(
                "disk.free:%s" % path,
                "free disk",
                REQUIRED,
                status,
                "%.0f GiB free of %.0f GiB at %s" % (gib, total / 1024**3, where),
                None
                if status == "pass"
                else "free space on %s or choose a work directory on a larger volume "
                "(checkpoints of large models need hundreds of GB)" % probe,
                {"path": path, "free_bytes": free, "total_bytes": total},
            )
        )
    return out


def check_shm(ctx: Context) -> List[Check]:
    try:
        total, free = fs_space("/dev/shm")
    except OSError as exc:
        return [
            Check(
                "shm.size",
                "/dev/shm",
                REQUIRED,
                "fail",
                "/dev/shm is missing: %s" % exc,
                "mount a tmpfs on /dev/shm (Docker: --ipc=host or --shm-size=64g)",
            )
        ]
    gib = total / 1024**3
    status = "fail" if gib < SHM_FAIL_GIB else "warn" if gib < SHM_WARN_GIB else "pass"
    return [
        Check(
            "shm.size",
            "/dev/shm",
            REQUIRED,
            status,
            "%.1f GiB (%.1f GiB free)" % (gib, free / 1024**3),
            None
            if status == "pass"
            else "NCCL and data loaders need a large /dev/shm: `sudo mount -o remount,size=64G "
            "/dev/shm` (Docker: --ipc=host or --shm-size=64g)",
            {"total_bytes": total, "free_bytes": free},
        )
    ]


def check_efa(ctx: Context) -> List[Check]:
    devices = efa_devices()
    if not devices:
        return [Check("efa.ofi_nccl", "EFA and aws-ofi-nccl", OPTIONAL, "skip", "no EFA devices")]
    ld_dirs = [d for d in ctx.environ.get("LD_LIBRARY_PATH", "").split(":") if d]
    plugins = find_files(ld_dirs + list(OFI_NCCL_DIRS), OFI_NCCL_NAMES)
    fabric = find_files(ld_dirs + list(LIBFABRIC_DIRS), ("libfabric.so", "libfabric.so.1"))
    data = {"devices": devices, "plugins": plugins, "libfabric": fabric}
    if not plugins:
        return [
            Check(
                "efa.ofi_nccl",
                "EFA and aws-ofi-nccl",
                OPTIONAL,
                "fail",
                "%d EFA device(s) but no aws-ofi-nccl plugin: NCCL falls back to TCP sockets"
                % len(devices),
                "install the AWS EFA installer (it ships aws-ofi-nccl under /opt/amazon/ofi-nccl)",
                data,
            )
        ]
    on_path = any(os.path.dirname(p) in ld_dirs for p in plugins) or ctx.environ.get(
        "NCCL_NET_PLUGIN"
    )
    status = "pass" if on_path and fabric else "warn"
    detail = "%d EFA device(s), plugin %s%s" % (
        len(devices),
        plugins[0],
        "" if fabric else ", libfabric not found",
    )
    fix = None
    if not on_path:
        fix = (
            "export LD_LIBRARY_PATH=%s:/opt/amazon/efa/lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
            % os.path.dirname(plugins[0])
        )
        detail += " (not on LD_LIBRARY_PATH: NCCL will not load it)"
    return [Check("efa.ofi_nccl", "EFA and aws-ofi-nccl", OPTIONAL, status, detail, fix, data)]


def check_nccl_env(ctx: Context) -> List[Check]:
    env = reported_env(ctx.environ)
    if not env:
        return [
            Check("nccl.env", "NCCL environment", OPTIONAL, "skip", "no NCCL_*/FI_* variables set")
        ]
    disabled = [k for k, v in env.items() if k.endswith("_DISABLE") and v.strip() == "1"]
    detail = " ".join("%s=%s" % kv for kv in env.items())
    if disabled:
        return [
            Check(
                "nccl.env",
                "NCCL environment",
                OPTIONAL,
                "warn",
                "%s disable fast transports (%s)" % (", ".join(disabled), detail),
                "unset %s unless a known problem needs it" % " ".join(disabled),
                {"env": env},
            )
        ]
    return [Check("nccl.env", "NCCL environment", OPTIONAL, "pass", detail, data={"env": env})]


CHECK_GROUPS = (
    check_python,
    check_torch,
    check_gpus,
    check_driver,
    check_nvcc,
    check_cudnn_nccl_runtime,
    check_headers,
    check_transformer_engine,
    check_megatron_core,
    check_apex,
    check_flash_attn,
    check_plain_packages,
    check_megatron_lm_path,
    check_disk,
    check_shm,
    check_efa,
    check_nccl_env,
)


# ----------------------------------------------------------------------------- the report


def run_checks(ctx: Context) -> List[Check]:
    checks = []
    for group in CHECK_GROUPS:
        try:
            checks.extend(group(ctx))
        except Exception as exc:  # a bug in one check must not hide the others
            checks.append(
                Check(
                    "internal.%s" % group.__name__,
                    group.__name__,
                    OPTIONAL,
                    "fail",
                    "the check itself failed: %s: %s" % (type(exc).__name__, exc),
                )
            )
    return not_applicable_on_cpu(checks) if ctx.opts.cpu_ok else checks


# GPU checks that cannot pass on a CPU-only machine: with --cpu-ok a failure there is no failure
GPU_ONLY_CHECKS = (
    "torch.cuda_build",
    "torch.cuda_available",
    "gpu.count",
    "gpu.arch",
    "driver.version",
    "driver.cuda_compat",
    "cudnn.runtime",
    "nccl.runtime",
)


def not_applicable_on_cpu(checks: List[Check]) -> List[Check]:
    """--cpu-ok: GPU checks that failed become "skip" (not applicable), so the summary's ok
    never sits next to rows that say fail."""
    for c in checks:
        if c.id in GPU_ONLY_CHECKS and c.status == "fail":
            c.status, c.fix = "skip", None
            c.detail = "not applicable with --cpu-ok (a CPU run): %s" % c.detail
    return checks


def summarize(checks: Sequence[Check]) -> dict:
    counts = {s: sum(1 for c in checks if c.status == s) for s in STATUSES}
    failed = [c.id for c in checks if c.level == REQUIRED and c.status == "fail"]
    return {
        "ok": not failed,
        "exit_code": 1 if failed else 0,
        "counts": counts,
        "failed_required": failed,
    }


def collect_report(opts: Options) -> dict:
    """Run every check and return the JSON document (see the module docstring)."""
    start = time.time()
    opts.workdirs = [
        os.path.abspath(os.path.expanduser(w)) for w in (opts.workdirs or [os.getcwd()])
    ]
    ctx = gather(opts)
    checks = run_checks(ctx)
    return {
        "schema": SCHEMA_ID,
        "script_version": SCRIPT_VERSION,
        "created": datetime.datetime.now(datetime.timezone.utc).replace(microsecond=0).isoformat(),
        "duration_s": round(time.time() - start, 2),
        "host": {
            "hostname": socket.gethostname(),
            "platform": platform.platform(),
            "machine": platform.machine(),
            "python": {
                "executable": sys.executable,
                "version": platform.python_version(),
                "prefix": sys.prefix,
                "in_venv": sys.prefix != sys.base_prefix,
            },
        },
        "options": {
            "require_te": opts.require_te,
            "cpu_ok": opts.cpu_ok,
            "workdirs": opts.workdirs,
            "timeout_s": opts.timeout,
        },
        "summary": summarize(checks),
        "facts": facts(ctx),
        "te_build_env": ctx.te_plan,
        "checks": [c.to_dict() for c in checks],
    }


# ----------------------------------------------------------------------------- rendering

COLORS = {"pass": "32", "warn": "33", "fail": "31", "skip": "2"}


def render_table(report: dict, color: bool) -> str:
    def paint(text: str, status: str) -> str:
        return "\033[%sm%s\033[0m" % (COLORS[status], text) if color else text

    host, py = report["host"], report["host"]["python"]
    lines = [
        "megafleet environment check on %s: Python %s (%s)"
        % (host["hostname"], py["version"], py["executable"]),
        "",
    ]
    width = max(len(c["id"]) for c in report["checks"]) + 2
    for c in report["checks"]:
        word = c["status"].upper() if c["status"] in ("fail", "warn") else c["status"]
        level = "" if c["level"] == REQUIRED else " (optional)"
        lines.append(
            "  %s  %s%s%s"
            % (
                paint(word.ljust(4), c["status"]),
                c["id"].ljust(width),
                c["detail"],
                level if c["status"] != "pass" else "",
            )
        )
        if c["fix"] and c["status"] in ("fail", "warn"):
            for i, fix_line in enumerate(c["fix"].splitlines()):
                prefix = "fix: " if i == 0 else "     "
                lines.append(" " * (8 + width) + prefix + fix_line)
    s = report["summary"]
    lines.append("")
    verdict = (
        "all required checks passed"
        if s["ok"]
        else "required checks failed: %s" % ", ".join(s["failed_required"])
    )
    lines.append(
        "%d passed, %d warnings, %d failed, %d skipped: %s"
        % (
            s["counts"]["pass"],
            s["counts"]["warn"],
            s["counts"]["fail"],
            s["counts"]["skip"],
            paint(verdict, "pass" if s["ok"] else "fail"),
        )
    )
    return "\n".join(lines)


def use_color(stream) -> bool:
    return (
        hasattr(stream, "isatty")
        and stream.isatty()
        and not os.environ.get("NO_COLOR")
        and os.environ.get("TERM") != "dumb"
    )


# ----------------------------------------------------------------------------------- CLI


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="check_megatron_env.py",
        description="Check this machine's Megatron training environment and print fixes.",
        epilog="exit codes: 0 all required checks passed, 1 a required check failed, 2 usage error",
    )
    p.add_argument("--json", action="store_true", help="print one JSON document on stdout")
    p.add_argument(
        "--require-te", action="store_true", help="make transformer-engine a required check"
    )
    p.add_argument(
        "--cpu-ok",
        action="store_true",
        help="accept a machine without CUDA GPUs (GPU checks become optional)",
    )
    p.add_argument(
        "--workdir",
        action="append",
        default=[],
        metavar="DIR",
        help="check free disk space here (repeatable; default: current directory)",
    )
    p.add_argument(
        "--timeout",
        type=float,
        default=DEFAULT_PROBE_TIMEOUT,
        metavar="S",
        help="seconds each package probe may take (default %(default)s)",
    )
    p.add_argument(
        "--print-te-env",
        action="store_true",
        help="print only the export lines for building transformer-engine",
    )
    p.add_argument("--venv", metavar="DIR", help="with --print-te-env: the venv to plan for")
    p.add_argument("--version", action="version", version="%(prog)s " + SCRIPT_VERSION)
    p.add_argument("--probe", nargs=2, metavar=("KIND", "SPEC"), help=argparse.SUPPRESS)
    return p


def print_te_env(args) -> int:
    if args.venv:
        site_dirs = venv_site_packages(args.venv)
        if not site_dirs:
            sys.stderr.write("error: %s has no lib/python3*/site-packages\n" % args.venv)
            return 2
    else:
        site_dirs = interpreter_site_packages()
    plan = plan_te_build(site_dirs)
    if args.json:
        sys.stdout.write(json.dumps(plan, indent=2) + "\n")
    else:
        sys.stdout.write("\n".join(plan["export_lines"]) + "\n")
        for what in plan["missing"]:
            sys.stderr.write("missing: %s\n" % what)
    return 1 if plan["missing"] else 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    sys.dont_write_bytecode = True
    if args.probe:
        if args.probe[0] not in PROBES:
            sys.stderr.write("error: unknown probe %s\n" % args.probe[0])
            return 2
        return probe_main(*args.probe)
    if args.venv and not args.print_te_env:
        build_parser().error("--venv only goes with --print-te-env")
    if args.timeout <= 0:
        build_parser().error("--timeout must be positive")
    if args.print_te_env:
        return print_te_env(args)
    report = collect_report(
        Options(
            require_te=args.require_te,
            cpu_ok=args.cpu_ok,
            workdirs=args.workdir,
            timeout=args.timeout,
        )
    )
    if args.json:
        sys.stdout.write(json.dumps(report, indent=2) + "\n")
    else:
        sys.stdout.write(render_table(report, use_color(sys.stdout)) + "\n")
    return report["summary"]["exit_code"]


if __name__ == "__main__":
    sys.exit(main())
