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
        qs, ks, vs = (t[start:start + n].float().transpose(0, 1) for t in (q, k, v))
        ks, vs = ks.repeat_interleave(rep, 0), vs.repeat_interleave(rep, 0)
        with torch.nn.attention.sdpa_kernel([torch.nn.attention.SDPBackend.MATH]):
            outs.append(torch.nn.functional.scaled_dot_product_attention(
                qs, ks, vs, is_causal=True, scale=scale).transpose(0, 1))
        start += n
    return torch.cat(outs)


def _qkv_pack(lengths, heads=16, groups=8, d=128):
    from megatron.core.packed_seq_params import PackedSeqParams

    torch.manual_seed(0)
    total = sum(lengths)
    cu = torch.tensor([0] + list(torch.tensor(lengths).cumsum(0)), dtype=torch.int32, device="cuda")
    psp = PackedSeqParams(qkv_format="thd", cu_seqlens_q=cu, cu_seqlens_kv=cu,
                          max_seqlen_q=max(lengths), max_seqlen_kv=max(lengths))
    q, k, v = (torch.randn(total, n, d, device="cuda", dtype=torch.bfloat16, requires_grad=True)
               for n in (heads, groups, groups))
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
