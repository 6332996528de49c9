"""AdamW in one Triton pass per parameter: moments in fp32 or bf16, the bf16 model weight written
in the same pass.

Why: on one GPU the optimizer step is bound by memory. torch's fused AdamW reads the fp32 main
parameter, gradient and both moments and writes the parameter and moments back (28 bytes per
parameter); megatron then copies every fp32 main parameter into its bf16 model parameter in a
second pass (6 more bytes). Here one kernel does both (30 bytes). With bf16 moments (megatron's
`use_precision_aware_optimizer` with `exp_avg_dtype` / `exp_avg_sq_dtype` bf16) it moves 22 bytes
and the moments take 4 bytes per parameter instead of 8.

The update is torch's AdamW (decoupled weight decay, no amsgrad) in the order of torch's fused
kernel, so fp32 moments give torch's result up to fp32 rounding. The state keeps torch's layout
(a `step` tensor, `exp_avg`, `exp_avg_sq` per parameter): megatron's distributed checkpoints
save and load it unchanged (its fp32 buffers take bf16 moments and cast them back on load).

bf16 moments round each update to bf16 (8 significant bits): an update smaller than about 0.4%
of a moment is lost. With the usual beta2 of 0.95 the second moment moves 5% per step; with
beta2 0.999 it moves 0.1% and stalls where the gradient is steady. That is the trade megatron's
precision-aware optimizer makes too; fp32 stays the default.

Installed by `install(optimizer, ...)` into megatron's optimizer: the torch AdamW megatron
built becomes this class (same parameter groups and state). train/optim.py installs it on GPU
always, on CPU only for bf16 moments (CPU runs keep torch's AdamW). The model weight is written
by the kernel only inside `writes_model_weights(...)` (train/optimizer_step.py wraps the
training step's optimizer call in it), which also stops megatron's own copy; every other step
(megatron's dummy step before loading a checkpoint, its own `step()`) leaves the copy to
megatron.
"""

from __future__ import annotations

import contextlib

import torch

from remote_runtime.train.optim import sub_optimizers

MOMENT_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
BLOCK = 2048  # elements per Triton program
NUM_WARPS = 8


class AdamW(torch.optim.AdamW):
    """torch's AdamW with a Triton update (GPU) and a choice of moment dtype. Built only by
    `install` (class swap of the AdamW megatron made), which sets the attributes below."""

    exp_avg_dtype: torch.dtype = torch.float32
    exp_avg_sq_dtype: torch.dtype = torch.float32
    # main parameter -> the bf16 model tensor (same number of elements) the kernel writes
    model_weights: dict | None = None
    write_model_weights: bool = False
    # gradient factor (0-dim fp32 tensor on the device) the next step applies; None: 1
    grad_factor: torch.Tensor | None = None

    def _state(self, param: torch.Tensor) -> dict:
        state = self.state[param]
        if not state:
            # torch's fused layout: the step count is a float32 tensor on the parameter's device
            state["step"] = torch.zeros((), dtype=torch.float32, device=param.device)
            state["exp_avg"] = torch.zeros_like(param, dtype=self.exp_avg_dtype)
            state["exp_avg_sq"] = torch.zeros_like(param, dtype=self.exp_avg_sq_dtype)
        return state

    @torch.no_grad()
    def step(self, closure=None):
        if closure is not None:
            raise ValueError("megafleet's AdamW takes no closure")
        for group in self.param_groups:
            if group.get("amsgrad") or group.get("maximize"):
                raise ValueError("megafleet's AdamW implements neither amsgrad nor maximize")
            params = [p for p in group["params"] if p.grad is not None]
            if not params:
                continue
            states = [self._state(p) for p in params]
            steps = [s["step"] for s in states]
            torch._foreach_add_(steps, 1.0)
            scalars = self._scalars(group, steps[0])
            for param, state in zip(params, states):
                out = self.model_weights.get(param) if self.write_model_weights else None
                # (write_model_weights is only set where model_weights holds every parameter)
                m, v = state["exp_avg"], state["exp_avg_sq"]
                update(param, param.grad, m, v, out, scalars, group)
        return None

    def _scalars(self, group: dict, step: torch.Tensor) -> torch.Tensor:
        """[gradient factor, lr / bias_correction1, sqrt(bias_correction2)] on the device, from
        the step tensor (all parameters of a group step together), with no host sync."""
        beta1, beta2 = group["betas"]
        step = step.to(torch.float32)
        factor = self.grad_factor
        if factor is None:
            factor = torch.ones((), dtype=torch.float32, device=step.device)
        return torch.stack(
            [
                factor.to(device=step.device, dtype=torch.float32).reshape(()),
                group["lr"] / (1.0 - torch.pow(beta1, step)),
                (1.0 - torch.pow(beta2, step)).sqrt(),
            ]
        )


