"""GPU kernels of the runtime against exact references (runs only where CUDA is available).

Run on a GPU machine: `python -m pytest tests/gpu -q`. Results are recorded in
benchmarks/results/ with the session that ran them.
"""

import pytest
import torch

pytestmark = pytest.mark.gpu


def _packed_reference(q, k, v, lengths, scale):
    """Per-document causal attention in fp32 with the math kernel: the exact answer."""
    outs, start = [], 0
    rep = q.shape[1] // k.shape[1]
    for n in lengths:
        qs, ks, vs = (t[start : start + n].float().transpose(0, 1) for t in (q, k, v))
        ks, vs = ks.repeat_interleave(rep, 0), vs.repeat_interleave(rep, 0)
        with torch.nn.attention.sdpa_kernel([torch.nn.attention.SDPBackend.MATH]):
            outs.append(
                torch.nn.functional.scaled_dot_product_attention(
                    qs, ks, vs, is_causal=True, scale=scale
                ).transpose(0, 1)
            )
        start += n
    return torch.cat(outs)


def _qkv_pack(lengths, heads=16, groups=8, d=128):
    from megatron.core.packed_seq_params import PackedSeqParams

    torch.manual_seed(0)
    total = sum(lengths)
    cu = torch.tensor([0] + list(torch.tensor(lengths).cumsum(0)), dtype=torch.int32, device="cuda")
    psp = PackedSeqParams(
        qkv_format="thd",
        cu_seqlens_q=cu,
        cu_seqlens_kv=cu,
        max_seqlen_q=max(lengths),
        max_seqlen_kv=max(lengths),
    )
    q, k, v = (
        torch.randn(total, n, d, device="cuda", dtype=torch.bfloat16, requires_grad=True)
        for n in (heads, groups, groups)
    )
    return q, k, v, psp


def _module(uniform: str, heads=16, groups=8, d=128):
    from remote_runtime.model.attention import SDPAttention

    return SDPAttention.bare(heads, groups, d, uniform=uniform)


def _assert_matches_reference(out, q, k, v, lengths, scale):
    ref = _packed_reference(q, k, v, lengths, scale)
    assert torch.isfinite(out).all()
    rel = (out.float() - ref).norm() / ref.norm()
    assert rel < 1e-2, rel
    grad = torch.randn_like(out)
    dq, dk, dv = torch.autograd.grad(out, (q, k, v), grad)
    rq, rk, rv = torch.autograd.grad(ref, (q, k, v), grad.float())
    for ours, exact in ((dq, rq), (dk, rk), (dv, rv)):
        assert torch.isfinite(ours).all()
        assert (ours.float() - exact).norm() / exact.norm() < 2e-2


def test_packed_attention_matches_per_document_reference():
    lengths = [1000, 37, 2059, 1000]
    q, k, v, psp = _qkv_pack(lengths)
    module = _module("varlen")
    out = module._varlen(q, k, v, psp.cu_seqlens_q, psp.cu_seqlens_kv, psp)
    _assert_matches_reference(out, q, k, v, lengths, module.scale)


@pytest.mark.parametrize("kernel", ["cudnn", "cudnn-expand", "flash", "efficient"])
def test_uniform_pack_kernels_match_per_document_reference(kernel):
    """Each kernel the uniform-pack path may pick, forward and backward, or a skip saying that
    this GPU / torch build has no such kernel for the shape (the path then tries the next)."""
    from remote_runtime.model import attention as A

    lengths = [2048, 2048, 2048]
    q, k, v, psp = _qkv_pack(lengths)
    module = _module(kernel)
    A.PACKED_PATH["uniform_errors"].clear()
    out = module._packed(q, k, v, psp, 0.0)
    if A.PACKED_PATH["used"] != f"uniform SDPA ({kernel})":
        pytest.skip(f"{kernel}: {A.PACKED_PATH['uniform_errors']}")
    out = out.view(out.shape[0], module.heads, module.head_dim)
    _assert_matches_reference(out, q, k, v, lengths, module.scale)


