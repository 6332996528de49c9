"""Weight gradients accumulated straight into megatron's fp32 `main_grad` buffers (GPU).

Without it every linear layer's backward writes a bf16 weight gradient, autograd hands it to
megatron's DDP hook, and the hook adds it into the fp32 buffer: two extra passes over all
weights per micro-batch (12% of step time for Qwen3-1.7B on an H200). Megatron's remedy,
`gradient_accumulation_fusion`, calls `fused_weight_gradient_mlp_cuda.wgrad_gemm_accum_fp32`
from Apex/TE; this provides that function on torch alone: a bf16 GEMM with fp32 output that
accumulates in place (`addmm(..., out_dtype=torch.float32)`, cuBLAS beta=1).
"""

from __future__ import annotations

import types

import torch


def wgrad_gemm_accum_fp32(
    total_input: torch.Tensor, grad_output: torch.Tensor, main_grad: torch.Tensor
) -> None:
    torch.addmm(main_grad, grad_output.t(), total_input, out_dtype=torch.float32, out=main_grad)


def wgrad_gemm_accum_fp16(
    total_input: torch.Tensor, grad_output: torch.Tensor, main_grad: torch.Tensor
) -> None:
    main_grad.addmm_(grad_output.t(), total_input)


def _works() -> bool:
    """addmm with out_dtype exists (torch >= 2.8, CUDA) and accumulates correctly here."""
    try:
        a = torch.randn(64, 32, device="cuda", dtype=torch.bfloat16)
        b = torch.randn(64, 16, device="cuda", dtype=torch.bfloat16)
        acc = torch.ones(16, 32, device="cuda")
        wgrad_gemm_accum_fp32(a, b, acc)
        ref = 1 + b.float().t() @ a.float()
        return bool(torch.allclose(acc, ref, atol=1e-2, rtol=1e-2))
    except (RuntimeError, TypeError, NotImplementedError):
        return False


def install() -> bool:
    """Make megatron's gradient_accumulation_fusion available; False where it cannot be."""
    from megatron.core.tensor_parallel import layers

    if layers._grad_accum_fusion_available:  # Apex/TE provide it already
        return True
    if not torch.cuda.is_available() or not _works():
        return False
    layers.fused_weight_gradient_mlp_cuda = types.SimpleNamespace(
        wgrad_gemm_accum_fp32=wgrad_gemm_accum_fp32, wgrad_gemm_accum_fp16=wgrad_gemm_accum_fp16
    )
    layers._grad_accum_fusion_available = True
    return True
