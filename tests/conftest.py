"""Shared test setup: tiers (markers), the CLI runner, and an isolated MEGAFLEET_HOME.

Tiers (see pyproject markers): unit tests need nothing; `runtime` tests need torch and
megatron-core; `fleet` tests need root, sshd and iproute2 (they build real hosts in network
namespaces); `gpu` tests need CUDA. Missing prerequisites skip a tier, except that CI sets
MEGAFLEET_REQUIRE_FLEET=1, which turns a skipped fleet or runtime tier into a failure.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parent.parent
REQUIRE_ALL = os.environ.get("MEGAFLEET_REQUIRE_FLEET") == "1"

# Without a GPU, Triton kernels run under Triton's CPU interpreter. It must be chosen before
# triton is first imported (its standard library is decorated then), so here, before any test.
if not Path("/dev/nvidiactl").exists():
    os.environ.setdefault("TRITON_INTERPRET", "1")


def _fleet_missing() -> str | None:
    if os.geteuid() != 0:
        return "fleet tests need root (network namespaces)"
    if not (shutil.which("sshd") or Path("/usr/sbin/sshd").exists()):
        return "fleet tests need OpenSSH sshd (apt-get install openssh-server)"
    if not shutil.which("ip"):
        return "fleet tests need iproute2"
    return None


def _runtime_missing() -> str | None:
    for mod in ("torch", "megatron.core", "transformers", "safetensors"):
        if importlib.util.find_spec(mod.split(".")[0]) is None:
            return f"runtime tests need {mod} (./dev setup installs it)"
    return None


def _gpu_missing() -> str | None:
    try:
        import torch

        return None if torch.cuda.is_available() else "no CUDA GPU"
    except ImportError:
        return "no torch"


_TIER_CHECKS = {"fleet": _fleet_missing, "runtime": _runtime_missing, "gpu": _gpu_missing}
_tier_reasons: dict[str, str | None] = {}


def pytest_runtest_setup(item):
    for tier, check in _TIER_CHECKS.items():
        if tier not in item.keywords:
            continue
        if tier not in _tier_reasons:
            _tier_reasons[tier] = check()
        reason = _tier_reasons[tier]
        if reason is None:
            continue
        if REQUIRE_ALL and tier != "gpu":
            pytest.fail(f"required test tier '{tier}' cannot run: {reason}")
        pytest.skip(reason)


def cli_env(extra: dict | None = None) -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO_ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    env.setdefault("NO_COLOR", "1")
    env["COLUMNS"] = "200"
    env.update(extra or {})
    return env


def run_cli(
    *args: str,
    env: dict | None = None,
    input: str | None = None,
    timeout: float = 300,
    cwd: str | Path | None = None,
) -> subprocess.CompletedProcess:
    """Run `megafleet ARGS` as a user would (a separate process), from this checkout."""
    return subprocess.run(
        [sys.executable, "-m", "megafleet", *args],
        capture_output=True,
        text=True,
        env=cli_env(env),
        input=input,
        timeout=timeout,
        cwd=cwd or REPO_ROOT,
    )


def run_cli_json(*args: str, **kw):
    proc = run_cli(*args, **kw)
    try:
        return proc, json.loads(proc.stdout)
    except json.JSONDecodeError:
        raise AssertionError(f"not JSON (rc={proc.returncode}):\n{proc.stdout}\n{proc.stderr}")


@pytest.fixture
def megafleet_home(tmp_path, monkeypatch):
    """An empty MEGAFLEET_HOME (inventory, known_hosts, runs) for this test, in-process and for
    subprocesses started with cli_env()."""
    home = tmp_path / "megafleet-home"
    home.mkdir(mode=0o700)
    monkeypatch.setenv("MEGAFLEET_HOME", str(home))
    monkeypatch.chdir(tmp_path)
    return home


pytest_plugins = ["tests.fleet_fixture"]
