"""Operator side of `megafleet setup`: the project wheel, the requirement set, known fixes on
sample failure logs, the failure display, and the CLI in local mode (dry run, lock held)."""

from __future__ import annotations

import hashlib
import io
import os
import subprocess
import sys
import zipfile

import pytest
import tomllib

from megafleet.errors import UsageError
from megafleet.setup import fixes, wheel
from megafleet.setup.remote import HostSetupResult
from megafleet.setup.request import SetupOptions, node_requirements, torch_requirement
from megafleet.setup.view import show_failure
from tests.conftest import REPO_ROOT, cli_env, run_cli, run_cli_json
from tests.unit.setup_fakes import fake_cuda_home, fake_cuda_venv


def test_project_wheel_is_reproducible_complete_and_installable(tmp_path, monkeypatch):
    one, two = wheel.wheel_bytes(), wheel.wheel_bytes()
    assert one == two  # same code, same sha256: nodes skip the reinstall
    names = zipfile.ZipFile(io.BytesIO(one)).namelist()
    assert "megafleet/_bundled/check_megatron_env.py" in names
    assert "remote_runtime/spec/config.py" in names and "megafleet/setup/node/agent.py" in names
    assert not [n for n in names if "__pycache__" in n or n.endswith(".pyc")]
    path, sha = wheel.build_project_wheel(tmp_path)
    assert path.name == "megafleet-0.1.0-py3-none-any.whl"
    assert sha == hashlib.sha256(path.read_bytes()).hexdigest()
    target = tmp_path / "target"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "install",
            "-q",
            "--no-deps",
            "--no-index",
            "--target",
            str(target),
            str(path),
        ],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 0, proc.stderr
    assert (target / "remote_runtime" / "__init__.py").exists()
    assert (target / "megafleet" / "_bundled" / "check_megatron_env.schema.json").exists()
    extra = dict(wheel.project_files(), **{"megafleet/extra.py": path})
    monkeypatch.setattr(wheel, "project_files", lambda: extra)
    assert wheel.wheel_bytes() != one  # a changed checkout is a different wheel


def test_node_requirements_are_the_runtime_extra():
    extra = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())
    runtime = set(extra["project"]["optional-dependencies"]["runtime"])
    assert torch_requirement() in runtime
    assert runtime - {torch_requirement()} <= set(node_requirements())
    assert "megatron-core>=0.16,<0.17" in node_requirements()


def test_options_are_validated():
    with pytest.raises(UsageError, match="--force bogus"):
        SetupOptions(force=("bogus",)).validate()
    with pytest.raises(UsageError, match="need a CUDA torch"):
        SetupOptions(with_te=True, torch_index="cpu").validate()
    assert SetupOptions().venv == "megafleet/venv"


SAMPLES = {
    "build_out_of_memory": [
        "building 'transformer_engine_torch' extension",
        "c++: fatal error: Killed signal terminated program cc1plus",
        "compilation terminated.",
        "ninja: build stopped: subcommand failed.",
    ],
    "no_space_left": [
        "Installing collected packages: torch",
        "ERROR: Could not install packages due to an OSError: [Errno 28] No space left on device",
    ],
    "missing_cudnn_h": [
        "/tmp/pip-build/common/cudnn_utils.h:10:10: fatal error: cudnn.h: "
        "No such file or directory",
        "   10 | #include <cudnn.h>",
    ],
    "missing_nccl_h": ["csrc/comm.cpp:3:10: fatal error: nccl.h: No such file or directory"],
    "nvcc_missing": [
        "OSError: CUDA_HOME environment variable is not set. Please set it to your "
        "CUDA install root."
    ],
    "wheel_not_in_wheelhouse": [
        "ERROR: Could not find a version that satisfies the "
        "requirement megatron-core<0.17,>=0.16 (from versions: none)",
        "ERROR: No matching distribution found for megatron-core",
    ],
    "no_venv_module": [
        "The virtual environment was not created successfully because ensurepip is not available."
    ],
}


