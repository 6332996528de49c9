"""Caught before launch, on the operator's side: bad datasets (file and line), devices and process
counts, unreadable model files, too little data for one global batch, NAME=value in --env; and
Megatron-SWIFT commands as users paste them (no-op options noted, ms-swift-only options named)."""

from __future__ import annotations

import json

import pytest

from megafleet.errors import ValidationError
from megafleet.jobs.dataset_check import check_datasets
from megafleet.model_shape import NAMED_CONFIGS
from remote_runtime.spec.flags import job_from_argv
from tests.conftest import run_cli, run_cli_json

CHAT = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}


def chat_lines(n: int) -> str:
    return "".join(json.dumps(CHAT) + "\n" for _ in range(n))


@pytest.fixture
def model(tmp_path):
    d = tmp_path / "model"
    d.mkdir()
    (d / "config.json").write_text(json.dumps(NAMED_CONFIGS["qwen3-0.6b"]))
    return d


def problems_for(tmp_path, name: str, data: bytes, task: str = "sft") -> list[str]:
    path = tmp_path / name
    path.write_bytes(data)
    job = job_from_argv(["--model", "m", "--dataset", str(path)], task=task)
    with pytest.raises(ValidationError) as e:
        check_datasets(job, None)
    return [p.message for p in e.value.problems]


@pytest.mark.parametrize(
    "data, needle",
    [
        (chat_lines(2).encode() + b'{"messages": [\n', "line 3: invalid JSON"),
        (b"", "the file holds no rows"),
        (
            b'{"messages": [{"role": "user", "content": "only a question"}]}\n',
            "line 1: no assistant turn",
        ),
        (chat_lines(1).encode() + b'{"text": "caf\xe9"}\n', "line 2: not UTF-8 text"),
        (
            chat_lines(1).encode() + b'{"messages": [{"role": "bot", "content": "x"}]}\n',
            "line 2: 'messages[0].role' is 'bot'",
        ),
    ],
)
def test_bad_rows_are_named_by_file_and_line(tmp_path, data, needle):
    found = problems_for(tmp_path, "d.jsonl", data)
    assert len(found) == 1 and needle in found[0] and "d.jsonl" in found[0], found


def test_text_rows_are_for_pt_and_counts_come_back(tmp_path):
    found = problems_for(tmp_path, "t.jsonl", b'{"text": "abcdefgh"}\n')
    assert "text rows are for pre-training" in found[0]
    (tmp_path / "t.jsonl").write_text('{"text": "abcdefgh"}\n' * 3)
    job = job_from_argv(["--model", "m", "--dataset", str(tmp_path / "t.jsonl")], task="pt")
    report = check_datasets(job, None).to_dict()
    assert report["rows"] == 3 and report["trainable_tokens"] == 6
    assert "estimated" in report["tokens"]


def test_many_bad_rows_stop_at_ten_problems(tmp_path):
    found = problems_for(tmp_path, "d.jsonl", b'{"messages": []}\n' * 50)
    assert len(found) == 11 and found[-1].endswith("(more problems not shown)")


def dry_run(tmp_path, model, *flags, rows=40, env=None):
    data = tmp_path / "d.jsonl"
    data.write_text(chat_lines(rows))
    return run_cli_json(
        "launch",
        "--local",
        "--dry-run",
        "--json",
        "--",
        "--model",
        str(model),
        "--dataset",
        str(data),
        "--train_iters",
        "2",
        "--master_port",
        "29393",
        *flags,
        env={"MEGAFLEET_HOME": str(tmp_path / "home"), **(env or {})},
    )


def test_too_little_data_for_one_global_batch_names_the_value_to_set(tmp_path, model):
    proc, out = dry_run(tmp_path, model, "--device", "cpu", rows=12)
    assert proc.returncode == 2
    assert out["problems"][0]["field"] == "train.global_batch_size"
    assert "12 sequence(s) per epoch" in out["problems"][0]["message"]
    assert out["hint"] == "set --global_batch_size 12"


def test_cuda_without_gpus_and_more_processes_than_cores_are_refused(tmp_path, model):
    import os

    proc, out = dry_run(tmp_path, model, "--device", "cuda")
    assert proc.returncode == 2 and "local has no NVIDIA GPU" in out["message"]
    assert "--device cpu" in out["hint"]
    proc, out = dry_run(tmp_path, model, "--device", "cpu", "--nproc_per_node", "64")
    assert proc.returncode == 2 and f"local has {os.cpu_count()} core(s)" in out["message"]
    assert "--nproc_per_node" in out["hint"]


def test_a_broken_weight_link_is_refused_before_anything_starts(tmp_path, model):
    (model / "model.safetensors").symlink_to(tmp_path / "blobs" / "gone")
    proc, out = dry_run(tmp_path, model, "--device", "cpu")
    assert proc.returncode == 2 and "model.safetensors: a broken symbolic link" in out["message"]


