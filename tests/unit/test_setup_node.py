"""Node side of `megafleet setup`, run as on a node: the agent's plan mode through the same
stdin bootstrap the SSH runner uses (a real subprocess, here through LocalRunner), plus its
building blocks (lock, marker, redaction, install environment, step decisions)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from megafleet.runner import LocalRunner
from megafleet.setup.node import CHECK, core
from megafleet.setup.node.agent import decide
from megafleet.setup.node.context import Ctx
from megafleet.setup.node.steps import Step
from megafleet.setup.remote import run_agent
from megafleet.setup.request import SetupOptions, build_request
from tests.unit.setup_fakes import fake_cuda_home, fake_cuda_venv

PY38 = "/root/.pyenv/versions/3.8.18/bin/python"
WHEEL = {"name": "megafleet-0.1.0-py3-none-any.whl", "sha256": "0" * 64}


def test_installed_packages_and_torch_cuda_are_read_without_importing(tmp_path):
    venv, sp = fake_cuda_venv(tmp_path / "v")
    (sp / "Megatron_Core-0.16.1.dist-info").mkdir()
    (sp / "PyYAML-6.0.egg-info").mkdir()
    dists = core.installed_dists([str(sp)])
    assert dists["torch"] == "2.11.0+cu130" and dists["megatron-core"] == "0.16.1"
    assert dists["pyyaml"] == "6.0"
    assert core.torch_cuda([str(sp)]) == "13.0"
    _, cpu_sp = fake_cuda_venv(tmp_path / "cpu", "2.13.0+cpu", None, headers=False)
    assert core.torch_cuda([str(cpu_sp)]) is None


def test_offline_installs_see_no_pip_or_uv_configuration(tmp_path):
    base = {
        "PATH": os.environ["PATH"],
        "HOME": str(tmp_path),
        "PIP_FIND_LINKS": "/opt/wheels",
        "PIP_EXTRA_INDEX_URL": "file:///opt/pypi/simple",
        "UV_INDEX_URL": "https://x/simple",
        "PYTHONPATH": "/somewhere/else",
        "HF_TOKEN": "hf_secret",
    }
    offline = core.child_env({"MAX_JOBS": "3"}, offline=True, base=base)
    assert offline["PIP_CONFIG_FILE"] == os.devnull and offline["UV_NO_CONFIG"] == "1"
    leaked = {"PIP_FIND_LINKS", "PIP_EXTRA_INDEX_URL", "UV_INDEX_URL", "PYTHONPATH"} & set(offline)
    assert not leaked
    assert offline["MAX_JOBS"] == "3" and offline["PIP_NO_INPUT"] == "1"
    online = core.child_env({}, offline=False, base=base)  # a node's own mirror stays in use
    assert online["PIP_FIND_LINKS"] == "/opt/wheels" and "PYTHONPATH" not in online
    # pip itself then sees no find-links or index from any config file (e.g. /etc/pip.conf)
    proc = subprocess.run(
        [sys.executable, "-m", "pip", "config", "list"], env=offline, capture_output=True, text=True
    )
    assert proc.returncode == 0
    assert sorted(proc.stdout.split()) == [
        ":env:.config-file='/dev/null'",
        ":env:.disable-pip-version-check='1'",
        ":env:.no-input='1'",
    ]


def test_secrets_are_redacted_from_logs_and_displayed_environments():
    red = core.Redactor(
        {"HF_TOKEN": "hf_abcdef123", "PATH": "/usr/bin", "AWS_SECRET_ACCESS_KEY": "wJalrXUtnFEMI"},
        CHECK.SECRET_NAME,
    )
    line = red("Looking in indexes: https://alice:p4ss@mirror.example/simple token hf_abcdef123")
    assert line == "Looking in indexes: https://****@mirror.example/simple token ****"
    assert red("key wJalrXUtnFEMI in /usr/bin") == "key **** in /usr/bin"
    assert red.env_for_display({"HF_TOKEN": "x", "MAX_JOBS": "2"}) == {
        "HF_TOKEN": "****",
        "MAX_JOBS": "2",
    }


def test_the_lock_refuses_a_second_setup_and_dies_with_its_holder(tmp_path):
    path = tmp_path / "setup.lock"
    code = (
        "import sys, time; from megafleet.setup.node.core import SetupLock\n"
        f"SetupLock({str(path)!r}).acquire({{'pid': 4242, 'started': 'then'}})\n"
        "print('locked', flush=True); time.sleep(60)"
    )
    holder = subprocess.Popen(
        [sys.executable, "-c", code],
        stdout=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONPATH": os.getcwd()},
    )
    try:
        assert holder.stdout.readline().strip() == "locked"
        assert core.lock_is_held(str(path))
        with pytest.raises(core.LockBusy) as busy:
            core.SetupLock(str(path)).acquire({"pid": os.getpid()})
        assert busy.value.holder == {"pid": 4242, "started": "then"}
    finally:
        holder.kill()
        holder.wait()
    assert not core.lock_is_held(str(path))  # the kernel released it: no stale lock
    lock = core.SetupLock(str(path))
    lock.acquire({"pid": os.getpid()})
    lock.release()


def test_marker_is_per_venv_and_survives_reload(tmp_path):
    path = str(tmp_path / "state" / "v.json")
    m = core.Marker(path, "/home/u/megafleet/venv")
    m.save_step("venv", {"fingerprint": "abc", "outcome": {"python": "3.11.2"}})
    assert core.Marker(path, "/home/u/megafleet/venv").record("venv")["fingerprint"] == "abc"
    assert core.Marker(path, "/other/venv").record("venv") is None
    assert oct(os.stat(path).st_mode & 0o777) == "0o600"


class _Packages(Step):
    id = "packages"

    def inputs(self, ctx):
        return {"source": ctx.source(), "x": ctx.req["x"]}


def test_a_step_is_skipped_only_with_the_same_inputs_and_its_packages_still_there(
    tmp_path, monkeypatch
):
    monkeypatch.setenv("HOME", str(tmp_path))
    venv, _ = fake_cuda_venv(tmp_path / "v", headers=False)
    req = {"venv": str(venv), "x": 1, "installer": "pip"}
    ctx = Ctx(req, core.Redactor({}, CHECK.SECRET_NAME))
    marker = core.Marker(ctx.marker_path, ctx.venv)
    step = _Packages()
    inputs, fp, why = decide(ctx, marker, step, [])
    assert why == "not done yet"
    marker.save_step(
        "packages",
        {"fingerprint": fp, "inputs": inputs, "outcome": {"dists": {"torch": "2.11.0+cu130"}}},
    )
    assert decide(ctx, marker, step, [])[2] is None
    assert (
        decide(ctx, marker, step, [{"torch": "2.12.0"}])[2]
        == "changed since last run: an earlier step's result"
    )
    req["x"] = 2
    assert decide(ctx, marker, step, [])[2] == "changed since last run: x"
    req["x"] = 1
    marker.save_step(
        "packages", {"fingerprint": fp, "inputs": inputs, "outcome": {"dists": {"torch": "2.10.0"}}}
    )
    assert decide(ctx, marker, step, [])[2] == "torch 2.10.0 was recorded, now 2.11.0+cu130"
    req["force"] = ["packages"]
    assert decide(ctx, marker, step, [])[2] == "forced (--force)"


def _plan(tmp_path, monkeypatch, agent_python=sys.executable, headers=True, **opts):
    """The agent's plan for a fake CUDA venv at ~/fakevenv, run like on a node."""
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.setenv("CUDA_HOME", str(fake_cuda_home(tmp_path / "cuda")))
    venv, sp = fake_cuda_venv(home / "fakevenv", headers=headers)
    options = SetupOptions(venv="~/fakevenv", with_te=True, base_python=sys.executable, **opts)
    req = build_request(options, "plan", WHEEL, None, "c" * 64)
    res, events = run_agent(LocalRunner(), req, agent_python)
    assert res.ok, res.describe()
    (plan,) = [e for e in events if e["ev"] == "plan"]
    return plan, home, sp


