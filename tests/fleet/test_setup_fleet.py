"""`megafleet setup` on namespace hosts that cannot reach any package index: everything comes
from a wheelhouse built during the test (CPU torch 2.13.0, megatron-core 0.16.1, transformers,
safetensors, tokenizers, their dependencies and the project wheel). Two hosts are set up at
once: node1 with uv (its binary put on node1's PATH when the test environment has uv), node2
with python -m venv + pip. node2's setup is killed (agent and pip, SIGKILL) while pip installs
the runtime packages; the second run skips node1 entirely, resumes node2 and ends with the
environment check passing on both; a third run skips every step in under 10 s.

The wheelhouse is cached under /var/tmp keyed by its inputs (a clean machine builds it in
about 15 s: ~240 MB, mostly torch's CPU wheel from the local find-links folder)."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from megafleet.setup.request import node_requirements
from megafleet.setup.wheelhouse import DEFAULT_PLATFORMS
from tests.conftest import REPO_ROOT, cli_env, run_cli_json

pytestmark = pytest.mark.fleet

TORCH = "torch==2.13.0"
HOST_PYTHON = "/usr/bin/python3"  # host users cannot read /root, where the test's python lives


def _host_python_version() -> str:
    out = subprocess.run(
        [HOST_PYTHON, "-c", "import sys; print('%d.%d' % sys.version_info[:2])"],
        capture_output=True,
        text=True,
    )
    if out.returncode != 0:
        pytest.skip(f"no {HOST_PYTHON}")
    return out.stdout.strip()


@pytest.fixture(scope="session")
def wheelhouse():
    version = _host_python_version()
    key = hashlib.sha256(
        json.dumps([TORCH, node_requirements(), version, list(DEFAULT_PLATFORMS)]).encode()
    ).hexdigest()[:12]
    path = Path("/var/tmp") / f"megafleet-test-wheelhouse-{key}"
    started = time.monotonic()
    proc, doc = run_cli_json(
        "setup",
        "--build-wheelhouse",
        str(path),
        "--python-version",
        version,
        "--torch",
        TORCH,
        "--json",
        timeout=900,
    )
    assert proc.returncode == 0, proc.stderr
    names = sorted(os.listdir(path))
    assert any(n.startswith("torch-2.13.0+cpu") for n in names), names
    assert any(n.startswith("megatron_core-0.16.1") for n in names), names
    print(
        f"\nwheelhouse {path}: {doc['files']} files, {doc['bytes'] / 2**20:.0f} MiB, "
        f"{'downloaded' if doc['downloaded'] else 'from cache'} in "
        f"{time.monotonic() - started:.1f}s"
    )
    return path


def _node_file(node, rel: str) -> Path:
    return Path(f"/home/{node.user}") / rel


def _pids(node, pattern: str) -> list[int]:
    out = subprocess.run(["pgrep", "-u", node.user, "-f", pattern], capture_output=True, text=True)
    return [int(p) for p in out.stdout.split()]


def _kill_during_package_install(node, timeout: float = 300) -> dict:
    """Wait until pip is installing the runtime packages on `node`, then SIGKILL the setup
    agent and pip (no chance to clean up: like a lost connection or a crashed machine)."""
    log = _node_file(node, "megafleet/setup/logs/latest.log")
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        text = log.read_text() if log.exists() else ""
        _, header, after = text.partition("] packages: ")
        if header and "Installing collected packages" in after:
            agents, pips = _pids(node, "megafleet_node"), _pids(node, "pip install")
            for pid in agents + pips:
                os.kill(pid, signal.SIGKILL)
            return {"agents": agents, "pips": pips}
        time.sleep(0.1)
    raise AssertionError(f"pip never reached the install phase:\n{log.read_text()[-3000:]}")


def _states(doc: dict, host: str) -> dict:
    return {s["id"]: s["state"] for s in doc["hosts"][host]["steps"]}


def _uv_binary() -> str | None:
    found = shutil.which("uv")
    if found:
        return found
    try:
        import uv

        return uv.find_uv_bin()
    except (ImportError, FileNotFoundError):
        return None


@pytest.fixture
def uv_on_node1(fleet):
    """node1 gets uv on its PATH when this environment has uv (else it also uses pip)."""
    uv = _uv_binary()
    target = fleet.host("node1").bin_dir / "uv"
    if uv:
        shutil.copy(uv, target)
        target.chmod(0o755)
    yield bool(uv)
    target.unlink(missing_ok=True)


@pytest.mark.slow
def test_offline_setup_of_two_hosts_killed_resumed_checked_then_a_no_op(
    fleet, fleet_home, wheelhouse, uv_on_node1
):
    node1, node2 = fleet.host("node1"), fleet.host("node2")
    for node in (node1, node2):  # hosts that never had megafleet (other tests leave venvs)
        node.run("rm -rf ~/megafleet")
    fleet.write_inventory(fleet_home, [node1, node2])
    no_net = node2.run(
        "python3 -c \"import socket; socket.create_connection(('pypi.org', 443), timeout=3)\"",
        check=False,
    )
    assert no_net.returncode != 0  # the hosts have no route to any package index
    env = {"MEGAFLEET_HOME": str(fleet_home)}
    args = (
        "setup",
        "--hosts",
        "node1,node2",
        "--wheelhouse",
        str(wheelhouse),
        "--base-python",
        HOST_PYTHON,
        "--yes",
        "--json",
    )
    times = {}

    # 1. both in parallel; node2 killed while pip installs megatron-core & co.
    started = time.monotonic()
    first = subprocess.Popen(
        [sys.executable, "-m", "megafleet", *args],
        env=cli_env(env),
        cwd=REPO_ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    killed = _kill_during_package_install(node2)
    out, err = first.communicate(timeout=300)
    times["run 1 (node2 killed)"] = time.monotonic() - started
    assert killed["agents"] and killed["pips"]
    doc = json.loads(out)
    assert first.returncode == 4, err
    one, two = doc["hosts"]["node1"], doc["hosts"]["node2"]
    assert one["status"] == "ok" and two["status"] == "failed", json.dumps(one)[:6000]
    assert one["facts"]["installer"] == ("uv" if uv_on_node1 else "pip")
    assert "the setup stopped before it finished" in two["message"]
    assert two["uploads"]["files"] >= 30  # the whole wheelhouse and the project wheel
    (marker_path,) = _node_file(node2, "megafleet/setup/state").glob("*.json")
    marker = json.loads(marker_path.read_text())["steps"]
    assert marker["venv"]["outcome"]["python"].startswith(_host_python_version())
    assert marker["torch"]["outcome"]["torch"] == "2.13.0+cpu"
    assert marker["packages"]["state"] == "running"  # killed mid-step

    # 2. node1 is left alone, node2 resumes at the interrupted step; both checks pass
    started = time.monotonic()
    proc, doc = run_cli_json(*args, env=env, timeout=600)
    times["run 2 (resumed)"] = time.monotonic() - started
    assert proc.returncode == 0, proc.stderr + json.dumps(doc["hosts"]["node2"].get("failed"))
    assert set(_states(doc, "node1").values()) == {"skipped"}
    assert _states(doc, "node2") == {
        "venv": "skipped",
        "torch": "skipped",
        "packages": "done",
        "project": "done",
        "check": "done",
    }
    resumed = doc["hosts"]["node2"]
    assert resumed["uploads"]["files"] == 0
    packages = next(s for s in resumed["steps"] if s["id"] == "packages")
    assert packages["reason"].startswith("interrupted during the last run")
    assert doc["findings"] == []  # same torch, megatron-core, ... on both hosts
    for name, node in (("node1", node1), ("node2", node2)):
        report = doc["hosts"][name]["report"]["report"]
        assert report["summary"]["ok"] and report["options"]["cpu_ok"]
        facts = report["facts"]
        assert (facts["torch"], facts["megatron_core"]) == ("2.13.0+cpu", "0.16.1")
        assert facts["transformers"] and facts["safetensors"] and facts["tokenizers"]
        venv_python = f"/home/{node.user}/megafleet/venv/bin/python"
        assert report["host"]["python"]["executable"] == venv_python
    ran = node2.run(
        f"/home/{node2.user}/megafleet/venv/bin/python -c "
        "'import megafleet, remote_runtime.spec.config; print(megafleet.__file__)'"
    )
    assert "/megafleet/venv/lib/" in ran.stdout  # this checkout, installed as a wheel

    # 3. nothing to do: every step skipped on both hosts, in seconds
    started = time.monotonic()
    proc, doc = run_cli_json(*args, env=env, timeout=120)
    times["run 3 (no-op)"] = time.monotonic() - started
    assert proc.returncode == 0, proc.stderr
    for name in ("node1", "node2"):
        assert set(_states(doc, name).values()) == {"skipped"}
        assert doc["hosts"][name]["uploads"]["files"] == 0
        assert doc["hosts"][name]["report"]["report"]["summary"]["ok"]
    assert times["run 3 (no-op)"] < 10, times
    log = _node_file(node2, "megafleet/setup/logs/latest.log").read_text()
    assert "--- [5/5] check: skipped" in log
    print("\n" + ", ".join(f"{k} {v:.1f}s" for k, v in times.items()))


def test_dry_run_over_ssh_picks_torch_for_the_drivers_cuda_and_changes_nothing(fleet, fleet_home):
    """node0 reports 2 H200s through a STUB nvidia-smi (driver 580.159.04, CUDA 13.0): torch
    must come from PyTorch's cu130 index; node1 has no GPU: CPU torch."""
    node0, node1 = fleet.host("node0"), fleet.host("node1")
    fleet.write_inventory(fleet_home, [node0, node1])
    node0.install_stub_nvidia_smi()
    node0.run("rm -rf ~/megafleet", check=False)
    proc, doc = run_cli_json(
        "setup",
        "--hosts",
        "node0,node1",
        "--dry-run",
        "--json",
        "--venv",
        "dry-venv",
        env={"MEGAFLEET_HOME": str(fleet_home)},
    )
    assert proc.returncode == 0, proc.stderr
    gpu, cpu = doc["hosts"]["node0"], doc["hosts"]["node1"]
    assert gpu["facts"]["gpus"] == ["NVIDIA H200", "NVIDIA H200"]
    assert gpu["facts"]["driver"] == "580.159.04"

    def torch_cmd(host):
        step = next(s for s in host["plan"] if s["id"] == "torch")
        return step["commands"][-1]["shell"]

    assert "--index-url https://download.pytorch.org/whl/cu130 'torch>=2.6'" in torch_cmd(gpu)
    assert "--index-url https://download.pytorch.org/whl/cpu 'torch>=2.6'" in torch_cmd(cpu)
    check = next(s for s in gpu["plan"] if s["id"] == "check")["commands"][0]["argv"]
    assert (
        "--cpu-ok" not in check
        and "--cpu-ok" in next(s for s in cpu["plan"] if s["id"] == "check")["commands"][0]["argv"]
    )
    assert gpu["uploads"]["names"] == ["megafleet-0.1.0-py3-none-any.whl"]
    assert node0.run("ls ~/megafleet ~/dry-venv", check=False).returncode != 0  # nothing written
