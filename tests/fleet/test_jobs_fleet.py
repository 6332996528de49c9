"""The job lifecycle on the namespace fleet: launch, logs, status, stop, fetch, fail-fast.

Most jobs here run the STAND-IN workload (tests/standin_workload.py: torchrun + gloo, logging.jsonl,
checkpoints, SIGTERM) through `launch_job(..., entry_module="tests.standin_workload")`; everything
after the launch goes through the `megafleet` command as a user runs it. The real 2-node SFT run
(`python -m remote_runtime sft`: launch, logs, status, fetch, then transformers loads the model)
is in tests/fleet/test_faults_fleet.py, where it is also stopped and resumed.

Each node's venv is `~/megafleet/venv` (the default launch.venv): a symlink to fleet.host_python()'s
venv, which sees torch and this checkout.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from megafleet.jobs.launch import LaunchOptions, launch_job
from megafleet.jobs.records import RunRecord
from tests.conftest import REPO_ROOT, cli_env, run_cli, run_cli_json

pytestmark = pytest.mark.fleet

SECRET = "hf_s3cr3t-value-4-tests"


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    from remote_runtime.tiny import build_model

    return build_model("qwen3", tmp_path_factory.mktemp("tiny") / "model")


@pytest.fixture
def nodes(fleet, fleet_home, tmp_path):
    """node0 and node1 with ~/megafleet/venv, an inventory of the two, and demo data."""
    venv = Path(fleet.host_python()).parent.parent
    for h in fleet.hosts[:2]:
        h.run(
            f"mkdir -p ~/megafleet && ln -sfn {venv} ~/megafleet/venv"
            " && rm -rf ~/megafleet/runs ~/megafleet/uploads ~/megafleet/models"
        )
    fleet.write_inventory(fleet_home, fleet.hosts[:2])
    from remote_runtime.data.demo_data import write_demo_dataset

    write_demo_dataset(tmp_path / "demo.jsonl", 40)
    yield fleet.hosts[:2]
    for h in fleet.hosts[:2]:  # nothing of any run may outlive its test
        h.run("pkill -9 -u $(id -u) -f 'megafleet|torch.distributed|standin' || true", check=False)


def standin_job(model, data, port, **flags):
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
        "--save_steps",
        "10",
        "--logging_steps",
        "2",
        "--stop_grace",
        "5",
    ]
    for k, v in flags.items():
        argv += [f"--{k}"] + (v if isinstance(v, list) else [str(v)])
    return job_from_argv(argv, task="sft")


def launch_standin(job) -> RunRecord:
    return launch_job(job, LaunchOptions(entry_module="tests.standin_workload"))


def env(home, **extra):
    return {"MEGAFLEET_HOME": str(home), **extra}


def run_procs(run_id: str) -> dict[int, str]:
    """Every process on this machine (all fleet users) tagged with the run: {pid: cmdline}."""
    found = {}
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
        except OSError:
            continue
        if any(
            e in environ
            for e in (
                f"MEGAFLEET_RUN_ID={run_id}".encode(),
                f"MEGAFLEET_WATCH_RUN={run_id}".encode(),
            )
        ):
            found[int(pid)] = cmd
    return found


def followers(run_id: str) -> list[int]:
    """`nodectl follow` processes of the run on any fleet host."""
    out = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
        except OSError:
            continue
        if "nodectl follow" in cmd and run_id in cmd:
            out.append(int(pid))
    return out


def wait_for(cond, timeout: float, what: str, step: float = 0.25):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        value = cond()
        if value:
            return value
        time.sleep(step)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


def node_file(host, run: RunRecord, rank: int, name: str) -> str:
    return host.run(f"cat {run.node(rank).run_dir}/{name}", check=False).stdout


def logged_steps(host, run: RunRecord) -> int:
    """Lines rank 0 has appended to logging.jsonl so far."""
    return len(node_file(host, run, 0, "output/logging.jsonl").splitlines())


def test_two_node_job_streams_both_nodes_and_the_checkpoint_loads(
    nodes, fleet_home, tiny_model, tmp_path
):
    """Launched with the `megafleet launch` command (the stand-in chosen with the hidden
    --entry-module option), HF_TOKEN forwarded from the operator's environment. node0's sshd has
    no SFTP subsystem: the upload to it and the fetch from it stream over the exec channel."""
    nodes[0].set_sftp(False)
    proc = run_cli(
        "launch",
        "--yes",
        "--entry-module",
        "tests.standin_workload",
        "--",
        "--model",
        str(tiny_model),
        "--dataset",
        str(tmp_path / "demo.jsonl"),
        "--train_iters",
        "20",
        "--device",
        "cpu",
        "--master_port",
        "29710",
        "--save_steps",
        "10",
        "--logging_steps",
        "2",
        "--env",
        "HF_TOKEN",
        "STANDIN_STEP_S",
        env=env(fleet_home, HF_TOKEN=SECRET, STANDIN_STEP_S="0.1"),
        timeout=120,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    run_id = re.search(r"run (\S+) is running", proc.stdout).group(1)
    assert f"megafleet logs {run_id} -f" in proc.stdout and "node 1 (node1) started" in proc.stdout
    assert SECRET not in proc.stdout + proc.stderr
    run = RunRecord.load(run_id)
    assert [n.host for n in run.nodes] == ["node0", "node1"] and run.world_size == 2
    assert run.master_addr == nodes[0].address  # node 0's address on the nodes' network
    assert all(n.pid and n.pgid == n.pid and n.start_time for n in run.nodes)
    assert sorted(u["host"] for u in run.uploads) == ["node0", "node1"]  # data and model, whole
    assert all(u["bytes_sent"] == u["bytes_total"] > 0 and u["skipped"] == 0 for u in run.uploads)

    proc = run_cli("logs", run.run_id, "-f", env=env(fleet_home), timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    out = proc.stdout
    assert re.search(r"^n0 r0 +│ stand-in rank 0/2 ready on .* \(HF_TOKEN set\)", out, re.M), out
    assert re.search(r"^n1 r1 +│ stand-in rank 1/2 ready", out, re.M), out
    assert re.search(r"^n0 r0 +│ step 20/20 loss 0.2500", out, re.M)
    assert re.search(r"^n1 +│ megafleet: node 1 torchrun exited with code 0", out, re.M)

    nodes[0].install_stub_nvidia_smi()  # a STUB replaying 2xH200 captures: GPU columns, no GPU
    proc, status = run_cli_json("status", run.run_id, "--json", env=env(fleet_home))
    assert status["state"] == "succeeded" and status["exit_code"] == 0
    assert status["progress"]["step"] == 20 and status["progress"]["loss"] == 0.25
    curve = status["progress"]["loss_curve"]
    assert curve[0] == [2, status["progress"]["first_loss"]] and curve[-1] == [20, 0.25]
    shown = run_cli("status", run.run_id, "--plot", str(tmp_path / "loss.png"), env=env(fleet_home))
    assert re.search(r"loss \S+ \(step 2\) → 0\.25 \(step 20\)  [▁▂▃▄▅▆▇█]+", shown.stdout)
    assert ("matplotlib is not installed" in shown.stdout) != (tmp_path / "loss.png").exists()
    assert [n["state"] for n in status["nodes"]] == ["exited", "exited"]
    assert status["nodes"][0]["gpus"][1] == {
        "index": 1,
        "util": 0,
        "mem_used_mib": 0,
        "mem_total_mib": 143771,
    }
    assert status["nodes"][1]["gpus"] is None

    # the secret lived in the 0600 env file only, which is gone now that the run has ended:
    # not in scripts, records or any log
    for rank, host in enumerate(nodes):
        assert host.run(f"test -e {run.node(rank).run_dir}/env", check=False).returncode == 1
        leaked = host.run(f"grep -rl -- {SECRET} {run.node(rank).run_dir} || true").stdout.split()
        assert leaked == [], leaked
    assert SECRET not in out and SECRET not in (run.dir / "run.json").read_text()

    proc, fetched = run_cli_json(
        "fetch", run.run_id, "--json", "--to", str(tmp_path / "ckpt"), env=env(fleet_home)
    )
    assert proc.returncode == 0, proc.stderr
    assert fetched["step"] == 20 and fetched["host"] == "node0" and fetched["skipped"] == []
    assert fetched["state_left_on_node"] == {"files": 1, "bytes": 4096}  # optimizer state stays
    assert not (tmp_path / "ckpt" / "megatron_state").exists()
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tmp_path / "ckpt")
    assert model.config.model_type == "qwen3"
    again = run_cli_json(
        "fetch", run.run_id, "--json", "--to", str(tmp_path / "ckpt"), env=env(fleet_home)
    )[1]
    assert again["bytes_sent"] == 0 and len(again["skipped"]) == fetched["files"]
    state = run_cli_json(
        "fetch",
        run.run_id,
        "--json",
        "--with-state",
        "--to",
        str(tmp_path / "ckpt"),
        env=env(fleet_home),
    )[1]
    assert state["bytes_sent"] == 4096 and state["state_left_on_node"]["files"] == 0
    shard = tmp_path / "ckpt" / "megatron_state" / "optimizer" / "shard_0.bin"
    assert shard.stat().st_size == 4096


def test_stop_during_a_long_run_leaves_no_process_on_either_node(
    nodes, fleet_home, tiny_model, tmp_path, monkeypatch
):
    monkeypatch.setenv("STANDIN_STEP_S", "0.2")
    run = launch_standin(
        standin_job(
            tiny_model, tmp_path / "demo.jsonl", 29720, train_iters=100000, env=["STANDIN_STEP_S"]
        )
    )
    wait_for(lambda: logged_steps(nodes[0], run) >= 2, 60, "training to log steps")
    before = run_procs(run.run_id)
    assert {"torch.distributed.run", "tests.standin_workload", "megafleet.jobs.watcher"} <= {
        w for cmd in before.values() for w in cmd.split()
    }

    # Ctrl-C on `logs -f` detaches: the job goes on, the log followers on the nodes go away;
    # also when started with SIGINT ignored (a background command of a non-interactive shell)
    follower = subprocess.Popen(
        [sys.executable, "-m", "megafleet", "logs", run.run_id, "-f"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=cli_env(env(fleet_home)),
        cwd=REPO_ROOT,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_IGN),
    )
    while "step " not in follower.stdout.readline():
        pass
    follower.send_signal(signal.SIGINT)
    _, err = follower.communicate(timeout=30)
    assert follower.returncode == 130 and f"detached: run {run.run_id} keeps running" in " ".join(
        err.split()
    )
    wait_for(lambda: not followers(run.run_id), 15, "the nodes' log followers to exit")
    assert set(run_procs(run.run_id)) == set(before)

    proc, report = run_cli_json("stop", run.run_id, "--yes", "--json", env=env(fleet_home))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert report["ok"] and set(report["nodes"]) == {"node0", "node1"}
    assert all(r["left"] == [] and r["terminated"] for r in report["nodes"].values())
    assert run_procs(run.run_id) == {}
    for rank, host in enumerate(nodes):  # the env file (forwarded variables) went with the run
        assert host.run(f"test -e {run.node(rank).run_dir}/env", check=False).returncode == 1
    status = run_cli_json("status", run.run_id, "--json", env=env(fleet_home))[1]
    assert status["state"] == "stopped" and status["failure"] is None
    assert "SIGTERM: stopping at step" in run_cli("logs", run.run_id, env=env(fleet_home)).stdout


def test_a_dead_worker_on_node1_makes_the_watcher_stop_node0(
    nodes, fleet, fleet_home, tiny_model, tmp_path, monkeypatch
):
    monkeypatch.setenv("STANDIN_STEP_S", "0.2")
    monkeypatch.setenv("STANDIN_HANG_ON_PEER_FAILURE", "1")  # node 0 would wait forever
    run = launch_standin(
        standin_job(
            tiny_model,
            tmp_path / "demo.jsonl",
            29730,
            train_iters=100000,
            stall_timeout=60,
            env=["STANDIN_STEP_S", "STANDIN_HANG_ON_PEER_FAILURE"],
        )
    )
    user1 = fleet.host("node1").user
    worker = wait_for(
        lambda: next(
            (
                pid
                for pid, cmd in run_procs(run.run_id).items()
                if "tests.standin_workload" in cmd and _owner(pid) == user1
            ),
            None,
        ),
        60,
        "the worker on node1",
    )
    wait_for(lambda: logged_steps(nodes[0], run) >= 2, 60, "training to log steps")
    os.kill(worker, 9)
    killed_at = time.monotonic()
    wait_for(lambda: not run_procs(run.run_id), 30, "every process of the run to end")
    elapsed = time.monotonic() - killed_at
    # heartbeat 1 s + torchrun noticing + SIGTERM (stop_grace 5 s) + watchers' linger (5 s)
    assert elapsed < 20, elapsed

    proc, status = run_cli_json("status", run.run_id, "--json", env=env(fleet_home))
    assert status["state"] == "failed", status
    failure = status["failure"]
    assert (
        failure["node"] == 1
        and failure["host"] == "node1"
        and failure["exit_code"] not in (0, None)
    )
    assert any("exited with code" in line or "rank1" in line for line in failure["tail"]), failure
    stopped = status["nodes"][0]["watcher_stop"]
    assert "fail-fast: node 1 (node1) exited with code" in stopped["reason"]
    human = run_cli("status", run.run_id, env=env(fleet_home)).stdout
    assert "node 1 (node1) failed first: exited with code" in human
    assert "node0 was stopped by the watcher" in human


def _owner(pid: int) -> str:
    import pwd

    try:
        return pwd.getpwuid(os.stat(f"/proc/{pid}").st_uid).pw_name
    except (OSError, KeyError):
        return ""


def test_an_interrupted_upload_resumes_and_sends_only_the_rest(nodes, fleet_home, tmp_path):
    from megafleet.inventory import Inventory
    from megafleet.jobs.preflight import probe_nodes, select_targets
    from megafleet.jobs.sync import plan_tree, upload

    big = tmp_path / "big.bin"
    big.write_bytes(os.urandom(24 * 2**20))
    target = select_targets(["node1"], inventory=Inventory.load())[0]
    python = probe_nodes([target], "megafleet/venv")["node1"].python
    copies = plan_tree(big, f"/home/{nodes[1].user}/megafleet/uploads/t/big.bin")

    def cut_halfway(done, total):  # Ctrl-C halfway through
        if done > total // 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        upload(target.runner, python, copies, cut_halfway)
    part = nodes[1].run(f"stat -c %s {copies[0].remote}.mfpart").stdout.strip()
    assert 0 < int(part) < copies[0].size
    seen = []
    report = upload(target.runner, python, copies, lambda d, t: seen.append(d))
    offset = report.resumed[copies[0].remote]
    assert offset == int(part) and report.bytes_sent == copies[0].size - offset
    assert seen[0] == offset and seen[-1] == copies[0].size  # the bar starts where it stopped
    assert nodes[1].run(f"sha256sum {copies[0].remote}").stdout.split()[0] == copies[0].sha256
    again = upload(target.runner, python, copies)
    assert again.bytes_sent == 0 and again.skipped == [copies[0].remote]


def test_a_blocked_master_port_is_reported_before_anything_starts(
    nodes, fleet_home, tiny_model, tmp_path
):
    """node0 drops its replies from port 29740 (as a firewall would): node1's connect times out."""
    nodes[0].run("ip rule add pref 100 ipproto tcp sport 29740 blackhole", as_root=True)
    try:
        proc = run_cli(
            "launch",
            "--yes",
            "--",
            "--model",
            str(tiny_model),
            "--dataset",
            str(tmp_path / "demo.jsonl"),
            "--train_iters",
            "5",
            "--device",
            "cpu",
            "--master_port",
            "29740",
            env=env(fleet_home),
            timeout=120,
        )
    finally:
        nodes[0].run("ip rule del pref 100", as_root=True)
    assert proc.returncode == 3, proc.stdout + proc.stderr
    err = " ".join(proc.stderr.split())
    assert f"node1 cannot reach node0 at {nodes[0].address}:29740: no answer within 5s" in err, err
    assert "allow TCP 29740/29741 from the other nodes to node0" in err
    assert "node1 cannot reach node0 at" in err and ":29741" not in err.split("fix:")[0]
    assert run_cli_json("runs", "--json", env=env(fleet_home))[1]["runs"] == []
    assert nodes[0].run("ls ~/megafleet/runs 2>/dev/null || true").stdout.strip() == ""


