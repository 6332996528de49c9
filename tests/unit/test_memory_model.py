"""The memory model: byte counts that can be worked out by hand, and how it responds to changes."""

import dataclasses

import pytest

from megafleet.memory import GIB, Assumptions, Parallel, Recompute, estimate_memory
from megafleet.model_shape import (
    NAMED_CONFIGS,
    ModelShape,
    load_model_config,
    shape_from_hf_config,
)
from remote_runtime.spec.config import ConfigError
from remote_runtime.spec.resolve import padded_vocab_size

Q17 = NAMED_CONFIGS["qwen3-1.7b"]
Q8 = NAMED_CONFIGS["qwen3-8b"]


def est(config=Q17, par=Parallel(), seq=4096, mbs=1, rc=Recompute(), **kw):
    return estimate_memory(config, par, seq, mbs, rc, **kw)


def test_named_shapes_have_the_published_sizes():
    sizes = {
        name: shape_from_hf_config(cfg).total_params() / 1e9 for name, cfg in NAMED_CONFIGS.items()
    }
    assert sizes["qwen3-1.7b"] == pytest.approx(1.72, abs=0.01)
    assert sizes["qwen3-8b"] == pytest.approx(8.19, abs=0.01)
    assert sizes["llama3-8b"] == pytest.approx(8.03, abs=0.01)
    assert sizes["llama3-70b"] == pytest.approx(70.55, abs=0.05)


def test_unsupported_architecture_is_refused():
    with pytest.raises(ConfigError) as e:
        shape_from_hf_config({"architectures": ["MixtralForCausalLM"], "hidden_size": 8})
    assert "MixtralForCausalLM" in str(e.value) and "not supported" in str(e.value)


def test_load_model_config_reads_dirs_files_and_names(tmp_path):
    (tmp_path / "config.json").write_text('{"architectures": ["Qwen3ForCausalLM"]}')
    assert load_model_config(str(tmp_path))["architectures"] == ["Qwen3ForCausalLM"]
    assert load_model_config("Qwen3-8B")["hidden_size"] == 4096
    assert load_model_config("Qwen/Qwen3-8B-Base")["hidden_size"] == 4096  # hub ids too
    assert load_model_config("meta-llama/Llama-3.1-8B-Instruct")["vocab_size"] == 128256
    assert load_model_config("meta-llama/Llama-3.2-1B")["tie_word_embeddings"] is True
    with pytest.raises(ConfigError) as e:
        load_model_config(str(tmp_path / "nope"))
    assert "qwen3-8b" in str(e.value)  # the known shapes are offered


def test_static_memory_is_18_bytes_per_parameter_on_one_gpu():
    """bf16 weights 2 + fp32 gradient buffer 4 + fp32 master 4 + Adam m, v 8."""
    shape = shape_from_hf_config(Q17)
    padded = padded_vocab_size(shape.vocab_size, 1)
    params = shape.total_params() + (padded - shape.vocab_size) * shape.hidden_size
    e = est()
    assert e.params_per_gpu == params
    c = e.components
    assert (c["weights"], c["gradients"], c["optimizer_states"]) == pytest.approx(
        (2 * params / GIB, 4 * params / GIB, 12 * params / GIB), abs=1e-3
    )


def test_bf16_adam_moments_take_4_bytes_per_parameter_less():
    """The precision-aware optimizer's bf16 moments (megafleet's AdamW): master 4 + m, v 2 + 2;
    the planner takes them from the job."""
    from megafleet.planner import job_assumptions
    from remote_runtime.spec.flags import job_from_argv

    base = est().components["optimizer_states"]
    bf16 = est(assumptions=Assumptions(exp_avg_bytes=2, exp_avg_sq_bytes=2))
    assert bf16.components["optimizer_states"] == pytest.approx(base * 8 / 12, rel=1e-6)
    flags = ["--model", "m", "--dataset", "d.jsonl", "--use_precision_aware_optimizer", "true"]
    job = job_from_argv(flags + ["--exp_avg_dtype", "bf16", "--exp_avg_sq_dtype", "bf16"])
    assert (job_assumptions(job).exp_avg_bytes, job_assumptions(job).exp_avg_sq_bytes) == (2, 2)
    assert job_assumptions(job_from_argv(flags[:4])).exp_avg_bytes == 4


def test_components_sum_to_allocated_and_overheads_to_total():
    for par, rc in [
        (Parallel(), Recompute()),
        (Parallel(tp=2, dp=2, sequence_parallel=True), Recompute("full", "uniform", 1)),
        (Parallel(pp=4), Recompute("full", "block", 3)),
    ]:
        e = est(Q8, par, rc=rc)
        assert sum(e.components.values()) == pytest.approx(e.allocated_gib, abs=0.01)
        assert e.allocated_gib + sum(e.overhead.values()) == pytest.approx(e.total_gib, abs=0.01)


def test_logits_buffer_by_cross_entropy_implementation():
    """The runtime's Triton loss (TP=1) keeps only the bf16 logits: 151936 × 4096 × 2 bytes;
    megatron's (vocabulary-parallel, TP > 1, or asked for) adds fp32 softmax and gradient: 10."""
    e = est(seq=4096)
    assert e.components["logits_and_loss"] == pytest.approx(
        padded_vocab_size(151936, 1) * 4096 * 2 / GIB, rel=1e-3
    )
    megatron = est(seq=4096, assumptions=Assumptions(loss_impl="megatron"))
    assert megatron.components["logits_and_loss"] == pytest.approx(
        padded_vocab_size(151936, 1) * 4096 * 10 / GIB, rel=1e-3
    )
    tp2 = est(par=Parallel(tp=2, sequence_parallel=True))
    assert tp2.components["logits_and_loss"] == pytest.approx(
        padded_vocab_size(151936, 2) / 2 * 4096 * 10 / GIB, rel=1e-3
    )


