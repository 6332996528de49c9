"""The Triton RMSNorm, RoPE and SwiGLU (`remote_runtime/model/ops.py`) compute what the eager
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
    from remote_runtime.model import ops as k

    if not k.interpreted():
        pytest.skip("CPU tensors need TRITON_INTERPRET=1 (tests/conftest.py sets it without a GPU)")
    return k


def assert_same_values_and_gradients(out, ref, inputs=(), weights=()):
    """Our output(s) equal the reference (1e-5), and the same upstream gradient gives each
    (ours, reference) leaf the same gradient: 1e-5 for `inputs`, 1e-4 for `weights` (summed over
    rows in another order)."""
    outs, refs = (out, ref) if isinstance(out, tuple) else ((out,), (ref,))
    for a, e in zip(outs, refs, strict=True):
        assert a.shape == e.shape
        torch.testing.assert_close(a, e, atol=1e-5, rtol=1e-5)
    grads = [torch.randn_like(e) for e in refs]
    torch.autograd.backward(refs, grads)
    torch.autograd.backward(outs, grads)
    for (ours, theirs), tol in [(p, 1e-5) for p in inputs] + [(p, 1e-4) for p in weights]:
        torch.testing.assert_close(ours.grad, theirs.grad, atol=tol, rtol=tol)


def eager_rms_norm(x, w, eps):
    x32 = x.float()
    return w * (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)


@pytest.mark.parametrize("shape,n", [((5, 3), 64), ((7, 4), 48), ((130,), 128)])
def test_rms_norm_forward_and_backward_match_eager(kernels, shape, n):
    torch.manual_seed(0)
    base = torch.randn(*shape, n + 16)  # a strided view, as q/k slices of the fused QKV are
    x_ref = base[..., 8 : 8 + n].clone().requires_grad_(True)
    x_tri = base[..., 8 : 8 + n].detach().requires_grad_(True)
    w_ref = (torch.rand(n) + 0.5).requires_grad_(True)
    w_tri = w_ref.detach().clone().requires_grad_(True)
    assert_same_values_and_gradients(
        kernels.rms_norm(x_tri, w_tri, 1e-6),
        eager_rms_norm(x_ref, w_ref, 1e-6),
        inputs=[(x_tri, x_ref)],
        weights=[(w_tri, w_ref)],
    )


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
    assert_same_values_and_gradients(
        kernels.rope_bshd(t_tri, freqs), unfused_rope_bshd(t_ref, freqs), inputs=[(t_tri, t_ref)]
    )

    cu = torch.tensor([0, 7, 27, 40], dtype=torch.int32)
    packed = torch.randn(40, heads, d, requires_grad=True)
    docs = [packed[s:e].unsqueeze(1) for s, e in zip(cu[:-1].tolist(), cu[1:].tolist())]
    expected = torch.cat([unfused_rope_bshd(doc, freqs[: doc.shape[0]]).squeeze(1) for doc in docs])
    packed_tri = packed.detach().clone().requires_grad_(True)
    assert_same_values_and_gradients(
        kernels.rope_thd(packed_tri, cu, freqs), expected, inputs=[(packed_tri, packed)]
    )


def test_rope_rejects_an_odd_rotary_dimension(kernels):
    with pytest.raises(ValueError, match="rotary dimension 5"):
        kernels.rope_bshd(torch.randn(4, 1, 2, 8), torch.randn(4, 1, 1, 5))


@pytest.mark.parametrize("f", [48, 1500])  # one partial column block; two blocks
def test_swiglu_forward_and_backward_match_eager(kernels, f):
    torch.manual_seed(0)
    y_ref = torch.randn(6, 2, 2 * f, requires_grad=True)
    y_tri = y_ref.detach().clone().requires_grad_(True)
    gate, up = torch.chunk(y_ref, 2, dim=-1)
    assert_same_values_and_gradients(
        kernels.SwiGLU()(y_tri), torch.nn.functional.silu(gate) * up, inputs=[(y_tri, y_ref)]
    )


@pytest.mark.parametrize("f", [48, 1500])  # one column block; a row looped over two
def test_weighted_swiglu_matches_eager_swiglu_times_the_row_weights(kernels, f):
    """The MoE experts' SwiGLU x router weight: values, the fc1-output gradient and the
    router-weight gradient (a sum over the row: 1e-4) equal the eager product's."""
    torch.manual_seed(0)
    y_ref = torch.randn(7, 2 * f, requires_grad=True)
    p_ref = torch.rand(7, requires_grad=True)
    y_tri, p_tri = (t.detach().clone().requires_grad_(True) for t in (y_ref, p_ref))
    gate, up = torch.chunk(y_ref, 2, dim=-1)
    assert_same_values_and_gradients(
        kernels.swiglu(y_tri, p_tri),
        torch.nn.functional.silu(gate) * up * p_ref.unsqueeze(-1),
        inputs=[(y_tri, y_ref)],
        weights=[(p_tri, p_ref)],
    )
    with pytest.raises(ValueError, match="6 for 7 rows"):
        kernels.swiglu(y_tri, p_tri[:6])
    assert kernels.swiglu(y_tri[:0], p_tri[:0]).shape == (0, f)  # an expert rank given no token


