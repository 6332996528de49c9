"""RMSNorm for the local (non-Transformer-Engine) layer spec.

Megatron's local spec uses `WrappedTorchNorm`, which refuses sequence parallelism because it
cannot mark its weight for the tensor-parallel gradient all-reduce. This one marks it
(`weight.sequence_parallel`, read by megatron's finalize_model_grads), and computes exactly as
Hugging Face's Llama/Qwen RMSNorm does (normalise in fp32, cast back, then scale), so bf16 logits
match transformers as closely as possible.
"""

from __future__ import annotations

import torch


class RMSNorm(torch.nn.Module):
    def __init__(self, config, hidden_size: int, eps: float = 1e-6, **_unused):
        super().__init__()
        self.eps = eps
        self.weight = torch.nn.Parameter(
            torch.ones(hidden_size, dtype=config.params_dtype, device=torch.cuda.current_device())
        )
        # Sequence parallel: each TP rank sees a slice of the sequence, so the weight's gradient
        # is partial and megatron must sum it over the TP group.
        self.weight.sequence_parallel = bool(config.sequence_parallel)

    kernel = "eager"  # set by rms_norm_class: "compile" or "triton" run one kernel per direction

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.kernel == "triton":
            from remote_runtime.model.ops import rms_norm

            return rms_norm(x, self.weight, self.eps)
        if self.kernel == "compile":
            from remote_runtime.model.compiled import rms_norm

            return rms_norm(x, self.weight, self.eps)
        dtype = x.dtype
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(dtype)


class CompiledRMSNorm(RMSNorm):
    kernel = "compile"


class TritonRMSNorm(RMSNorm):
    kernel = "triton"


def rms_norm_class(kernel: str) -> type:
    """RMSNorm computing with `kernel`: eager | compile | triton."""
    return {"eager": RMSNorm, "compile": CompiledRMSNorm, "triton": TritonRMSNorm}[kernel]
