"""megatron-core DistributedDataParallel, the (distributed) Adam optimizer and the LR schedule.

Loss normalisation: the loss function returns (sum of token losses, number of loss tokens), and
`calculate_per_token_loss` makes megatron divide the summed gradients by the loss tokens of the
whole global batch (all micro-batches, all data-parallel ranks). Every token of the global batch
therefore weighs the same, however documents are packed or split across ranks.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

from remote_runtime.spec.config import JobConfig

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Schedule:
    train_iters: int
    warmup_iters: int
    decay_iters: int


def schedule_for(job: JobConfig, train_iters: int) -> Schedule:
    o = job.optim
    if o.lr_warmup_fraction is not None:
        warmup = int(math.ceil(o.lr_warmup_fraction * train_iters))
    else:
        warmup = o.lr_warmup_iters
    warmup = min(warmup, max(train_iters - 1, 0))
    return Schedule(train_iters=train_iters, warmup_iters=warmup, decay_iters=train_iters)


def check_one_device(chunks: list) -> None:
    """All parameters on one device, or a RuntimeError naming those elsewhere (DDP's
    broadcast would otherwise fail with "No backend type associated with device type cpu"
    and no parameter name: a module that builds a weight on the CPU, megatron's Router for one,
    and is frozen so that DDP does not move it)."""
    where: dict[str, list[str]] = {}
    for i, chunk in enumerate(chunks):
        for name, param in chunk.named_parameters():
            where.setdefault(str(param.device), []).append(f"chunk {i}: {name}")
    if len(where) > 1:
        main = max(where, key=lambda d: len(where[d]))
        others = "; ".join(
            f"{device}: {', '.join(names[:5])}{' ...' if len(names) > 5 else ''}"
            for device, names in where.items()
            if device != main
        )
        raise RuntimeError(
            f"model parameters are not all on {main} ({others}): the module that builds them "
            "must be moved to the training device (remote_runtime/model/builder.py build_model)"
        )


def wrap_ddp(chunks: list, job: JobConfig) -> list:
    """Wrap each model chunk in megatron's DDP (gradients reduced in fp32 buckets)."""
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig

    par = job.parallel
    ddp_config = DistributedDataParallelConfig(
        grad_reduce_in_fp32=True,
        overlap_grad_reduce=par.overlap_grad_reduce,
        overlap_param_gather=par.overlap_param_gather,
        use_distributed_optimizer=par.use_distributed_optimizer,
        check_for_nan_in_grad=False,
        average_in_collective=False,
    )
    check_one_device(chunks)
    wrapped = []
    for i, chunk in enumerate(chunks):
        chunk.config.calculate_per_token_loss = True
        wrapped.append(
            DistributedDataParallel(
                config=chunk.config, ddp_config=ddp_config, module=chunk, disable_bucketing=i > 0
            )
        )
    for m in wrapped:
        m.broadcast_params()  # identical starting weights on every DP rank
    return wrapped


