"""MoE checkpoints: Hugging Face per-expert tensors <-> the runtime's stacked experts.

Tiny random Qwen3-MoE and Qwen2-MoE (8 experts, top 2; Qwen2-MoE with a gated shared expert),
saved by transformers in the hub layout (per-expert names, sharded safetensors with an index),
both with dense MLP layers among the MoE layers (`DENSE_LAYERS`: Qwen3-MoE 4 layers with
mlp_only_layers=[2], so PP2's second stage mixes a dense and a MoE layer; Qwen2-MoE 2 layers with
decoder_sparse_step=2, so PP2's first stage has no MoE layer):

* the transforms alone, at EP2 × expert-TP2 (all four ranks, no megatron): each rank's piece is
  its two experts' slices, and the pieces of the expert-TP ranks give back the HF tensors exactly;
* real megatron-core models (moe_bridge_worker.py) at EP1, EP2, expert-TP2 (TP2 + sequence
  parallel) and PP2: every rank holds exactly its experts' slices, reads no more than it holds,
  HF -> megatron -> HF is bit-exact for every tensor, and transformers loads the saved directory
  with the source's logits;
* megatron's logits against transformers' (`compare_with_hf`) in every layout, for both
  families (Qwen2-MoE's gated shared expert split by TP2 included), and `check-convert` on a
  MoE checkpoint.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.conftest import REPO_ROOT, cli_env

pytestmark = pytest.mark.runtime

WORKER = Path(__file__).with_name("moe_bridge_worker.py")
FAMILIES = ("qwen3_moe", "qwen2_moe")
DENSE_LAYERS = {
    "qwen3_moe": {"num_hidden_layers": 4, "mlp_only_layers": [2]},  # MoE, MoE, dense, MoE
    "qwen2_moe": {"decoder_sparse_step": 2},  # dense, MoE
}


@pytest.fixture(scope="module")
def moe_models(tmp_path_factory) -> Path:
    from remote_runtime.tiny import build_model, build_tokenizer

    root = tmp_path_factory.mktemp("tiny-moe")
    build_tokenizer(root / "tokenizer")
    for seed, family in enumerate(FAMILIES):
        build_model(
            family,
            root / family,
            tokenizer_dir=root / "tokenizer",
            seed=seed,
            max_shard_size="200KB",
            **DENSE_LAYERS[family],
        )
    return root


def _run(mode: str, models: Path, out: Path) -> dict[int, dict]:
    out.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, str(WORKER), mode, str(models), str(out)]
    if mode == "parallel":
        cmd = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc_per_node",
            "2",
        ] + cmd[1:]
    proc = subprocess.run(
        cmd,
        capture_output=True,
        text=True,
        timeout=900,
        cwd=REPO_ROOT,
        env=cli_env({"OMP_NUM_THREADS": "1"}),
    )
    assert proc.returncode == 0, f"{proc.stdout[-2000:]}\n{proc.stderr[-6000:]}"
    return {
        int(p.stem.rsplit("rank", 1)[1]): json.loads(p.read_text())
        for p in out.glob(f"{mode}-rank*.json")
    }


@pytest.fixture(scope="module")
def runs(moe_models, tmp_path_factory) -> dict[int, dict]:
    single = _run("single", moe_models, tmp_path_factory.mktemp("single"))
    parallel = _run("parallel", moe_models, tmp_path_factory.mktemp("parallel"))
    return {0: {**single[0], **parallel[0]}, 1: parallel[1]}


def test_hub_checkpoint_has_per_expert_names_in_shards(moe_models):
    index = json.loads((moe_models / "qwen2_moe" / "model.safetensors.index.json").read_text())
    names = set(index["weight_map"])
    assert "model.layers.1.mlp.experts.7.down_proj.weight" in names
    assert "model.layers.1.mlp.shared_expert_gate.weight" in names
    assert len(set(index["weight_map"].values())) > 1
    # the dense layers: a plain MLP, no router or experts
    for family, layer in (("qwen2_moe", 0), ("qwen3_moe", 2)):
        index = json.loads((moe_models / family / "model.safetensors.index.json").read_text())
        names = set(index["weight_map"])
        assert f"model.layers.{layer}.mlp.down_proj.weight" in names
        assert not any(n.startswith(f"model.layers.{layer}.mlp.experts.") for n in names)
        assert f"model.layers.{layer}.mlp.gate.weight" not in names


@pytest.mark.parametrize("transform,per", [("expert_gate_up", 2), ("expert_row", 1)])
def test_transforms_split_experts_by_ep_and_expert_tp(transform, per):
    from remote_runtime.bridge.transforms import Layout, TensorSlice, shard, unshard

    gen = torch.Generator().manual_seed(0)
    experts, hidden, ffn = 8, 6, 4
    shape = (hidden, ffn) if transform == "expert_row" else (ffn, hidden)
    full = {
        f"e{e}.{w}": torch.randn(shape, generator=gen)
        for e in range(experts)
        for w in ("gate", "up")[:per]
    }
    gathered = {}
    for ep_rank in range(2):
        pieces = []
        for etp_rank in range(2):
            lay = Layout(
                heads=1,
                groups=1,
                head_dim=1,
                vocab=1,
                padded_vocab=1,
                tp=1,
                tp_rank=0,
                num_experts=experts,
                ep=2,
                ep_rank=ep_rank,
                etp=2,
                etp_rank=etp_rank,
            )
            mine = list(lay.local_experts())
            assert mine == list(range(4 * ep_rank, 4 * ep_rank + 4))
            keys = [f"e{e}.{w}" for e in mine for w in ("gate", "up")[:per]]
            piece = shard(transform, [TensorSlice(full[k]) for k in keys], lay, keys)
            for i, e in enumerate(mine):  # the contract, written out
                if transform == "expert_row":
                    want = full[f"e{e}.gate"][:, etp_rank * 2 : (etp_rank + 1) * 2]
                else:
                    rows = slice(etp_rank * 2, (etp_rank + 1) * 2)
                    want = torch.cat([full[f"e{e}.gate"][rows], full[f"e{e}.up"][rows]])
                assert torch.equal(piece[i], want)
            pieces.append(piece)
        gathered.update(unshard(transform, pieces, lay, keys))
    assert gathered.keys() == full.keys()
    assert all(torch.equal(gathered[k], full[k]) for k in full)


LAYOUTS = [("ep1", 0), ("ep2", 0), ("ep2", 1), ("etp2", 0), ("etp2", 1), ("pp2", 0), ("pp2", 1)]


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("layout,rank", LAYOUTS)
def test_each_rank_holds_exactly_its_experts_slices(runs, layout, rank, family):
    r = runs[rank][f"{layout}/{family}"]
    assert r["wrong_slices"] == []
    if layout == "ep2":
        assert r["experts_held"] == list(range(4 * rank, 4 * rank + 4))
        assert r["ep_rank"] == rank
    elif layout == "etp2":
        assert r["experts_held"] == list(range(8)) and r["etp_rank"] == rank
    elif layout == "pp2":
        assert r["pp_rank"] == rank
    # read from the checkpoint what it holds: with EP2 / expert-TP2, half the expert bytes
    single = runs[0][f"ep1/{family}"]
    if layout in ("ep2", "etp2"):
        assert 2 * r["expert_bytes"] == single["expert_bytes"]
        assert r["bytes_read"] < single["bytes_read"]


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("layout", ["ep1", "ep2", "etp2", "pp2"])
def test_round_trip_is_bit_exact_and_transformers_loads_it(runs, layout, family):
    r = runs[0][f"{layout}/{family}"]
    assert r["keys_only_in_source"] == [] and r["keys_only_in_saved"] == []
    assert r["unequal"] == []
    assert r["reload_diff"] == 0.0
    assert r["files"] > 1 and "model.safetensors.index.json" in r["saved_files"]


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("layout", ["ep1", "ep2", "etp2", "pp2"])
def test_logits_match_transformers(runs, layout, family):
    c = runs[0][f"{layout}/{family}"]["compare"]
    assert c["ok"] and c["max_abs_diff"] <= 1e-4, c
    assert c["packed_max_abs_diff"] is None or c["packed_max_abs_diff"] <= 1e-4, c


def test_check_convert_covers_moe(moe_models):
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "remote_runtime",
            "check-convert",
            "--model",
            str(moe_models / "qwen2_moe"),
            "--device",
            "cpu",
            "--seq_length",
            "16",
            "--json",
        ],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=REPO_ROOT,
        env=cli_env({"OMP_NUM_THREADS": "1"}),
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout)
    assert result["ok"] and result["family"] == "qwen2_moe"
    assert result["padded"]["max_abs_diff"] <= 1e-4