@pytest.mark.parametrize("problem", sorted(SAMPLES))
def test_known_problems_are_recognised_with_their_fix(problem):
    failed = {
        "build_plan": {
            "vars": {"MAX_JOBS": "8"},
            "export_lines": [
                "export CUDNN_PATH=/home/u/megafleet/venv/lib/python3.12/site-packages/nvidia/cudnn"
            ],
        },
        "torch_cuda": "12.8",
    }
    ctx = fixes.context_for(failed, "/home/u/megafleet/venv", "3.12.3", "/data/wheels")
    found = fixes.match_known_problem(["Collecting x", *SAMPLES[problem], "done"], ctx)
    assert found and found["id"] == problem
    assert "{" not in found["fix"] and "?" not in found["fix"]
    if problem == "build_out_of_memory":
        assert "--max-jobs 4" in found["fix"] and "used 8" in found["fix"]
    if problem == "missing_cudnn_h":
        assert "nvidia-cudnn-cu12" in found["fix"] and "export CUDNN_PATH=/home/u" in found["fix"]
    if problem == "wheel_not_in_wheelhouse":
        assert "--build-wheelhouse /data/wheels --python-version 3.12" in found["fix"]


def test_an_unknown_failure_has_no_known_problem():
    assert (
        fixes.match_known_problem(
            ["Traceback (most recent call last):", "ValueError: something else"], {}
        )
        is None
    )


def test_a_failure_shows_its_step_the_last_30_lines_and_the_fix(capsys):
    tail = [f"line {i}" for i in range(100)] + SAMPLES["missing_nccl_h"]
    r = HostSetupResult(
        "node1",
        "failed",
        log="/home/u/megafleet/setup/logs/latest.log",
        failed={
            "step": "te",
            "title": "transformer-engine",
            "tail": tail,
            "message": "`build transformer-engine` exited with status 1",
        },
        known_problem=fixes.match_known_problem(tail, {}),
    )
    show_failure(r)
    out = capsys.readouterr().out
    assert "node1: step te (transformer-engine) failed" in out
    assert "last 30 lines of /home/u/megafleet/setup/logs/latest.log" in out
    assert "| line 71" in out and "| line 70\n" not in out and "fatal error: nccl.h" in out
    assert "known problem: nccl.h not found" in out and "nvidia-nccl-cu13" in out


def _env(home, mf_home, **extra):
    return {"HOME": str(home), "MEGAFLEET_HOME": str(mf_home), **extra}


def test_dry_run_prints_commands_and_environment_and_changes_nothing(tmp_path):
    home, mf = tmp_path / "home", tmp_path / "mf"
    home.mkdir()
    mf.mkdir()
    fake_cuda_venv(home / "fakevenv")
    wheels = tmp_path / "wheels"
    wheels.mkdir()
    (wheels / "torch-2.11.0+cu130-cp311-cp311-manylinux_2_28_x86_64.whl").write_bytes(b"x" * 10)
    env = _env(
        home, mf, CUDA_HOME=str(fake_cuda_home(tmp_path / "cuda")), PIP_FIND_LINKS="/opt/wheels"
    )
    args = (
        "setup",
        "--local",
        "--dry-run",
        "--with-te",
        "--venv",
        "~/fakevenv",
        "--wheelhouse",
        str(wheels),
        "--base-python",
        sys.executable,
    )
    proc = run_cli(*args, env=env)
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    site = next((home / "fakevenv" / "lib").glob("python3*/site-packages"))
    assert f"cudnn: {site}/nvidia/cudnn/include (venv, 9.10.2)" in out
    assert f"env CUDNN_PATH={site}/nvidia/cudnn" in out and "env PIP_CONFIG_FILE=/dev/null" in out
    assert any(
        line.strip().startswith("unset ") and "PIP_FIND_LINKS" in line.split()
        for line in out.splitlines()
    )
    assert f"--no-index --find-links {home}/megafleet/setup/wheelhouse" in out
    assert "would upload 2 file(s)" in out  # the wheelhouse's one wheel and the project wheel
    assert sorted(os.listdir(home)) == ["fakevenv"]
    proc, doc = run_cli_json(*args, "--json", env=env)
    assert proc.returncode == 0 and doc["dry_run"] is True
    steps = {s["id"]: s for s in doc["hosts"]["local"]["plan"]}
    assert [c["title"] for c in steps["te"]["commands"]] == [
        "pin torch",
        "install build tools",
        "build transformer-engine",
    ]
    assert doc["hosts"]["local"]["uploads"]["files"] == 2


