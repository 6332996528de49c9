"""Model families (torch-free): detection, config mapping, name tables, key checks."""

import json
import subprocess
import sys

import pytest

from remote_runtime.bridge.mapping import ConversionError, check_checkpoint_keys, summarize
from remote_runtime.spec.config import ConfigError
from remote_runtime.spec.families import FAMILIES, family_for_hf_config
from remote_runtime.spec.flags import job_from_argv
from remote_runtime.spec.resolve import resolve_job
from tests.conftest import REPO_ROOT, cli_env

# Real config.json contents (abridged) as the Hub ships them: older transformers layout with
# top-level rope_theta / rope_scaling.
QWEN3_1_7B = {
    "architectures": ["Qwen3ForCausalLM"],
    "model_type": "qwen3",
    "hidden_size": 2048,
    "intermediate_size": 6144,
    "num_hidden_layers": 28,
    "num_attention_heads": 16,
    "num_key_value_heads": 8,
    "head_dim": 128,
    "rms_norm_eps": 1e-6,
    "rope_theta": 1000000,
    "rope_scaling": None,
    "tie_word_embeddings": True,
    "vocab_size": 151936,
    "max_position_embeddings": 40960,
    "hidden_act": "silu",
    "attention_bias": False,
    "use_sliding_window": False,
}
QWEN25_7B = {
    "architectures": ["Qwen2ForCausalLM"],
    "model_type": "qwen2",
    "hidden_size": 3584,
    "intermediate_size": 18944,
    "num_hidden_layers": 28,
    "num_attention_heads": 28,
    "num_key_value_heads": 4,
    "rms_norm_eps": 1e-6,
    "rope_theta": 1000000.0,
    "tie_word_embeddings": False,
    "vocab_size": 152064,
    "hidden_act": "silu",
    "max_position_embeddings": 32768,
    "use_sliding_window": False,
}
LLAMA32_1B = {
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "hidden_size": 2048,
    "intermediate_size": 8192,
    "num_hidden_layers": 16,
    "num_attention_heads": 32,
    "num_key_value_heads": 8,
    "head_dim": 64,
    "rms_norm_eps": 1e-5,
    "rope_theta": 500000.0,
    "tie_word_embeddings": True,
    "vocab_size": 128256,
    "hidden_act": "silu",
    "attention_bias": False,
    "mlp_bias": False,
    "max_position_embeddings": 131072,
    "rope_scaling": {
        "factor": 32.0,
        "high_freq_factor": 4.0,
        "low_freq_factor": 1.0,
        "original_max_position_embeddings": 8192,
        "rope_type": "llama3",
    },
}


@pytest.mark.parametrize(
    "hf,name", [(QWEN3_1_7B, "qwen3"), (QWEN25_7B, "qwen2"), (LLAMA32_1B, "llama")]
)
def test_family_is_detected_from_architectures(hf, name):
    assert family_for_hf_config(hf).name == name
    assert family_for_hf_config({"model_type": name}).name == name  # no architectures field


def test_unsupported_architecture_lists_the_supported_ones():
    with pytest.raises(ConfigError) as exc:
        family_for_hf_config({"architectures": ["MistralForCausalLM"], "model_type": "mistral"})
    field, msg = exc.value.problems[0][:2]
    assert field == "model.model" and "MistralForCausalLM" in msg
    for arch in ("LlamaForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM"):
        assert arch in msg


def test_qwen3_config_kwargs():
    tc = family_for_hf_config(QWEN3_1_7B).transformer_config_kwargs(QWEN3_1_7B)
    assert tc["kv_channels"] == 128 and tc["hidden_size"] // tc["num_attention_heads"] == 128
    assert (tc["num_layers"], tc["num_query_groups"], tc["ffn_hidden_size"]) == (28, 8, 6144)
    assert tc["qk_layernorm"] is True and tc["add_qkv_bias"] is False
    assert tc["normalization"] == "RMSNorm" and tc["gated_linear_unit"] is True
    assert tc["share_embeddings_and_output_weights"] is True
    assert tc["rotary_base"] == 1e6 and tc["rope_scaling"] is None
    json.dumps(tc)  # plain values: the dry run prints them


def test_qwen3_head_dim_differs_from_hidden_over_heads():
    hf = dict(QWEN3_1_7B, hidden_size=64, num_attention_heads=4, head_dim=32)
    assert family_for_hf_config(hf).transformer_config_kwargs(hf)["kv_channels"] == 32


def test_qwen2_has_qkv_bias_and_defaults_head_dim():
    tc = family_for_hf_config(QWEN25_7B).transformer_config_kwargs(QWEN25_7B)
    assert tc["add_qkv_bias"] is True and tc["qk_layernorm"] is False
    assert tc["kv_channels"] == 3584 // 28 and tc["share_embeddings_and_output_weights"] is False


@pytest.mark.parametrize("layout", ["legacy", "transformers5"])
def test_llama3_rope_scaling_in_both_config_layouts(layout):
    hf = dict(LLAMA32_1B)
    if layout == "transformers5":
        scaling = hf.pop("rope_scaling")
        hf["rope_parameters"] = dict(scaling, rope_theta=hf.pop("rope_theta"))
    tc = family_for_hf_config(hf).transformer_config_kwargs(hf)
    assert tc["rotary_base"] == 500000.0
    assert tc["rope_scaling"] == {
        "rope_type": "llama3",
        "factor": 32.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8192,
    }


