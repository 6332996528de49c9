"""The real `scripts/check_megatron_env.py`, run as a process on this (GPU-less) machine: with the
development venv's real torch and megatron-core, with a bare system Python, with the oldest
supported Python, in fake venvs that stand in for a GPU node, and with packages whose import
segfaults, aborts or raises."""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

import pytest

from tests.unit.envcheck_fakes import (
    checks_by_id,
    make_venv,
    run_json,
    run_script,
    schema_validator,
    site_packages,
    write_fake_torch,
    write_fake_version_package,
    write_module,
    write_nvidia_headers,
)

BARE_PYTHON = next(
    (p for p in ("/usr/bin/python3", shutil.which("python3")) if p and os.path.exists(p)), None
)
PY38 = "/root/.pyenv/versions/3.8.18/bin/python"


def _clean_env(home: Path, **extra: str) -> dict:
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("NCCL_", "FI_", "CUDA_", "CUDNN_", "MEGATRON_", "PYTHON"))
        and k not in ("XDG_CACHE_HOME", "HF_HOME", "VIRTUAL_ENV")
    }
    env["HOME"] = str(home)
    env.update(extra)
    return env


@pytest.fixture(scope="module")
def dev_venv_run(tmp_path_factory):
    """One run with this test's interpreter (the dev venv: real CPU torch, megatron-core),
    with an empty HOME and working directory, to prove the check writes nothing."""
    home = tmp_path_factory.mktemp("home")
    cwd = tmp_path_factory.mktemp("cwd")
    proc, report = run_json(
        sys.executable, "--workdir", str(cwd / "not-yet"), env=_clean_env(home), cwd=cwd
    )
    return proc, report, home, cwd


def test_dev_venv_report_is_valid_and_names_the_missing_gpu(dev_venv_run):
    proc, report, _, _ = dev_venv_run
    schema_validator().validate(report)
    checks = checks_by_id(report)
    assert proc.returncode == 1 and report["summary"]["exit_code"] == 1
    assert checks["python.version"]["status"] == "pass"
    torch_check = checks["torch.import"]
    assert torch_check["status"] == "pass" and report["facts"]["torch_cuda"] is None
    assert checks["torch.cuda_build"]["status"] == "fail"
    assert "CPU-only build" in checks["torch.cuda_build"]["detail"]
    assert checks["torch.cuda_available"]["status"] == "fail"
    assert checks["gpu.count"]["status"] == "fail" and "no GPU" in checks["gpu.count"]["detail"]
    assert checks["gpu.arch"]["status"] == "skip"
    assert checks["driver.cuda_compat"]["status"] == "skip"
    assert checks["cudnn.runtime"]["status"] == "skip"
    assert checks["megatron_core.version"]["status"] == "pass"
    assert report["facts"]["megatron_core"].startswith("0.16.")
    # TE is optional by default: a warning that carries the whole install recipe
    te = checks["te.import"]
    assert te["level"] == "optional" and te["status"] == "warn"
    assert f"{sys.executable} -m pip install --no-build-isolation" in te["fix"]
    assert {"torch.cuda_build", "gpu.count", "driver.version"} <= set(
        report["summary"]["failed_required"]
    )


def test_a_missing_gpu_has_a_fix_and_cpu_ok_marks_gpu_checks_not_applicable(dev_venv_run, tmp_path):
    """With --cpu-ok the summary says ok: then no row may still say fail."""
    _, report, home, _ = dev_venv_run
    assert "--cpu-ok" in checks_by_id(report)["gpu.count"]["fix"]
    proc, cpu = run_json(
        sys.executable, "--cpu-ok", "--workdir", str(tmp_path), env=_clean_env(home), cwd=tmp_path
    )
    checks = checks_by_id(cpu)
    assert proc.returncode == 0 and cpu["summary"]["ok"]
    assert [c for c, v in checks.items() if v["status"] == "fail"] == []
    for cid in ("gpu.count", "torch.cuda_build", "torch.cuda_available", "driver.version"):
        assert checks[cid]["status"] == "skip", checks[cid]
        assert checks[cid]["detail"].startswith("not applicable with --cpu-ok")