class _HeldLock:
    """Another setup on the "host" (this machine with HOME=home): a process holding its lock."""

    def __init__(self, home):
        self.path = home / "megafleet" / "setup" / "setup.lock"

    def __enter__(self):
        self.path.parent.mkdir(parents=True)
        code = (
            "import time; from megafleet.setup.node.core import SetupLock, host_identity\n"
            f"SetupLock({str(self.path)!r}).acquire(host_identity())\n"
            "print('locked', flush=True); time.sleep(120)"
        )
        self.proc = subprocess.Popen(
            [sys.executable, "-c", code],
            stdout=subprocess.PIPE,
            text=True,
            env={**os.environ, "PYTHONPATH": str(REPO_ROOT)},
        )
        assert self.proc.stdout.readline().strip() == "locked"
        return self.proc

    def __exit__(self, *exc):
        self.proc.kill()
        self.proc.wait()


def test_a_second_setup_on_a_host_is_refused_while_one_runs(tmp_path):
    home, mf = tmp_path / "home", tmp_path / "mf"
    with _HeldLock(home) as holder:
        proc, doc = run_cli_json(
            "setup", "--local", "--yes", "--json", "--venv", "~/v", env=_env(home, mf)
        )
    assert proc.returncode == 4, proc.stderr
    local = doc["hosts"]["local"]
    assert local["status"] == "locked" and f"(pid {holder.pid}," in local["message"]
    assert not (home / "v").exists()  # nothing ran


def test_on_a_terminal_progress_is_live_and_results_are_a_table(tmp_path):
    import pexpect

    home, mf = tmp_path / "home", tmp_path / "mf"
    env = {**cli_env(_env(home, mf)), "COLUMNS": "160", "LINES": "40", "TERM": "xterm"}
    env.pop("NO_COLOR", None)
    with _HeldLock(home):
        child = pexpect.spawn(
            sys.executable,
            ["-m", "megafleet", "setup", "--local", "--yes", "--venv", "~/v"],
            env=env,
            cwd=str(REPO_ROOT),
            encoding="utf-8",
            timeout=120,
            dimensions=(40, 160),
        )
        child.expect(pexpect.EOF)
        child.close()
    out = child.before
    assert child.exitstatus == 4
    assert "megafleet setup" in out and "elapsed" in out  # the live table
    assert "Setup of 1 host(s)" in out and "locked" in out
    assert "another megafleet setup is running on local" in out


def test_needs_setup_lists_the_steps_a_setup_would_run(tmp_path, monkeypatch):
    from megafleet.runner import LocalRunner
    from megafleet.setup import needs_setup

    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.setenv("MEGAFLEET_HOME", str(tmp_path / "mf"))
    todo = needs_setup(LocalRunner(), SetupOptions(venv="~/v", base_python=sys.executable))
    assert todo == ["upload", "venv", "torch", "packages", "project", "check"]
    assert sorted(os.listdir(tmp_path)) == ["mf"]  # the operator's wheel cache only


def test_setup_needs_yes_without_a_terminal(tmp_path):
    proc = run_cli("setup", "--local", env=_env(tmp_path, tmp_path))
    assert proc.returncode == 2 and "add --yes" in proc.stderr
    proc = run_cli("setup", "--build-wheelhouse", str(tmp_path / "w"), "--local")
    assert proc.returncode == 2 and "--build-wheelhouse only prepares" in proc.stderr
    proc = run_cli("setup", "--local", "--python-version", "3.12", "--yes")
    assert proc.returncode == 2 and "go with --build-wheelhouse" in proc.stderr
