"""The job config schema: flags, job files, validation messages, round trips."""

import pytest

from remote_runtime.spec.config import (
    LEAVES,
    ConfigError,
    JobConfig,
    from_dict,
    normalize,
    validate,
)
from remote_runtime.spec.flags import dump_job, job_from_argv, load_job_file, to_flags

BASE = ["--model", "/m", "--dataset", "d.jsonl", "--train_iters", "10"]


def problems(exc: ConfigError) -> dict:
    return {p.field: p.message for p in exc.problems}


def test_leaf_names_are_unique_and_dotted():
    assert LEAVES["tensor_model_parallel_size"][0] == "parallel.tensor_model_parallel_size"
    assert LEAVES["lr"][0] == "optim.lr"
    assert all(d.count(".") <= 1 for d, _, _ in LEAVES.values())


def test_flags_set_nested_fields_with_types():
    job = job_from_argv(
        BASE
        + [
            "--dataset",
            "a.jsonl",
            "b.jsonl#5",
            "--packing",
            "--lr",
            "2e-5",
            "--tensor_model_parallel_size",
            "2",
            "--sequence_parallel",
            "false",
            "--save_total_limit",
            "none",
        ],
        task="pt",
    )
    assert job.task == "pt"
    assert job.data.dataset == ["a.jsonl", "b.jsonl#5"]
    assert job.data.packing is True
    assert job.optim.lr == pytest.approx(2e-5)
    assert job.parallel.tensor_model_parallel_size == 2
    assert job.parallel.sequence_parallel is False
    assert job.checkpoint.save_total_limit is None


def test_ms_swift_3x_aliases_map_to_4x_names():
    job = job_from_argv(
        BASE + ["--save", "out", "--save_interval", "7", "--log_interval", "3", "--max_epochs", "2"]
    )
    assert (job.checkpoint.output_dir, job.checkpoint.save_steps) == ("out", 7)
    assert (job.logging.logging_steps, job.train.num_train_epochs) == (3, 2.0)


def test_misspelt_option_suggests_the_closest_name():
    with pytest.raises(ConfigError) as e:
        job_from_argv(BASE + ["--tensor_parallel_size", "2"])
    assert "did you mean --tensor_model_parallel_size" in str(e.value)


def test_known_but_unimplemented_option_is_an_error_naming_it():
    with pytest.raises(ConfigError) as e:
        job_from_argv(BASE + ["--fp8_format", "e4m3"])
    assert "--fp8_format" in str(e.value) and "not implemented" in str(e.value)


def test_bad_values_name_the_dotted_field():
    with pytest.raises(ConfigError) as e:
        job_from_argv(BASE + ["--lr", "fast", "--micro_batch_size", "1.5"])
    p = problems(e.value)
    assert "optim.lr" in p and "train.micro_batch_size" in p


@pytest.mark.parametrize(
    "flags,field,needle",
    [
        (["--lr_decay_style", "step"], "optim.lr_decay_style", "cosine"),
        (["--min_lr", "1", "--lr", "0.1"], "optim.min_lr", "larger"),
        (
            ["--global_batch_size", "10", "--micro_batch_size", "4"],
            "train.global_batch_size",
            "multiple",
        ),
        (["--recompute_granularity", "full"], "recompute.recompute_method", "uniform"),
        (["--lr_warmup_fraction", "1.5"], "optim.lr_warmup_fraction", "[0, 1)"),
        (["--packing", "--padding_free", "false"], "data.padding_free", "packing"),
        (["--dataset", "x.jsonl#abc"], "data.dataset", "row count"),
    ],
)
def test_validate_rejects_with_field_and_reason(flags, field, needle):
    job = job_from_argv(BASE + flags)
    with pytest.raises(ConfigError) as e:
        validate(job)
    assert needle in problems(e.value)[field]


