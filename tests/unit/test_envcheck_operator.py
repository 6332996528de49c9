"""Operator side: validating reports against the shipped schema (our subset validator agrees
with the `jsonschema` package), cross-host findings, the host × check table, and
`megafleet env check --local` comparing two venvs that differ like two drifting nodes."""

from __future__ import annotations

import copy
import json
import os
import shutil

import pytest

from megafleet import envcheck
from megafleet.errors import EXIT_FAILED, EXIT_OK, EXIT_REMOTE, ValidationError
from megafleet.jsonschema_subset import unsupported_keywords
from tests.conftest import run_cli, run_cli_json
from tests.unit.envcheck_fakes import (
    make_venv,
    run_json,
    schema_validator,
    site_packages,
    write_fake_torch,
    write_fake_version_package,
)


@pytest.fixture(scope="module")
def real_report(tmp_path_factory):
    """A report from the real script with this machine's system Python (fast: no torch)."""
    python = "/usr/bin/python3" if os.path.exists("/usr/bin/python3") else shutil.which("python3")
    _, report = run_json(python, cwd=tmp_path_factory.mktemp("cwd"))
    return report


def _broken(report, mutate):
    doc = copy.deepcopy(report)
    mutate(doc)
    return doc


MUTATIONS = {
    "missing summary": lambda d: d.pop("summary"),
    "unknown status": lambda d: d["checks"][0].update(status="ok"),
    "two-line detail": lambda d: d["checks"][0].update(detail="a\nb"),
    "extra field": lambda d: d["facts"].update(surprise=1),
    "bool gpu_count": lambda d: d["facts"].update(gpu_count=True),
    "tilde export": lambda d: d["te_build_env"]["export_lines"].append("export CUDA_HOME=~/cuda"),
    "bad check id": lambda d: d["checks"][0].update(id="Torch Import"),
    "relative workdir": lambda d: d["options"]["workdirs"].append("work"),
    "wrong schema": lambda d: d.update(schema="megafleet.envcheck/2"),
    "negative duration": lambda d: d.update(duration_s=-1),
    "gpu without name": lambda d: d["facts"]["gpus"].append(
        {"index": 0, "capability": "9.0", "memory_mib": 1}
    ),
}


def test_subset_validator_agrees_with_jsonschema(real_report):
    reference = schema_validator()
    assert envcheck.validate_report(real_report) == []
    reference.validate(real_report)
    for name, mutate in MUTATIONS.items():
        doc = _broken(real_report, mutate)
        ours = envcheck.validate_report(doc, host="gpu1")
        theirs = list(reference.iter_errors(doc))
        assert ours and theirs, name
        assert all(p.source == "gpu1" for p in ours)


def test_schema_uses_only_supported_keywords():
    assert unsupported_keywords(envcheck.load_schema()) == []
    assert unsupported_keywords({"properties": {"a": {"oneOf": []}}}) == ["#/properties/a: oneOf"]


def test_parse_report_errors_name_host_and_field(real_report):
    with pytest.raises(ValidationError) as err:
        envcheck.parse_report("Traceback (most recent call last):", host="gpu2")
    assert "gpu2: (output): not JSON" in err.value.message
    doc = _broken(real_report, MUTATIONS["unknown status"])
    with pytest.raises(ValidationError) as err:
        envcheck.parse_report(json.dumps(doc), host="gpu2")
    assert "gpu2: checks[0].status: 'ok' is not one of" in err.value.message


def test_report_from_output(real_report):
    text = json.dumps(real_report)
    good = envcheck.report_from_output("gpu1", 1, text)
    assert good.report and not good.ok and good.error is None
    crashed = envcheck.report_from_output("gpu2", 127, "", "bash: python3: command not found")
    assert crashed.report is None
    assert "exited with 127: bash: python3: command not found" in crashed.error
    garbled = envcheck.report_from_output("gpu3", 0, "{not json")
    assert garbled.report is None and "not JSON" in garbled.error
    assert envcheck.exit_code_for([good], []) == EXIT_FAILED
    assert envcheck.exit_code_for([good, crashed], []) == EXIT_REMOTE


def _facts(**kw):
    base = {
        "torch": "2.11.0+cu130",
        "torch_cuda": "13.0",
        "nccl_runtime": "2.27.7",
        "transformer_engine": None,
        "megatron_core": "0.16.1",
        "gpus": [{"index": 0, "name": "NVIDIA H200", "capability": "9.0", "memory_mib": 1}],
    }
    base.update(kw)
    return base


def test_cross_node_findings():
    assert envcheck.cross_node_findings({"a": _facts()}) == []
    assert envcheck.cross_node_findings({"a": _facts(), "b": _facts()}) == []
    h100 = [{"index": 0, "name": "NVIDIA H100 80GB HBM3", "capability": "9.0", "memory_mib": 1}]
    findings = envcheck.cross_node_findings(
        {
            "a": _facts(),
            "b": _facts(torch="2.10.0+cu128", torch_cuda="12.8"),
            "c": _facts(transformer_engine="2.8.0", gpus=h100),
        }
    )
    by_key = {f.key: f for f in findings}
    assert set(by_key) == {"torch", "torch_cuda", "transformer_engine", "gpu_models"}
    assert by_key["torch"].values == {"a": "2.11.0+cu130", "b": "2.10.0+cu128", "c": "2.11.0+cu130"}
    assert (
        by_key["torch"].message
        == "torch not the same on all hosts: 2.11.0+cu130 on a, c; 2.10.0+cu128 on b"
    )
    assert by_key["transformer_engine"].values["a"] == "missing"
    assert by_key["gpu_models"].severity == "warn" and by_key["torch"].severity == "fail"
    assert by_key["gpu_models"].values["c"] == "NVIDIA H100 80GB HBM3"


