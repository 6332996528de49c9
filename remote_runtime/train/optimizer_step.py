"""The optimizer step with the gradient's scaling folded into Adam.

megatron-core's step, without transformer-engine or apex, makes passes over the fp32 gradients
that cost as much as Adam itself on a large model: `finalize_model_grads` multiplies every
gradient by 1 / (loss tokens of the global batch) (8 bytes per parameter), the norm is taken
tensor by tensor with a device-to-host copy per tensor, and clipping multiplies every gradient
again through a temporary (`dst.copy_(src * scale)`, 16 bytes per parameter). On Qwen3-30B-A3B
cut to 8 layers (5.6B parameters) that is about 40 ms of a 580 ms step.

Here the two multiplications become one factor, computed on the device (no host sync), that
the optimizer applies as it reads each gradient: megafleet's AdamW (train/adamw.py, GPU)
multiplies by it in its kernel, torch's fused AdamW divides by its `grad_scale` in the same
kernel; the foreach AdamW (CPU) gets one `_foreach_mul_` first. The norm is one
`_foreach_norm` per sub-optimizer. The result equals megatron's step
(tests/runtime/test_optimizer_step.py): same gradient norm (of the token-averaged gradients,
before clipping), same clipping rule, same update up to fp32 rounding.
"""

from __future__ import annotations

import torch

from remote_runtime.train.adamw import AdamW, writes_model_weights
from remote_runtime.train.optim import sub_optimizers


class GradScaling:
    """What the step needs to scale the gradients: 1 / (loss tokens of the global batch), set
    by `finalize` after the backward passes, and the clipping threshold."""

    def __init__(self, clip_grad: float):
        self.clip_grad = clip_grad
        self.token_scale: torch.Tensor | None = None

    def finalize(self, model, num_tokens, pg_collection=None, force_all_reduce=False):
        """megatron's `finalize_model_grads` (gradient reductions) without its scaling pass:
        the loss-token count is reduced as megatron reduces it and kept for the step."""
        from megatron.core import parallel_state
        from megatron.core.distributed import finalize_model_grads
        from megatron.core.pipeline_parallel.utils import get_pp_last_rank

        finalize_model_grads(
            model, None, pg_collection=pg_collection, force_all_reduce=force_all_reduce
        )
        if num_tokens is None:
            self.token_scale = None
            return
        if pg_collection is not None:
            pp_group, dp_cp_group = pg_collection.pp, pg_collection.dp_cp
        else:
            pp_group = parallel_state.get_pipeline_model_parallel_group()
            dp_cp_group = parallel_state.get_data_parallel_group(with_context_parallel=True)
        # the count is only on the last pipeline stage; then summed over data-parallel ranks
        torch.distributed.broadcast(num_tokens, src=get_pp_last_rank(pp_group), group=pp_group)
        torch.distributed.all_reduce(num_tokens, group=dp_cp_group)
        count = num_tokens.float()
        # no loss token anywhere: megatron leaves the gradients unscaled
        self.token_scale = torch.where(count > 0, 1.0 / count.clamp(min=1.0), 1.0)


def _squared_norm(opt, device) -> torch.Tensor:
    """Sum of squares of the gradients this sub-optimizer counts in the norm (no shared or
    tensor-parallel duplicate), summed over its gradient-statistics group."""
    grads = opt.get_main_grads_for_grad_norm()
    if grads:
        part = torch.stack(torch._foreach_norm(grads)).float().square().sum()
    else:
        part = torch.zeros((), dtype=torch.float32, device=device)
    torch.distributed.all_reduce(part, group=opt.get_grad_stats_parallel_group())
    return part


def _apply_factor(opt, factor: torch.Tensor) -> None:
    """Make `opt`'s torch optimizer see every gradient times `factor` (a 0-dim tensor)."""
    inner = getattr(opt, "optimizer", None)
    if inner is None or getattr(opt, "is_stub_optimizer", False):
        return
    if all(group.get("fused") for group in inner.param_groups):
        inner.grad_scale = factor.reciprocal().reshape(1)  # fused Adam divides by it, in-kernel
        return
    grads = [p.grad for g in inner.param_groups for p in g["params"] if p.grad is not None]
    if grads:
        torch._foreach_mul_(grads, factor)


@torch.no_grad()
def optimizer_step(optimizer, scaling: GradScaling):
    """megatron's `optimizer.step()` (bf16, no loss scaler) with the token average and the
    clipping applied by the optimizer kernel. Returns (update_successful, grad_norm, None)."""
    subs = sub_optimizers(optimizer)
    if optimizer.prepare_grads():  # True only with a loss scaler (fp16), which is not used
        return False, None, None
    scale = scaling.token_scale
    device = scale.device if scale is not None else _grad_device(subs)
    norm = sum(_squared_norm(opt, device) for opt in subs).sqrt()
    factor = torch.ones((), dtype=torch.float32, device=device) if scale is None else scale
    norm = norm * factor
    if scaling.clip_grad > 0.0:
        factor = factor * (scaling.clip_grad / (norm + 1.0e-6)).clamp(max=1.0)
    # megafleet's AdamW (train/adamw.py) takes the factor itself and writes the model weights
    with writes_model_weights(optimizer, factor):
        for opt in subs:
            if not isinstance(getattr(opt, "optimizer", None), AdamW):
                _apply_factor(opt, factor)
        try:
            success = optimizer.step_with_ready_grads()
        finally:
            for opt in subs:
                inner = getattr(opt, "optimizer", None)
                if inner is not None and hasattr(inner, "grad_scale"):
                    del inner.grad_scale
    return success, float(norm), None


def _grad_device(subs) -> torch.device:
    for opt in subs:
        for grad in opt.get_main_grads_for_grad_norm():
            return grad.device
    if torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")
