"""The Triton RMSNorm, RoPE and SwiGLU (`remote_runtime/model/kernels.py`) compute what the eager
PyTorch versions compute, forward and backward. On CPU they run under Triton's interpreter
(TRITON_INTERPRET=1), which executes the same kernel code on CPU tensors; on GPU machines
`tests/gpu` runs them for real.

Tolerances: fp32 1e-5 (outputs), 1e-4 (weight gradients, summed over rows in another order);
bf16 outputs within torch's bf16 tolerance of the eager bf16 chain (the kernels round once where
the eager chain rounds after every op).
"""

import pytest
import torch

pytestmark = pytest.mark.runtime
pytest.importorskip("triton")


@pytest.fixture()
def kernels():
    from remote_runtime.model import kernels as k

    if not k.interpreted():
        pytest.skip("CPU tensors need TRITON_INTERPRET=1 (tests/conftest.py sets it without a GPU)")
    return k


def eager_rms_norm(x, w, eps):
    x32 = x.float()
    return w * (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)


@pytest.mark.parametrize("shape,n", [((5, 3), 64), ((7, 4), 48), ((130,), 128)])
def test_rms_norm_forward_and_backward_match_eager(kernels, shape, n):
    torch.manual_seed(0)
    base = torch.randn(*shape, n + 16)  # a strided view, as q/k slices of the fused QKV are
    x_ref = base[..., 8:8 + n].clone().requires_grad_(True)
    x_tri = base[..., 8:8 + n].detach().requires_grad_(True)
    w_ref = (torch.rand(n) + 0.5).requires_grad_(True)
    w_tri = w_ref.detach().clone().requires_grad_(True)
    y_ref, y_tri = eager_rms_norm(x_ref, w_ref, 1e-6), kernels.rms_norm(x_tri, w_tri, 1e-6)
    torch.testing.assert_close(y_tri, y_ref, atol=1e-5, rtol=1e-5)
    g = torch.randn_like(y_ref)
    y_ref.backward(g)
    y_tri.backward(g)
    torch.testing.assert_close(x_tri.grad, x_ref.grad, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(w_tri.grad, w_ref.grad, atol=1e-4, rtol=1e-4)


def test_rms_norm_bf16_matches_the_eager_bf16_chain(kernels):
    torch.manual_seed(1)
    x = torch.randn(33, 96).to(torch.bfloat16)
    w = (torch.rand(96) + 0.5).to(torch.bfloat16)
    torch.testing.assert_close(kernels.rms_norm(x, w, 1e-6), eager_rms_norm(x, w, 1e-6))


def unfused_rope_bshd(t, freqs):
    from megatron.core.models.common.embeddings import rope_utils

    return rope_utils._apply_rotary_pos_emb_bshd(t, freqs)


@pytest.mark.parametrize("rot", [32, 16])  # full and partial rotary (the rest passes through)
def test_rope_bshd_and_thd_match_megatron_unfused_with_gradients(kernels, rot):
    torch.manual_seed(0)
    d, heads = 32, 3
    freqs = torch.randn(40, 1, 1, rot // 2).repeat(1, 1, 1, 2)  # megatron's [f, f] layout
    qkv = torch.randn(40, 2, heads, 3 * d)
    t_ref = qkv[..., :d].clone().requires_grad_(True)
    t_tri = qkv[..., :d].detach().requires_grad_(True)  # a non-contiguous view
    ref, out = unfused_rope_bshd(t_ref, freqs), kernels.rope_bshd(t_tri, freqs)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    g = torch.randn_like(ref)
    ref.backward(g)
    out.backward(g)
    torch.testing.assert_close(t_tri.grad, t_ref.grad, atol=1e-5, rtol=1e-5)

    cu = torch.tensor([0, 7, 27, 40], dtype=torch.int32)
    packed = torch.randn(40, heads, d, requires_grad=True)
    docs = [packed[s:e].unsqueeze(1) for s, e in zip(cu[:-1].tolist(), cu[1:].tolist())]
    expected = torch.cat([unfused_rope_bshd(doc, freqs[: doc.shape[0]]).squeeze(1) for doc in docs])
    packed_tri = packed.detach().clone().requires_grad_(True)
    got = kernels.rope_thd(packed_tri, cu, freqs)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    g = torch.randn_like(expected)
    expected.backward(g)
    got.backward(g)
    torch.testing.assert_close(packed_tri.grad, packed.grad, atol=1e-5, rtol=1e-5)


def test_rope_rejects_an_odd_rotary_dimension(kernels):
    with pytest.raises(ValueError, match="rotary dimension 5"):
        kernels.rope_bshd(torch.randn(4, 1, 2, 8), torch.randn(4, 1, 1, 5))


@pytest.mark.parametrize("f", [48, 1500])  # one partial column block; two blocks
def test_swiglu_forward_and_backward_match_eager(kernels, f):
    torch.manual_seed(0)
    y_ref = torch.randn(6, 2, 2 * f, requires_grad=True)
    y_tri = y_ref.detach().clone().requires_grad_(True)
    gate, up = torch.chunk(y_ref, 2, dim=-1)
    ref = torch.nn.functional.silu(gate) * up
    out = kernels.SwiGLU()(y_tri)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    g = torch.randn_like(ref)
    ref.backward(g)
    out.backward(g)
    torch.testing.assert_close(y_tri.grad, y_ref.grad, atol=1e-5, rtol=1e-5)


def test_swiglu_rejects_an_odd_width(kernels):
    with pytest.raises(ValueError, match="must be even"):
        kernels.swiglu(torch.randn(2, 7))
