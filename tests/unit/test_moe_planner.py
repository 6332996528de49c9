"""Memory model and planner for mixture-of-experts models (Qwen3-30B-A3B), torch-free."""

import dataclasses

import pytest

from megafleet.memory import GIB, Parallel, Recompute, activation_bytes_per_token, estimate_memory
from megafleet.model_shape import NAMED_CONFIGS, shape_from_hf_config
from megafleet.planner import apply_plan, estimate_job, plan
from remote_runtime.spec.config import from_dict
from remote_runtime.spec.resolve import resolve_job

A3B = NAMED_CONFIGS["qwen3-30b-a3b"]
SHAPE = shape_from_hf_config(A3B)
FULL = Recompute("full", "uniform", 1)


def static(e) -> float:
    return sum(e.components[k] for k in ("weights", "gradients", "optimizer_states"))


def test_expert_weights_split_by_ep_and_their_optimizer_states_by_expert_dp():
    one = estimate_memory(A3B, Parallel(dp=8, ep=1), 4096, 1, FULL)
    eight = estimate_memory(A3B, Parallel(dp=8, ep=8), 4096, 1, FULL)
    experts = SHAPE.num_layers * SHAPE.layer_param_groups()["experts"]
    assert one.params_per_gpu - eight.params_per_gpu == experts - experts // 8
    # EP1 × DP8: expert states sharded over 8 replicas; EP8 × DP8: one copy of each expert
    # (expert-DP 1), so its optimizer holds a whole 1/8 of the experts' states.
    assert eight.components["optimizer_states"] == pytest.approx(
        one.components["optimizer_states"], rel=0.05
    )
    sixteen = estimate_memory(A3B, Parallel(dp=16, ep=8), 4096, 1, FULL)
    assert sixteen.components["optimizer_states"] < 0.55 * eight.components["optimizer_states"]
    assert sixteen.components["weights"] == eight.components["weights"]


def test_routed_tokens_cost_top_k_copies_and_all_to_all_buffers():
    base = estimate_memory(A3B, Parallel(dp=8, ep=8), 4096)
    top2 = estimate_memory(
        dataclasses.replace(SHAPE, moe_router_topk=2), Parallel(dp=8, ep=8), 4096
    )
    # each token copy keeps its permuted input, the fc1 output (the fused SwiGLU x router
    # weight's only input) and the fc2 input, in bf16, on every layer
    per_copy = 2 * (SHAPE.hidden_size + 2 * SHAPE.moe_ffn_hidden_size + SHAPE.moe_ffn_hidden_size)
    routed = (8 - 2) * per_copy * 4096 * SHAPE.num_layers
    extra = base.components["activations"] - top2.components["activations"]
    assert extra * GIB == pytest.approx(routed, rel=1e-3)
    # backward working set: one layer's temporaries and the replayed layer, plus the dispatch
    # and combine buffers: 8 bf16 copies of each of the 4096 tokens' hidden states, both ways
    # (a 32k vocabulary, so that the logits do not set this peak instead)
    small_vocab = dataclasses.replace(SHAPE, vocab_size=32000)
    layer = activation_bytes_per_token(small_vocab, Parallel(dp=8, ep=8))["layer"]
    working = estimate_memory(small_vocab, Parallel(dp=8, ep=8), 4096, 1, FULL).components
    all_to_all = 2 * 2 * SHAPE.hidden_size * 4096 * 8
    assert working["backward_working_set"] * GIB == pytest.approx(2 * 4096 * layer + all_to_all)
    assert base.to_dict()["params_per_gpu"] < SHAPE.total_params() / 4


def test_8x80gb_fits_only_tightly_with_experts_over_all_gpus_and_model_parallelism():
    p = plan(A3B, gpus=8, gpu_mem_gb=80, gpus_per_node=8)
    assert p.feasible
    c = p.chosen
    assert c.parallel.ep == 8 and c.parallel.etp == 1
    # TP4 + SP splits the activations enough to keep all 48 layers' (TP1 would recompute all)
    assert (c.parallel.tp, c.parallel.sequence_parallel) == (4, True)
    assert c.recompute.checkpointed_layers(48) == 0
    assert any(n.startswith("tight:") for n in p.notes)
    assert any("16 of the 128 experts per GPU" in n for n in p.notes)
    assert not any("no model parallelism" in n for n in p.notes)
    assert "--expert_model_parallel_size" in p.flags()


