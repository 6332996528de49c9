"""Mixture-of-experts in the runtime (remote_runtime/model/moe.py) against transformers, on CPU.

A tiny random Qwen3-MoE (8 experts, top-2, 2 layers, fp32; `moe_worker.py`) in transformers and
in megatron-core with our router, experts and dispatch, at EP1 (one process), EP2 (two gloo
processes: megatron's all-to-all token dispatcher; gloo implements all_to_all_single with
uneven splits), TP2 + sequence parallel with expert TP 2 (megatron's dispatcher) and expert
TP 1 (the local dispatch), and PP2 (a training step through megatron's 1F1B schedule): logits
within 1e-4; the loss (LM + coef * aux) equal to transformers'; the aux loss equal to
`load_balancing_loss_func` (at PP2 over the layers of both stages); router and expert gradients
equal to transformers' (at PP2 the aux gradient needs the router counts of the other stage).
The `_mixed` layouts run a 4-layer model whose layer 0 has a dense MLP (mlp_only_layers=[0]) at
EP1, EP2 and PP2 (stage 0: dense + MoE layer); `pp2_recompute` is PP2 with full activation
recompute. The logged MoE stats reduced over EP / PP ranks equal transformers' over the whole
batch and all layers. And the real training loop (torchrun, CPU): the loss curves at EP2 and PP2
follow EP1's, with aux_loss and expert_load_imbalance over all layers in logging.jsonl.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO_ROOT, cli_env
from tests.runtime.train_helpers import base_args, check, make_assets, read_log, run_runtime

pytestmark = pytest.mark.runtime

WORKER = Path(__file__).with_name("moe_worker.py")
TOL = 1e-4
SINGLE = ("ep1", "ep1_mixed")
PARALLEL = ("ep2", "tp2sp", "tp2sp_etp1", "pp2", "ep2_mixed", "pp2_mixed", "pp2_recompute")


def _run(layouts: tuple[str, ...], nproc: int, out: Path) -> dict:
    cmd = [sys.executable, str(WORKER), ",".join(layouts), str(out)]
    if nproc > 1:
        cmd[1:1] = ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc)]
    proc = subprocess.run(
        cmd,
        capture_output=True,
        text=True,
        timeout=900,
        cwd=REPO_ROOT,
        env=cli_env({"OMP_NUM_THREADS": "1"}),
    )
    if proc.returncode != 0:
        raise AssertionError(
            f"worker failed (rc={proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
        )
    return {p.stem: json.loads(p.read_text()) for p in out.glob("*.json")}


@pytest.fixture(scope="module")
def results(tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("moe")
    return {**_run(SINGLE, 1, out), **_run(PARALLEL, 2, out)}


def _ranks(results, layout):
    return [v for k, v in results.items() if k.startswith(layout + "-rank")]


@pytest.mark.parametrize("layout", SINGLE + PARALLEL)
def test_logits_match_transformers(results, layout):
    ranks = [r for r in _ranks(results, layout) if "logits_diff" in r]
    assert ranks, f"no rank of {layout} reported logits"
    for r in ranks:
        assert r["logits_diff"] < TOL, r
        assert r["logit_scale"] > 1  # not a degenerate all-zero model


@pytest.mark.parametrize(
    "layout", ("ep1", "tp2sp", "tp2sp_etp1", "ep1_mixed", "pp2", "pp2_mixed", "pp2_recompute")
)
def test_loss_and_aux_loss_match_transformers(results, layout):
    ranks = _ranks(results, layout)
    assert any("loss_diff" in r for r in ranks)  # the last pipeline stage
    for r in ranks:
        assert r.get("loss_diff", 0.0) < TOL, r
        assert abs(r["aux_reduced"] - r["aux_ref"]) < TOL, r  # at PP2: all stages' layers
        if "aux_fn_ref" in r:  # HF: one function (PP2: two micro-batches, the mean of two)
            assert r["aux_ref"] == pytest.approx(r["aux_fn_ref"], abs=1e-6)
        assert r["aux_reduced"] > 1.0  # top-k (2) when perfectly balanced, more when not


def test_aux_loss_of_one_pipeline_stage_is_not_the_model_s(results):
    """Why PP needs the exchange: each stage's own layers give a different number."""
    for r in _ranks(results, "pp2") + _ranks(results, "pp2_mixed"):
        assert abs(r["aux"] - r["aux_ref"]) > 0.05, r


@pytest.mark.parametrize("layout", ("ep2", "ep2_mixed"))
def test_aux_loss_per_ep_rank_is_transformers_on_that_rank_s_samples(results, layout):
    ranks = _ranks(results, layout)
    assert len(ranks) == 2
    for r in ranks:
        assert abs(r["aux"] - r["aux_ref"]) < TOL, r
    assert ranks[0]["aux"] != ranks[1]["aux"]  # different samples on the two ranks


@pytest.mark.parametrize(
    "layout",
    ("ep1", "ep2", "tp2sp", "tp2sp_etp1", "pp2", "ep1_mixed", "ep2_mixed", "pp2_mixed")
    + ("pp2_recompute",),  # routers run again in the backward, after the next forward began
)
def test_router_and_expert_gradients_match_transformers(results, layout):
    ranks = _ranks(results, layout)
    assert sum(r["compared"] for r in ranks) > 0
    for r in ranks:
        assert r["router_grad_diff"] < TOL * r["grad_scale"], r
        assert r["expert_grad_diff"] < TOL * r["grad_scale"], r


