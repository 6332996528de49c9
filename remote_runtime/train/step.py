"""One optimizer step through megatron's forward/backward schedule (pipeline-aware).

Micro-batches come from `remote_runtime.data` with labels already shifted (label t is the token
after t, -100 where no loss is taken). The model returns the per-token cross entropy; the loss
function sums it over loss tokens and returns the count, so megatron normalises by the loss
tokens of the whole global batch (see optim.py).
"""

from __future__ import annotations

from functools import partial

import torch

from remote_runtime.model import expert_wgrad, moe_aux

IGNORE_INDEX = -100


def _packed_seq_params(mb):
    from megatron.core.packed_seq_params import PackedSeqParams

    return PackedSeqParams(
        qkv_format="thd",
        cu_seqlens_q=mb.cu_seqlens,
        cu_seqlens_kv=mb.cu_seqlens,
        max_seqlen_q=mb.max_seqlen,
        max_seqlen_kv=mb.max_seqlen,
    )


def _loss_func(loss_mask: torch.Tensor, per_token_loss: torch.Tensor):
    loss_sum = (per_token_loss.float() * loss_mask).sum()
    num_tokens = loss_mask.sum().to(torch.int)
    return loss_sum, num_tokens, {"lm loss": torch.stack([loss_sum.detach(), num_tokens.float()])}


def token_loss_for(mb):
    """The SFT/PT loss function of a micro-batch: summed token losses over its loss tokens."""
    return partial(_loss_func, mb.loss_mask)


def make_forward_step(loss_for=token_loss_for):
    """megatron's forward_step_func: run one micro-batch, return (output, loss_for(mb))."""

    def forward_step(data_iterator, model):
        mb = next(data_iterator)
        moe_aux.start_micro_batch(mb.loss_mask)  # MoE: the aux loss's scale (a no-op when dense)
        # The vocab-parallel cross entropy needs a valid id everywhere; ignored positions are
        # zeroed by the loss mask instead.
        labels = mb.labels.clamp(min=0)
        output = model(
            mb.tokens,
            mb.position_ids,
            None,
            labels=labels,
            packed_seq_params=_packed_seq_params(mb) if mb.is_thd else None,
        )
        moe_aux.after_forward(output)  # MoE: router counts across stages, recompute's record
        return output, loss_for(mb)

    return forward_step


forward_step = make_forward_step()


def _run_schedule(model, micro_batches, forward_backward, loss_for, forward_only: bool) -> list:
    first = micro_batches[0]
    return forward_backward(
        forward_step_func=make_forward_step(loss_for),
        data_iterator=iter(micro_batches),
        model=model,
        num_microbatches=len(micro_batches),
        seq_length=max(mb.tokens.shape[1] for mb in micro_batches),
        micro_batch_size=1 if first.is_thd else first.tokens.shape[0],
        forward_only=forward_only,
    )


def sum_reports(items: list, device) -> dict[str, torch.Tensor]:
    """The loss functions' report tensors summed over micro-batches, by name (last pipeline
    stage only; an empty dict elsewhere)."""
    totals: dict[str, torch.Tensor] = {}
    for item in items or []:
        for name, value in item.items():
            value = value.to(device)
            totals[name] = totals[name] + value if name in totals else value.clone()
    return totals


def step_optimizer(optimizer):
    """One optimizer step: ours when build_optimizer set it up (the gradient's scaling folded
    into Adam, train/optimizer_step.py), else megatron-core's."""
    scaling = getattr(optimizer, "megafleet_scaling", None)
    if scaling is None:
        return optimizer.step()
    from remote_runtime.train.optimizer_step import optimizer_step

    return optimizer_step(optimizer, scaling)


def train_step(
    model: list,
    optimizer,
    scheduler,
    micro_batches: list,
    forward_backward,
    loss_for=token_loss_for,
    reports: dict | None = None,
):
    """Forward/backward over the micro-batches and one optimizer step.

    Returns (loss_sum_and_count tensor [2] on device — zeros except on the last pipeline stage,
    grad_norm float or None, update_successful bool). `reports`, when given, receives every
    report tensor of the loss functions summed over the micro-batches (see sum_reports).
    """
    for chunk in model:
        chunk.zero_grad_buffer()
    optimizer.zero_grad()
    deferred = expert_wgrad.deferrals(model)  # MoE expert gradients kept over micro-batches
    for d in deferred:
        d.begin_step(len(micro_batches))
    losses = _run_schedule(model, micro_batches, forward_backward, loss_for, forward_only=False)
    for d in deferred:
        d.end_step(micro_batches[0].tokens.device)
    update_successful, grad_norm, _ = step_optimizer(optimizer)
    if update_successful:
        scheduler.step(increment=1)
    device = micro_batches[0].tokens.device
    totals = sum_reports(losses, device)
    if reports is not None:
        reports.update(totals)
    total = totals.get("lm loss", torch.zeros(2, dtype=torch.float32, device=device))
    return total, grad_norm, update_successful


@torch.no_grad()
def forward_only_step(
    model: list, micro_batches: list, forward_backward, loss_for=token_loss_for
) -> list:
    """The loss functions' reports of each micro-batch (last pipeline stage; [] elsewhere), with
    the model in eval mode and no gradient; the model's train/eval mode is restored after."""
    if not micro_batches:
        return []
    modes = [chunk.training for chunk in model]
    for chunk in model:
        chunk.eval()
    try:
        return list(
            _run_schedule(model, micro_batches, forward_backward, loss_for, forward_only=True) or []
        )
    finally:
        for chunk, mode in zip(model, modes):
            chunk.train(mode)