def test_distributed_optimizer_shards_only_the_optimizer_states():
    plain = est(Q8, Parallel(dp=4, distributed_optimizer=False))
    sharded = est(Q8, Parallel(dp=4, distributed_optimizer=True))
    assert sharded.components["optimizer_states"] == pytest.approx(
        plain.components["optimizer_states"] / 4, rel=1e-3
    )
    assert sharded.components["weights"] == plain.components["weights"]
    assert sharded.components["gradients"] == plain.components["gradients"]


def test_tensor_and_pipeline_parallel_split_the_weights():
    one = est(Q8).components["weights"]
    tp2 = est(Q8, Parallel(tp=2, sequence_parallel=True)).components["weights"]
    assert tp2 == pytest.approx(one / 2, rel=0.01)
    assert est(Q8, Parallel(pp=2)).components["weights"] == pytest.approx(one / 2, rel=0.01)


def test_monotonic_in_sequence_length_and_micro_batch():
    for par in (Parallel(), Parallel(tp=2, sequence_parallel=True), Parallel(pp=2)):
        by_seq = [est(Q8, par, seq=s).allocated_gib for s in (512, 1024, 2048, 4096, 8192)]
        by_mbs = [est(Q8, par, mbs=m).allocated_gib for m in (1, 2, 4)]
        assert by_seq == sorted(by_seq) and len(set(by_seq)) == len(by_seq)
        assert by_mbs == sorted(by_mbs) and len(set(by_mbs)) == len(by_mbs)


@pytest.mark.parametrize("par", [Parallel(tp=2, sequence_parallel=True), Parallel(pp=2)])
def test_more_recompute_never_needs_more_memory(par):
    """Stage 0 of a pipeline has no logits buffer: there the activation terms alone decide."""
    ladder = [Recompute()] + [Recompute("full", "block", n) for n in range(1, 36 // par.pp + 1)]
    for stage in range(par.pp):
        totals = [
            est(Q8, par, rc=rc, num_microbatches=1).stages[stage]["allocated_gib"] for rc in ladder
        ]
        steps = totals[:-1]  # recomputing the top layer too saves nothing: it replays at once
        assert all(a > b for a, b in zip(steps, steps[1:])), stage
        assert totals[-1] <= totals[-2] + 0.05
    full = est(Q8, rc=Recompute("full", "uniform", 1)).components["activations"]
    none = est(Q8).components["activations"]
    assert full < none / 12  # one hidden-state checkpoint per layer instead of ~16 h per token


def test_sequence_parallel_shrinks_activations():
    without = est(Q8, Parallel(tp=2, sequence_parallel=False)).components["activations"]
    with_sp = est(Q8, Parallel(tp=2, sequence_parallel=True)).components["activations"]
    assert with_sp < without


def test_first_pipeline_stage_holds_pp_microbatches():
    e = est(Q8, Parallel(pp=4), num_microbatches=8)
    one_in_flight = est(Q8, Parallel(pp=4), num_microbatches=1)
    assert e.stages[0]["allocated_gib"] > one_in_flight.stages[0]["allocated_gib"]
    act = {s["stage"]: s["allocated_gib"] for s in e.stages}
    assert act[0] > act[1] > act[2]  # 4, 3, 2 microbatches in flight


def test_optimizer_step_peak_with_foreach_adam():
    """torch's foreach AdamW allocates an fp32 temporary per parameter during the step."""
    fused = est(Q8, Parallel(tp=2, sequence_parallel=True), rc=Recompute("full", "uniform", 1))
    foreach = est(
        Q8,
        Parallel(tp=2, sequence_parallel=True),
        rc=Recompute("full", "uniform", 1),
        assumptions=Assumptions(optimizer_impl="foreach"),
    )
    assert foreach.peak_phase == "optimizer step"
    extra = foreach.phases["optimizer step"] - fused.phases["optimizer step"]
    assert extra == pytest.approx(4 * fused.params_per_gpu / GIB, rel=1e-3)


def test_bf16_gradient_buffer_halves_gradients():
    fp32 = est(Q8, Parallel(dp=8))
    bf16 = est(Q8, Parallel(dp=8), assumptions=Assumptions(grad_reduce_in_fp32=False))
    assert bf16.components["gradients"] == pytest.approx(fp32.components["gradients"] / 2, rel=1e-3)


def test_shape_parameter_count_of_qwen2_biases_and_tied_head():
    base = dict(NAMED_CONFIGS["qwen3-1.7b"], architectures=["Qwen2ForCausalLM"], model_type="qwen2")
    tied = shape_from_hf_config(base)
    untied = dataclasses.replace(tied, tie_word_embeddings=False)
    assert untied.total_params() - tied.total_params() == tied.vocab_size * tied.hidden_size
    assert tied.qkv_bias and not tied.qk_layernorm
    assert isinstance(tied, ModelShape)


def test_assumptions_reject_unknown_choices():
    with pytest.raises(ValueError) as e:
        Assumptions(optimizer_impl="sgd")
    assert "optimizer_impl" in str(e.value) and "foreach" in str(e.value)