@pytest.mark.parametrize("agent_python", [sys.executable, PY38], ids=["python", "python3.8"])
def test_te_build_paths_are_the_venvs_real_paths_without_tilde(tmp_path, monkeypatch, agent_python):
    if not os.path.exists(agent_python):
        pytest.skip(f"no {agent_python}")
    plan, home, sp = _plan(tmp_path, monkeypatch, agent_python, max_jobs=3)
    te = next(s for s in plan["steps"] if s["id"] == "te")
    env = te["build_plan"]["vars"]
    nvidia = str(sp / "nvidia")
    assert env["CUDNN_PATH"] == env["CUDNN_HOME"] == f"{nvidia}/cudnn"
    assert env["CPLUS_INCLUDE_PATH"].split(":")[:2] == [
        f"{nvidia}/cudnn/include",
        f"{nvidia}/nccl/include",
    ]
    assert env["LIBRARY_PATH"].split(":")[:2] == [f"{nvidia}/cudnn/lib", f"{nvidia}/nccl/lib"]
    assert env["CUDA_HOME"] == str(tmp_path / "cuda") and env["MAX_JOBS"] == "3"
    assert te["build_plan"]["missing"] == []
    assert te["build_plan"]["cudnn"]["version"] == "9.10.2"
    build = te["commands"][-1]
    assert "transformer_engine[pytorch,core_cu13]>=2.9,<2.12" in build["argv"]
    assert "--no-build-isolation" in build["argv"]
    assert build["env"]["CUDNN_PATH"] == env["CUDNN_PATH"]
    assert f"export CPLUS_INCLUDE_PATH={nvidia}/cudnn/include:" in "\n".join(
        te["build_plan"]["export_lines"]
    )
    assert "~" not in json.dumps(plan["steps"]) and plan["facts"]["venv"] == str(home / "fakevenv")
    assert sorted(os.listdir(home)) == ["fakevenv"]  # planning wrote nothing on the "node"


def test_missing_headers_block_the_te_step_with_the_wheel_to_install(tmp_path, monkeypatch):
    # pip, not uv: whether uv is on this machine must not change what the test expects
    plan, _, sp = _plan(tmp_path, monkeypatch, headers=False, installer="pip")
    te = next(s for s in plan["steps"] if s["id"] == "te")
    assert te["blocked"]["message"] == "cannot build transformer-engine: missing cudnn.h, nccl.h"
    assert "nvidia-cudnn-cu13" in te["blocked"]["fix"]
    assert "nvidia-nccl-cu13" in te["blocked"]["fix"]
    venv = next(s for s in plan["steps"] if s["id"] == "venv")
    assert venv["state"] == "run" and venv["reason"] == "not done yet"
    assert venv["commands"][0]["argv"][-3:] == ["-m", "ensurepip", "--upgrade"]  # venv lacks pip


def test_node_agent_hashes_files_as_the_operator_does(tmp_path):
    """The stdlib-only node agent keeps its own sha256 helper; the operator compares its
    manifests against megafleet.transfer.file_sha256, so the two must agree (also past one
    block)."""
    from megafleet.transfer import file_sha256

    f = tmp_path / "wheel.whl"
    f.write_bytes(os.urandom(3 * (1 << 20) + 17))
    assert core.sha256_file(str(f)) == file_sha256(f)
