"""The wizard's EC2 branch in a pseudo-terminal, under moto (`python -m tests.ec2_moto SEED --
wizard ...` runs the CLI in its own process with AWS mocked): instances found by tag, the
import staged and shown, `ec2 check` findings (two availability zones), SSH checked (moto's
instances do not answer), GPU facts from the instance type (p5.48xlarge: 8x H100 80 GiB), a
hub id that must be on the nodes, the planner for 16 GPUs, and "save only": the inventory gets
the instances (public address, private address, EC2 tags) and the job file their names."""

from __future__ import annotations

import json

from megafleet.inventory import Inventory
from remote_runtime.spec.flags import load_job_file
from tests.ec2_moto import make_key
from tests.wizard_pty import WizardPty

SEED = {
    "region": "us-east-1",
    "self_rule": True,
    "instances": [
        {"name": "gpu-a", "type": "p5.48xlarge", "az": "a", "tags": {"team": "ml"}},
        {"name": "gpu-b", "type": "p5.48xlarge", "az": "b", "tags": {"team": "ml"}},
        {"name": "other", "type": "g5.xlarge", "az": "a", "tags": {"team": "web"}},
    ],
}


def test_ec2_branch_finds_checks_imports_and_saves_the_job(tmp_path):
    from remote_runtime.data.demo_data import write_demo_dataset

    (tmp_path / "seed.json").write_text(json.dumps(SEED))
    key = make_key(tmp_path)
    home, ws = tmp_path / "home", tmp_path / "ws"
    home.mkdir(mode=0o700)
    ws.mkdir()
    write_demo_dataset(ws / "chats.jsonl", 20)
    w = WizardPty(
        [str(tmp_path / "seed.json"), "--", "wizard", "--timeout", "2"],
        module="tests.ec2_moto",
        cwd=ws,
        timeout=60,
        env={"MEGAFLEET_HOME": str(home), "TMPDIR": str(tmp_path)},
    )
    try:
        w.choose("Where should training run", 3)
        w.enter("AWS region")  # us-east-1, from the environment
        w.type("Instance tags to match", "team=ml")
        w.expect("2 instance.s. in us-east-1 tagged team=ml")
        w.enter("SSH user on the instances")  # ubuntu
        w.type("Private key of the instances", str(key))
        w.expect("import: would change")
        w.expect("one VPC and availability zone")
        w.expect("SSH reachable from here")
        w.yes("Go on anyway", timeout=30)
        w.enter("train across all of them")
        w.enter("What kind of training")
        w.type("Model:", "Qwen/Qwen3-8B")
        w.expect("qwen3, 8.19B parameters")
        w.expect("is not on this machine")
        w.type("Path of the model directory on the nodes", "/data/Qwen3-8B")
        w.enter("Dataset file")
        w.enter("Tokens per training row")  # 4096
        w.expect(r"2 node.s. × 8 H100 \(80 GiB each, from the EC2 type p5.48xlarge\)")
        w.expect("16 GPUs × 80 GiB")
        w.enter("How long to train")
        w.enter("Learning rate")
        w.enter("Where the nodes write")
        w.enter("Save the job as")
        w.choose("Go ahead", 2)  # save only
        code = w.wait()
    finally:
        w.close()
    text = " ".join(w.text.split())
    assert code == 0, text[-4000:]
    assert "multiple_azs: instances are in different availability zones" in text
    assert "testing" not in text  # moto's fake credentials never show

    inv = Inventory.load(home / "hosts.yaml")
    assert inv.names() == ["gpu-a", "gpu-b"]
    a = inv.hosts["gpu-a"]
    assert a.user == "ubuntu" and a.identity_file == str(key)
    assert a.private_address.startswith("10.7.")
    assert a.tags["ec2_instance_type"] == "p5.48xlarge" and a.tags["team"] == "ml"
    assert not (home / "known_hosts").exists()  # no SSH connection ever completed
    job = load_job_file(ws / "job.yaml")
    assert job.launch.hosts == ["gpu-a", "gpu-b"] and job.model.model == "/data/Qwen3-8B"
    assert job.launch.nproc_per_node == 8 and job.data.max_length == 4096
    tp, pp = job.parallel.tensor_model_parallel_size, job.parallel.pipeline_model_parallel_size
    assert 16 % (tp * pp) == 0 and tp <= 8
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith("megafleet-wizard-")] == []