def test_fused_weight_gradient_accumulates_in_fp32():
    from remote_runtime.model.wgrad import wgrad_gemm_accum_fp32

    torch.manual_seed(0)
    x = torch.randn(4096, 2048, device="cuda", dtype=torch.bfloat16)
    g = torch.randn(4096, 6144, device="cuda", dtype=torch.bfloat16)
    main = torch.randn(6144, 2048, device="cuda")
    expected = main + g.double().t().matmul(x.double()).float()
    wgrad_gemm_accum_fp32(x, g, main)
    rel = (main - expected).norm() / expected.norm()
    assert rel < 1e-3, rel


def _rel(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def _assert_bf16_matches_fp32(out, ref, inputs, ref_inputs):
    """Our bf16 output(s) and their gradients w.r.t. `inputs` against the fp32 reference's
    w.r.t. `ref_inputs`, under the same upstream gradients: relative error below 1e-2."""
    outs, refs = (out, ref) if isinstance(out, tuple) else ((out,), (ref,))
    grads = [torch.randn_like(t) for t in outs]
    for ours, exact in zip(outs, refs, strict=True):
        assert _rel(ours, exact) < 1e-2
    got = torch.autograd.grad(outs, inputs, grads)
    want = torch.autograd.grad(refs, ref_inputs, [g.float() for g in grads])
    for ours, exact in zip(got, want, strict=True):
        assert _rel(ours, exact) < 1e-2


# two packed documents of 1000 and 3096 tokens, with Qwen3's rotary angles for head size 128
SPANS = ((0, 1000), (1000, 4096))


def _angles(head_dim: int = 128):
    cu = torch.tensor([0, 1000, 4096], dtype=torch.int32, device="cuda")
    inv = 1.0 / (1e6 ** (torch.arange(0, head_dim, 2, device="cuda").float() / head_dim))
    f = torch.outer(torch.arange(4096, device="cuda").float(), inv)
    return cu, torch.cat([f, f], -1)[:, None, None, :]


def _rms_norm32(t, w):
    return w * t * torch.rsqrt(t.pow(2).mean(-1, keepdim=True) + 1e-6)


def _rope32(t, freqs):
    """Each document rotated from position 0 (megatron's unfused RoPE); t [T, 1 or h, ...]."""
    from megatron.core.models.common.embeddings import rope_utils

    return torch.cat(
        [rope_utils._apply_rotary_pos_emb_bshd(t[s:e], freqs[: e - s]) for s, e in SPANS]
    )


def _fp32(*tensors):
    return tuple(t.detach().float().requires_grad_(True) for t in tensors)


def test_triton_rms_norm_rope_swiglu_match_fp32_references_in_bf16():
    """Our Triton kernels at Qwen3-1.7B sizes, bf16, against the same maths in fp32 (forward
    and backward): relative error within bf16 rounding (1e-2)."""
    from remote_runtime.model import ops as kernels

    torch.manual_seed(0)
    dev, bf = "cuda", torch.bfloat16
    x = torch.randn(4096, 1, 2048, device=dev, dtype=bf, requires_grad=True)
    w = torch.rand(2048, device=dev, dtype=bf).add_(0.5).requires_grad_(True)
    x32, w32 = _fp32(x, w)
    _assert_bf16_matches_fp32(
        kernels.rms_norm(x, w, 1e-6), _rms_norm32(x32, w32), (x, w), (x32, w32)
    )

    q = torch.randn(4096, 16, 128, device=dev, dtype=bf, requires_grad=True)
    cu, freqs = _angles()
    (q32,) = _fp32(q)
    _assert_bf16_matches_fp32(
        kernels.rope_thd(q, cu, freqs), _rope32(q32.unsqueeze(1), freqs).squeeze(1), (q,), (q32,)
    )

    h = torch.randn(4096, 1, 2 * 6144, device=dev, dtype=bf, requires_grad=True)
    (h32,) = _fp32(h)
    a, b = torch.chunk(h32, 2, -1)
    _assert_bf16_matches_fp32(kernels.swiglu(h), torch.nn.functional.silu(a) * b, (h,), (h32,))


def test_weighted_swiglu_rounds_like_the_eager_bf16_chain():
    """The MoE experts' SwiGLU x router weight in one kernel, at Qwen3-30B-A3B's expert size
    (F 768, 8 x 4096 token copies), against `swiglu(h) * p.to(bf16)`: output and fc1-output
    gradient within one bf16 rounding (the same roundings in the same order), the router-weight
    gradient within 1e-2 (ours sums the row in fp32, the eager chain sums bf16 products)."""
    from remote_runtime.model import ops as kernels

    torch.manual_seed(0)
    h = torch.randn(8 * 4096, 2 * 768, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    p = torch.rand(8 * 4096, device="cuda", requires_grad=True)
    out = kernels.swiglu(h, p)
    ref = kernels.swiglu(h) * p.unsqueeze(-1).to(torch.bfloat16)
    torch.testing.assert_close(out, ref, rtol=8e-3, atol=1e-6)
    g = torch.randn_like(out)
    dh, dp = torch.autograd.grad(out, (h, p), g)
    dh_ref, dp_ref = torch.autograd.grad(ref, (h, p), g)
    torch.testing.assert_close(dh, dh_ref, rtol=8e-3, atol=1e-6)
    assert _rel(dp, dp_ref) < 1e-2


def test_triton_qk_norm_rope_matches_fp32_reference_in_bf16():
    """The fused q/k norm + RoPE + split at Qwen3-1.7B sizes (16 heads, 8 groups, d 128), packed."""
    from remote_runtime.model import ops as kernels

    torch.manual_seed(0)
    heads, groups, d, total = 16, 8, 128, 4096
    qkv = torch.randn(
        total,
        1,
        groups,
        (heads // groups + 2) * d,
        device="cuda",
        dtype=torch.bfloat16,
        requires_grad=True,
    )
    wq, wk = (
        torch.rand(d, device="cuda", dtype=torch.bfloat16).add_(0.5).requires_grad_(True)
        for _ in range(2)
    )
    cu, freqs = _angles(d)
    out = kernels.qk_norm_rope(qkv, wq, wk, 1e-6, freqs, heads, groups, d, cu_seqlens=cu)
    x32, wq32, wk32 = _fp32(qkv, wq, wk)
    q, k, v = torch.split(x32, [heads // groups * d, d, d], dim=3)
    q = q.reshape(total, 1, heads, d)
    ref = (_rope32(_rms_norm32(q, wq32), freqs), _rope32(_rms_norm32(k, wk32), freqs), v)
    _assert_bf16_matches_fp32(out, ref, (qkv, wq, wk), (x32, wq32, wk32))


def test_triton_cross_entropy_matches_fp32_reference():
    """Per-token loss and logits gradient at Qwen3's vocabulary (151,936), bf16 logits."""
    from remote_runtime.model import ops as kernels

    torch.manual_seed(0)
    vocab, valid = 151936, 151669
    logits = (torch.randn(512, 1, vocab, device="cuda") * 3).to(torch.bfloat16).requires_grad_(True)
    labels = torch.randint(0, valid, (512, 1), device="cuda")
    ref_in = logits.detach()[..., :valid].float().requires_grad_(True)
    ref = torch.nn.functional.cross_entropy(
        ref_in.view(-1, valid), labels.view(-1), reduction="none"
    ).view(512, 1)
    loss = kernels.cross_entropy(logits * 1, labels, valid=valid)
    assert (loss - ref).abs().max() < 1e-3
    g = torch.rand_like(ref)
    (dref,) = torch.autograd.grad(ref, ref_in, g)
    (dours,) = torch.autograd.grad(loss, logits, g)
    assert _rel(dours[..., :valid], dref) < 1e-2
    assert torch.count_nonzero(dours[..., valid:]) == 0
