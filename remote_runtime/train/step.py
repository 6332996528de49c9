"""One optimizer step through megatron's forward/backward schedule (pipeline-aware).

Micro-batches come from `remote_runtime.data` with labels already shifted (label t is the token
after t, -100 where no loss is taken). The model returns the per-token cross entropy; the loss
function sums it over loss tokens and returns the count, so megatron normalises by the loss
tokens of the whole global batch (see optim.py).
"""

from __future__ import annotations

from functools import partial

import torch

from remote_runtime.model import moe_aux

IGNORE_INDEX = -100


def _packed_seq_params(mb):
    from megatron.core.packed_seq_params import PackedSeqParams

    return PackedSeqParams(qkv_format="thd", cu_seqlens_q=mb.cu_seqlens, cu_seqlens_kv=mb.cu_seqlens,
                           max_seqlen_q=mb.max_seqlen, max_seqlen_kv=mb.max_seqlen)


def _loss_func(loss_mask: torch.Tensor, per_token_loss: torch.Tensor):
    loss_sum = (per_token_loss.float() * loss_mask).sum()
    num_tokens = loss_mask.sum().to(torch.int)
    return loss_sum, num_tokens, {"lm loss": torch.stack([loss_sum.detach(), num_tokens.float()])}


def forward_step(data_iterator, model):
    """megatron's forward_step_func: run one micro-batch, return (output, loss function)."""
    mb = next(data_iterator)
    moe_aux.start_micro_batch(mb.loss_mask)  # MoE: the aux loss's scale (a no-op when dense)
    # The vocab-parallel cross entropy needs a valid id everywhere; ignored positions are zeroed
    # by the loss mask instead.
    labels = mb.labels.clamp(min=0)
    output = model(mb.tokens, mb.position_ids, None, labels=labels,
                   packed_seq_params=_packed_seq_params(mb) if mb.is_thd else None)
    return output, partial(_loss_func, mb.loss_mask)


def train_step(model: list, optimizer, scheduler, micro_batches: list, forward_backward):
    """Forward/backward over the micro-batches and one optimizer step.

    Returns (loss_sum_and_count tensor [2] on device — zeros except on the last pipeline stage,
    grad_norm float or None, update_successful bool).
    """
    for chunk in model:
        chunk.zero_grad_buffer()
    optimizer.zero_grad()
    first = micro_batches[0]
    thd = first.is_thd
    seq_length = max(mb.tokens.shape[1] for mb in micro_batches)
    losses = forward_backward(
        forward_step_func=forward_step, data_iterator=iter(micro_batches), model=model,
        num_microbatches=len(micro_batches), seq_length=seq_length,
        micro_batch_size=1 if thd else first.tokens.shape[0], forward_only=False)
    update_successful, grad_norm, _ = optimizer.step()
    if update_successful:
        scheduler.step(increment=1)
    device = first.tokens.device
    total = torch.zeros(2, dtype=torch.float32, device=device)
    for item in losses:
        total += item["lm loss"].to(device)
    return total, grad_norm, update_successful