def test_env_with_a_value_is_refused_without_echoing_it(tmp_path, model):
    proc = run_cli(
        "launch",
        "--local",
        "--dry-run",
        "--",
        "--model",
        str(model),
        "--dataset",
        "x.jsonl",
        "--train_iters",
        "2",
        "--env",
        "HF_TOKEN=hf_sup3rs3cret",
        env={"MEGAFLEET_HOME": str(tmp_path / "home")},
    )
    assert proc.returncode == 2 and "HF_TOKEN" in proc.stderr and "NAME=value" in proc.stderr
    assert "sup3rs3cret" not in proc.stdout + proc.stderr


# ---- Megatron-SWIFT commands as pasted ------------------------------------------------------

SWIFT_COMMANDS = {
    "sft": (
        2,
        "sft",
        """--tensor_model_parallel_size 2 --sequence_parallel true
        --micro_batch_size 4
        --global_batch_size 16 --recompute_granularity full --recompute_method uniform
        --recompute_num_layers 1 --finetune true --cross_entropy_loss_fusion true --lr 1e-5
        --lr_warmup_fraction 0.05 --min_lr 1e-6 --save megatron_output/Qwen3 --save_interval 100
        --max_length 2048 --system You_are_a_helpful_assistant. --num_workers 4 --no_save_optim true
        --no_save_rng true --dataset_num_proc 4 --model_author swift --model_name swift-robot
        --save_safetensors true --load_from_cache_file true""",
    ),
    "pt": (
        1,
        "pt",
        """--packing true --max_steps 1000 --learning_rate 2e-5 --log_interval 5
        --warmup_ratio 0.03 --max_grad_norm 1.0
        --torch_dtype bfloat16 --dataloader_num_workers 8 --use_hf true --add_version false""",
    ),
    "multi-node": (
        16,
        "sft",
        """--tensor_model_parallel_size 4 --pipeline_model_parallel_size 2
        --use_distributed_optimizer true --overlap_grad_reduce true --overlap_param_gather true
        --global_batch_size 64 --micro_batch_size 1 --num_train_epochs 2 --save_steps 500
        --logging_steps 1 --check_model false --lazy_tokenize false""",
    ),
    "long context": (
        8,
        "sft",
        """--max_length 32768 --packing true --context_parallel_size 2
        --transformer_impl transformer_engine --attention_backend flash
        --tensor_model_parallel_size 2
        --sequence_parallel true --recompute_granularity full --recompute_method uniform
        --recompute_num_layers 1 --log_throughput true --attention_softmax_in_fp32 true""",
    ),
}


@pytest.mark.parametrize("name", SWIFT_COMMANDS)
def test_megatron_swift_commands_run_as_pasted_through_the_dry_run(
    name, model, capsys, monkeypatch
):
    from remote_runtime.__main__ import main

    world, task, flags = SWIFT_COMMANDS[name]
    monkeypatch.setenv("WORLD_SIZE", str(world))
    rc = main(
        [
            task,
            "--model",
            str(model),
            "--dataset",
            "data.jsonl#500",
            "--dry_run",
            "true",
            *flags.split(),
        ]
    )
    out, err = capsys.readouterr()
    assert rc == 0, err
    resolved = json.loads(out)
    noted = [w.split(":")[0] for w in resolved["warnings"] if "Megatron-SWIFT compatibility" in w]
    given = [
        f
        for f in flags.split()
        if f.lstrip("-")
        in (
            "num_workers",
            "dataloader_num_workers",
            "model_author",
            "save_safetensors",
            "load_from_cache_file",
            "use_hf",
            "add_version",
            "check_model",
            "lazy_tokenize",
            "log_throughput",
            "attention_softmax_in_fp32",
            "model_name",
        )
    ]
    assert sorted(n.split()[0] for n in noted) == sorted(given)
    assert resolved["job"]["train"]["num_train_epochs"] == (2 if name == "multi-node" else 1)
    if name == "pt":  # transformers-style spellings map to the Megatron names
        assert resolved["job"]["train"]["train_iters"] == 1000
        assert resolved["job"]["optim"]["lr"] == 2e-5
        assert resolved["job"]["optim"]["lr_warmup_fraction"] == 0.03


def test_the_runtime_help_that_errors_point_to_lists_every_option(capsys):
    from remote_runtime.__main__ import main

    assert main(["sft", "--help"]) == 0
    out = capsys.readouterr().out
    assert "--num_train_epochs" in out and "1.0  (train.num_train_epochs)" in out
    assert "--save_safetensors" in out and "(swift_compat.save_safetensors)" in out


def test_ms_swift_options_that_are_not_implemented_say_so_instead_of_suggesting_a_neighbour(model):
    from remote_runtime.spec.config import ConfigError

    with pytest.raises(ConfigError) as e:
        job_from_argv(["--model", str(model), "--lora_bias", "all"])  # neighbour: --lora_alpha
    message = str(e.value)
    assert "Megatron-SWIFT option that megafleet does not implement" in message
    assert "did you mean" not in message
    from remote_runtime.spec.config import LEAVES
    from remote_runtime.spec.swift_compat import MS_SWIFT_ONLY

    assert not MS_SWIFT_ONLY & set(LEAVES), "an implemented option is listed as not implemented"
    with pytest.raises(ConfigError, match=r"did you mean --save_steps\?"):
        job_from_argv(["--save_step", "3"])