@pytest.mark.parametrize("layout", ("ep1", "ep1_mixed"))
def test_expert_load_imbalance_is_reported_per_layer(results, layout):
    (r,) = _ranks(results, layout)
    assert len(r["imbalance"]) == (3 if "mixed" in layout else 2)  # the MoE layers only
    assert r["imbalance"] == pytest.approx(r["imbalance_ref"], abs=1e-4)
    assert all(x >= 1.0 for x in r["imbalance"])


@pytest.mark.parametrize("layout", ("ep2", "ep2_mixed", "pp2", "pp2_mixed", "tp2sp"))
def test_logged_moe_stats_cover_every_rank_and_stage(results, layout):
    """pop_step_stats(reduce=True), what logging.jsonl gets: the aux loss over all stages'
    layers, averaged over the EP (data-parallel) ranks' samples, and the load of every MoE
    layer counted over all ranks (transformers' on the whole batch), the same on every rank."""
    ranks = _ranks(results, layout)
    for r in ranks:
        want = r["aux_mean_ref"] if layout.startswith("ep2") else r["aux_ref"]
        assert abs(r["aux_reduced"] - want) < TOL, r
        assert r["imbalance_reduced"] == pytest.approx(r["imbalance_ref"], abs=1e-4), r
    if layout != "tp2sp":  # one rank alone sees part of the samples or of the layers
        assert any(r["imbalance"] != r["imbalance_ref"] for r in ranks)


def test_training_loss_at_ep2_and_pp2_follows_ep1(tmp_path):
    """The real loop on a model with a dense MLP layer (layers MoE, dense, MoE, MoE): DP2
    (EP1), DP2 with EP2, and PP2 (the aux gradient's counts exchanged between the stages, the
    logged stats reduced over them) train the same curve, and log the same aux loss and
    per-layer load over all three MoE layers. The EP2 run's checkpoint is a hub checkpoint
    (per-expert names, loaded by transformers) and a resume with another expert layout is
    refused by name."""
    model, data = make_assets(tmp_path, "qwen3_moe", num_hidden_layers=4, mlp_only_layers=[1])
    logs = {}
    layouts = (
        ("ep1", {}),
        ("ep2", {"expert_model_parallel_size": 2}),
        ("pp2", {"pipeline_model_parallel_size": 2}),
    )
    for tag, extra in layouts:
        out = tmp_path / tag
        check(run_runtime(base_args(model, data, out, train_iters=4, **extra), nproc=2))
        logs[tag] = read_log(out)
    assert [r["step"] for r in logs["ep1"]] == [1, 2, 3, 4]
    for tag in ("ep2", "pp2"):
        for a, b in zip(logs["ep1"], logs[tag]):
            assert b["loss"] == pytest.approx(a["loss"], abs=1e-4), tag
            assert b["aux_loss"] == pytest.approx(a["aux_loss"], abs=1e-4), tag
            assert b["expert_load_imbalance"] == pytest.approx(
                a["expert_load_imbalance"], abs=1e-3
            ), tag
            assert a["aux_loss"] > 1.0 and len(a["expert_load_imbalance"]) == 3
    assert logs["ep1"][-1]["loss"] < logs["ep1"][0]["loss"]
    _assert_trained_hub_checkpoint(model, tmp_path / "ep2" / "checkpoint-4")
    proc = run_runtime(base_args(model, data, tmp_path / "ep2", train_iters=5, resume="auto"), 2)
    assert proc.returncode != 0
    text = proc.stdout + proc.stderr
    assert "layout" in text and "'ep': 2" in text, text[-3000:]


def _assert_trained_hub_checkpoint(source_dir: Path, saved: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM

    index = json.loads((saved / "model.safetensors.index.json").read_text())
    assert "model.layers.2.mlp.experts.7.down_proj.weight" in index["weight_map"]
    assert "model.layers.1.mlp.down_proj.weight" in index["weight_map"]  # the dense layer
    trained = AutoModelForCausalLM.from_pretrained(str(saved), dtype=torch.float32)
    source = dict(
        AutoModelForCausalLM.from_pretrained(
            str(source_dir), dtype=torch.float32
        ).named_parameters()
    )
    moved = {n for n, p in trained.named_parameters() if not torch.equal(p, source[n])}
    assert any(".mlp.experts." in n for n in moved)  # the experts were trained and written


def test_triton_expert_wgrad_accumulates_into_main_grad():
    """The fused weight gradient (Triton, here under its CPU interpreter): main_grad[e] +=
    dy_e^T x_e for rows grouped by expert, experts without rows untouched."""
    pytest.importorskip("triton")
    import torch

    from remote_runtime.model import ops
    from remote_runtime.model.expert_wgrad import accumulate_segments

    if not ops.interpreted():
        pytest.skip("CPU tensors need TRITON_INTERPRET=1 (tests/conftest.py sets it without a GPU)")
    torch.manual_seed(0)
    counts = torch.tensor([5, 0, 70, 1])  # an empty expert, one over a 64-row block
    x, dy = torch.randn(int(counts.sum()), 40), torch.randn(int(counts.sum()), 24)
    main_grad = torch.randn(4, 24, 40)
    expected = main_grad.clone()
    for e, (xs, gs) in enumerate(
        zip(torch.split(x, counts.tolist()), torch.split(dy, counts.tolist()))
    ):
        expected[e] += gs.t() @ xs
    accumulate_segments(main_grad, [(dy, x, torch.cumsum(counts, 0).to(torch.int32))])
    torch.testing.assert_close(main_grad, expected, atol=1e-4, rtol=1e-4)
