"""Job options of evaluation and preference training: names, aliases, refusals, and the
eval fields `megafleet status` shows."""

import json

import pytest

from megafleet.jobs.nodectl import last_metrics
from remote_runtime.spec.config import ConfigError, validate
from remote_runtime.spec.flags import job_from_argv

BASE = ["--model", "/m", "--dataset", "d.jsonl", "--train_iters", "3"]


def test_eval_and_dpo_options_parse_with_megatron_swift_names():
    job = job_from_argv(
        [
            *BASE,
            "--val_dataset",
            "v.jsonl",
            "v2.jsonl#5",
            "--eval_interval",
            "7",
            "--eval_iters",
            "2",
            "--beta",
            "0.2",
            "--loss_type",
            "ipo",
            "--rpo_alpha",
            "0.5",
            "--ref_model",
            "/ref",
            "--rlhf_type",
            "dpo",
        ],
        task="rlhf",
    )
    assert job.eval.val_dataset == ["v.jsonl", "v2.jsonl#5"] and job.eval.eval_steps == 7
    assert (job.eval.eval_iters, job.rlhf.beta, job.rlhf.loss_type) == (2, 0.2, "ipo")
    assert (job.rlhf.rpo_alpha, job.rlhf.ref_model, job.task) == (0.5, "/ref", "rlhf")
    assert validate(job) == []
    split = job_from_argv([*BASE, "--split_dataset_ratio", "0.1", "--eval_steps", "4"])
    assert (split.eval.split_dataset_ratio, split.eval.eval_steps) == (0.1, 4)


@pytest.mark.parametrize(
    "flags,field,text",
    [
        (
            ["--loss_type", "robust"],
            "rlhf.loss_type",
            "'robust' is not one of: sigmoid, ipo, hinge",
        ),
        (["--rlhf_type", "kto"], "rlhf.rlhf_type", "'kto' is not one of: dpo, simpo, orpo"),
        (["--rlhf_type", "simpo", "--ref_model", "/r"], "rlhf.ref_model", "reference-free"),
        (["--rlhf_type", "orpo", "--loss_type", "ipo"], "rlhf.loss_type", "dpo only"),
        (["--rlhf_type", "simpo", "--rpo_alpha", "1"], "rlhf.rpo_alpha", "cpo_alpha"),
        (["--rlhf_type", "orpo", "--label_smoothing", "0.1"], "rlhf.label_smoothing", "simpo"),
        (["--simpo_gamma", "0.5"], "rlhf.simpo_gamma", "simpo only"),
        (["--rlhf_type", "orpo", "--cpo_alpha", "0"], "rlhf.cpo_alpha", "simpo only"),
        (["--beta", "0"], "rlhf.beta", "must be > 0"),
        (
            ["--label_smoothing", "0.1", "--loss_type", "hinge"],
            "rlhf.label_smoothing",
            "sigmoid only",
        ),
        (["--reference_free", "true", "--ref_model", "/r"], "rlhf.ref_model", "reference_free"),
        (["--split_dataset_ratio", "1.5"], "eval.split_dataset_ratio", "[0, 1)"),
        (["--eval_iters", "0"], "eval.eval_iters", "-1 for the whole validation set"),
    ],
)
def test_bad_values_are_refused_naming_the_field(flags, field, text):
    job = job_from_argv([*BASE, *flags], task="rlhf")
    with pytest.raises(ConfigError) as exc:
        validate(job)
    assert any(p[0] == field and text in p[1] for p in exc.value.problems), exc.value.problems


def test_status_metrics_carry_the_last_evaluation(tmp_path):
    path = tmp_path / "logging.jsonl"
    records = [
        {"step": 1, "loss": 2.0},
        {"step": 2, "loss": 1.5, "eval_loss": 1.8, "eval_rewards/accuracies": 0.75},
        {"step": 3, "loss": 1.2},
    ]
    path.write_text("".join(json.dumps(r) + "\n" for r in records) + '{"step": 4, "lo')
    metrics, count = last_metrics(path)
    assert count == 4 and metrics["step"] == 3 and metrics["loss"] == 1.2
    assert (metrics["eval_step"], metrics["eval_loss"]) == (2, 1.8)
    assert metrics["eval_rewards/accuracies"] == 0.75
    path.write_text(json.dumps(records[0]) + "\n")
    assert "eval_loss" not in last_metrics(path)[0]


def test_simpo_orpo_and_dpo_with_lora_are_accepted():
    from remote_runtime.spec.config import effective_beta, uses_reference

    for kind, beta in (("dpo", 0.1), ("simpo", 2.0), ("orpo", 0.1)):  # ms-swift's defaults
        job = job_from_argv([*BASE, "--rlhf_type", kind], task="rlhf")
        assert validate(job) == [] and effective_beta(job.rlhf) == beta
        assert uses_reference(job.rlhf) is (kind == "dpo")
    job = job_from_argv([*BASE, "--rlhf_type", "simpo", "--beta", "2.5"], task="rlhf")
    assert effective_beta(job.rlhf) == 2.5
    for spelling in ("--train_type", "--tuner_type"):
        job = job_from_argv([*BASE, spelling, "lora", "--merge_lora", "true"], task="rlhf")
        assert (job.task, job.tuner.train_type, job.tuner.merge_lora) == ("rlhf", "lora", True)
        assert validate(job) == []