def update(param, grad, exp_avg, exp_avg_sq, out, scalars, group) -> None:
    """One parameter's AdamW update (see `triton_kernels.adamw_step`); `out`, if given, receives
    the updated parameter in its own dtype."""
    beta1, beta2 = group["betas"]
    lr, eps, decay = float(group["lr"]), float(group["eps"]), float(group["weight_decay"])
    tensors = (param, grad, exp_avg, exp_avg_sq) + ((out,) if out is not None else ())
    if param.is_cuda and all(t.is_contiguous() for t in tensors) or _interpreted(param):
        from remote_runtime.model import triton_kernels
        from remote_runtime.model.ops import triton_cdiv

        n = param.numel()
        triton_kernels.adamw_step[(triton_cdiv(n, BLOCK),)](
            param,
            grad,
            exp_avg,
            exp_avg_sq,
            out if out is not None else param,
            scalars,
            n,
            lr,
            beta1,
            beta2,
            eps,
            decay,
            HAS_OUT=out is not None,
            BLOCK=BLOCK,
            num_warps=NUM_WARPS,
        )
        return
    factor, step_size, bc2_sqrt = scalars.unbind()
    g = grad.to(torch.float32) * factor
    m, v = exp_avg.to(torch.float32), exp_avg_sq.to(torch.float32)
    param.sub_(lr * decay * param)
    m.mul_(beta1).add_(g, alpha=1.0 - beta1)
    v.mul_(beta2).addcmul_(g, g, value=1.0 - beta2)
    param.sub_(step_size * m / (v.sqrt() / bc2_sqrt + eps))
    exp_avg.copy_(m)
    exp_avg_sq.copy_(v)
    if out is not None:
        out.view(-1).copy_(param.view(-1))


def _interpreted(param: torch.Tensor) -> bool:
    """CPU tensors through the kernel: only under Triton's interpreter and only when a test asks
    (`MEGAFLEET_ADAMW_KERNEL_ON_CPU`), so CPU training runs keep the torch path."""
    import os

    from remote_runtime.model import ops

    return (
        not param.is_cuda
        and ops.interpreted()
        and os.environ.get("MEGAFLEET_ADAMW_KERNEL_ON_CPU") == "1"
    )


def install(
    optimizer,
    exp_avg_dtype: torch.dtype = torch.float32,
    exp_avg_sq_dtype: torch.dtype = torch.float32,
) -> list:
    """Make the torch AdamW inside each of megatron's (chained) optimizers this class, before its
    first step (the state is created in the chosen dtypes). Returns the AdamW instances."""
    installed = []
    for opt in sub_optimizers(optimizer):
        inner = getattr(opt, "optimizer", None)
        if not isinstance(inner, torch.optim.Adam):  # AdamW is a subclass
            continue
        params = [p for g in inner.param_groups for p in g["params"]]
        if not params:
            continue
        on_gpu = all(p.is_cuda for p in params)
        if inner.state:
            raise RuntimeError("the optimizer has state already: install before the first step")
        if not all(p.dtype == torch.float32 for p in params):
            raise RuntimeError("megafleet's AdamW updates fp32 main parameters only")
        inner.__class__ = AdamW
        inner.exp_avg_dtype, inner.exp_avg_sq_dtype = exp_avg_dtype, exp_avg_sq_dtype
        inner.model_weights = _model_weights(opt)
        for group in inner.param_groups:
            # torch's load_state_dict keeps a fused optimizer's step tensors on the device
            group.update(fused=on_gpu, foreach=False)
        installed.append(inner)
    return installed


def _model_weights(opt) -> dict:
    """main parameter -> the model tensor megatron's `_copy_main_params_to_model_params` copies
    it into, for megatron's two bf16 optimizers; {} when the layout is another (fp32 model
    parameters, which megatron keeps copying itself)."""
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

    pairs = {}
    if isinstance(opt, DistributedOptimizer):
        if any(opt.shard_fp32_groups) or getattr(opt.ddp_config, "use_megatron_fsdp", False):
            return {}
        for mains, models in zip(opt.shard_fp32_from_float16_groups, opt.model_float16_groups):
            for main, model in zip(mains, models):
                world = opt._get_model_param_range_map(model)["gbuf_world_in_bucket"]
                gbuf_index, _, bucket_id = opt.model_param_gbuf_map[model]
                data = opt.buffers[gbuf_index].buckets[bucket_id].param_data
                pairs[main] = data.view(-1)[world.start : world.end]
    elif hasattr(opt, "fp32_from_float16_groups"):
        if any(getattr(opt, "fp32_from_fp32_groups", [])):
            return {}
        for mains, models in zip(opt.fp32_from_float16_groups, opt.float16_groups):
            for main, model in zip(mains, models):
                pairs[main] = model.data
    for main, model in pairs.items():
        if model.numel() != main.numel() or not model.is_contiguous():
            return {}
    return pairs


@contextlib.contextmanager
def writes_model_weights(optimizer, factor: torch.Tensor | None):
    """Within: each megafleet AdamW applies `factor` to the gradients and, where it knows every
    model weight of its sub-optimizer, writes them in its kernel, and megatron's copy of the
    main parameters into the model weights is skipped for that sub-optimizer."""
    touched = []
    try:
        for opt in sub_optimizers(optimizer):
            inner = getattr(opt, "optimizer", None)
            if not isinstance(inner, AdamW):
                continue
            inner.grad_factor = factor
            touched.append((opt, inner))
            if inner.model_weights and not getattr(opt, "is_stub_optimizer", False):
                inner.write_model_weights = True
                opt._copy_main_params_to_model_params = _no_copy
        yield
    finally:
        for opt, inner in touched:
            inner.grad_factor = None
            inner.write_model_weights = False
            opt.__dict__.pop("_copy_main_params_to_model_params", None)


def _no_copy() -> None:
    """megatron's main-to-model copy, done by the AdamW kernel instead."""
