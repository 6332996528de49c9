"""The wizard in a pseudo-terminal against the namespace fleet (real sshd hosts), through its
real questionary prompts: hosts typed in and checked at once, a distributed CPU run of the tiny
Qwen3 model with the real runtime, followed to success; the saved job replays with `megafleet
launch`. And Ctrl-C at each question before the confirmation leaves nothing behind: no job
file, no inventory, no pinned host key, no run, no staging directory.

The wizard starts from an empty inventory (MEGAFLEET_HOME without hosts.yaml). Each node's
~/megafleet/venv links to fleet.host_python()'s venv, which sees torch and this checkout.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from megafleet.inventory import Inventory
from remote_runtime.spec.flags import load_job_file
from tests.conftest import run_cli, run_cli_json
from tests.wizard_pty import WizardPty

pytestmark = pytest.mark.fleet


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    from remote_runtime.data.demo_data import write_demo_dataset
    from remote_runtime.tiny import build_model

    root = tmp_path_factory.mktemp("wizard-assets")
    build_model("qwen3", root / "model")
    write_demo_dataset(root / "chats.jsonl", 200)
    return root


@pytest.fixture
def workspace(fleet, fleet_home, tmp_path, assets):
    """An empty inventory, node0/node1 ready to run jobs, a working directory holding the
    dataset, and a private TMPDIR for the wizard (its staging directory must not outlive it)."""
    (fleet_home / "hosts.yaml").unlink()
    venv = Path(fleet.host_python()).parent.parent
    for h in fleet.hosts[:2]:
        h.run(
            f"mkdir -p ~/megafleet && ln -sfn {venv} ~/megafleet/venv && "
            "rm -rf ~/megafleet/runs ~/megafleet/uploads"
        )
    ws = tmp_path / "ws"
    ws.mkdir()
    (ws / "chats.jsonl").write_bytes((assets / "chats.jsonl").read_bytes())
    (tmp_path / "tmp").mkdir()
    yield ws
    for h in fleet.hosts[:2]:
        h.run("pkill -9 -u $(id -u) -f 'megafleet|torch.distributed' || true", check=False)


def wizard(fleet_home, tmp_path, argv=("wizard", "--timeout", "5")) -> WizardPty:
    return WizardPty(
        list(argv),
        cwd=tmp_path / "ws",
        env={"MEGAFLEET_HOME": str(fleet_home), "TMPDIR": str(tmp_path / "tmp")},
    )


def add_host(w: WizardPty, fleet, host) -> None:
    w.type("Host address", f"{host.user}@{host.address}")
    w.enter("SSH user")  # the user from the address
    w.type("Private key", str(fleet.key))
    w.type("Name for this host", host.name)
    w.expect("1/1 host.s. reachable")


def test_wizard_end_to_end_on_two_hosts_then_replay(fleet, fleet_home, workspace, assets, tmp_path):
    w = wizard(fleet_home, tmp_path)
    try:
        w.choose("Where should training run", 2)
        w.yes("Add a new host")
        add_host(w, fleet, fleet.hosts[0])
        w.yes("Add a new host")
        add_host(w, fleet, fleet.hosts[1])
        w.yes("Add a new host", False)
        w.enter("train across all of them")  # default: distributed across both
        w.yes("Run on CPU instead")
        w.expect("What kind of training")
        w.enter("SFT with LoRA adapters")  # the choices are shown; Enter takes the default, SFT
        w.type("Model:", str(assets / "model"))
        w.expect("qwen3, 0.00B parameters")
        w.enter("Dataset file")  # default: the .jsonl in the working directory
        w.expect("200 rows, format messages")
        w.type("Tokens per training row", "128")
        w.type("How long to train", "2 steps")
        w.type("Learning rate", "1e-3")
        w.enter("Where the nodes write checkpoints")
        w.enter("Save the job as")
        w.expect("megafleet launch job.yaml")
        w.enter("Go ahead")
        w.expect("every node runs this megafleet")
        run_id = w.run_id()
        w.yes("Follow the logs now")
        code = w.wait(timeout=300)
    finally:
        w.close()
    assert code == 0, w.text[-5000:]
    text = w.text
    assert "node 1 (node1) started" in text and f"run {run_id} succeeded" in text
    assert "n1 r1" in text and "step 2/2" in text

    env = {"MEGAFLEET_HOME": str(fleet_home)}
    status = run_cli_json("status", run_id, "--json", env=env)[1]
    assert status["state"] == "succeeded" and status["exit_code"] == 0
    assert [n["host"] for n in status["nodes"]] == ["node0", "node1"]

    inv = Inventory.load(fleet_home / "hosts.yaml")  # written at the confirmation
    assert inv.names() == ["node0", "node1"]
    assert inv.hosts["node1"].identity_file == str(fleet.key)
    pinned = (fleet_home / "known_hosts").read_text()
    assert all(h.address in pinned for h in fleet.hosts[:2])
    job = load_job_file(workspace / "job.yaml")
    assert job.launch.hosts == ["node0", "node1"] and job.model.device == "cpu"
    assert job.train.train_iters == 2 and job.data.dataset == [str(workspace / "chats.jsonl")]
    assert list((tmp_path / "tmp").iterdir()) == []  # the staged known_hosts is gone

    # The saved answers replay as a job (on other ports: node 0's watcher of the run that just
    # ended keeps answering on master_port + 1 for a few seconds).
    proc, plan = run_cli_json(
        "launch",
        "job.yaml",
        "--dry-run",
        "--json",
        "--",
        "--master_port",
        "29620",
        env=env,
        cwd=workspace,
    )
    assert proc.returncode == 0, proc.stderr
    assert [n["host"] for n in plan["nodes"]] == ["node0", "node1"]
    assert plan["run"]["world_size"] == 2


# Cancel points: each kind of prompt (select, text, confirm) and each state the goodbye message
# depends on: nothing asked yet (bare `megafleet`), a host being added, a host added (its
# `hosts add` hint), the dataset prompt (no `render` hint yet), the first prompt after it (the
# hint), the confirmation after the planner ran (Ctrl-C and its Cancel choice). The task, model,
# train length and job file prompts (select and text prompts in a state a neighbour covers) are
# answered on the way, not cancelled at: they ran the same cancel path in 4 more wizards.
STEPS = [
    "where",
    "host address",
    "add another host",
    "dataset",
    "max_length",
    "confirm (Ctrl-C)",
    "confirm (Cancel)",
]


def drive_until(w: WizardPty, fleet, assets, step: str) -> None:
    """Answer the questions (one host with a STUB nvidia-smi: 2xH200 captures, so the planner
    runs) until the prompt of `step`, then cancel there."""
    script = [  # (step, its prompt, how it is answered when the test goes past it)
        (
            "where",
            "Where should training run",
            lambda: (w.choose("Where should training run", 2), w.yes("Add a new host")),
        ),
        ("host address", "Host address", lambda: add_host(w, fleet, fleet.hosts[2])),
        ("add another host", "Add a new host", lambda: w.yes("Add a new host", False)),
        ("task", "What kind of training", lambda: w.enter("What kind of training")),
        ("model", "Model:", lambda: w.type("Model:", str(assets / "model"))),
        ("dataset", "Dataset file", lambda: w.enter("Dataset file")),
        (
            "max_length",
            "Tokens per training",
            lambda: (w.type("Tokens per training row", "256"), w.expect(r"Layouts \(GiB per GPU")),
        ),
        (
            "train length",
            "How long to train",
            lambda: (
                w.enter("How long to train"),
                w.enter("Learning rate"),
                w.enter("Where the nodes write"),
            ),
        ),
        ("job file", "Save the job as", lambda: w.enter("Save the job as")),
        ("confirm (Ctrl-C)", "Go ahead", None),
    ]
    for name, prompt, answer in script:
        if step == "confirm (Cancel)" and answer is None:
            return w.choose(prompt, 3)  # "Cancel (nothing is written)"
        if name == step:
            return w.cancel(prompt)
        answer()


@pytest.mark.parametrize("step", STEPS)
def test_cancel_at_each_step_leaves_nothing(fleet, fleet_home, workspace, assets, tmp_path, step):
    fleet.hosts[2].install_stub_nvidia_smi()
    before = sorted(p.name for p in workspace.iterdir())
    argv = ["--debug"] if step == "where" else ["wizard", "--timeout", "5"]  # bare `megafleet`
    w = wizard(fleet_home, tmp_path, argv)
    try:
        drive_until(w, fleet, assets, step)
        code = w.wait()
    finally:
        w.close()
    text = " ".join(w.text.split())
    assert code == 130, text[-3000:]
    assert "Nothing was written: no job file, no inventory change, no run." in text
    assert "To start again: megafleet wizard" in text
    if STEPS.index(step) > STEPS.index("add another host"):
        assert f"megafleet hosts add node2 {fleet.hosts[2].user}@{fleet.hosts[2].address}" in text
    if STEPS.index(step) > STEPS.index("dataset"):
        assert "megafleet render sft-full --set model=" in text
    assert sorted(p.name for p in workspace.iterdir()) == before
    assert sorted(p.name for p in fleet_home.iterdir()) == []  # no inventory, keys or runs
    assert list((tmp_path / "tmp").iterdir()) == []


def test_a_node_without_megafleet_is_offered_setup_answers_file(
    fleet, fleet_home, workspace, assets, tmp_path
):
    """Scripted with --answers (no terminal): node2 has no ~/megafleet/venv, so the wizard shows
    the setup plan and asks; declined, it keeps the saved job and says how to go on."""
    fleet.hosts[2].run("rm -rf ~/megafleet")
    h = fleet.hosts[2]
    answers = {
        "where": "ssh",
        "new_hosts": [{"address": f"{h.user}@{h.address}", "key": str(fleet.key), "name": "node2"}],
        "cpu_ok": True,
        "task": "sft",
        "model": str(assets / "model"),
        "dataset": str(workspace / "chats.jsonl"),
        "max_length": 128,
        "train_length": "2 steps",
        "lr": "1e-3",
        "output_dir": "out",
        "job_file": "job.yaml",
        "confirm": "launch",
        "setup": False,
    }
    (tmp_path / "answers.yaml").write_text(json.dumps(answers))
    proc = run_cli(
        "wizard",
        "--answers",
        str(tmp_path / "answers.yaml"),
        "--timeout",
        "5",
        cwd=workspace,
        env={"MEGAFLEET_HOME": str(fleet_home), "TMPDIR": str(tmp_path / "tmp")},
        timeout=180,
    )
    out = " ".join(proc.stdout.split())
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "node2: not set up" in out and "no megafleet in" in out
    assert "venv: run" in out  # the setup plan of node2
    assert "Set up node2 now" in out and "Not set up. The job is saved in" in out
    assert "megafleet setup --hosts node2" in out
    assert load_job_file(workspace / "job.yaml").launch.hosts == ["node2"]
    assert Inventory.load(fleet_home / "hosts.yaml").names() == ["node2"]
    assert not (fleet_home / "runs").exists()
    assert fleet.hosts[2].run("ls ~/megafleet/venv", check=False).returncode != 0  # untouched
