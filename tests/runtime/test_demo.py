"""`megafleet demo`, the README's main job, as a user runs it (separate process, fresh home)."""

import json

import pytest

from tests.conftest import run_cli

pytestmark = pytest.mark.runtime


def test_demo_trains_fetches_and_answers_from_the_training_data(tmp_path):
    workspace = tmp_path / "ws"
    env = {"MEGAFLEET_HOME": str(tmp_path / "home")}
    proc = run_cli(
        "demo",
        "--dir",
        str(workspace),
        "--device",
        "cpu",
        "--json",
        env=env,
        timeout=240,
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads(proc.stdout)
    assert result["exit_code"] == 0
    assert result["last_loss"] < result["first_loss"] / 2, result
    assert result["learned"], (result["answer"], result["expected"])
    ckpt = workspace / "checkpoint"
    assert (ckpt / "config.json").is_file() and (ckpt / "trainer_state.json").is_file()
    assert (ckpt / "model.safetensors.index.json").is_file() or list(ckpt.glob("*.safetensors"))
    # the run is a normal run: its record is there for `megafleet logs/status`
    proc = run_cli("status", result["run_id"], "--json", env=env, cwd=tmp_path)
    assert proc.returncode == 0 and json.loads(proc.stdout)["state"] == "succeeded"
