"""Evidence from a real GPU machine: the check script's JSON from a 2×H200 node (Python 3.12 venv
at /opt/torch/.venv, torch 2.11+cu130, no transformer-engine), kept under
tests/fixtures/envcheck/ with the date in its name. These tests read the recorded report; they
skip until the first recording is added (the command is in tests/fixtures/README.md)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from megafleet import envcheck
from tests.unit.envcheck_fakes import REPO_ROOT, checks_by_id, schema_validator

RECORDINGS = sorted((REPO_ROOT / "tests" / "fixtures" / "envcheck").glob("h200x2-*.json"))

pytestmark = pytest.mark.skipif(
    not RECORDINGS,
    reason="no GPU recording yet: tests/fixtures/envcheck/h200x2-<date>.json is "
    "added by running the script on a 2xH200 machine",
)


@pytest.fixture(params=RECORDINGS, ids=[p.name for p in RECORDINGS])
def report(request) -> dict:
    return json.loads(Path(request.param).read_text())


def test_recording_is_valid(report):
    schema_validator().validate(report)
    assert envcheck.validate_report(report) == []


def test_gpus_driver_and_torch_cuda_found(report):
    facts, checks = report["facts"], checks_by_id(report)
    assert facts["gpu_count"] == 2 and facts["cuda_available"] is True
    assert [g["name"] for g in facts["gpus"]] == ["NVIDIA H200", "NVIDIA H200"]
    assert {g["capability"] for g in facts["gpus"]} == {"9.0"}
    assert facts["driver"] and facts["driver_cuda"].startswith("13.")
    assert facts["torch"].startswith("2.") and facts["torch_cuda"].startswith("13.")
    for cid in (
        "torch.cuda_build",
        "torch.cuda_available",
        "gpu.count",
        "gpu.arch",
        "driver.version",
        "driver.cuda_compat",
        "cudnn.runtime",
        "nccl.runtime",
    ):
        assert checks[cid]["status"] == "pass", (cid, checks[cid]["detail"])
    assert facts["cudnn_runtime"] and facts["nccl_runtime"]


def test_venv_local_cudnn_and_nccl_headers_found(report):
    prefix = report["host"]["python"]["prefix"]
    plan = report["te_build_env"]
    for lib in ("cudnn", "nccl"):
        loc = plan[lib]
        assert loc is not None, f"{lib} headers not found"
        assert loc["source"] == "venv" and loc["root"].startswith(prefix + "/")
        assert loc["include_dir"].endswith(f"site-packages/nvidia/{lib}/include")
        assert loc["version"] and checks_by_id(report)[f"{lib}.headers"]["status"] == "pass"
    assert plan["vars"]["CUDNN_PATH"] == plan["cudnn"]["root"]
    includes = plan["vars"]["CPLUS_INCLUDE_PATH"].split(":")
    assert includes[:2] == [plan["cudnn"]["include_dir"], plan["nccl"]["include_dir"]]
    assert not any("~" in line for line in plan["export_lines"])
    assert plan["missing"] == []


def test_missing_transformer_engine_comes_with_its_fix(report):
    te = checks_by_id(report)["te.import"]
    assert report["facts"]["transformer_engine"] is None
    assert te["status"] in ("warn", "fail") and te["fix"]
    for line in report["te_build_env"]["export_lines"]:
        assert line in te["fix"]
    python = report["host"]["python"]["executable"]
    assert (
        f"{python} -m pip install --no-build-isolation 'transformer_engine[pytorch,core_cu13]'"
        in te["fix"]
    )