def test_the_check_writes_nothing(dev_venv_run):
    proc, report, home, cwd = dev_venv_run
    assert list(home.iterdir()) == [] and list(cwd.iterdir()) == []
    disk = [c for c in report["checks"] if c["id"].startswith("disk.free:")]
    assert [c["id"] for c in disk] == [f"disk.free:{cwd / 'not-yet'}"]
    assert "not created yet" in disk[0]["detail"]


def test_table_output_and_usage_errors(tmp_path):
    env = _clean_env(tmp_path)
    table = run_script(BARE_PYTHON, env=env, cwd=tmp_path)
    assert table.returncode == 1
    assert "FAIL  torch.import" in table.stdout and "fix: " in table.stdout
    assert "\033[" not in table.stdout  # no colour when stdout is not a terminal
    for bad in (["--timeout", "0"], ["--venv", str(tmp_path)], ["--no-such-flag"]):
        proc = run_script(BARE_PYTHON, *bad, env=env)
        assert proc.returncode == 2, (bad, proc.stderr)
        assert "usage:" in proc.stderr


def test_bare_python_fails_with_install_fixes(tmp_path):
    proc, report = run_json(BARE_PYTHON, env=_clean_env(tmp_path), cwd=tmp_path)
    schema_validator().validate(report)
    checks = checks_by_id(report)
    assert proc.returncode == 1
    assert checks["torch.import"]["detail"] == "torch is not installed"
    assert checks["torch.import"]["fix"].startswith(f"{BARE_PYTHON} -m pip install")
    assert checks["torch.cuda_build"]["status"] == "skip"
    assert (
        checks["megatron_core.version"]["fix"]
        == f"{BARE_PYTHON} -m pip install 'megatron-core>=0.16,<0.17'"
    )
    for name in ("transformers", "safetensors", "tokenizers"):
        assert checks[f"{name}.import"]["status"] == "fail"
    assert checks["peft.import"]["status"] == "skip"


@pytest.mark.skipif(not os.path.exists(PY38), reason=f"no Python 3.8 at {PY38}")
def test_runs_on_python_38_and_says_it_is_too_old(tmp_path):
    proc, report = run_json(PY38, env=_clean_env(tmp_path), cwd=tmp_path)
    schema_validator().validate(report)
    py = checks_by_id(report)["python.version"]
    assert py["status"] == "fail" and "need 3.10+" in py["detail"]
    assert report["host"]["python"]["version"].startswith("3.8.")


def test_crashing_imports_are_failures_and_the_report_goes_on(tmp_path):
    fakes = tmp_path / "fakes"
    write_module(fakes, "transformer_engine", "import ctypes\nctypes.string_at(0)\n")  # SIGSEGV
    write_module(fakes, "apex", "import os\nos.abort()\n")  # SIGABRT
    write_module(fakes, "peft", "raise RuntimeError('peft is broken on purpose')\n")
    write_module(fakes, "flash_attn", "import time\ntime.sleep(60)\n")  # hangs
    write_module(fakes, "tokenizers", "import a_missing_dependency\n")
    env = _clean_env(tmp_path, PYTHONPATH=str(fakes))
    proc, report = run_json(BARE_PYTHON, "--require-te", "--timeout", "3", env=env, cwd=tmp_path)
    schema_validator().validate(report)
    checks = checks_by_id(report)
    te = checks["te.import"]
    assert (te["level"], te["status"]) == ("required", "fail")
    assert "killed by SIGSEGV" in te["detail"] and te["fix"]
    assert "te.import" in report["summary"]["failed_required"]
    assert "killed by SIGABRT" in checks["apex.cuda_ext"]["detail"]
    assert checks["peft.import"]["status"] == "fail"
    assert "RuntimeError: peft is broken on purpose" in checks["peft.import"]["detail"]
    assert "timed out after 3s" in checks["flash_attn.version"]["detail"]
    # installed but broken is not "not installed"
    assert checks["tokenizers.import"]["detail"] == (
        "import tokenizers failed: ModuleNotFoundError: No module named 'a_missing_dependency'"
    )
    assert checks["transformers.import"]["detail"] == "transformers is not installed"
    # every later check still ran
    assert checks["shm.size"]["status"] in ("pass", "warn", "fail")
    assert checks["nccl.env"]["id"] == "nccl.env"