def test_a_node_with_another_megafleet_version_is_refused_with_the_fix(
    nodes, fleet, fleet_home, tiny_model, tmp_path
):
    old = fleet.workdir / "old-venv"
    if not old.exists():
        base = Path(fleet.host_python()).resolve()
        import subprocess

        subprocess.run([str(base), "-m", "venv", "--without-pip", str(old)], check=True)
        site = next(old.glob("lib/python*/site-packages"))
        (site / "megafleet").mkdir()
        (site / "megafleet" / "__init__.py").write_text('__version__ = "0.0.1"\n')
    nodes[1].run(f"ln -sfn {old} ~/megafleet/venv")
    proc = run_cli(
        "launch",
        "--yes",
        "--",
        "--model",
        str(tiny_model),
        "--dataset",
        str(tmp_path / "demo.jsonl"),
        "--train_iters",
        "5",
        "--device",
        "cpu",
        env=env(fleet_home),
        timeout=120,
    )
    assert proc.returncode == 2, proc.stdout + proc.stderr
    err = " ".join(proc.stderr.split())
    assert "node1: megafleet 0.0.1 is installed, this machine has 0.1.0" in err, err
    assert "node0" not in err.split("fix:")[0]
    assert "run `megafleet setup`" in err


def test_dry_run_shows_the_plan_and_changes_nothing(nodes, fleet_home, tiny_model, tmp_path):
    proc, plan = run_cli_json(
        "launch",
        "--dry-run",
        "--json",
        "--",
        "--model",
        str(tiny_model),
        "--dataset",
        str(tmp_path / "demo.jsonl"),
        "--train_iters",
        "5",
        "--device",
        "cpu",
        "--master_port",
        "29750",
        env=env(fleet_home),
    )
    assert proc.returncode == 0, proc.stderr
    n0, n1 = plan["nodes"]
    assert (n0["host"], n1["host"], n1["node_rank"], n1["ranks"]) == ("node0", "node1", 1, [1])
    assert f"--master_addr {nodes[0].address} --master_port 29750" in n1["launch_sh"]
    assert "--nnodes 2 --node_rank 1 --nproc_per_node 1" in n1["launch_sh"]
    assert any(u["remote"].endswith("/demo.jsonl") for u in n1["uploads"])
    assert any(u["remote"].endswith("/config.json") for u in n1["uploads"])  # the model too
    assert "/megafleet/uploads/" in n1["job_yaml"] and "/megafleet/models/" in n1["job_yaml"]
    assert any("not on node0, node1: uploading it" in note for note in plan["notes"])
    assert plan["ports"] == {"node1": {"29750": "ok", "29751": "ok"}}
    assert (
        nodes[1].run("ls ~/megafleet/runs ~/megafleet/uploads 2>/dev/null || true").stdout.strip()
        == ""
    )
    assert run_cli_json("runs", "--json", env=env(fleet_home))[1]["runs"] == []