def test_bf16_adam_moments_need_the_precision_aware_optimizer():
    """Megatron-SWIFT's spelling: --use_precision_aware_optimizer true --exp_avg_dtype bf16
    --exp_avg_sq_dtype bf16. Without the switch a bf16 moment is named with the fix; fp16 and
    fp8 moments are not offered."""
    job = job_from_argv(
        BASE
        + ["--use_precision_aware_optimizer", "true", "--exp_avg_dtype", "bf16"]
        + ["--exp_avg_sq_dtype", "bf16"]
    )
    validate(job)
    assert (job.optim.exp_avg_dtype, job.optim.exp_avg_sq_dtype) == ("bf16", "bf16")
    with pytest.raises(ConfigError) as e:
        validate(job_from_argv(BASE + ["--exp_avg_sq_dtype", "bf16"]))
    (p,) = [p for p in e.value.problems if p.field == "optim.exp_avg_sq_dtype"]
    assert "precision-aware optimizer" in p.message
    assert p.hint == "add --use_precision_aware_optimizer true"
    with pytest.raises(ConfigError) as e:
        validate(
            job_from_argv(
                BASE + ["--use_precision_aware_optimizer", "true", "--exp_avg_dtype", "fp8"]
            )
        )
    assert "bf16" in problems(e.value)["optim.exp_avg_dtype"]


def test_validate_requires_model_dataset_and_a_length_but_epochs_default_to_one():
    with pytest.raises(ConfigError) as e:
        validate(JobConfig())
    assert {"model.model", "data.dataset"} == set(problems(e.value))
    assert JobConfig().train.num_train_epochs == 1  # ms-swift's default
    job = job_from_argv(["--model", "/m", "--dataset", "d.jsonl", "--num_train_epochs", "none"])
    with pytest.raises(ConfigError) as e:
        validate(job)
    assert set(problems(e.value)) == {"train.train_iters"}


def test_sequence_parallel_without_tp_is_disabled_with_a_warning():
    job = job_from_argv(BASE + ["--sequence_parallel", "true"])
    warnings = validate(job)
    assert "sequence_parallel" in warnings[0]
    assert job.parallel.sequence_parallel is True, "validate must not change the job"
    assert normalize(job).parallel.sequence_parallel is False


def test_job_file_round_trip_and_flat_ms_swift_keys(tmp_path):
    job = job_from_argv(BASE + ["--packing", "--lr", "3e-5", "--hosts", "a", "b"])
    path = tmp_path / "job.yaml"
    path.write_text(dump_job(job))
    assert load_job_file(path) == job
    flat = tmp_path / "flat.yaml"
    flat.write_text(
        "model: /m\ndataset: [d.jsonl]\ntrain_iters: 10\npacking: true\nlr: 3.0e-5\nhosts: [a, b]\n"
    )
    assert load_job_file(flat) == job
    # flags reproduce the job (launch group excluded: the runtime never sees it)
    again = job_from_argv(to_flags(job))
    again.launch = job.launch
    assert again == job


def test_job_file_errors_carry_file_line(tmp_path):
    path = tmp_path / "job.yaml"
    path.write_text(
        "task: sft\nparallel:\n  tensor_model_parallel_size: 2\n  lr: 3\n  foo_bar: 1\n"
    )
    with pytest.raises(ConfigError) as e:
        load_job_file(path)
    text = str(e.value)
    assert "parallel.lr: belongs in group 'optim'" in text and f"{path}:4" in text
    assert "parallel.foo_bar" in text and f"{path}:5" in text


def test_job_file_syntax_error_names_line(tmp_path):
    path = tmp_path / "job.yaml"
    path.write_text("task: sft\nmodel:\n  model: x\n   bad: 1\n")
    with pytest.raises(ConfigError) as e:
        load_job_file(path)
    assert f"{path}:4: mapping values are not allowed here" in str(e.value)


def test_from_dict_rejects_non_mapping_group():
    with pytest.raises(ConfigError) as e:
        from_dict({"parallel": 3})
    assert "parallel" in problems(e.value)
