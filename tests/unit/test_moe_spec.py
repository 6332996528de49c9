"""Mixture-of-experts families and job options (torch-free): the published Qwen3-MoE and
Qwen2-MoE configs resolve to megatron's MoE settings, the expert name table expands per expert,
and every option or layout the runtime cannot run is refused by name."""

import re

import pytest

from megafleet.model_shape import NAMED_CONFIGS, shape_from_hf_config
from remote_runtime.bridge.mapping import ConversionError, check_checkpoint_keys
from remote_runtime.spec.config import ConfigError, from_dict
from remote_runtime.spec.families import family_for_hf_config
from remote_runtime.spec.flags import job_from_argv
from remote_runtime.spec.resolve import resolve_job

QWEN3_30B = NAMED_CONFIGS["qwen3-30b-a3b"]
QWEN15_MOE = NAMED_CONFIGS["qwen1.5-moe-a2.7b"]
QWEN2_57B = NAMED_CONFIGS["qwen2-57b-a14b"]
BASE = {"model": "m", "dataset": ["d.jsonl"], "train_iters": 1, "global_batch_size": 16}


def resolve(hf: dict, world: int = 8, **options) -> dict:
    return resolve_job(from_dict({**BASE, **options}), world, dict(hf))


def problems(hf: dict, world: int = 8, **options) -> dict[str, str]:
    with pytest.raises(ConfigError) as exc:
        resolve(hf, world, **options)
    out: dict[str, str] = {}
    for p in exc.value.problems:
        out[p.field] = f"{out[p.field]}\n{p.message}" if p.field in out else p.message
    return out


def test_qwen3_30b_a3b_resolves_with_its_published_shape():
    r = resolve(QWEN3_30B, world=8, expert_model_parallel_size=8)
    tc = r["transformer_config"]
    assert r["model"]["family"] == "qwen3_moe"
    assert (
        tc["num_layers"],
        tc["num_moe_experts"],
        tc["moe_router_topk"],
        tc["moe_ffn_hidden_size"],
    ) == (48, 128, 8, 768)
    assert tc["qk_layernorm"] and tc["num_query_groups"] == 4 and tc["kv_channels"] == 128
    # norm_topk_prob=true: top-k then softmax over the k (megatron's pre_softmax=False)
    assert tc["moe_router_pre_softmax"] is False
    assert tc["moe_aux_loss_coeff"] == 0.001 and tc["moe_router_load_balancing_type"] == "aux_loss"
    assert tc["expert_model_parallel_size"] == 8 and tc["moe_router_dtype"] == "fp32"
    assert "moe_shared_expert_intermediate_size" not in tc
    assert r["experts"]["experts_per_rank"] == 16
    assert round(r["model"]["params"] / 1e9, 1) == 30.5  # the dry run reports both
    assert round(r["model"]["active_params"] / 1e9, 2) == 3.35
    assert r["experts"]["experts_of_ep_rank"][-1] == "112-127"
    shape = shape_from_hf_config(QWEN3_30B)
    assert round(shape.total_params() / 1e9, 1) == 30.5
    assert round(shape.active_params() / 1e9, 1) == 3.4  # "3.3B activated" in the model card


@pytest.mark.parametrize(
    "hf,experts,topk,shared,total,active",
    [(QWEN15_MOE, 60, 4, 5632, 14.3, 2.7), (QWEN2_57B, 64, 8, 20480, 57.4, 14.2)],
)
def test_qwen2_moe_resolves_with_a_gated_shared_expert(hf, experts, topk, shared, total, active):
    tc = resolve(hf, world=4, expert_model_parallel_size=4)["transformer_config"]
    assert tc["num_moe_experts"] == experts and tc["moe_router_topk"] == topk
    assert tc["moe_shared_expert_intermediate_size"] == shared and tc["moe_shared_expert_gate"]
    assert tc["add_qkv_bias"] and tc["moe_router_pre_softmax"] is True  # norm_topk_prob=false
    shape = shape_from_hf_config(hf)
    assert round(shape.total_params() / 1e9, 1) == total
    assert round(shape.active_params() / 1e9, 1) == active


def test_transformers5_spelling_of_the_expert_count_is_read():
    hf = {k: v for k, v in QWEN3_30B.items() if k != "num_experts"} | {"num_local_experts": 64}
    assert family_for_hf_config(hf).transformer_config_kwargs(hf)["num_moe_experts"] == 64
    hf.pop("num_local_experts")
    with pytest.raises(ConfigError, match="num_experts"):
        family_for_hf_config(hf).transformer_config_kwargs(hf)


