"""LoRA options (torch-free): flags and aliases, named errors in --dry_run, target resolution from
the family tables, the memory model against what the H200 measured, and the planner proposing
LoRA when full fine-tuning does not fit."""

from __future__ import annotations

import json

import pytest

from megafleet.memory import Lora, Parallel, Recompute, estimate_memory
from megafleet.model_shape import NAMED_CONFIGS
from megafleet.planner import job_lora, plan
from remote_runtime.spec.config import ConfigError, TunerConfig
from remote_runtime.spec.families import get_family
from remote_runtime.spec.flags import dump_job, job_from_argv, load_job_file
from remote_runtime.spec.resolve import resolve_job
from remote_runtime.spec.tuner import peft_adapter_config, resolve_lora, select_targets

BASE = ["--model", "/m", "--dataset", "d.jsonl", "--train_iters", "10"]
QWEN3 = NAMED_CONFIGS["qwen3-1.7b"]


def problems(exc: ConfigError) -> dict:
    return {p[0]: p[1] for p in exc.problems}


def test_flags_aliases_and_yaml_round_trip(tmp_path):
    job = job_from_argv(
        BASE
        + [
            "--tuner_type",
            "lora",
            "--lora_rank",
            "16",
            "--target_modules",
            "q_proj",
            "linear_fc1",
            "--init_lora_weights",
            "gaussian",
            "--use_rslora",
            "--merge_lora",
            "true",
        ]
    )
    t = job.tuner
    assert (t.train_type, t.lora_rank, t.target_modules) == ("lora", 16, ["q_proj", "linear_fc1"])
    assert t.use_rslora and t.merge_lora and t.init_lora_weights == "gaussian"
    path = tmp_path / "job.yaml"
    path.write_text(dump_job(job))
    assert load_job_file(path) == job
    path.write_text("train_type: lora\ninit_lora_weights: false\nlora_alpha: 16\n")
    assert load_job_file(path).tuner.init_lora_weights == "false"  # a YAML bool, PEFT's spelling


@pytest.mark.parametrize(
    "argv,field,needle",
    [
        (["--lora_rank", "4"], "tuner.lora_rank", "applies to LoRA only"),
        (["--merge_lora", "true"], "tuner.merge_lora", "applies to LoRA only"),
        (["--train_type", "qlora"], "tuner.train_type", "is not one of: full, lora"),
        (
            ["--train_type", "lora", "--init_lora_weights", "pissa"],
            "tuner.init_lora_weights",
            "is not one of",
        ),
        (["--train_type", "lora", "--lora_rank", "0"], "tuner.lora_rank", "must be > 0"),
        (["--train_type", "lora", "--lora_dropout", "1"], "tuner.lora_dropout", "[0, 1)"),
        (
            ["--train_type", "lora", "--target_modules", "all-linear", "q_proj"],
            "tuner.target_modules",
            "already means every linear layer",
        ),
        (
            ["--train_type", "lora", "--modules_to_save", "norm"],
            "tuner.modules_to_save",
            "cannot be trained in full",
        ),
        (
            ["--train_type", "lora", "--target_modules", "qkv_proj"],
            "tuner.target_modules",
            "not a linear layer of qwen3",
        ),
        (
            ["--train_type", "lora", "--transformer_impl", "transformer_engine"],
            "model.transformer_impl",
            "LoRA runs on the local implementation",
        ),
        (
            ["--train_type", "lora", "--adapters", "/nowhere"],
            "tuner.adapters",
            "is not a PEFT adapter directory",
        ),
    ],
)
def test_bad_combinations_are_named_errors_in_dry_run(argv, field, needle):
    with pytest.raises(ConfigError) as e:
        resolve_job(job_from_argv(BASE + argv), 1, QWEN3)
    assert needle in problems(e.value)[field], e.value


def test_tied_embeddings_cannot_be_trained_in_full():
    tied = dict(QWEN3, tie_word_embeddings=True)
    with pytest.raises(ConfigError) as e:
        resolve_job(
            job_from_argv(BASE + ["--train_type", "lora", "--modules_to_save", "lm_head"]), 1, tied
        )
    assert "ties its input and output embeddings" in problems(e.value)["tuner.modules_to_save"]


def test_targets_come_from_the_family_table():
    family = get_family("qwen3")
    every = select_targets(family, ["all-linear"])
    assert [t.megatron.rsplit(".", 1)[-1] for t in every] == [
        "linear_qkv",
        "linear_proj",
        "linear_fc1",
        "linear_fc2",
    ]
    assert [t.parallel for t in every] == ["column", "row", "column", "row"]
    assert every[0].short_names() == ["q_proj", "k_proj", "v_proj"]
    some = select_targets(family, ["q_proj", "v_proj", "linear_fc2"])
    assert [(t.transform, t.active) for t in some] == [
        ("qkv", (True, False, True)),
        ("row", (True,)),
    ]


def test_moe_targets_are_attention_experts_and_shared_expert_never_the_router():
    qwen3 = select_targets(get_family("qwen3_moe"), ["all-linear"])
    # the dense-MLP rows adapt the layers listed in mlp_only_layers (layer kind "dense")
    assert [(t.megatron.split("{layer}.")[1], t.per_expert, t.layers) for t in qwen3] == [
        ("self_attention.linear_qkv", False, None),
        ("self_attention.linear_proj", False, None),
        ("mlp.linear_fc1", False, "dense"),
        ("mlp.linear_fc2", False, "dense"),
        ("mlp.experts.linear_fc1", True, "moe"),
        ("mlp.experts.linear_fc2", True, "moe"),
    ]
    assert qwen3[4].short_names() == ["gate_proj", "up_proj"]
    assert [t.parallel for t in qwen3[2:]] == ["column", "row", "column", "row"]
    # an HF name selects the shared expert's module and the routed experts' alike (as PEFT)
    gate = select_targets(get_family("qwen2_moe"), ["gate_proj"])
    assert [(t.megatron.split("{layer}.")[1], t.active, t.layers) for t in gate] == [
        ("mlp.linear_fc1", (True, False), "dense"),
        ("mlp.experts.linear_fc1", (True, False), "moe"),
        ("mlp.shared_experts.linear_fc1", (True, False), "moe"),
    ]
    with pytest.raises(ConfigError) as e:
        select_targets(get_family("qwen3_moe"), ["gate"])  # the router is not adaptable
    assert "not a linear layer" in problems(e.value)["tuner.target_modules"]