def test_dry_run_lists_its_checks_and_refuses_weights_the_nodes_cannot_read(
    nodes, fleet_home, tiny_model, tmp_path
):
    """node1's sshd has no SFTP: the dry run says how files will reach it. Then a model that is
    already on the nodes (`m`, home-relative) with an unreadable weights file is refused."""
    from megafleet import __version__

    nodes[1].set_sftp(False)
    args = [
        "--dataset",
        str(tmp_path / "demo.jsonl"),
        "--train_iters",
        "5",
        "--device",
        "cpu",
        "--master_port",
        "29760",
    ]
    proc, plan = run_cli_json(
        "launch",
        "--dry-run",
        "--json",
        "--",
        "--model",
        str(tiny_model),
        *args,
        env=env(fleet_home),
    )
    assert proc.returncode == 0, proc.stderr
    checks = {c["name"]: c for c in plan["checks"]}
    assert checks["megafleet_version"]["detail"] == {
        "operator": __version__,
        "node0": __version__,
        "node1": __version__,
    }
    transfer = checks["file_transfer"]
    assert transfer["status"] == "note" and transfer["detail"]["node0"] == "sftp"
    assert "exec channel" in transfer["detail"]["node1"]
    assert checks["dataset"]["detail"]["rows"] == 40 and checks["devices"]["status"] == "ok"
    assert checks["master_ports"]["status"] == "ok"

    for h in nodes:
        h.run(
            f"rm -rf {h.home}/m && cp -r {tiny_model} {h.home}/m && chown -R {h.user}: "
            f"{h.home}/m && chmod 000 {h.home}/m/model.safetensors",
            as_root=True,
        )
    proc, err = run_cli_json(
        "launch", "--dry-run", "--json", "--", "--model", "m", *args, env=env(fleet_home)
    )
    assert proc.returncode == 2 and err["problems"][0]["field"] == "model.model"
    assert "model.safetensors cannot be read" in err["message"] and "chmod" in err["hint"]