def test_matrix_marks_differing_rows(real_report):
    a = envcheck.HostReport("gpu1", report=real_report, exit_code=1)
    other = copy.deepcopy(real_report)
    other["facts"]["megatron_core"] = "0.15.0"
    b = envcheck.HostReport("gpu2", report=other, exit_code=1)
    down = envcheck.HostReport("gpu3", error="unreachable")
    findings = envcheck.findings_for([a, b, down])
    assert [f.key for f in findings] == ["megatron_core"]
    rows = {
        cid: (differs, cells)
        for cid, differs, cells in envcheck.matrix_rows([a, b, down], findings)
    }
    differs, cells = rows["megatron_core.version"]
    assert differs and cells[1] == ("fail", "0.15.0") and cells[2] == ("fail", "no report")
    assert rows["python.version"][0] is False
    assert list(rows)[:2] == ["python.version", "torch.import"]  # the script's order


def _fake_node(root, torch, cuda, nccl, megatron, gpu, transformers="5.17.0"):
    venv = make_venv(root)
    sp = site_packages(venv)
    write_fake_torch(sp, version=torch, cuda=cuda, nccl=nccl, gpus=[(gpu, 9, 0, 81559)] * 2)
    for module, version in (
        ("megatron.core", megatron),
        ("transformers", transformers),
        ("safetensors", "0.6.2"),
        ("tokenizers", "0.22.1"),
    ):
        write_fake_version_package(sp, module, version)
    return str(venv / "bin" / "python")


def test_cli_local_compares_two_venvs(tmp_path):
    a = _fake_node(tmp_path / "a", "2.11.0+cu130", "13.0", (2, 27, 7), "0.16.1", "NVIDIA H200")
    b = _fake_node(
        tmp_path / "b",
        "2.10.0+cu128",
        "12.8",
        (2, 26, 2),
        "0.15.0",
        "NVIDIA H100",
        transformers="4.46.3",
    )
    args = (
        "env",
        "check",
        "--local",
        "--cpu-ok",
        "--python",
        a,
        "--python",
        b,
        "--workdir",
        str(tmp_path),
    )
    proc, out = run_cli_json(*args, "--json")
    assert proc.returncode == EXIT_FAILED, proc.stderr
    assert list(out["hosts"]) == [f"local:{a}", f"local:{b}"]
    keys = {f["key"]: f for f in out["findings"]}
    assert set(keys) == {"torch", "torch_cuda", "nccl_runtime", "megatron_core", "gpu_models"}
    assert keys["nccl_runtime"]["values"] == {f"local:{a}": "2.27.7", f"local:{b}": "2.26.2"}
    assert out["hosts"][f"local:{a}"]["ok"] is True
    failed = out["hosts"][f"local:{b}"]["report"]["summary"]["failed_required"]
    assert failed == ["megatron_core.version", "transformers.import"]
    table = run_cli(*args)
    assert table.returncode == EXIT_FAILED
    assert "≠ torch.import" in table.stdout and "≠ megatron_core.version" in table.stdout
    assert "2.10.0+cu128" in table.stdout
    assert "megatron-core not the same on all hosts" in table.stdout
    assert "fix: " in table.stdout and "'megatron-core>=0.16,<0.17'" in table.stdout


def test_cli_single_good_venv_passes(tmp_path):
    a = _fake_node(tmp_path / "a", "2.11.0+cu130", "13.0", (2, 27, 7), "0.16.1", "NVIDIA H200")
    proc, out = run_cli_json(
        "env", "check", "--local", "--cpu-ok", "--python", a, "--json", "--workdir", str(tmp_path)
    )
    assert proc.returncode == EXIT_OK and out["ok"] and out["findings"] == []
    assert list(out["hosts"]) == ["local"]


def test_cli_usage_errors(tmp_path, megafleet_home):
    no_hosts = run_cli("env", "check", env={"MEGAFLEET_HOME": str(megafleet_home)})
    assert no_hosts.returncode == 2 and "no hosts in" in no_hosts.stderr
    assert "megafleet env check --local" in no_hosts.stderr
    python_on_hosts = run_cli("env", "check", "--python", "python3")
    assert (
        python_on_hosts.returncode == 2 and "--python goes with --local" in python_on_hosts.stderr
    )
    venv_local = run_cli("env", "check", "--local", "--venv", "x")
    assert venv_local.returncode == 2
    missing = run_cli("env", "check", "--local", "--python", str(tmp_path / "nope"), "--json")
    assert missing.returncode == 2
    assert json.loads(missing.stdout)["error"] == "UsageError"


def test_script_argv_is_the_remote_command():
    argv = envcheck.script_argv(
        "/opt/venv/bin/python",
        "/tmp/mf/check_megatron_env.py",
        ["/data/run 1"],
        require_te=True,
        timeout=60,
    )
    assert argv == [
        "/opt/venv/bin/python",
        "/tmp/mf/check_megatron_env.py",
        "--json",
        "--workdir",
        "/data/run 1",
        "--require-te",
        "--timeout",
        "60",
    ]