def test_lora_on_moe_resolves_and_a_fused_expert_adapter_is_a_named_refusal(tmp_path):
    a3b = NAMED_CONFIGS["qwen3-30b-a3b"]
    lora = BASE + ["--train_type", "lora", "--expert_model_parallel_size", "2"]
    resolved = resolve_job(job_from_argv(lora), 2, a3b)
    assert resolved["tuner"]["target_modules"] == sorted(
        ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    )
    assert resolved["experts"]["expert_model_parallel_size"] == 2
    # what PEFT saves for an adapter trained on transformers 5's fused experts
    adapter = tmp_path / "fused"
    adapter.mkdir()
    (adapter / "adapter_model.safetensors").write_bytes(b"")
    config = {"peft_type": "LORA", "r": 8, "lora_alpha": 16, "target_modules": ["q_proj"]}
    config["target_parameters"] = ["gate_up_proj", "down_proj"]
    (adapter / "adapter_config.json").write_text(json.dumps(config))
    with pytest.raises(ConfigError) as e:
        resolve_job(job_from_argv(lora + ["--adapters", str(adapter)]), 2, a3b)
    assert "fused expert parameters" in problems(e.value)["tuner.adapters"]


def test_dry_run_reports_the_resolved_lora_and_adapter_config(tmp_path):
    resolved = resolve_job(job_from_argv(BASE + ["--train_type", "lora", "--use_rslora"]), 1, QWEN3)
    assert resolved["tuner"]["r"] == 8 and resolved["tuner"]["scale"] == pytest.approx(32 / 8**0.5)
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_model.safetensors").write_bytes(b"")
    settings = resolve_lora(
        TunerConfig(train_type="lora", lora_rank=64), get_family("qwen3"), QWEN3
    )
    config = peft_adapter_config(settings, "/base")
    config["target_modules"] = [
        "model.layers.0.self_attn.q_proj",
        "model.layers.1.self_attn.q_proj",
    ]
    (adapter / "adapter_config.json").write_text(json.dumps(config))
    continued = resolve_job(
        job_from_argv(BASE + ["--train_type", "lora", "--adapters", str(adapter)]), 1, QWEN3
    )["tuner"]
    # the adapter's own r and targets win over the flags' defaults
    assert continued["r"] == 64 and continued["target_modules"] == ["q_proj"]


@pytest.mark.parametrize(
    "shape,recompute,measured",
    [
        ("qwen3-8b", Recompute(), 37.0),  # session lora-b, torch.cuda.max_memory_allocated
        ("qwen3-8b", Recompute("full", "uniform", 1), 18.5),  # session lora-a
        ("qwen3-1.7b", Recompute(), 12.9),  # session lora-b
    ],
)
def test_memory_model_matches_the_h200_lora_runs(shape, recompute, measured):
    est = estimate_memory(
        NAMED_CONFIGS[shape], Parallel(), 4096, 1, recompute, num_microbatches=8, lora=Lora(rank=16)
    )
    assert abs(est.allocated_gib - measured) <= 0.05 * measured, est.components
    assert est.components["optimizer_states"] < 1.0  # adapters only: no 12 bytes per weight


def test_plan_proposes_lora_when_full_fine_tuning_does_not_fit():
    full = plan(NAMED_CONFIGS["qwen3-8b"], 1, 40, seq_len=4096)
    assert not full.feasible and "LoRA" in full.reason
    # the GPU count that would do names what it is for (full fine-tuning), not "it" after LoRA
    assert "; full fine-tuning would fit on 4 such GPUs" in full.reason
    alt = full.lora_alternative
    assert alt.feasible and alt.job_fragment()["tuner"]["train_type"] == "lora"
    assert "--train_type" in alt.flags()
    lora = plan(NAMED_CONFIGS["qwen3-8b"], 1, 40, seq_len=4096, lora=Lora())
    assert lora.feasible and lora.chosen.memory.total_gib <= 40 * 0.95
    roomy = plan(NAMED_CONFIGS["qwen3-1.7b"], 1, 80, seq_len=4096)
    assert roomy.feasible and roomy.lora_alternative is None
    # DPO (both answers of a pair per micro-batch, cached reference): LoRA is offered too
    dpo = plan(NAMED_CONFIGS["qwen3-8b"], 1, 40, seq_len=2048, task="rlhf")
    assert not dpo.feasible and dpo.lora_alternative.feasible and "LoRA" in dpo.reason
    assert dpo.lora_alternative.request.task == "rlhf"


def test_job_lora_reads_the_tuner_group():
    assert job_lora(job_from_argv(BASE)) is None
    lora = job_lora(
        job_from_argv(
            BASE
            + [
                "--train_type",
                "lora",
                "--lora_rank",
                "32",
                "--target_modules",
                "linear_qkv",
                "o_proj",
            ]
        )
    )
    assert lora.rank == 32 and set(lora.targets) == {"q_proj", "k_proj", "v_proj", "o_proj"}