@pytest.mark.parametrize(
    "overrides,pattern",
    [
        ({}, 1),
        ({"decoder_sparse_step": 2}, [0, 1, 0, 1]),
        ({"mlp_only_layers": [0]}, [0, 1, 1, 1]),
        ({"decoder_sparse_step": 2, "mlp_only_layers": [1]}, [0, 0, 0, 1]),
        ({"mlp_only_layers": [0, 1, 2, 3], "num_hidden_layers": 5}, [0, 0, 0, 0, 1]),
    ],
)
def test_dense_layers_between_moe_layers_follow_transformers_rule(overrides, pattern):
    """transformers: layer i is MoE iff i not in mlp_only_layers and (i + 1) % step == 0."""
    hf = {**QWEN3_30B, "num_hidden_layers": 4, **overrides}
    tc = family_for_hf_config(hf).transformer_config_kwargs(hf)
    assert tc["moe_layer_freq"] == pattern
    layers = tc["num_layers"]
    flags = [True] * layers if pattern == 1 else [bool(f) for f in pattern]
    shape = shape_from_hf_config(hf)
    assert shape.moe_layer_flags() == flags and shape.num_moe_layers == sum(flags)
    moe, dense = shape.layer_params(True), shape.layer_params(False)
    assert moe != dense
    rest = shape.embedding_params() + shape.hidden_size
    assert shape.total_params() == sum(flags) * moe + (layers - sum(flags)) * dense + rest
    inactive = (128 - 8) * 3 * shape.hidden_size * shape.moe_ffn_hidden_size
    assert shape.active_params() == shape.total_params() - sum(flags) * inactive
    # FLOPs: a dense layer's MLP instead of the top-k experts'
    all_moe = shape_from_hf_config({**QWEN3_30B, "num_hidden_layers": layers})
    routed, ffn, h = 8 * 768, shape.ffn_hidden_size, shape.hidden_size
    extra = 12 * h * h * 1000 * (layers - sum(flags)) * (1.5 * (ffn - routed) / h - 128 / (2 * h))
    want = all_moe.training_flops(1000, 1000**2) + extra
    assert shape.training_flops(1000, 1000**2) == pytest.approx(want, rel=1e-12)
    # the dry run resolves it and reports the same counts
    r = resolve(hf, world=8, expert_model_parallel_size=8)
    assert r["transformer_config"]["moe_layer_freq"] == pattern
    assert (r["model"]["params"], r["model"]["active_params"]) == (
        shape.total_params(),
        shape.active_params(),
    )
    # the name table: dense MLP tensors at the dense layers, experts and router at the MoE ones
    keys = family_for_hf_config(hf).expected_hf_keys(layers, False, 2, flags)
    for i, is_moe in enumerate(flags):
        assert (f"model.layers.{i}.mlp.gate.weight" in keys) == is_moe
        assert (f"model.layers.{i}.mlp.experts.1.down_proj.weight" in keys) == is_moe
        assert (f"model.layers.{i}.mlp.gate_proj.weight" in keys) != is_moe
        assert (f"model.layers.{i}.mlp.down_proj.weight" in keys) != is_moe


