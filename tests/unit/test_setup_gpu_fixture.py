"""The installer's TE build planning as recorded on a GPU machine (H100/H200, venv
/opt/torch/.venv: Python 3.12, torch 2.11+cu130, NVIDIA's cuDNN/NCCL wheels), by
    python -m megafleet.setup.node plan --with-te --venv /opt/torch/.venv > setup-te-plan.json
kept as tests/fixtures/gpu/setup-te-plan.json. Until that capture is checked in, this test skips."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

FIXTURE = Path(__file__).resolve().parents[1] / "fixtures" / "gpu" / "setup-te-plan.json"


@pytest.fixture(scope="module")
def plan():
    if not FIXTURE.exists():
        pytest.skip(f"no GPU capture at {FIXTURE} yet")
    return json.loads(FIXTURE.read_text())


def test_the_gpu_venvs_headers_were_found_in_the_venv_with_absolute_paths(plan):
    te = next(s for s in plan["steps"] if s["id"] == "te")
    bp = te["build_plan"]
    site = bp["cudnn"]["root"].rsplit("/nvidia/", 1)[0]
    assert site.startswith("/opt/torch/.venv/lib/python3.") and site.endswith("/site-packages")
    for lib in ("cudnn", "nccl"):
        loc = bp[lib]
        assert loc["source"] == "venv" and loc["include_dir"] == f"{site}/nvidia/{lib}/include"
        assert loc["version"]
    env = bp["vars"]
    assert env["CUDNN_PATH"] == env["CUDNN_HOME"] == f"{site}/nvidia/cudnn"
    assert env["CPLUS_INCLUDE_PATH"].split(":")[:2] == [
        f"{site}/nvidia/cudnn/include",
        f"{site}/nvidia/nccl/include",
    ]
    assert int(env["MAX_JOBS"]) >= 1
    assert "~" not in json.dumps(te)
    assert plan["facts"]["torch"].startswith("2.") and plan["facts"]["torch_cuda"] == "13.0"
    assert plan["facts"]["gpus"] and plan["facts"]["driver"]
