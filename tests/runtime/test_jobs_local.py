"""Local mode (`--local`, what `megafleet demo` uses): the same lifecycle with this machine as the
only node, no SSH. Jobs run the STAND-IN workload (tests/standin_workload.py) under a real torchrun;
logs/status/fetch go through the `megafleet` command."""

from __future__ import annotations

import json

import pytest

from megafleet.jobs.launch import LaunchOptions, launch_job
from tests.conftest import run_cli, run_cli_json

pytestmark = pytest.mark.runtime


@pytest.fixture
def model_and_data(tmp_path):
    from transformers import Qwen3Config

    from remote_runtime.tiny import TINY_SHAPES

    model = tmp_path / "model"
    Qwen3Config(
        **TINY_SHAPES["qwen3"][1], vocab_size=509, architectures=["Qwen3ForCausalLM"]
    ).save_pretrained(model)
    (model / "model.safetensors").write_bytes(b"stand-in weights")
    data = tmp_path / "data.jsonl"
    data.write_text(
        json.dumps(
            {
                "messages": [
                    {"role": "user", "content": "hi"},
                    {"role": "assistant", "content": "hello"},
                ]
            }
        )
        + "\n"
    )
    return model, data


def job(model, data, port, **flags):
    from remote_runtime.spec.flags import job_from_argv

    argv = [
        "--model",
        str(model),
        "--dataset",
        str(data),
        "--device",
        "cpu",
        "--master_port",
        str(port),
        "--logging_steps",
        "2",
        "--save_steps",
        "5",
        "--global_batch_size",  # the one-row dataset: launch refuses a batch it cannot fill
        "1",
    ]
    for k, v in flags.items():
        argv += [f"--{k}"] + (v if isinstance(v, list) else [str(v)])
    return job_from_argv(argv, task="sft")


def cli_env(home):
    return {"MEGAFLEET_HOME": str(home)}


def test_a_local_run_from_launch_to_fetch(megafleet_home, model_and_data, tmp_path):
    model, data = model_and_data
    run = launch_job(
        job(model, data, 29381, train_iters=10, hosts=["local"]),
        LaunchOptions(entry_module="tests.standin_workload"),
    )
    assert run.local and run.nodes[0].host == "local" and run.master_addr == "127.0.0.1"
    proc = run_cli("logs", "last", "-f", env=cli_env(megafleet_home), timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert (
        "n0 r0   │ stand-in rank 0/1 ready" in proc.stdout
        and "step 10/10 loss 0.5000" in proc.stdout
    )
    proc, status = run_cli_json("status", run.run_id, "--json", env=cli_env(megafleet_home))
    assert (status["state"], status["exit_code"], status["progress"]["step"]) == (
        "succeeded",
        0,
        10,
    )
    proc, got = run_cli_json(
        "fetch",
        run.run_id,
        "--json",
        "--checkpoint",
        "5",
        "--to",
        str(tmp_path / "ck5"),
        env=cli_env(megafleet_home),
    )
    assert proc.returncode == 0, proc.stderr
    assert got["step"] == 5 and (tmp_path / "ck5" / "trainer_state.json").exists()
    assert (tmp_path / "ck5" / "model.safetensors").read_bytes() == b"stand-in weights"
    proc = run_cli("fetch", run.run_id, "--checkpoint", "7", env=cli_env(megafleet_home))
    err = " ".join(proc.stderr.split())
    assert proc.returncode == 2 and "no complete checkpoint 7" in err and "(complete: 5, 10)" in err
    listed = run_cli_json("runs", "--json", env=cli_env(megafleet_home))[1]["runs"]
    assert [(r["run_id"], r["state"]) for r in listed] == [(run.run_id, "succeeded")]


def test_a_hung_local_run_is_stopped_by_the_watcher(megafleet_home, model_and_data, monkeypatch):
    """A step that never ends (60 s > stall_timeout 4 s): no log progress, so the watcher stops
    it."""
    model, data = model_and_data
    monkeypatch.setenv("STANDIN_STEP_S", "60")
    run = launch_job(
        job(
            model, data, 29386, train_iters=5, stall_timeout=4, stop_grace=2, env=["STANDIN_STEP_S"]
        ),
        LaunchOptions(local=True, entry_module="tests.standin_workload"),
    )
    proc = run_cli("logs", run.run_id, "-f", env=cli_env(megafleet_home), timeout=120)
    assert proc.returncode != 0, proc.stdout + proc.stderr
    proc, status = run_cli_json("status", run.run_id, "--json", env=cli_env(megafleet_home))
    assert status["state"] == "failed"
    assert "made no log progress on any node for 4s" in status["failure"]["reason"]
    assert "fail-fast" in status["nodes"][0]["watcher_stop"]["reason"]
    assert status["nodes"][0]["processes"] == 0
