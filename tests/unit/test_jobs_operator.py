"""Operator-side job pieces without hosts: the rendered node files, run records, incremental and
resumable copies (LocalRunner), log-line parsing, run states, planning helpers and CLI input
errors."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest

from megafleet import __version__
from megafleet.errors import UsageError, ValidationError
from megafleet.jobs import node_scripts as render
from megafleet.jobs.logs import parse_line
from megafleet.jobs.preflight import NodeFacts, check_versions, nproc_per_node, venv_python
from megafleet.jobs.records import NodeInfo, RunRecord, list_runs, resolve_run_id
from megafleet.jobs.status import derive_state
from megafleet.jobs.sync import RemoteFile, download, plan_tree, upload
from megafleet.runner import LocalRunner
from tests.conftest import run_cli, run_cli_json


def record(run_id="20260101-000000-abcd", nodes=2, **kw) -> RunRecord:
    return RunRecord(
        run_id=run_id,
        created=time.time(),
        task="sft",
        nodes=[
            NodeInfo(
                rank=k,
                host=f"gpu{k}",
                run_dir=f"/home/u/megafleet/runs/{run_id}",
                python="/home/u/megafleet/venv/bin/python",
                ranks=[2 * k, 2 * k + 1],
                ifname="ens5",
            )
            for k in range(nodes)
        ],
        master_addr="10.0.0.5",
        master_port=29500,
        watcher_port=29501,
        nproc_per_node=2,
        world_size=2 * nodes,
        entry=["-m", "remote_runtime", "sft", "--config", "job.yaml"],
        output_dir="output",
        stall_timeout=900,
        stop_grace=30,
        **kw,
    )


def test_launch_script_runs_torchrun_for_its_rank_and_records_the_exit_code():
    run = record()
    text = render.launch_script(run, run.nodes[1])
    assert (
        "\n/home/u/megafleet/venv/bin/python -m torch.distributed.run --nnodes 2 --node_rank 1 "
        "--nproc_per_node 2 --master_addr 10.0.0.5 --master_port 29500 --redirects 3 "
        "--log_dir torchrun-logs -m remote_runtime sft --config job.yaml\n"
    ) in text
    assert "echo $$ > pid" in text and "> exit_code.tmp && mv exit_code.tmp exit_code" in text
    assert "export MEGAFLEET_RUN_ID=20260101-000000-abcd" in text
    assert 'GLOO_SOCKET_IFNAME="${GLOO_SOCKET_IFNAME:-ens5}"' in text
    assert "unset MEGAFLEET_WATCH_TOKEN" in text
    start = render.start_command(run.nodes[1])
    assert "setsid nohup /bin/sh launch.sh < /dev/null >> node.log 2>&1 &" in start
    assert "setsid nohup /bin/sh watch.sh < /dev/null >> watcher.log 2>&1 &" in start
    assert (
        "exec /home/u/megafleet/venv/bin/python -m megafleet.jobs.watcher "
        "/home/u/megafleet/runs/20260101-000000-abcd"
    ) in render.watch_script(run, run.nodes[1])


def test_secrets_go_to_the_env_file_only():
    run = record(env_names=["HF_TOKEN"])
    secret = "hf_it's a $ecret"
    env = render.env_file(run, {"HF_TOKEN": secret}, "tok123")
    assert "HF_TOKEN='hf_it'\"'\"'s a $ecret'" in env and "MEGAFLEET_WATCH_TOKEN=tok123" in env
    out = os.popen(
        f"sh -c 'set -a; . /dev/stdin; printf %s \"$HF_TOKEN\"' <<'EOF'\n{env}EOF"
    ).read()
    assert out == secret
    for text in (
        render.launch_script(run, run.nodes[0]),
        render.watch_script(run, run.nodes[0]),
        json.dumps(render.node_record(run, run.nodes[0])),
        json.dumps(run.to_dict()),
    ):
        assert "a $ecret" not in text and "tok123" not in text


def test_records_save_load_and_resolve(megafleet_home):
    with pytest.raises(UsageError, match="no runs recorded yet"):
        resolve_run_id("last")
    a, b = record("20260101-000000-aaaa"), record("20260102-000000-bbbb")
    a.save(), b.save()
    assert resolve_run_id("last") == b.run_id and resolve_run_id("20260101") == a.run_id
    with pytest.raises(UsageError, match="ambiguous"):
        resolve_run_id("2026")
    with pytest.raises(UsageError, match="no run 'nope'"):
        resolve_run_id("nope")
    loaded = RunRecord.load("20260102")
    assert loaded.to_dict() == {**b.to_dict(), "updated": loaded.updated}
    assert [r.run_id for r in list_runs()] == [a.run_id, b.run_id]


def test_upload_skips_matching_files_and_resumes_a_partial_copy(tmp_path):
    src = tmp_path / "src"
    (src / "sub").mkdir(parents=True)
    (src / "a.bin").write_bytes(os.urandom(300_000))
    (src / "sub" / "b.txt").write_text("hello")
    dst = tmp_path / "node" / "model"
    copies = plan_tree(src, str(dst))
    runner, py = LocalRunner("local"), os.sys.executable
    first = upload(runner, py, copies)
    assert first.bytes_sent == 300_005 and not first.skipped
    assert (dst / "sub" / "b.txt").read_text() == "hello"
    again = upload(runner, py, copies)
    assert again.bytes_sent == 0 and len(again.skipped) == 2
    (dst / "a.bin").unlink()
    (dst / "a.bin.mfpart").write_bytes((src / "a.bin").read_bytes()[:100_000])
    resumed = upload(runner, py, copies)
    assert resumed.resumed == {str(dst / "a.bin"): 100_000} and resumed.bytes_sent == 200_000
    assert (dst / "a.bin").read_bytes() == (src / "a.bin").read_bytes()
    (dst / "a.bin").unlink()
    (dst / "a.bin.mfpart").write_bytes(b"not a prefix")
    fresh = upload(runner, py, copies)
    assert fresh.resumed == {} and fresh.bytes_sent == 300_000


def test_download_resumes_and_verifies(tmp_path):
    from megafleet.transfer import file_sha256

    node = tmp_path / "node.bin"
    node.write_bytes(os.urandom(200_000))
    local = tmp_path / "here" / "x.bin"
    local.parent.mkdir()
    (local.parent / "x.bin.mfpart").write_bytes(node.read_bytes()[:50_000])
    f = RemoteFile(str(node), local, 200_000, file_sha256(node))
    rep = download(LocalRunner(), [f])
    assert rep.resumed == {str(node): 50_000} and local.read_bytes() == node.read_bytes()
    assert download(LocalRunner(), [f]).skipped == [str(node)]
    bad = RemoteFile(str(node), tmp_path / "y.bin", 200_000, "0" * 64)
    with pytest.raises(Exception, match="different sha256"):
        download(LocalRunner(), [bad])


def test_log_lines_are_tagged_by_rank_and_progress_updates_marked():
    assert parse_line(1, "gpu1", "[rank3]:loss 0.5").__dict__ == {
        "node": 1,
        "host": "gpu1",
        "rank": 3,
        "text": "loss 0.5",
        "progress": False,
    }
    p = parse_line(0, "gpu0", "\r[rank0]: 40%|####")
    assert (p.rank, p.text, p.progress, p.prefix) == (0, " 40%|####", True, "n0 r0")
    assert parse_line(0, "gpu0", "torchrun: started").prefix == "n0"


@pytest.mark.parametrize(
    "nodes,state,code",
    [
        ([{"state": "exited", "exit_code": 0}] * 2, "succeeded", 0),
        (
            [{"state": "exited", "exit_code": 0}, {"state": "running", "exit_code": None}],
            "running",
            None,
        ),
        (
            [
                {"state": "exited", "exit_code": 1, "failure": {"node": 1, "exit_code": 1}},
                {"state": "exited", "exit_code": 143},
            ],
            "failed",
            1,
        ),
        # a stop by the user is a clean end: exit code 0 even where torchrun reported the SIGTERM
        (
            [
                {"state": "exited", "exit_code": 1, "stop_requested": True},
                {"state": "stopped", "exit_code": None, "stop_requested": True},
            ],
            "stopped",
            0,
        ),
        # node 1 unreachable: node 0's watcher has declared the failure and node 0 has ended
        (
            [
                {
                    "state": "exited",
                    "exit_code": 143,
                    "watch": {"failure": {"node": 1, "exit_code": None}},
                },
                {"state": "unreachable", "reachable": False, "error": "timed out"},
            ],
            "failed",
            1,
        ),
        (
            [
                {"state": "running", "exit_code": None},
                {"state": "unreachable", "reachable": False, "error": "timed out"},
            ],
            "launching",
            None,
        ),
        ([{"state": "lost", "exit_code": None}, {"state": "exited", "exit_code": 0}], "lost", 1),
    ],
)
def test_run_state_from_the_nodes(nodes, state, code):
    run = record()
    derive_state(run, [{"node_rank": k, **n} for k, n in enumerate(nodes)])
    assert (run.state, run.exit_code) == (state, code)


def test_planning_helpers():
    assert venv_python("megafleet/venv", "/home/u") == "/home/u/megafleet/venv/bin/python"
    assert venv_python("~/v", "/home/u/") == "/home/u/v/bin/python"
    assert venv_python("/opt/v/", "/home/u") == "/opt/v/bin/python"
    facts = {"a": NodeFacts("/h", "p", __version__, 8), "b": NodeFacts("/h", "p", __version__, 8)}
    assert nproc_per_node(None, "auto", facts) == 8 and nproc_per_node(2, "auto", facts) == 2
    assert nproc_per_node(None, "cpu", facts) == 1
    assert nproc_per_node(None, "auto", {"a": NodeFacts("/h", "p", "x", 0)}) == 1
    with pytest.raises(UsageError, match=r"different GPU counts \(a has 8, b has 8, c has 4\)"):
        nproc_per_node(None, "auto", {**facts, "c": NodeFacts("/h", "p", __version__, 4)})
    bad = {
        "a": facts["a"],
        "b": NodeFacts("/h", "/v/bin/python", "0.0.1", 0),
        "c": NodeFacts("/h", "/v/bin/python", None, 0, "No module named 'megafleet'"),
    }
    with pytest.raises(ValidationError) as e:
        check_versions(bad, "megafleet/venv")
    assert f"b: megafleet 0.0.1 is installed, this machine has {__version__}" in e.value.message
    assert (
        "c: no megafleet in /v/bin/python (launch.venv=megafleet/venv): No module named"
        in e.value.message
    )
    assert "run `megafleet setup`" in e.value.hint and "a:" not in e.value.message


def test_the_master_address_is_node0s_private_address_when_the_inventory_has_one():
    from megafleet.inventory import Host
    from megafleet.jobs.preflight import Target, master_address
    from megafleet.runner import DryRunRunner

    a = Host("a", "203.0.113.7", private_address="10.0.0.7")
    b = Host("b", "203.0.113.8")
    r0 = DryRunRunner("a")
    assert (
        master_address([Target(0, "a", a, r0), Target(1, "b", b, DryRunRunner("b"))]) == "10.0.0.7"
    )
    assert r0.calls == []  # nothing asked: the inventory says it
    assert master_address([Target(0, "a", a, r0)]) == "127.0.0.1"  # one node: loopback


def test_cli_input_errors(megafleet_home, tmp_path):
    proc = run_cli("launch", "--yes", env={"MEGAFLEET_HOME": str(megafleet_home)})
    assert proc.returncode == 2 and "give a job file or runtime flags" in proc.stderr
    proc = run_cli(
        "launch", "--yes", "--", "--modle", "x", env={"MEGAFLEET_HOME": str(megafleet_home)}
    )
    assert proc.returncode == 2 and "unknown option --modle (did you mean --model?)" in proc.stderr
    data = tmp_path / "d.jsonl"
    data.write_text(
        '{"messages": [{"role": "user", "content": "hi"}, '
        '{"role": "assistant", "content": "yo"}]}\n'
    )
    proc = run_cli(
        "launch",
        "--yes",
        "--",
        "--model",
        str(tmp_path),
        "--dataset",
        str(data),
        "--train_iters",
        "2",
        env={"MEGAFLEET_HOME": str(megafleet_home)},
    )
    assert (
        proc.returncode == 2
        and "no hosts in the inventory" in proc.stderr
        and "--local" in proc.stderr
    )
    proc = run_cli(
        "launch",
        "--yes",
        "--",
        "--model",
        str(tmp_path),
        "--dataset",
        str(data),
        "--train_iters",
        "2",
        "--env",
        "MF_UNSET_VAR",
        env={"MEGAFLEET_HOME": str(megafleet_home)},
    )
    assert proc.returncode == 2 and "launch.env: MF_UNSET_VAR not set in this shell" in proc.stderr
    proc, runs = run_cli_json("runs", "--json", env={"MEGAFLEET_HOME": str(megafleet_home)})
    assert runs == {"runs": []}
    proc = run_cli("status", "nope", env={"MEGAFLEET_HOME": str(megafleet_home)})
    assert proc.returncode == 2 and "no runs recorded yet" in proc.stderr
    proc = run_cli(
        "fetch", "nope", "--checkpoint", "best", env={"MEGAFLEET_HOME": str(megafleet_home)}
    )
    assert proc.returncode == 2 and "give `latest` or a step number" in proc.stderr


def test_local_dry_run_plans_without_starting(megafleet_home, tmp_path):
    from megafleet.model_shape import NAMED_CONFIGS

    model = tmp_path / "model"
    model.mkdir()  # config.json only: the dry run resolves the job from it, reads no weights
    (model / "config.json").write_text(json.dumps(NAMED_CONFIGS["qwen3-0.6b"]))
    data = tmp_path / "d.jsonl"
    data.write_text(
        '{"messages": [{"role": "user", "content": "hi"}, '
        '{"role": "assistant", "content": "hello there"}]}\n'
    )
    proc, plan = run_cli_json(
        "launch",
        "--local",
        "--dry-run",
        "--json",
        "--",
        "--model",
        str(model),
        "--dataset",
        f"{data}#5",
        "--train_iters",
        "2",
        "--device",
        "cpu",
        "--global_batch_size",
        "4",
        "--master_port",
        "29391",
        env={"MEGAFLEET_HOME": str(megafleet_home)},
    )
    assert proc.returncode == 0, proc.stderr
    checks = {c["name"]: c for c in plan["checks"]}
    assert {n: c["status"] for n, c in checks.items()} == {
        "job_schema": "ok",
        "dataset": "ok",
        "model_files": "ok",
        "nodes_reachable": "ok",
        "megafleet_version": "note",
        "file_transfer": "ok",
        "devices": "ok",
        "batches": "ok",
        "runtime_dry_run": "ok",
        "master_ports": "ok",
    }
    assert checks["megafleet_version"]["detail"]["operator"]
    assert checks["dataset"]["detail"]["rows"] == 1
    assert "5 sequence(s) per epoch" in checks["batches"]["detail"]
    node = plan["nodes"][0]
    assert node["host"] == "local" and node["uploads"] == []
    assert f"{data}#5" in node["job_yaml"] and str(model) in node["job_yaml"]
    assert (
        "--nnodes 1 --node_rank 0 --nproc_per_node 1 --master_addr 127.0.0.1" in node["launch_sh"]
    )
    assert plan["run"]["master_addr"] == "127.0.0.1"
    assert not Path(plan["run"]["nodes"][0]["run_dir"]).exists() and list_runs() == []
