"""megafleet's AdamW kernel (remote_runtime/train/adamw.py) on a GPU: fp32 moments follow torch's
fused AdamW, the bf16 model weight it writes is the updated fp32 parameter rounded to nearest
(bit for bit what megatron's copy gives), bf16 moments stay near fp32 ones; and a short
Qwen3 training run (2 layers) gives the losses of torch's AdamW."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from remote_runtime.train import adamw

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU"),
]

ROOT = Path(__file__).resolve().parents[2]
HYPER = dict(lr=1e-3, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1)


def _params(seed=0):
    g = torch.Generator(device="cuda").manual_seed(seed)
    return [torch.randn(n, device="cuda", generator=g) for n in (1_000_003, 4096, 77)]


def _steps(opt, params, n=5):
    g = torch.Generator(device="cuda").manual_seed(1)
    for _ in range(n):
        for p in params:
            p.grad = torch.randn(p.shape, device="cuda", generator=g)
        opt.step()


def test_kernel_follows_torchs_fused_adamw_and_writes_the_rounded_weight():
    ref, ours = _params(), _params()
    _steps(torch.optim.AdamW(ref, fused=True, **HYPER), ref)
    opt = adamw.AdamW(ours, **HYPER)
    weights = {p: torch.empty_like(p, dtype=torch.bfloat16) for p in ours}
    opt.model_weights, opt.write_model_weights = weights, True
    _steps(opt, ours)
    for r, o in zip(ref, ours):
        torch.testing.assert_close(o, r, rtol=1e-6, atol=1e-6)
        assert torch.equal(weights[o], o.bfloat16())  # round to nearest, as megatron's copy


def test_bf16_moments_stay_near_fp32_ones():
    ref, ours = _params(), _params()
    _steps(torch.optim.AdamW(ref, fused=True, **HYPER), ref)
    opt = adamw.AdamW(ours, **HYPER)
    opt.exp_avg_dtype = opt.exp_avg_sq_dtype = torch.bfloat16
    _steps(opt, ours)
    start = _params()
    for r, o, s in zip(ref, ours, start):
        assert opt.state[o]["exp_avg"].dtype == torch.bfloat16
        assert (o - r).abs().max() < 0.05 * (r - s).abs().max()


def _mean_loss(tmp_path, adam: str, lr: float) -> float:
    out = tmp_path / f"{adam}-{lr}.json"
    cmd = [sys.executable, str(ROOT / "benchmarks" / "train_throughput.py")]
    cmd += ["--shape", "qwen3-1.7b", "--num-layers", "2", "--seq-len", "512"]
    cmd += ["--global-batch", "4", "--warmup", "1", "--steps", "4", "--impl", "runtime"]
    cmd += ["--adam", adam, "--lr", str(lr), "--json", str(out)]
    subprocess.run(cmd, check=True, cwd=ROOT, timeout=300)
    return json.loads(out.read_text())[0]["runs"][0]["mean_loss"]


def test_training_with_the_kernel_gives_torchs_losses(tmp_path):
    """Mean loss over 5 steps at lr 1e-3: the same with either AdamW, and not the loss of a
    model that does not move (lr 0), so the weights the kernel writes are the ones trained."""
    ours, torchs = _mean_loss(tmp_path, "megafleet", 1e-3), _mean_loss(tmp_path, "torch", 1e-3)
    frozen = _mean_loss(tmp_path, "megafleet", 0.0)
    assert abs(ours - torchs) <= 2e-3 * abs(torchs), (ours, torchs)
    assert abs(ours - frozen) > 10 * abs(ours - torchs) + 1e-3, (ours, torchs, frozen)