@pytest.mark.parametrize("base", [None, PY38], ids=["dev-python", "python3.8"])
def test_fake_gpu_venv_finds_venv_headers_and_prints_exports(tmp_path, base):
    if base and not os.path.exists(base):
        pytest.skip(f"no {base}")
    venv = make_venv(tmp_path / "venv with space", base)
    sp = site_packages(venv)
    write_fake_torch(sp)
    for module, version in (
        ("megatron.core", "0.16.1"),
        ("transformers", "5.17.0"),
        ("safetensors", "0.6.2"),
        ("tokenizers", "0.22.1"),
    ):
        write_fake_version_package(sp, module, version)
    made = write_nvidia_headers(sp)
    bin_dir = write_fake_nvidia_smi(tmp_path / "bin")
    env = _clean_env(
        tmp_path,
        NCCL_SOCKET_IFNAME="eth0",
        NCCL_IB_AUTH_TOKEN="hunter2",
        NCCL_P2P_DISABLE="1",
        CPLUS_INCLUDE_PATH="~/include",
        PATH=f"{bin_dir}:{os.environ['PATH']}",
    )
    proc, report = run_json(venv / "bin" / "python", env=env, cwd=tmp_path)
    schema_validator().validate(report)
    checks, facts = checks_by_id(report), report["facts"]
    assert facts["torch"] == "2.11.0+cu130" and facts["torch_cuda"] == "13.0"
    assert facts["cudnn_runtime"] == "9.10.2" and facts["nccl_runtime"] == "2.27.7"
    assert [g["name"] for g in facts["gpus"]] == ["NVIDIA H200", "NVIDIA H200"]
    assert checks["gpu.count"]["status"] == "pass"
    assert "2x NVIDIA H200 (sm_90)" in checks["gpu.count"]["detail"]
    assert checks["gpu.arch"]["status"] == "pass" and "sm_90" in checks["gpu.arch"]["detail"]
    plan = report["te_build_env"]
    assert plan["cudnn"]["source"] == "venv" and plan["cudnn"]["version"] == "9.10.2"
    assert plan["cudnn"]["root"] == str(made["cudnn"])
    assert plan["nccl"]["include_dir"] == str(made["nccl"] / "include")
    assert plan["vars"]["CUDNN_PATH"] == str(made["cudnn"])
    includes = plan["vars"]["CPLUS_INCLUDE_PATH"].split(":")
    assert includes[:2] == [str(made["cudnn"] / "include"), str(made["nccl"] / "include")]
    assert includes[2] == str(tmp_path / "include")  # the inherited ~/include, expanded
    assert plan["vars"]["LIBRARY_PATH"].split(":")[:2] == [
        str(made["cudnn"] / "lib"),
        str(made["nccl"] / "lib"),
    ]
    assert not any("~" in line for line in plan["export_lines"])
    assert f"export CUDNN_PATH='{made['cudnn']}'" in plan["export_lines"]  # quoted: a space
    te = checks["te.import"]
    for line in plan["export_lines"]:
        assert line in te["fix"]
    assert "'transformer_engine[pytorch,core_cu13]'" in te["fix"]
    assert checks["cudnn.headers"]["status"] == "pass"
    assert "venv" in checks["cudnn.headers"]["detail"]
    nccl_env = checks["nccl.env"]
    assert nccl_env["data"]["env"]["NCCL_IB_AUTH_TOKEN"] == "<redacted>"
    assert "hunter2" not in proc.stdout
    assert nccl_env["status"] == "warn" and "NCCL_P2P_DISABLE" in nccl_env["detail"]
    # the driver as the real H200 machine's nvidia-smi reports it
    assert (facts["driver"], facts["driver_cuda"]) == ("580.159.04", "13.0")
    assert checks["driver.version"]["status"] == "pass"
    assert checks["driver.cuda_compat"]["status"] == "pass"
    assert not list(sp.rglob("__pycache__"))  # imports were probed without writing bytecode
    # every required check passes, GPU ones included; only Python 3.8 is too old for the runtime
    too_old = ["python.version"] if base else []
    assert report["summary"]["failed_required"] == too_old
    assert proc.returncode == (1 if too_old else 0)