@pytest.mark.parametrize("h", [40, 2500])  # one partial column block; three blocks
def test_gather_sum_rows_sums_each_tokens_k_rows(kernels, h):
    """The MoE un-permutation: each token's k expert rows (found through the inverse index)
    summed, as `index_select` then `sum` computes it; a token may list the same row twice."""
    torch.manual_seed(0)
    y = torch.randn(12, h)
    index = torch.randint(0, 12, (15,))
    want = y.index_select(0, index).view(5, 3, h).sum(1)
    torch.testing.assert_close(kernels.gather_sum_rows(y, index, 3), want, atol=1e-5, rtol=1e-5)
    assert kernels.gather_sum_rows(y, index[:0], 3).shape == (0, h)
    with pytest.raises(ValueError, match="not a multiple of k=4"):
        kernels.gather_sum_rows(y, index, 4)


def test_swiglu_rejects_an_odd_width(kernels):
    with pytest.raises(ValueError, match="must be even"):
        kernels.swiglu(torch.randn(2, 7))


def _reference_qk_norm_rope(qkv, wq, wk, freqs, heads, groups, d, cu=None):
    """Megatron's unfused path: split the fused QKV output, RMSNorm q and k per head, rotate."""
    qpg = heads // groups
    q, k, v = torch.split(qkv, [qpg * d, d, d], dim=3)
    q = q.reshape(q.shape[0], q.shape[1], heads, d)
    q, k = eager_rms_norm(q, wq, 1e-6), eager_rms_norm(k, wk, 1e-6)
    if cu is None:
        return unfused_rope_bshd(q, freqs), unfused_rope_bshd(k, freqs), v
    spans = list(zip(cu[:-1].tolist(), cu[1:].tolist()))
    rot = [torch.cat([unfused_rope_bshd(t[s:e], freqs[: e - s]) for s, e in spans]) for t in (q, k)]
    return rot[0], rot[1], v