def test_the_master_address_is_the_one_node0_reaches_a_worker_behind_it_from(
    nodes, fleet, fleet_home, tiny_model, tmp_path
):
    """inner0 is reachable only through node0 (jump host), on a second network: the master
    address must be node0's address on that network, not the one the operator uses."""
    inner = fleet.host("inner0")
    inner.run(
        "mkdir -p ~/megafleet && "
        f"ln -sfn {Path(fleet.host_python()).parent.parent} ~/megafleet/venv"
    )
    fleet.write_inventory(fleet_home, [nodes[0], inner])
    proc, plan = run_cli_json(
        "launch",
        "--dry-run",
        "--json",
        "--",
        "--model",
        str(tiny_model),
        "--dataset",
        str(tmp_path / "demo.jsonl"),
        "--train_iters",
        "5",
        "--device",
        "cpu",
        "--master_port",
        "29770",
        env=env(fleet_home),
    )
    assert proc.returncode == 0, proc.stderr
    bridge = nodes[0].run("ip -o -4 addr show eth1").stdout.split()[3].split("/")[0]
    assert plan["run"]["master_addr"] == bridge != nodes[0].address
    assert plan["ports"] == {"inner0": {"29770": "ok", "29771": "ok"}}
    assert [n["ifname"] for n in plan["run"]["nodes"]] == ["eth1", "eth0"]
