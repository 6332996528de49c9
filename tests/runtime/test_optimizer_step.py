"""The runtime's optimizer step (remote_runtime/train/optimizer_step.py: the token average and
the clipping folded into one factor that Adam applies) against megatron-core's own step.

optimizer_step_worker.py trains the same tiny model both ways in lockstep (two gloo processes:
MoE with EP2 and data-parallel dense parameters, TP2, PP2), with clipping active (torch's fused
AdamW, which takes the factor as `grad_scale`, and the foreach AdamW) and inactive. Adam's
moments hold the scaled gradients (its update alone would hide a wrong scale: Adam is invariant
to it), so they are what is compared, with the reported gradient norm and the parameters.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO_ROOT, cli_env

pytestmark = pytest.mark.runtime

WORKER = Path(__file__).with_name("optimizer_step_worker.py")


@pytest.fixture(scope="module")
def results(tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("optimizer-step") / "steps.json"
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node",
        "2",
        str(WORKER),
        str(out),
    ]
    proc = subprocess.run(
        cmd,
        capture_output=True,
        text=True,
        timeout=600,
        cwd=REPO_ROOT,
        env=cli_env({"OMP_NUM_THREADS": "1"}),
    )
    assert proc.returncode == 0, f"{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}"
    return json.loads(out.read_text())


LAYOUTS = ["ep2_dp2", "tp2", "pp2"]


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("variant", ["clip_fused", "clip_foreach", "noclip", "megafleet_bf16"])
def test_first_step_equals_megatrons(results, layout, variant):
    first = results[f"{layout}/{variant}"][0]
    # fp32: the two paths round the product (1/tokens) x (clip coefficient) differently
    assert first["norm_ours"] == pytest.approx(first["norm_megatron"], rel=1e-6)
    assert first["adam_state_diff"] < 1e-5, first
    assert first["param_diff"] < 1e-4, first  # parameters near 1.0 move by 1e-2: 1 ulp ~1e-5


@pytest.mark.parametrize("layout", LAYOUTS)
def test_without_clipping_every_step_is_bit_identical(results, layout):
    for step in results[f"{layout}/noclip"]:
        assert step["adam_state_diff"] == 0.0 and step["param_diff"] == 0.0, step
        assert step["norm_ours"] == pytest.approx(step["norm_megatron"], rel=1e-6)


@pytest.mark.parametrize("layout", ["tp2", "pp2"])
@pytest.mark.parametrize("variant", ["clip_fused", "clip_foreach"])
def test_clipped_training_follows_megatrons(results, layout, variant):
    """Dense models: three clipped steps stay within fp32 rounding of megatron's (a MoE model's
    routing can flip on a one-ulp difference, so for it only the norms are compared)."""
    for step in results[f"{layout}/{variant}"]:
        assert step["norm_ours"] == pytest.approx(step["norm_megatron"], rel=1e-5)
        assert step["adam_state_diff"] < 1e-4 and step["param_diff"] < 1e-3, step


def test_clipped_moe_norms_follow_megatrons(results):
    for variant in ("clip_fused", "clip_foreach"):
        for step in results[f"ep2_dp2/{variant}"]:
            assert step["norm_ours"] == pytest.approx(step["norm_megatron"], rel=1e-5)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_megafleet_adamw_writes_the_bf16_weights_megatron_would(results, layout):
    """megafleet's AdamW on a bf16 model (the GPU setting): every model weight it maps equals its
    fp32 main parameter rounded, after each step, with megatron's own copy skipped (and put back
    after the step); the main parameters follow megatron's step with torch's AdamW: the first
    step to fp32 rounding (test_first_step_equals_megatrons); later ones only loosely: the two
    AdamWs round differently in fp32, some bf16 weights then round one ulp apart, the next
    gradients differ slightly, and Adam turns a small gradient's change into a step of lr (here
    10-13% of the largest movement; torch's AdamW through the same folded step, which rounds as
    megatron's side does, 0.02-3%). Missing writes would fail the exact check above."""
    for step in results[f"{layout}/megafleet_bf16"]:
        assert step["mapped"] > 0, step
        assert step["weight_vs_main"] == 0.0, step
        assert not step["copy_override_left"], step
        assert step["adam_state_diff"] < 0.05 and step["param_diff"] < 0.5, step
