"""Batches for the Megatron model, and a forward-only pass through megatron's pipeline schedule.

Input conventions (what the training loop feeds `GPTModel.forward`):

* Padded batch: `tokens` and `position_ids` [b, s] (int64), `attention_mask=None` (causal; pad on
  the right and mask pad tokens out of the loss), optional `labels` [b, s].
* Packed batch (THD): documents concatenated into `tokens` [1, T]; `position_ids` restart at 0
  per document; `packed_seq_params` from `packed_seq_params(lengths)` carries cu_seqlens (int32)
  and the longest document. Attention and RoPE then treat each document on its own.
* With `labels` (same shape as tokens; the next token of each position) the model returns the
  per-token loss [b, s] in fp32 (vocab-parallel cross entropy, fused on GPU); without, logits
  [b, s, padded_vocab / TP] (pass `runtime_gather_output=True` for the full padded vocabulary).
"""

from __future__ import annotations

import torch


def packed_seq_params(lengths: list[int], device=None):
    """PackedSeqParams (THD) for documents of these lengths packed back to back."""
    from megatron.core.packed_seq_params import PackedSeqParams

    cu = torch.zeros(len(lengths) + 1, dtype=torch.int32)
    cu[1:] = torch.cumsum(torch.tensor(lengths, dtype=torch.int32), 0)
    cu = cu.to(device) if device is not None else cu
    longest = int(max(lengths))
    return PackedSeqParams(
        qkv_format="thd",
        cu_seqlens_q=cu,
        cu_seqlens_kv=cu,
        max_seqlen_q=longest,
        max_seqlen_kv=longest,
    )


def pack_documents(docs: list[list[int]], device=None) -> dict:
    """{"tokens": [1, T], "position_ids": [1, T], "packed_seq_params": ...} for token lists."""
    tokens = torch.tensor([t for d in docs for t in d], dtype=torch.long).unsqueeze(0)
    positions = torch.cat([torch.arange(len(d)) for d in docs]).unsqueeze(0)
    return {
        "tokens": tokens.to(device) if device is not None else tokens,
        "position_ids": positions.to(device) if device is not None else positions,
        "packed_seq_params": packed_seq_params([len(d) for d in docs], device),
    }


def padded_batch(tokens: torch.Tensor, device=None) -> dict:
    """{"tokens", "position_ids"} for a [b, s] batch (right padding, causal attention)."""
    tokens = tokens.to(device) if device is not None else tokens
    positions = torch.arange(tokens.shape[1], device=tokens.device).unsqueeze(0).expand_as(tokens)
    return {"tokens": tokens, "position_ids": positions.contiguous(), "packed_seq_params": None}


@torch.no_grad()
def forward_logits(chunks, batches: list[dict], vocab_size: int | None = None) -> list | None:
    """Full-vocabulary logits [b, s, vocab] (fp32, on CPU) for each batch, through megatron's
    forward-only pipeline schedule. Returned on the last pipeline stage; None elsewhere.

    vocab_size cuts Megatron's padded vocabulary back to the checkpoint's.
    """

    def run(model, batch):
        return model(
            batch["tokens"],
            batch["position_ids"],
            None,
            packed_seq_params=batch.get("packed_seq_params"),
            runtime_gather_output=True,
        )

    def collect(output):
        logits = output.float()
        return (logits[..., :vocab_size] if vocab_size else logits).cpu()

    return _forward_only(chunks, batches, run, collect)


@torch.no_grad()
def forward_losses(chunks, batches: list[dict]) -> list | None:
    """Per-token cross entropy [b, s] (fp32, on CPU) for batches that carry "labels"; same
    schedule and return convention as forward_logits."""

    def run(model, batch):
        return model(
            batch["tokens"],
            batch["position_ids"],
            None,
            labels=batch["labels"],
            packed_seq_params=batch.get("packed_seq_params"),
        )

    return _forward_only(chunks, batches, run, lambda output: output.float().cpu())


def _forward_only(chunks, batches, run, collect) -> list | None:
    from megatron.core import parallel_state
    from megatron.core.pipeline_parallel import get_forward_backward_func

    for chunk in chunks:
        chunk.eval()

    def step(data_iterator, model):
        out = run(model, next(data_iterator))
        return out, lambda output, non_loss_data=False: collect(output)

    first = batches[0]["tokens"]
    collected = get_forward_backward_func()(
        forward_step_func=step,
        data_iterator=iter(batches),
        model=chunks,
        num_microbatches=len(batches),
        seq_length=first.shape[1],
        micro_batch_size=first.shape[0],
        forward_only=True,
        collect_non_loss_data=True,
    )
    return list(collected) if parallel_state.is_pipeline_last_stage() else None