def test_16x80gb_drops_tensor_parallelism_for_a_little_recompute():
    p = plan(A3B, gpus=16, gpu_mem_gb=80, gpus_per_node=8)
    eight = plan(A3B, gpus=8, gpu_mem_gb=80, gpus_per_node=8)
    assert p.feasible and p.chosen.parallel.ep >= 8
    # expert states sharded twice over: TP1 fits with a few recomputed layers, and is faster
    assert p.chosen.parallel.tp == 1
    assert 0 < p.chosen.recompute.checkpointed_layers(48) < 48
    assert p.chosen.relative_speed > eight.chosen.relative_speed
    assert (
        p.chosen.memory.components["optimizer_states"]
        < eight.chosen.memory.components["optimizer_states"]
    )


def test_2x141gb_full_fine_tuning_does_not_fit_and_says_try_lora():
    p = plan(A3B, gpus=2, gpu_mem_gb=141, gpus_per_node=2)
    assert not p.feasible and p.chosen is None
    assert (
        "full fine-tuning of a 30.5B-parameter model does not fit on 2 GPUs of 141 GiB" in p.reason
    )
    assert "try LoRA" in p.reason
    assert p.min_gpus and p.min_gpus > 2


def test_qwen3_30b_a3b_lora_fits_on_2x80gb_with_expert_adapters_split_by_ep():
    """Issue 17: r=16 on attention and every expert's gate/up/down (844M adapter parameters,
    almost all in the 128 experts x 48 layers) on two 80 GB GPUs, and the plan resolves."""
    from megafleet.memory import Lora, lora_layer_param_split, lora_layer_params

    dense, experts = lora_layer_param_split(SHAPE, Lora())
    assert dense == 16 * (2 * (2048 + 4096) + 2 * (2048 + 512))  # q, o; k, v
    assert experts == 128 * 16 * 3 * (2048 + 768)
    assert SHAPE.num_layers * lora_layer_params(SHAPE, Lora()) == pytest.approx(844e6, rel=1e-3)
    assert lora_layer_param_split(SHAPE, Lora(), ep=2)[1] == experts // 2
    p = plan(A3B, gpus=2, gpu_mem_gb=80, gpus_per_node=2, lora=Lora())
    assert p.feasible and p.chosen.parallel.ep == 2
    assert p.chosen.memory.total_gib < p.chosen.limit_gib < 80
    job = apply_plan(from_dict({"model": "m", "dataset": ["d.jsonl"], "train_iters": 1}), p)
    assert job.tuner.train_type == "lora"
    resolved = resolve_job(job, 2, dict(A3B))
    assert {"gate_proj", "q_proj"} <= set(resolved["tuner"]["target_modules"])


@pytest.mark.parametrize("gpus", [8, 16])
def test_the_plan_is_a_job_the_resolver_accepts_and_estimates_the_same(gpus):
    p = plan(A3B, gpus=gpus, gpu_mem_gb=80, gpus_per_node=8)
    job = apply_plan(from_dict({"model": "m", "dataset": ["d.jsonl"], "train_iters": 1}), p)
    assert job.moe.expert_model_parallel_size == p.chosen.parallel.ep
    resolved = resolve_job(job, gpus, dict(A3B))
    assert resolved["experts"]["expert_model_parallel_size"] == p.chosen.parallel.ep
    again = estimate_job(job, gpus, A3B)
    assert again.total_gib == pytest.approx(p.chosen.memory.total_gib)
    assert again.total_gib * GIB < 80 * GIB


def test_the_sft_moe_template_renders_a_job_that_resolves_for_qwen3_30b_a3b(tmp_path):
    from megafleet import templates
    from remote_runtime.spec.flags import load_job_file

    t = templates.get_template("sft-moe")
    job = templates.job_from_template(t, ["model=/data/Qwen3-30B-A3B", "dataset=train.jsonl"])
    path = tmp_path / "job.yaml"
    path.write_text(templates.render(t, job))
    loaded = load_job_file(path)
    assert loaded == job and loaded.moe.expert_model_parallel_size == 8
    resolved = resolve_job(loaded, 8, dict(A3B))
    assert resolved["experts"]["experts_per_rank"] == 16
    assert estimate_job(loaded, 8, A3B).total_gib < 80