@pytest.mark.parametrize(
    "change,field",
    [
        ({"hidden_act": "gelu"}, "hidden_act"),
        ({"rope_scaling": {"rope_type": "yarn", "factor": 4.0}}, "rope type 'yarn'"),
        ({"use_sliding_window": True}, "use_sliding_window"),
        ({"layer_types": ["full_attention", "sliding_attention"]}, "layer_types"),
    ],
)
def test_unsupported_config_values_are_named(change, field):
    hf = dict(QWEN25_7B, **change)
    with pytest.raises(ConfigError) as exc:
        family_for_hf_config(hf).transformer_config_kwargs(hf)
    assert field in str(exc.value)


def test_llama_with_biases_is_refused():
    hf = dict(LLAMA32_1B, attention_bias=True)
    with pytest.raises(ConfigError, match="attention_bias"):
        family_for_hf_config(hf).transformer_config_kwargs(hf)


def test_name_tables_cover_each_checkpoint_layout():
    qwen3 = FAMILIES["qwen3"].expected_hf_keys(28, tied=True)
    assert len(qwen3) == 1 + 28 * 11 + 1  # embed, 11 per layer, final norm; lm_head is tied
    assert "lm_head.weight" not in qwen3
    assert "lm_head.weight" in FAMILIES["qwen3"].expected_hf_keys(28, tied=False)
    qwen2 = FAMILIES["qwen2"].expected_hf_keys(2, tied=False)
    assert "model.layers.1.self_attn.v_proj.bias" in qwen2
    assert FAMILIES["llama"].ignored_hf_key("lm_head.weight", tied=True) is not None
    assert FAMILIES["llama"].ignored_hf_key("lm_head.weight", tied=False) is None


def test_megatron_names_match_with_global_layers():
    fam = FAMILIES["qwen3"]
    row, layer = fam.match_megatron(
        "decoder.layers.27.self_attention.q_layernorm.weight", tied=True
    )
    assert layer == 27 and row.hf == ("model.layers.{layer}.self_attn.q_norm.weight",)
    row, _ = fam.match_megatron("output_layer.weight", tied=True)
    assert row.hf == ("model.embed_tokens.weight",) and row.save is False
    assert fam.match_megatron("decoder.layers.0.self_attention.linear_qkv.bias", tied=True) is None


def test_checkpoint_key_check_lists_missing_and_extra_grouped_by_layer():
    fam = FAMILIES["qwen3"]
    keys = [k for k in fam.expected_hf_keys(4, tied=False) if "q_norm" not in k]
    keys += ["model.layers.0.self_attn.rotary_emb.inv_freq", "vision_tower.patch_embed.weight"]
    with pytest.raises(ConversionError) as exc:
        check_checkpoint_keys(fam, keys, 4, tied=False, where="/ckpt")
    msg = str(exc.value)
    assert "/ckpt" in msg
    assert "missing from the checkpoint: model.layers.{0-3}.self_attn.q_norm.weight" in msg
    assert "vision_tower.patch_embed.weight" in msg
    assert "inv_freq" not in msg  # explicitly ignored


def test_summarize_keys():
    assert summarize(["a.1.w", "a.3.w", "b"]) == "a.{1,3}.w, b"
    assert summarize(["m.layers.5.x"]) == "m.layers.5.x"


def test_dry_run_resolves_with_the_family():
    job = job_from_argv(
        [
            "--model",
            "/m",
            "--dataset",
            "d.jsonl",
            "--train_iters",
            "1",
            "--tensor_model_parallel_size",
            "2",
            "--global_batch_size",
            "4",
        ]
    )
    resolved = resolve_job(job, 4, hf_config=QWEN3_1_7B)
    assert resolved["model"]["family"] == "qwen3"
    assert resolved["model"]["padded_vocab_size"] == 152064  # multiple of 128 × TP
    assert resolved["transformer_config"]["kv_channels"] == 128


def test_families_do_not_import_torch():
    code = (
        "import sys, remote_runtime.spec.families, remote_runtime.bridge.mapping; "
        "assert 'torch' not in sys.modules, 'torch imported'"
    )
    subprocess.run([sys.executable, "-c", code], check=True, env=cli_env(), cwd=REPO_ROOT)


@pytest.mark.runtime  # needs safetensors
def test_pytorch_bin_checkpoints_get_a_clear_error(tmp_path):
    from remote_runtime.bridge.checkpoint import CheckpointError, HFCheckpoint

    (tmp_path / "pytorch_model.bin").write_bytes(b"")
    with pytest.raises(
        CheckpointError, match="pytorch_model.bin.*not supported.*safe_serialization"
    ):
        HFCheckpoint(tmp_path)


@pytest.mark.runtime  # needs torch
def test_shard_sizes_parse():
    from remote_runtime.bridge.save import parse_size

    assert parse_size("5GB") == 5 * 10**9 and parse_size("500MiB") == 500 * 2**20
    assert parse_size(1234) == 1234
    with pytest.raises(ValueError, match="max_shard_size"):
        parse_size("lots")