def test_with_packing_too_few_rows_is_refused_and_maybe_too_few_packs_is_a_note(tmp_path):
    """A pack holds at least one row, so rows < global_batch_size is certain to fail; fewer
    packs than that is only an estimate (the chat template adds tokens)."""
    from megafleet.jobs.launch_checks import Checks, check_batches

    (tmp_path / "d.jsonl").write_text(chat_lines(20))
    job = job_from_argv(
        [
            "--model",
            "m",
            "--dataset",
            str(tmp_path / "d.jsonl"),
            "--packing",
            "true",
            "--max_length",
            "64",
            "--global_batch_size",
            "16",
        ]
    )
    checks = Checks()
    check_batches(checks, job, check_datasets(job, None), world_size=1)
    (note,) = checks.items
    assert note["status"] == "note" and "1 to 20 sequences per epoch" in note["detail"]
    job.data.dataset = [str(tmp_path / "d.jsonl") + "#10"]
    with pytest.raises(ValidationError) as e:
        check_batches(Checks(), job, check_datasets(job, None), world_size=1)
    assert "not one full global batch" in str(e.value)
    assert e.value.hint == (
        "set --global_batch_size 1, or --packing false with --global_batch_size 10"
    )


# MoE, LoRA and DPO commands as Megatron-SWIFT's examples write them (model and data replaced).
FEATURE_COMMANDS = {
    "moe": (
        16,
        "sft",
        "qwen3-30b-a3b",
        """--tensor_model_parallel_size 2 --sequence_parallel true --expert_model_parallel_size 8
        --moe_grouped_gemm true --moe_shared_expert_overlap true --moe_aux_loss_coeff 1e-3
        --moe_permute_fusion true --micro_batch_size 1 --global_batch_size 16 --packing true
        --recompute_granularity full --recompute_method uniform --recompute_num_layers 1
        --finetune true --lr 1e-5 --min_lr 1e-6 --max_length 8192 --save_safetensors true""",
    ),
    "lora": (
        2,
        "sft",
        "qwen3-0.6b",
        """--train_type lora --lora_rank 8 --lora_alpha 32 --target_modules all-linear
        --tensor_model_parallel_size 2 --sequence_parallel true --micro_batch_size 1
        --global_batch_size 16 --lr 1e-4 --lr_warmup_fraction 0.05 --min_lr 1e-5
        --max_length 2048 --merge_lora false --save_safetensors true""",
    ),
    "dpo": (
        2,
        "rlhf",
        "qwen3-0.6b",
        """--rlhf_type dpo --beta 0.1 --rpo_alpha 0.1 --loss_type sigmoid
        --tensor_model_parallel_size 2 --micro_batch_size 2 --global_batch_size 16
        --lr 1e-5 --max_length 8192 --finetune true --save_safetensors true""",
    ),
}


@pytest.mark.parametrize("name", FEATURE_COMMANDS)
def test_moe_lora_and_dpo_commands_run_as_pasted_through_the_dry_run(
    name, tmp_path, capsys, monkeypatch
):
    from remote_runtime.__main__ import main

    world, task, shape, flags = FEATURE_COMMANDS[name]
    model = tmp_path / shape
    model.mkdir()
    (model / "config.json").write_text(json.dumps(NAMED_CONFIGS[shape]))
    monkeypatch.setenv("WORLD_SIZE", str(world))
    argv = [task, "--model", str(model), "--dataset", "data.jsonl", "--dry_run", "true"]
    rc = main(argv + flags.split())
    out, err = capsys.readouterr()
    assert rc == 0, err
    resolved = json.loads(out)
    if name == "moe":
        assert resolved["model"]["active_params"] < resolved["model"]["params"] / 8
        assert resolved["job"]["moe"]["expert_model_parallel_size"] == 8
    if name == "lora":
        assert resolved["tuner"]["train_type"] == "lora"
    if name == "dpo":
        assert resolved["task"] == "rlhf" and resolved["job"]["rlhf"]["beta"] == 0.1


def test_preference_pairs_are_checked_and_counted_on_the_operator(tmp_path):
    rows = [  # one format per file (detected from the first row)
        {"prompt": "What is 2+2?", "chosen": "four", "rejected": "five"},
        {"prompt": "Capital of France?", "chosen": "Paris", "rejected": "Lyon"},
    ]
    path = tmp_path / "pairs.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    job = job_from_argv(["--model", "m", "--dataset", str(path)], task="rlhf")
    report = check_datasets(job, None)
    assert report.rows == 2
    (file,) = report.files
    # both answers of each pair are trained on; the prompts count twice (once per sequence)
    assert 0 < file.trainable_tokens < file.total_tokens
