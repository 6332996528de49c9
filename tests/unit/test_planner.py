"""The planner: known answers, the layout rules, and plans that the job config accepts."""

import pytest

from megafleet.memory import Parallel, Recompute, estimate_memory
from megafleet.model_shape import NAMED_CONFIGS, shape_from_hf_config
from megafleet.planner import apply_plan, estimate_job, layouts, plan
from remote_runtime.spec.config import ConfigError, JobConfig, from_dict, validate
from remote_runtime.spec.flags import job_from_argv

Q17, Q8, L70 = NAMED_CONFIGS["qwen3-1.7b"], NAMED_CONFIGS["qwen3-8b"], NAMED_CONFIGS["llama3-70b"]


def test_1_7b_on_one_80gb_gpu_fits_without_tp_or_recompute():
    p = plan(Q17, gpus=1, gpu_mem_gb=80)
    assert p.feasible
    c = p.chosen
    assert (c.parallel.tp, c.parallel.pp, c.parallel.dp) == (1, 1, 1)
    assert c.recompute.granularity == "none"
    assert c.memory.total_gib < 80 * 0.95


def test_8b_on_two_80gb_gpus_needs_model_parallelism():
    p = plan(Q8, gpus=2, gpu_mem_gb=80)
    assert p.feasible
    c = p.chosen.parallel
    assert (c.tp, c.pp, c.dp) == (2, 1, 1) and c.sequence_parallel  # TP inside the node
    # Plain data parallelism does not fit, not even with the distributed optimizer.
    for dist in (False, True):
        e = estimate_memory(
            Q8, Parallel(dp=2, distributed_optimizer=dist), 4096, 1, Recompute("full", "uniform", 1)
        )
        assert e.total_gib > 80


def test_8b_on_two_h200s_fits_data_parallel_only_with_the_distributed_optimizer():
    p = plan(Q8, gpus=2, gpu_mem_gb=141)
    assert p.feasible
    without = estimate_memory(
        Q8, Parallel(dp=2, distributed_optimizer=False), 4096, 1, Recompute("full", "uniform", 1)
    )
    with_dist = estimate_memory(Q8, Parallel(dp=2, distributed_optimizer=True), 4096)
    assert without.total_gib > 141 > with_dist.total_gib
    assert p.chosen.parallel.distributed_optimizer


def test_impossible_request_is_refused_with_the_reason():
    p = plan(Q8, gpus=1, gpu_mem_gb=24)
    assert not p.feasible and p.chosen is None and p.job_fragment() == {} and p.flags() == []
    assert "8.2B" in p.reason and "does not fit" in p.reason and "24 GiB" in p.reason
    assert "weights, gradients and optimizer states" in p.reason
    assert p.min_gpus and p.min_gpus > 1
    assert plan(Q8, gpus=p.min_gpus, gpu_mem_gb=24, gpus_per_node=8).feasible


def test_odd_gpu_counts_use_data_parallel_and_the_distributed_optimizer():
    p = plan(Q17, gpus=7, gpu_mem_gb=24, suggest=False)  # 7 divides no head count or layer count
    assert p.feasible and (p.chosen.parallel.tp, p.chosen.parallel.dp) == (1, 7)
    assert not plan(Q17, gpus=1, gpu_mem_gb=24, suggest=False).feasible  # sharding is what fits


@pytest.mark.parametrize(
    "config,gpus,per_node",
    [
        (L70, 16, 2),
        (L70, 64, 8),
        (Q8, 8, 4),
        (Q8, 6, 3),
        (Q17, 4, 1),
    ],
)
def test_layouts_respect_nodes_heads_and_layers(config, gpus, per_node):
    shape = shape_from_hf_config(config)
    p = plan(config, gpus=gpus, gpu_mem_gb=80, gpus_per_node=per_node)
    for c in p.candidates:
        par = c.parallel
        assert par.tp <= per_node
        assert shape.num_attention_heads % par.tp == 0 and shape.num_query_groups % par.tp == 0
        assert shape.num_layers % par.pp == 0
        assert par.tp * par.pp * par.dp == gpus
        assert c.global_batch_size % (c.micro_batch_size * par.dp) == 0


def test_70b_over_nodes_uses_pipeline_parallel_across_nodes():
    p = plan(L70, gpus=32, gpu_mem_gb=80, gpus_per_node=8)
    assert p.feasible
    c = p.chosen.parallel
    assert c.tp == 8 and c.pp > 1  # TP fills the node, PP spans nodes
    assert any("PP=" in n for n in p.notes)


