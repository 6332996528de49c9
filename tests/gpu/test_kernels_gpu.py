"""GPU kernels of the runtime against exact references (runs only where CUDA is available).

Run on a GPU machine: `python -m pytest tests/gpu -q`. Results are recorded in
benchmarks/results/ with the session that ran them.
"""

import math

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


def test_packed_attention_matches_per_document_reference():
    from megatron.core.packed_seq_params import PackedSeqParams

    from remote_runtime.model import attention as A

    torch.manual_seed(0)
    heads, groups, d = 16, 8, 128
    lengths = [1000, 37, 2059, 1000]
    total = sum(lengths)
    cu = torch.tensor([0] + list(torch.tensor(lengths).cumsum(0)), dtype=torch.int32, device="cuda")
    psp = PackedSeqParams(qkv_format="thd", cu_seqlens_q=cu, cu_seqlens_kv=cu,
                          max_seqlen_q=max(lengths), max_seqlen_kv=max(lengths))
    q = torch.randn(total, heads, d, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    k = torch.randn(total, groups, d, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    v = torch.randn(total, groups, d, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    scale = 1 / math.sqrt(d)
    module = A.SDPAttention.__new__(A.SDPAttention)
    module.heads, module.groups, module.head_dim, module.scale = heads, groups, d, scale
    out = module._varlen(q, k, v, cu, cu, psp)
    ref = _packed_reference(q, k, v, lengths, scale)
    rel = (out.float() - ref).norm() / ref.norm()
    assert rel < 1e-2, rel
    grad = torch.randn_like(out)
    dq, dk, dv = torch.autograd.grad(out, (q, k, v), grad)
    rq, rk, rv = torch.autograd.grad(ref, (q, k, v), grad.float())
    for ours, exact in ((dq, rq), (dk, rk), (dv, rv)):
        assert (ours.float() - exact).norm() / exact.norm() < 2e-2


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
