"""megafleet's AdamW (remote_runtime/train/adamw.py) against torch's AdamW: the torch path (CPU)
and the Triton kernel (under Triton's CPU interpreter), fp32 and bf16 moments, the gradient
factor, and the model weight written in the same pass. Through megatron's optimizer and the
folded step: tests/runtime/test_optimizer_step.py; resume with bf16 moments: test_train.py."""

import pytest
import torch

from remote_runtime.model import ops
from remote_runtime.train import adamw

HYPER = dict(lr=3e-2, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1)
SHAPES = [(37, 29), (5000,)]  # one block, and several with a ragged tail (BLOCK 2048)


def _params(seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(*s, generator=g) for s in SHAPES]


def _grads(step, seed=1):
    g = torch.Generator().manual_seed(seed + 10 * step)
    return [torch.randn(*s, generator=g) * (1 + step) for s in SHAPES]


def _ours(params, moments=torch.float32, weights=None):
    opt = adamw.AdamW(params, **HYPER)
    opt.exp_avg_dtype = opt.exp_avg_sq_dtype = moments
    opt.model_weights = weights or {}
    return opt


def _run(opt, params, steps=4, factor=None, lrs=(3e-2, 2e-2, 1e-2, 5e-3)):
    for step in range(steps):
        for p, g in zip(params, _grads(step)):
            p.grad = g.clone()
        for group in opt.param_groups:
            group["lr"] = lrs[step]
        if factor is not None:
            opt.grad_factor = torch.tensor(factor)
        opt.step()


def _to_bf16(x: torch.Tensor, path: str) -> torch.Tensor:
    """x rounded to bf16 as the path does: round to nearest (torch; the kernel on a GPU), or
    toward zero (Triton's CPU interpreter casts fp32 to bf16 by dropping the low 16 bits)."""
    if path == "torch":
        return x.bfloat16()
    return (x.float().contiguous().view(torch.int32) & ~0xFFFF).view(torch.float32).bfloat16()


@pytest.fixture(params=["torch", "kernel"])
def path(request, monkeypatch):
    if request.param == "kernel":
        if not ops.interpreted():
            pytest.skip("CPU tensors need TRITON_INTERPRET=1 (tests/conftest.py sets it)")
        monkeypatch.setenv("MEGAFLEET_ADAMW_KERNEL_ON_CPU", "1")
    return request.param


def test_fp32_moments_follow_torchs_adamw(path):
    """Four steps with weight decay and a changing lr: parameters and moments equal torch's
    AdamW to fp32 rounding (a few ulps of parameters near 2, 1e-5 of their movement)."""
    ref, ours = _params(), _params()
    torch_opt = torch.optim.AdamW(ref, foreach=False, **HYPER)
    _run(torch_opt, ref)
    opt = _ours(ours)
    _run(opt, ours)
    start = _params()
    for r, o, s in zip(ref, ours, start):
        moved = (r - s).abs().max()
        assert moved > 0.05
        torch.testing.assert_close(o, r, rtol=1e-6, atol=1e-6)
        for key in ("exp_avg", "exp_avg_sq"):
            want, got = torch_opt.state[r][key], opt.state[o][key]
            assert got.dtype == torch.float32
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-7)  # torch: lerp
        assert float(opt.state[o]["step"]) == 4.0


def test_the_gradient_factor_is_applied_to_every_gradient(path):
    """grad_factor f gives torch's AdamW on f x gradient (what the folded step relies on)."""
    ref, ours = _params(), _params()
    torch_opt = torch.optim.AdamW(ref, foreach=False, **HYPER)
    for step in range(3):
        for p, g in zip(ref, _grads(step)):
            p.grad = g * 0.25
        torch_opt.step()
    opt = _ours(ours)
    _run(opt, ours, steps=3, factor=0.25, lrs=(3e-2,) * 3)
    for r, o in zip(ref, ours):
        torch.testing.assert_close(opt.state[o]["exp_avg"], torch_opt.state[r]["exp_avg"])
        torch.testing.assert_close(o, r, rtol=1e-6, atol=1e-7)


def test_bf16_moments_are_the_fp32_update_rounded_each_step(path):
    """bf16 moments: each step updates in fp32 from the stored bf16 moments and rounds back;
    against an explicit reference of exactly that, and near torch's fp32 AdamW."""
    ours = _params()
    opt = _ours(ours, moments=torch.bfloat16)
    _run(opt, ours)
    ref = _params()
    m = [torch.zeros_like(p, dtype=torch.bfloat16) for p in ref]
    v = [torch.zeros_like(p, dtype=torch.bfloat16) for p in ref]
    beta1, beta2 = HYPER["betas"]
    for step, lr in enumerate((3e-2, 2e-2, 1e-2, 5e-3)):
        t = step + 1
        for i, (p, g) in enumerate(zip(ref, _grads(step))):
            p.mul_(1 - lr * HYPER["weight_decay"])
            m32 = beta1 * m[i].float() + (1 - beta1) * g
            v32 = beta2 * v[i].float() + (1 - beta2) * g * g
            denom = v32.sqrt() / (1 - beta2**t) ** 0.5 + HYPER["eps"]
            p.sub_(lr / (1 - beta1**t) * m32 / denom)
            m[i], v[i] = _to_bf16(m32, path), _to_bf16(v32, path)
    for o, r, mi, vi in zip(ours, ref, m, v):
        assert opt.state[o]["exp_avg"].dtype == torch.bfloat16
        # the same bf16 values but for rare one-ulp flips (fp32 operation order differs)
        for got, want in ((opt.state[o]["exp_avg"], mi), (opt.state[o]["exp_avg_sq"], vi)):
            assert (got != want).float().mean() < 0.01
            torch.testing.assert_close(got, want, rtol=8e-3, atol=1e-6)
        torch.testing.assert_close(o, r, rtol=1e-5, atol=1e-5)
    fp32 = _params()
    _run(torch.optim.AdamW(fp32, foreach=False, **HYPER), fp32)
    for o, f, s in zip(ours, fp32, _params()):
        assert (o - f).abs().max() < 0.05 * (f - s).abs().max()  # a few % of the movement


def test_the_model_weight_is_written_in_the_same_pass_only_when_asked(path):
    ours = _params()
    weights = {p: torch.zeros_like(p, dtype=torch.bfloat16) for p in ours}
    opt = _ours(ours, weights=weights)
    _run(opt, ours, steps=1)
    assert all(not w.any() for w in weights.values())  # not asked: megatron copies
    opt.write_model_weights = True
    _run(opt, ours, steps=1)
    for p, w in weights.items():
        assert torch.equal(w, _to_bf16(p.detach(), path))


def test_install_swaps_the_class_before_the_first_step_only():
    params = _params()
    inner = torch.optim.AdamW(params, **HYPER)
    outer = type("Opt", (), {"optimizer": inner})()
    (got,) = adamw.install(outer, torch.bfloat16, torch.float32)
    assert got is inner and isinstance(inner, adamw.AdamW)
    assert (inner.exp_avg_dtype, inner.exp_avg_sq_dtype) == (torch.bfloat16, torch.float32)
    assert inner.model_weights == {}  # not one of megatron's bf16 optimizers: megatron copies
    inner2 = torch.optim.AdamW(_params(), **HYPER)
    for p in inner2.param_groups[0]["params"]:
        p.grad = torch.ones_like(p)
    inner2.step()
    with pytest.raises(RuntimeError, match="before the first step"):
        adamw.install(type("Opt", (), {"optimizer": inner2})())