def test_chosen_is_the_fastest_layout_that_fits():
    p = plan(Q8, gpus=8, gpu_mem_gb=80)
    fitting = [c for c in p.candidates if c.fits]
    assert p.chosen is fitting[0]
    assert p.chosen.relative_speed == max(c.relative_speed for c in fitting)
    assert all(not c.fits for c in p.candidates[len(fitting) :])


def test_short_sequences_get_a_larger_micro_batch():
    p = plan(NAMED_CONFIGS["qwen3-0.6b"], gpus=1, gpu_mem_gb=80, seq_len=1024)
    assert p.chosen.micro_batch_size == 4  # 4 × 1024 tokens fill the GPU


def test_global_batch_is_rounded_to_data_parallel():
    p = plan(Q17, gpus=8, gpu_mem_gb=80, global_batch_size=20)
    c = p.chosen
    assert c.global_batch_size % (c.micro_batch_size * c.parallel.dp) == 0
    assert c.global_batch_size >= 20 and any("rounded" in n for n in p.notes)


def test_fragment_and_flags_are_a_valid_job():
    p = plan(Q8, gpus=16, gpu_mem_gb=80, gpus_per_node=8, seq_len=8192)
    job = from_dict(p.job_fragment(), base=JobConfig())
    job.model.model, job.data.dataset, job.train.train_iters = "/m", ["d.jsonl"], 10
    validate(job)
    flagged = job_from_argv(
        p.flags() + ["--model", "/m", "--dataset", "d.jsonl", "--train_iters", "10"],
        task=p.request.task,
    )
    flagged.launch = job.launch
    assert flagged == job
    try:
        import remote_runtime.spec.families  # noqa: F401
        from remote_runtime.spec.resolve import resolve_job
    except ImportError:
        return
    resolved = resolve_job(job, world_size=16, hf_config=Q8)
    assert resolved["parallel"]["data_parallel_size"] == p.chosen.parallel.dp


def test_apply_plan_and_estimate_job_agree():
    base = JobConfig()
    base.train.global_batch_size = 32
    p = plan(Q8, gpus=4, gpu_mem_gb=80, global_batch_size=32)
    job = apply_plan(base, p)
    assert job.parallel.tensor_model_parallel_size == p.chosen.parallel.tp
    assert base.parallel.tensor_model_parallel_size == 1  # the original is not changed
    assert estimate_job(job, 4, Q8).total_gib == pytest.approx(p.chosen.memory.total_gib)


def test_bad_requests_are_config_errors():
    with pytest.raises(ConfigError) as e:
        plan(Q8, gpus=8, gpu_mem_gb=80, gpus_per_node=3)
    assert "gpus_per_node" in {p.field for p in e.value.problems}
    with pytest.raises(ConfigError):
        plan(Q8, gpus=0, gpu_mem_gb=80)
    with pytest.raises(ConfigError):
        plan(Q8, gpus=1, gpu_mem_gb=80, task="dpo")


def test_layouts_enumerates_only_valid_splits():
    shape = shape_from_hf_config(Q8)  # 32 heads, 8 query groups, 36 layers
    found = {(p.tp, p.pp) for p in layouts(shape, 16, 16)}
    assert (16, 1) not in found  # 16 does not divide 8 query groups
    assert (8, 2) in found and (1, 16) not in found  # 16 does not divide 36 layers


def test_dpo_plans_for_two_sequences_per_pair_and_no_reference_copy():
    """A pair trains its chosen and rejected answer in one micro-batch: the memory of an SFT
    micro-batch twice as long; the cached reference adds nothing on the GPU."""
    sft = job_from_argv(
        ["--model", "/m", "--dataset", "d", "--train_iters", "1", "--max_length", "4096"],
        task="sft",
    )
    dpo = job_from_argv(
        ["--model", "/m", "--dataset", "d", "--train_iters", "1", "--max_length", "2048"],
        task="rlhf",
    )
    assert estimate_job(dpo, 1, Q17).total_gib == pytest.approx(estimate_job(sft, 1, Q17).total_gib)
    p = plan(Q17, gpus=1, gpu_mem_gb=80, seq_len=2048, task="rlhf")
    assert p.chosen.memory.tokens_per_microbatch == 2 * 2048 * p.chosen.micro_batch_size
