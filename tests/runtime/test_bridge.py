"""HF <-> megatron-core on CPU with real megatron-core, transformers as the reference.

For each family (tiny random models: GQA, odd vocabulary, Qwen3 with head_dim != hidden/heads, Llama
with llama3 rope scaling and tied embeddings): Megatron logits match transformers within 1e-4 (fp32)
at TP=1, TP=2, TP=2 + sequence parallel, PP=2 and DP=2 (and with our Triton kernels at TP=1 and TP=2
+ sequence parallel, under Triton's CPU interpreter); a packed batch of three documents gives the
same logits as three separate forwards; HF -> Megatron -> HF is bit-exact for every tensor (also
from a sharded checkpoint) and transformers loads the result; missing, extra and unmapped tensors
are errors that name them.

The megatron work runs in `bridge_worker.py`, once in one process and once in two gloo
processes, because megatron's state is per process; these tests assert on its measurements.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO_ROOT, cli_env

pytestmark = pytest.mark.runtime

WORKER = Path(__file__).with_name("bridge_worker.py")
FAMILIES = ("qwen3", "qwen2", "llama")
TOL = 1e-4


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory) -> Path:
    """The three families, a sharded Qwen3, and Qwen3 with a tensor missing / one extra."""
    from safetensors.torch import load_file, save_file

    from remote_runtime.tiny import build_model, build_tokenizer

    root = tmp_path_factory.mktemp("tiny-models")
    tok = root / "tokenizer"
    build_tokenizer(tok)
    build_model("qwen3", root / "qwen3", tokenizer_dir=tok)
    build_model("qwen2", root / "qwen2", tokenizer_dir=tok, seed=1)
    build_model("llama", root / "llama", tokenizer_dir=tok, seed=2, num_hidden_layers=4)
    build_model("qwen3", root / "qwen3-sharded", tokenizer_dir=tok, seed=3, max_shard_size="100KB")
    for variant, edit in (
        ("missing", lambda t: t.pop("model.layers.1.self_attn.k_norm.weight")),
        (
            "extra",
            lambda t: t.update(
                {"model.layers.0.self_attn.surprise.weight": t["model.norm.weight"].clone()}
            ),
        ),
    ):
        target = root / f"qwen3-{variant}"
        build_model("qwen3", target, tokenizer_dir=tok)
        weights = load_file(str(target / "model.safetensors"))
        edit(weights)
        save_file(weights, str(target / "model.safetensors"), metadata={"format": "pt"})
    return root


def _run_worker(mode: str, models: Path, out: Path, worker: Path = WORKER) -> dict:
    """Run a worker script (one process for `single`, else two under torchrun); its
    `<mode>-rank*.json` measurements merged."""
    out.mkdir(parents=True, exist_ok=True)
    if mode.startswith("single"):
        cmd = [sys.executable, str(worker), mode, str(models), str(out)]
    else:
        cmd = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc_per_node",
            "2",
            str(worker),
            mode,
            str(models),
            str(out),
        ]
    env = cli_env({"OMP_NUM_THREADS": "1"})
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=900, cwd=REPO_ROOT)
    if proc.returncode != 0:
        raise AssertionError(
            f"{mode} worker failed (rc={proc.returncode}):\n{proc.stdout[-3000:]}"
            f"\n{proc.stderr[-6000:]}"
        )
    merged: dict = {}
    for path in sorted(out.glob(f"{mode}-rank*.json")):
        for key, value in json.loads(path.read_text()).items():
            if isinstance(value, dict):
                merged.setdefault(key, {}).update(value)
            else:
                merged[key] = value
    return merged


@pytest.fixture(scope="session")
def single(tiny_models, tmp_path_factory) -> dict:
    return _run_worker("single", tiny_models, tmp_path_factory.mktemp("single"))


@pytest.fixture(scope="session")
def parallel(tiny_models, tmp_path_factory) -> dict:
    return _run_worker("parallel", tiny_models, tmp_path_factory.mktemp("parallel"))


CASES = (
    [("tp1", f) for f in FAMILIES]
    + [(layout, f) for layout in ("tp2", "pp2", "dp2") for f in FAMILIES]
    + [("tp2sp", "qwen3")]
    # our Triton RMSNorm/RoPE/SwiGLU, under Triton's CPU interpreter
    + [("tp1triton", "qwen3"), ("tp1triton", "llama"), ("tp2sptriton", "qwen3")]
)


def _result(single, parallel, layout, family) -> dict:
    return (single if layout.startswith("tp1") else parallel)[f"{layout}/{family}"]


@pytest.mark.parametrize("layout,family", CASES)
def test_logits_match_transformers(single, parallel, layout, family):
    r = _result(single, parallel, layout, family)
    assert r["logit_scale"] > 1.0  # logits are not trivially small
    assert r["hf_padded"] <= TOL, r
    assert r["hf_packed"] <= TOL, r


@pytest.mark.parametrize("layout,family", CASES)
def test_per_token_loss_matches_transformers(single, parallel, layout, family):
    """Megatron's loss ignores the padded vocabulary rows: it is the checkpoint's own loss."""
    r = _result(single, parallel, layout, family)
    assert r["loss_padded"] <= TOL and r["loss_packed"] <= TOL, r


@pytest.mark.parametrize("layout,family", CASES)
def test_packed_documents_do_not_see_each_other(single, parallel, layout, family):
    r = _result(single, parallel, layout, family)
    assert r["packed_vs_separate"] <= TOL, r


@pytest.mark.parametrize("layout,family", CASES)
def test_uniform_pack_runs_as_a_dense_batch_with_the_same_logits(single, parallel, layout, family):
    """Documents of one length take the dense causal SDPA path; logits still match transformers."""
    r = _result(single, parallel, layout, family)
    assert r["uniform_path"] == "uniform SDPA (cpu)", r
    assert r["hf_uniform_packed"] <= TOL, r


@pytest.mark.parametrize("layout,family", CASES)
def test_round_trip_is_bit_exact(single, parallel, layout, family):
    r = _result(single, parallel, layout, family)
    assert r["keys_only_in_source"] == [] and r["keys_only_in_saved"] == []
    assert r["unequal"] == []
    assert r["reload_diff"] == 0.0  # transformers loads the saved directory, same logits
    assert r["shards"] > 1 and "model.safetensors.index.json" in r["saved_files"]
    for name in (
        "config.json",
        "generation_config.json",
        "tokenizer.json",
        "tokenizer_config.json",
    ):
        assert name in r["saved_files"]
    assert not any(n.startswith(".") for n in r["saved_files"])


def test_sharded_source_round_trip(single):
    r = single["sharded"]
    assert r["hf_padded"] <= TOL and r["packed_vs_separate"] <= TOL
    assert r["unequal"] == [] and r["keys_only_in_source"] == [] and r["keys_only_in_saved"] == []


def test_triton_kernels_give_the_eager_gradients(single):
    """Every parameter's gradient through the Triton RMSNorm/RoPE/SwiGLU equals the eager one
    (fp32, 1e-5 of the largest gradient)."""
    r = single["triton_grads"]
    assert r["swiglu_module"] == "SwiGLU" and r["params"] > 10 and r["scale"] > 0
    assert r["max_diff"] <= 1e-5 * r["scale"], r


def test_ddp_wrapped_bf16_model_round_trip(single):
    r = single["ddp_bf16"]
    assert r["unequal"] == [] and r["config_dtype"] == "bfloat16"


def test_save_refuses_an_existing_directory(single):
    assert "already exists" in single["existing_dir_error"]


def test_missing_tensor_is_named(single):
    msg = single["missing_error"]
    assert "missing from the checkpoint" in msg and "model.layers.1.self_attn.k_norm.weight" in msg


def test_extra_tensor_is_named(single):
    msg = single["extra_error"]
    assert "not in the qwen3 table" in msg and "model.layers.0.self_attn.surprise.weight" in msg


def test_unmapped_megatron_parameter_is_named(single):
    msg = single["unmapped_error"]
    assert "no entry in the qwen3 table" in msg and "decoder.layers.1.mlp.surprise" in msg


def test_compare_with_hf(single, parallel):
    good, broken, bf16 = single["compare_fp32"], single["compare_broken"], single["compare_bf16"]
    assert good["ok"] and good["padded"]["max_abs_diff"] <= TOL
    assert good["packed"]["argmax_agreement"] == 1.0
    assert not broken["ok"] and broken["padded"]["mean_rel_diff"] > 0.05
    assert bf16["ok"] and bf16["dtype"] == "bfloat16"
    across_stages = parallel["pp2/compare"]
    assert across_stages["ok"] and across_stages["padded"]["max_abs_diff"] <= TOL


def test_check_convert_cli(tiny_models):
    env = cli_env({"OMP_NUM_THREADS": "1"})
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "remote_runtime",
            "check-convert",
            "--model",
            str(tiny_models / "qwen2"),
            "--device",
            "cpu",
            "--seq_length",
            "24",
            "--json",
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
        cwd=REPO_ROOT,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout)
    assert result["ok"] and result["family"] == "qwen2" and result["dtype"] == "float32"
    assert result["padded"]["max_abs_diff"] <= TOL
    for kind in ("padded", "packed"):  # fp32: no near-ties, so every position is decided
        m = result[kind]
        assert (
            m["near_ties"] == 0.0 and m["argmax_agreement_decided"] == m["argmax_agreement"] == 1.0
        )
    table = subprocess.run(
        [
            sys.executable,
            "-m",
            "remote_runtime",
            "check-convert",
            "--model",
            str(tiny_models / "qwen2"),
            "--device",
            "cpu",
            "--seq_length",
            "24",
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
        cwd=REPO_ROOT,
    )
    assert table.returncode == 0 and "decided" in table.stdout and "100.00%" in table.stdout, (
        table.stdout
    )
    bad = subprocess.run(
        [
            sys.executable,
            "-m",
            "remote_runtime",
            "check-convert",
            "--model",
            str(tiny_models / "qwen3-missing"),
            "--device",
            "cpu",
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
        cwd=REPO_ROOT,
    )
    assert bad.returncode == 2 and "model.layers.1.self_attn.k_norm.weight" in bad.stderr
