"""The wizard's pieces without a terminal: answers files (scripted runs), the dataset and model
checks with the messages people see, training length parsing, and the dry run."""

from __future__ import annotations

import json

import pytest

from megafleet.errors import UsageError
from megafleet.wizard.ask import Asker
from megafleet.wizard.job import describe_model, inspect_dataset, parse_length
from remote_runtime.spec.flags import load_job_file
from tests.conftest import run_cli


def test_parse_length():
    assert parse_length("1 epoch") == ("num_train_epochs", 1.0)
    assert parse_length("2.5") == ("num_train_epochs", 2.5)
    assert parse_length(" 500 steps ") == ("train_iters", 500)
    for bad in ("", "0 steps", "1.5 steps", "soon"):
        with pytest.raises(ValueError):
            parse_length(bad)


def test_dataset_format_is_detected_and_wrong_kinds_are_named(tmp_path):
    chat = tmp_path / "chat.jsonl"
    chat.write_text("\n" + json.dumps({"instruction": "Say hi", "output": "hi"}) + "\n")
    fmt, example, rows = inspect_dataset(str(chat), "sft")
    assert (fmt, rows) == ("alpaca", 1)
    assert example == [
        {"role": "user", "content": "Say hi"},
        {"role": "assistant", "content": "hi"},
    ]
    assert inspect_dataset(str(chat), "pt")[0] == "alpaca"  # pt: loss on every token
    text = tmp_path / "corpus.json"
    text.write_text(json.dumps([{"text": "a b c"}, {"text": "d"}]))
    assert inspect_dataset(str(text) + "#10", "pt")[::2] == ("text", 2)
    with pytest.raises(UsageError, match="SFT needs conversations"):
        inspect_dataset(str(text), "sft")
    broken = tmp_path / "broken.jsonl"
    broken.write_text('{"messages": [}\n')
    with pytest.raises(UsageError, match=r"broken.jsonl:1: invalid JSON"):
        inspect_dataset(str(broken), "sft")
    odd = tmp_path / "odd.jsonl"
    odd.write_text(json.dumps({"prompt": "x", "completion": "y"}) + "\n")
    with pytest.raises(UsageError, match="cannot tell the row format from its keys"):
        inspect_dataset(str(odd), "sft")
    with pytest.raises(UsageError, match="no such file"):
        inspect_dataset(str(tmp_path / "missing.jsonl"), "sft")


def test_models_the_runtime_cannot_train_are_refused_with_the_supported_list(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"architectures": ["MistralForCausalLM"]}))
    with pytest.raises(UsageError, match="MistralForCausalLM is not supported; supported: .*Qwen3"):
        describe_model(str(tmp_path))
    hf, summary = describe_model("meta-llama/Llama-3.1-8B-Instruct")  # a known hub id's shape
    assert hf["model_type"] == "llama" and summary.startswith("llama, 8.03B parameters")
    _, summary = describe_model("Qwen/Qwen3-30B-A3B")  # MoE: active parameters and experts too
    assert summary.startswith("qwen3_moe, 30.53B parameters (3.35B active: 128 experts, top 8)")


def test_answers_are_checked_and_never_guessed_without_a_terminal():
    ask = Asker({"where": "moon", "lr": "fast"}, "a.yaml", interactive=False)
    with pytest.raises(UsageError, match=r"a.yaml: where: 'moon': choose one of local, ssh"):
        ask.select("where", "Where?", [("local", "here"), ("ssh", "there")])
    with pytest.raises(UsageError, match="a.yaml: lr: 'fast': a number"):
        ask.text("lr", "Learning rate:", validate=lambda t: None if t[0].isdigit() else "a number")
    with pytest.raises(UsageError) as exc:
        ask.confirm("setup", "Set up the hosts now?")
    assert "no terminal to ask" in exc.value.message and "setup: ..." in exc.value.hint


def _answers(tmp_path, **extra) -> str:
    from megafleet.model_shape import NAMED_CONFIGS
    from remote_runtime.data.demo_data import write_demo_dataset

    (tmp_path / "model").mkdir()  # config.json is all the wizard reads (nothing is launched)
    (tmp_path / "model" / "config.json").write_text(json.dumps(NAMED_CONFIGS["qwen3-0.6b"]))
    write_demo_dataset(tmp_path / "chats.jsonl", 20)
    answers = {
        "where": "local",
        "cpu_ok": True,
        "task": "sft",
        "model": str(tmp_path / "model"),
        "dataset": str(tmp_path / "chats.jsonl"),
        "max_length": 128,
        "train_length": "5 steps",
        "lr": "1e-4",
        "output_dir": "out",
        "job_file": "job.yaml",
        **extra,
    }
    path = tmp_path / "answers.yaml"
    path.write_text(json.dumps(answers))
    return str(path)


def test_an_answers_file_saves_a_job_that_loads_back(tmp_path, megafleet_home):
    proc = run_cli(
        "wizard",
        "--answers",
        _answers(tmp_path, confirm="save"),
        cwd=tmp_path,
        env={"MEGAFLEET_HOME": str(megafleet_home)},
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    job = load_job_file(tmp_path / "job.yaml")
    assert (job.task, job.train.train_iters, job.optim.lr, job.checkpoint.output_dir) == (
        "sft",
        5,
        1e-4,
        "out",
    )
    assert job.launch.hosts == ["local"] and job.train.num_train_epochs is None
    assert "megafleet launch job.yaml" in proc.stdout
    assert not (megafleet_home / "runs").exists()  # saved, not launched


def test_dry_run_writes_nothing(tmp_path, megafleet_home):
    proc = run_cli(
        "wizard",
        "--dry-run",
        "--answers",
        _answers(tmp_path, confirm="launch"),
        cwd=tmp_path,
        env={"MEGAFLEET_HOME": str(megafleet_home)},
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "dry run: would write job.yaml" in proc.stdout
    assert not (tmp_path / "job.yaml").exists() and list(megafleet_home.iterdir()) == []


def test_a_cancel_says_what_was_written_and_how_to_go_on(tmp_path, capsys):
    from megafleet.inventory import Host, Inventory
    from megafleet.wizard.state import WizardState

    inv = Inventory(path=tmp_path / "hosts.yaml")
    inv.add(Host("gpu1", "203.0.113.7", user="ubuntu", identity_file="/keys/k.pem"))
    state = WizardState(inv, added=["gpu1"], nodes=["gpu1"])
    state.say_cancelled()
    out = " ".join(capsys.readouterr().out.split())
    assert "Nothing was written" in out
    assert "megafleet hosts add gpu1 ubuntu@203.0.113.7 -i /keys/k.pem" in out
    state.committed, state.job_file = True, tmp_path / "job.yaml"
    state.say_cancelled()
    assert f"megafleet launch {tmp_path / 'job.yaml'}" in " ".join(capsys.readouterr().out.split())
    state.run_id = "20261121-120000-abcd"
    state.say_cancelled()
    out = " ".join(capsys.readouterr().out.split())
    assert "Run 20261121-120000-abcd was started and keeps running" in out
    assert "megafleet logs 20261121-120000-abcd -f" in out and "megafleet launch" not in out