@pytest.mark.parametrize("packed", [False, True])
def test_qk_norm_rope_matches_split_norm_rope_with_gradients(kernels, packed):
    torch.manual_seed(0)
    heads, groups, d = 6, 2, 16
    s, b = (30, 1) if packed else (12, 2)
    cu = torch.tensor([0, 9, 30], dtype=torch.int32) if packed else None
    freqs = torch.randn(s, 1, 1, d // 2).repeat(1, 1, 1, 2)
    qkv_ref = torch.randn(s, b, groups, (heads // groups + 2) * d, requires_grad=True)
    qkv_tri = qkv_ref.detach().clone().requires_grad_(True)
    w_ref = [(torch.rand(d) + 0.5).requires_grad_(True) for _ in range(2)]
    w_tri = [w.detach().clone().requires_grad_(True) for w in w_ref]
    assert_same_values_and_gradients(
        kernels.qk_norm_rope(qkv_tri, *w_tri, 1e-6, freqs, heads, groups, d, cu_seqlens=cu),
        _reference_qk_norm_rope(qkv_ref, *w_ref, freqs, heads, groups, d, cu),
        inputs=[(qkv_tri, qkv_ref)],
        weights=list(zip(w_tri, w_ref)),
    )


def _ddp_like(weight: torch.Tensor) -> torch.Tensor:
    """What megatron's DDP attaches to a parameter: an fp32 main_grad and the fusion flag."""
    weight.main_grad = torch.ones(weight.shape)
    weight.grad_added_to_main_grad = False
    return weight


def test_norm_weight_gradients_go_straight_into_megatrons_main_grad(kernels):
    """Under megatron's DDP the kernels add the norm weights' gradients into the fp32 main_grad
    (as the fused weight-gradient GEMMs do) and flag it, so the DDP hook does not add them again."""
    torch.manual_seed(0)
    x = torch.randn(20, 32, requires_grad=True)
    w_ref = (torch.rand(32) + 0.5).requires_grad_(True)
    w = _ddp_like(w_ref.detach().clone().requires_grad_(True))
    g = torch.randn(20, 32)
    eager_rms_norm(x, w_ref, 1e-6).backward(g)
    kernels.rms_norm(x.detach(), w, 1e-6).backward(g)
    assert w.grad_added_to_main_grad
    torch.testing.assert_close(w.main_grad, 1 + w_ref.grad, atol=1e-4, rtol=1e-4)

    heads, groups, d = 4, 2, 8
    qkv = torch.randn(10, 1, groups, (heads // groups + 2) * d)
    freqs = torch.randn(10, 1, 1, d)
    wq_ref, wk_ref = ((torch.rand(d) + 0.5).requires_grad_(True) for _ in range(2))
    wq, wk = (_ddp_like(t.detach().clone().requires_grad_(True)) for t in (wq_ref, wk_ref))
    ref = _reference_qk_norm_rope(qkv, wq_ref, wk_ref, freqs, heads, groups, d)
    out = kernels.qk_norm_rope(qkv, wq, wk, 1e-6, freqs, heads, groups, d)
    grads = [torch.randn_like(t) for t in ref]
    torch.autograd.backward(ref[:2], grads[:2])
    torch.autograd.backward(out[:2], grads[:2])
    for ours, exact in ((wq, wq_ref), (wk, wk_ref)):
        assert ours.grad_added_to_main_grad
        torch.testing.assert_close(ours.main_grad, 1 + exact.grad, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("valid", [5000, 4700])  # whole vocabulary; megatron's padding left out
def test_cross_entropy_matches_torch_and_writes_the_gradient_over_the_logits(kernels, valid):
    """Two column blocks (4096 + rest); one label out of range counts as no logit (megatron)."""
    torch.manual_seed(0)
    logits = torch.randn(3, 2, 5000) * 4
    labels = torch.randint(0, valid, (3, 2))
    labels[1, 0] = -100
    ref_in = logits[..., :valid].clone().requires_grad_(True)
    ref = torch.nn.functional.cross_entropy(
        ref_in.reshape(-1, valid), labels.reshape(-1).clamp(min=0), reduction="none"
    ).view(3, 2)
    ref = ref.clone()
    ref[1, 0] = torch.logsumexp(ref_in[1, 0], 0)  # out of range: loss is the log-sum-exp alone
    ours_in = logits.clone().requires_grad_(True)
    leaf = ours_in * 1.0  # the logits are overwritten by their gradient: keep the leaf intact
    loss = kernels.cross_entropy(leaf, labels, valid=valid)
    torch.testing.assert_close(loss, ref, atol=1e-5, rtol=1e-5)
    g = torch.rand(3, 2)
    ref.backward(g)
    loss.backward(g)
    torch.testing.assert_close(ours_in.grad[..., :valid], ref_in.grad, atol=1e-6, rtol=1e-5)
    assert torch.count_nonzero(ours_in.grad[..., valid:]) == 0