def test_dense_mlp_stages_count_their_own_layers():
    """PP2 over MoE, MoE | dense, dense: the planner's per-stage parameters follow the kinds."""
    from megafleet.memory import Parallel, _stage_param_split

    hf = {**QWEN3_30B, "num_hidden_layers": 4, "mlp_only_layers": [2, 3]}
    shape = shape_from_hf_config(hf)
    par = Parallel(tp=1, pp=2, dp=1, ep=1, etp=1)
    first, last = _stage_param_split(shape, par, 0), _stage_param_split(shape, par, 1)
    assert first[1] == 2 * shape.layer_param_groups(True)["experts"] and last[1] == 0
    emb = shape.vocab_size * shape.hidden_size  # 151936 is a multiple of 128: no padding
    assert first[0] - emb == 2 * (shape.layer_params(True) - first[1] // 2)
    assert last[0] - emb - shape.hidden_size == 2 * shape.layer_params(False)
    assert sum(first) + sum(last) == shape.total_params()


@pytest.mark.parametrize(
    "key,value,message",
    [
        ("decoder_sparse_step", 0, "decoder_sparse_step=0 is not a positive integer"),
        ("mlp_only_layers", [0, 48], "mlp_only_layers=[0, 48] must list layer indices 0-47"),
        ("mlp_only_layers", 3, "mlp_only_layers=3 must list layer indices 0-47"),
        ("mlp_only_layers", list(range(48)), "leave no MoE layer"),
    ],
)
def test_impossible_dense_layer_settings_are_refused_by_name(key, value, message):
    hf = {**QWEN3_30B, key: value}
    with pytest.raises(ConfigError, match=re.escape(message)):
        family_for_hf_config(hf).transformer_config_kwargs(hf)


def test_aux_loss_coefficient_comes_from_config_json_unless_the_job_sets_it():
    assert (
        resolve({**QWEN3_30B, "router_aux_loss_coef": 0.02})["transformer_config"][
            "moe_aux_loss_coeff"
        ]
        == 0.02
    )
    tc = resolve(QWEN3_30B, moe_aux_loss_coeff=0.0)["transformer_config"]
    assert tc["moe_aux_loss_coeff"] == 0


def test_expert_arithmetic_errors_name_the_field():
    bad = problems(QWEN3_30B, world=6, expert_model_parallel_size=3)
    assert bad["moe.expert_model_parallel_size"] == "3 does not divide the model's 128 experts"
    bad = problems(QWEN3_30B, world=8, expert_model_parallel_size=8, expert_tensor_parallel_size=2)
    assert "does not divide the 8 ranks" in bad["moe.expert_model_parallel_size"]
    bad = problems(
        QWEN3_30B, world=8, expert_tensor_parallel_size=8, pipeline_model_parallel_size=2
    )
    assert "world % (EP × expert-TP × PP)" in bad["moe.expert_model_parallel_size"]
    bad = problems(QWEN3_30B, world=7, expert_tensor_parallel_size=7)
    assert "moe_intermediate_size=768" in bad["moe.expert_tensor_parallel_size"]
    bad = problems(
        {**QWEN15_MOE, "shared_expert_intermediate_size": 5630},
        world=4,
        tensor_model_parallel_size=4,
    )
    assert "shared_expert_intermediate_size=5630" in bad["parallel.tensor_model_parallel_size"]


def test_moe_layouts_that_megatron_accepts_resolve():
    r = resolve(
        QWEN3_30B,
        world=16,
        tensor_model_parallel_size=2,
        expert_model_parallel_size=8,
        sequence_parallel=True,
    )
    assert r["experts"]["expert_data_parallel_size"] == 2
    bad = problems(QWEN3_30B, world=16, tensor_model_parallel_size=2, expert_model_parallel_size=8)
    assert "needs sequence parallelism" in bad["parallel.sequence_parallel"]  # MoE + TP
    r = resolve(QWEN3_30B, world=8, pipeline_model_parallel_size=2, expert_model_parallel_size=4)
    assert r["experts"]["experts_per_rank"] == 32
    r = resolve(QWEN3_30B, world=4, expert_model_parallel_size=2, expert_tensor_parallel_size=2)
    assert r["experts"]["expert_data_parallel_size"] == 1


def test_moe_options_on_a_dense_model_are_refused_by_name():
    bad = problems(NAMED_CONFIGS["qwen3-8b"], expert_model_parallel_size=2, moe_grouped_gemm=False)
    assert set(bad) == {"moe.expert_model_parallel_size", "moe.moe_grouped_gemm"}
    assert "qwen3 is a dense model" in bad["moe.moe_grouped_gemm"]
    resolve(NAMED_CONFIGS["qwen3-8b"])  # defaults are fine


def test_te_only_and_inapplicable_options_are_accepted_with_a_note():
    r = resolve(
        QWEN3_30B,
        moe_permute_fusion=True,
        moe_shared_expert_overlap=True,
        moe_expert_capacity_factor=1.5,
    )
    text = "\n".join(r["warnings"])
    assert "moe_permute_fusion=true is accepted but has no effect" in text
    assert "moe_shared_expert_overlap has no effect: qwen3_moe has no shared expert" in text
    assert "dropped" in text
    assert r["transformer_config"]["moe_expert_capacity_factor"] == 1.5
    assert r["transformer_config"]["moe_shared_expert_overlap"] is False
    bad = problems(
        QWEN15_MOE, moe_shared_expert_overlap=True, moe_token_dispatcher_type="allgather"
    )
    assert "alltoall" in bad["moe.moe_shared_expert_overlap"]


@pytest.mark.parametrize(
    "option,value,field",
    [
        ("moe_token_dispatcher_type", "flex", "moe.moe_token_dispatcher_type"),
        ("moe_router_dtype", "bf16", "moe.moe_router_dtype"),
        ("expert_model_parallel_size", 0, "moe.expert_model_parallel_size"),
        ("moe_expert_capacity_factor", -1.0, "moe.moe_expert_capacity_factor"),
    ],
)
def test_bad_option_values_are_named(option, value, field):
    assert field in problems(QWEN3_30B, **{option: value})


def test_megatron_swift_moe_flags_parse():
    job = job_from_argv(
        [
            "--model",
            "m",
            "--dataset",
            "d.jsonl",
            "--train_iters",
            "1",
            "--expert_model_parallel_size",
            "8",
            "--moe_grouped_gemm",
            "true",
            "--moe_permute_fusion",
            "true",
            "--moe_aux_loss_coeff",
            "1e-3",
            "--expert_tensor_parallel_size",
            "1",
            "--moe_router_dtype",
            "fp32",
            "--moe_token_dispatcher_type",
            "alltoall",
            "--moe_expert_capacity_factor",
            "2",
            "--moe_shared_expert_overlap",
            "true",
        ]
    )
    assert job.moe.expert_model_parallel_size == 8 and job.moe.moe_aux_loss_coeff == 1e-3
    assert job.moe.moe_expert_capacity_factor == 2.0


def test_expert_names_expand_per_expert_and_conversion_stays_total():
    hf = dict(QWEN15_MOE, num_hidden_layers=2, num_experts=3)
    family = family_for_hf_config(hf)
    keys = family.expected_hf_keys(2, tied=False, num_experts=3)
    experts = [k for k in keys if ".mlp.experts." in k]
    assert len(experts) == 2 * 3 * 3  # layers × experts × (gate, up, down)
    assert "model.layers.1.mlp.experts.2.down_proj.weight" in keys
    assert "model.layers.0.mlp.shared_expert_gate.weight" in keys
    assert keys["model.layers.1.mlp.gate.weight"][0].megatron.endswith("mlp.router.weight")
    names = list(keys)
    check_checkpoint_keys(family, names, 2, False, "ckpt", num_experts=3)
    with pytest.raises(ConversionError, match=r"model\.layers\.\{0-1\}\.mlp\.experts\.3\."):
        check_checkpoint_keys(
            family,
            names + [f"model.layers.{i}.mlp.experts.3.up_proj.weight" for i in (0, 1)],
            2,
            False,
            "ckpt",
            num_experts=3,
        )
    with pytest.raises(ConversionError, match="missing"):
        check_checkpoint_keys(family, names[1:], 2, False, "ckpt", num_experts=3)


def test_lora_targets_of_a_moe_family_know_their_layer_kind():
    """The dense MLP rows of a MoE family apply to its dense layers only (attach_lora skips
    them on MoE layers, and the shared expert's on dense layers)."""
    from remote_runtime.spec.tuner import adaptable_linears

    family = family_for_hf_config(QWEN15_MOE)
    kinds = {t.megatron.split(".{layer}.")[1]: t.layers for t in adaptable_linears(family)}
    assert kinds["self_attention.linear_qkv"] is None
    assert kinds["mlp.linear_fc1"] == kinds["mlp.linear_fc2"] == "dense"
    assert kinds["mlp.shared_experts.linear_fc1"] == "moe"


def test_expert_gradient_deferral_option():
    """moe_wgrad_defer: auto (default) or 1-8 micro-batches; anything else is named; from the
    command line as from YAML; refused on a dense model like every MoE option."""
    assert resolve(QWEN3_30B)["job"]["moe"]["moe_wgrad_defer"] == "auto"
    assert resolve(QWEN3_30B, moe_wgrad_defer=1)["job"]["moe"]["moe_wgrad_defer"] == "1"
    job = job_from_argv(
        ["--model", "m", "--dataset", "d.jsonl", "--train_iters", "1", "--moe_wgrad_defer", "4"]
    )
    assert job.moe.moe_wgrad_defer == "4"
    for bad in ("0", "9", "sometimes"):
        found = problems(QWEN3_30B, moe_wgrad_defer=bad)
        assert "neither auto nor a micro-batch count from 1 to 8" in found["moe.moe_wgrad_defer"]
    dense = problems(NAMED_CONFIGS["qwen3-8b"], moe_wgrad_defer="2")
    assert "dense model" in dense["moe.moe_wgrad_defer"]