def write_fake_nvidia_smi(bin_dir: Path) -> Path:
    """An `nvidia-smi` answering like the 2xH200 machine did (tests/fixtures/h200x2)."""
    fixtures = Path(__file__).resolve().parents[1] / "fixtures" / "h200x2"
    bin_dir.mkdir(parents=True, exist_ok=True)
    smi = bin_dir / "nvidia-smi"
    csv = (fixtures / "nvidia-smi-query.csv").read_text()
    rows = [line.split(", ") for line in csv.splitlines()]
    # our query: index, name, uuid, memory.total, driver_version, compute_cap
    query = "\n".join(", ".join([r[0], r[1], r[2], r[3], r[5], r[6]]) for r in rows)
    smi.write_text(f"""#!/bin/sh
case "$1" in
  --query-gpu=*) printf '%s\\n' '{query.replace(chr(10), "' '")}' ;;
  *) cat '{fixtures / "nvidia-smi.txt"}' ;;
esac
""")
    smi.chmod(0o755)
    return bin_dir


def test_print_te_env_for_another_venv(tmp_path):
    venv = make_venv(tmp_path / "venv")
    made = write_nvidia_headers(site_packages(venv), cudnn_dir="cudnn", nccl_dir="cu13")
    env = _clean_env(tmp_path)
    proc = run_script(BARE_PYTHON, "--print-te-env", "--venv", str(venv), env=env)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert f"export CUDNN_PATH={made['cudnn']}" in lines
    assert f"export CPLUS_INCLUDE_PATH={made['cudnn']}/include:{made['nccl']}/include" in lines
    assert any(line.startswith("export MAX_JOBS=") for line in lines)
    empty = make_venv(tmp_path / "empty")
    missing = run_script(BARE_PYTHON, "--print-te-env", "--venv", str(empty), env=env)
    assert missing.returncode == 1 and "missing: cudnn.h" in missing.stderr


def test_installed_te_apex_and_flash_attn_are_cross_checked(tmp_path):
    """Stand-ins for an installed transformer-engine (with its flash-attn range in its source),
    a flash-attn newer than that range, and an apex built without one CUDA extension."""
    venv = make_venv(tmp_path / "venv")
    sp = site_packages(venv)
    write_fake_torch(sp, gpus=())
    write_module(sp, "transformer_engine", "__version__ = '2.9.0'\n")
    write_module(sp, "transformer_engine.pytorch", "import transformer_engine_torch\n")
    write_module(sp, "transformer_engine_torch", "")
    write_module(sp, "transformer_engine.pytorch.attention.dot_product_attention", "")
    (sp / "transformer_engine/pytorch/attention/dot_product_attention/utils.py").write_text(
        'class FlashAttentionUtils:\n    version_required = PkgVersion("2.1.1")\n'
        '    max_version = PkgVersion("2.8.3")\n'
    )
    write_fake_version_package(sp, "flash_attn", "2.8.3.post1")
    write_module(sp, "flash_attn_2_cuda", "")
    write_fake_version_package(sp, "apex", "0.1")
    for ext in ("amp_C", "fused_layer_norm_cuda"):
        write_module(sp, ext, "")
    proc, report = run_json(
        venv / "bin" / "python", "--require-te", env=_clean_env(tmp_path), cwd=tmp_path
    )
    schema_validator().validate(report)
    checks = checks_by_id(report)
    assert checks["te.import"]["status"] == "pass"
    assert report["facts"]["transformer_engine"] == "2.9.0"
    assert checks["te.extension"]["status"] == "pass"
    assert checks["te.fused_attention"]["status"] == "skip"  # no GPU
    fa = checks["flash_attn.version"]
    assert fa["status"] == "warn"
    assert "2.8.3.post1 is outside transformer-engine 2.9.0's range >=2.1.1,<=2.8.3" in fa["detail"]
    assert "'flash-attn>=2.1.1,<=2.8.3'" in fa["fix"]
    apex = checks["apex.cuda_ext"]
    assert apex["status"] == "warn"
    assert apex["data"]["missing"] == ["fused_weight_gradient_mlp_cuda"]
    assert "APEX_CUDA_EXT=1" in apex["fix"] and f"{venv}/src/apex" in apex["fix"]