def build_optimizer(
    model: list, job: JobConfig, schedule: Schedule, fold_grad_scaling=True, adam="megafleet"
):
    """(optimizer, scheduler) for the wrapped chunks; installs megatron's grad hooks.

    With `fold_grad_scaling` (the default) the token average and the clipping are applied by
    the optimizer kernel (train/optimizer_step.py; `train_step` uses it); False keeps
    megatron-core's own step (the benchmarks' ablation). `adam`: "megafleet" (train/adamw.py:
    one Triton pass that also writes the bf16 weights, moments in the job's dtypes) or "torch"
    (torch's fused AdamW on GPU, megatron's copy of the weights after it: the ablation)."""
    from megatron.core.distributed import finalize_model_grads
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
    from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

    o, par = job.optim, job.parallel
    config = model[0].config
    opt_config = OptimizerConfig(
        optimizer="adam",
        lr=o.lr,
        min_lr=o.min_lr,
        weight_decay=o.weight_decay,
        adam_beta1=o.adam_beta1,
        adam_beta2=o.adam_beta2,
        adam_eps=o.adam_eps,
        clip_grad=o.clip_grad,
        bf16=config.bf16,
        fp16=False,
        params_dtype=config.params_dtype,
        use_distributed_optimizer=par.use_distributed_optimizer,
        overlap_param_gather=par.overlap_param_gather,
    )
    # On CPU the world group is gloo already and platform.init_distributed creates no extra
    # gloo groups; on GPU it does, for megatron's host-side optimizer collectives.
    import torch

    optimizer = get_megatron_optimizer(
        opt_config, model, use_gloo_process_groups=torch.distributed.get_backend() != "gloo"
    )
    if adam == "megafleet":
        from remote_runtime.train import adamw

        aware = o.use_precision_aware_optimizer
        names = [d if aware else "fp32" for d in (o.exp_avg_dtype, o.exp_avg_sq_dtype)]
        on_gpu = any(p.is_cuda for m in model for p in m.parameters())
        if on_gpu or names != ["fp32", "fp32"]:  # CPU, fp32 moments: torch's AdamW as built
            if adamw.install(optimizer, *(adamw.MOMENT_DTYPES[n] for n in names)):
                log.info("optimizer: megafleet AdamW, moments exp_avg %s, exp_avg_sq %s", *names)
    elif adam == "torch":
        if o.use_precision_aware_optimizer and "bf16" in (o.exp_avg_dtype, o.exp_avg_sq_dtype):
            raise ValueError("bf16 Adam moments need megafleet's AdamW (adam='megafleet')")
        _use_fused_adam(optimizer)
    else:
        raise ValueError(f"adam={adam!r}: megafleet or torch")
    scheduler = OptimizerParamScheduler(
        optimizer,
        init_lr=0.0 if schedule.warmup_iters else o.lr,
        max_lr=o.lr,
        min_lr=o.min_lr,
        lr_warmup_steps=schedule.warmup_iters,
        lr_decay_steps=max(schedule.decay_iters, 1),
        lr_decay_style=o.lr_decay_style,
        start_wd=o.weight_decay,
        end_wd=o.weight_decay,
        wd_incr_steps=max(schedule.train_iters, 1),
        wd_incr_style="constant",
        use_checkpoint_opt_param_scheduler=False,
        override_opt_param_scheduler=True,
    )
    # Hooks megatron's schedules call: loss scaling, grad sync batching and the final reduction.
    config.grad_scale_func = optimizer.scale_loss
    config.finalize_model_grads_func = finalize_model_grads
    if fold_grad_scaling:
        from remote_runtime.train.optimizer_step import GradScaling

        optimizer.megafleet_scaling = GradScaling(o.clip_grad)
        config.finalize_model_grads_func = optimizer.megafleet_scaling.finalize
    config.no_sync_func = [m.no_sync for m in model] if len(model) > 1 else model[0].no_sync
    if par.overlap_grad_reduce:
        config.grad_sync_func = (
            [m.start_grad_sync for m in model] if len(model) > 1 else model[0].start_grad_sync
        )
    if par.overlap_param_gather and par.use_distributed_optimizer:
        config.param_sync_func = (
            [m.start_param_sync for m in model] if len(model) > 1 else model[0].start_param_sync
        )
    return optimizer, scheduler


def sub_optimizers(optimizer) -> list:
    """megatron's optimizers inside its (chained) optimizer, or [optimizer]."""
    return list(getattr(optimizer, "chained_optimizers", [optimizer]))


def inner_optimizers(optimizer) -> list:
    """The torch optimizers inside megatron's (chained) optimizer."""
    return [
        opt.optimizer
        for opt in sub_optimizers(optimizer)
        if getattr(opt, "optimizer", None) is not None
    ]


def _use_fused_adam(optimizer) -> None:
    """Without TE/Apex megatron-core builds torch's AdamW in its default (foreach) mode, which
    keeps an fp32 temporary per parameter shard at the step. On GPU, torch's fused AdamW does the
    same update in one kernel with no temporaries (before the first step, so state is created
    in the fused layout)."""
    import torch

    for inner in inner_optimizers(optimizer):
        if not isinstance(inner, torch.optim.Adam):  # AdamW is a subclass
            continue
        params = [p for g in inner.param_groups for p in g["params"]]
        if params and all(p.is_cuda and p.dtype == torch.float32 for p in params):
            inner.defaults.update(fused=True, foreach=False)
            for group in inner.param_groups:
                group.update(fused=True, foreach=False)


def current_lr(optimizer) -> float:
    return float(optimizer.param_groups[0]["lr"])
