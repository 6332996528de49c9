"""The wizard's "this machine" branch in a pseudo-terminal: real questionary prompts, a real
local run of the tiny Qwen3 model on CPU (torchrun + the megatron-core runtime), Ctrl-C while
following the logs detaches, and the run is followed again to success by `megafleet logs -f`."""

from __future__ import annotations

import re

import pytest

from remote_runtime.spec.flags import load_job_file
from tests.conftest import run_cli, run_cli_json
from tests.wizard_pty import WizardPty

pytestmark = pytest.mark.runtime


@pytest.fixture
def workspace(tmp_path, megafleet_home):
    from remote_runtime.data.demo_data import write_demo_dataset
    from remote_runtime.tiny import build_model

    build_model("qwen3", tmp_path / "model")
    write_demo_dataset(tmp_path / "chats.jsonl", 200)
    return tmp_path


def test_this_machine_branch_runs_a_real_local_job(workspace, megafleet_home):
    w = WizardPty(["wizard"], env={"MEGAFLEET_HOME": str(megafleet_home)}, cwd=workspace)
    try:
        w.choose("Where should training run", 1)
        w.expect("1/1 host.s. reachable")  # this machine, checked like a host
        w.yes("Run on CPU instead")
        w.enter("What kind of training")  # default: SFT, all parameters
        w.type("Model:", str(workspace / "model"))
        w.expect("qwen3, 0.00B parameters")
        w.enter("Dataset file")  # default: the .jsonl in the current directory
        w.expect("200 rows, format messages")
        w.expect("user: What is the capital of France")
        w.type("Tokens per training row", "128")
        # long enough that the Ctrl-C below always lands while the run is going, however late
        # the follower catches up on a loaded machine
        w.type("How long to train", "10 steps")
        w.type("Learning rate", "1e-3")
        w.enter("Where the nodes write checkpoints")
        w.enter("Save the job as")
        w.expect("megafleet launch job.yaml")
        w.enter("Go ahead")  # default: save and launch
        w.expect("this machine has the training runtime")
        run_id = w.run_id()
        w.yes("Follow the logs now")
        w.expect(r"n0 r0 +│", timeout=120)
        w.child.sendintr()  # Ctrl-C while following: detach, the run goes on
        assert w.wait() == 130
    finally:
        w.close()
    text = " ".join(w.text.split())
    assert f"detached: run {run_id} keeps running" in text
    assert f"megafleet logs {run_id} -f" in text

    job = load_job_file(workspace / "job.yaml")
    assert job.launch.hosts == ["local"] and job.model.device == "cpu"
    assert job.model.model == str(workspace / "model") and job.train.train_iters == 10
    assert job.data.dataset == [str(workspace / "chats.jsonl")] and job.data.max_length == 128

    logs = run_cli("logs", run_id, "-f", env={"MEGAFLEET_HOME": str(megafleet_home)}, timeout=180)
    assert logs.returncode == 0, logs.stdout[-3000:] + logs.stderr
    assert re.search(r"step 10/10 \| epoch \S+ \| loss", logs.stdout)
    status = run_cli_json("status", run_id, "--json", env={"MEGAFLEET_HOME": str(megafleet_home)})[
        1
    ]
    assert status["state"] == "succeeded" and status["progress"]["step"] == 10
