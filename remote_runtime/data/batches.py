"""Micro-batches as tensors: THD (packed / padding-free) or padded [b, s].

Labels are shifted here: labels[t] is the token at t+1 when that token is a training target
(an assistant token, or any token for pt) and t+1 is in the same document; else -100. So the
model's output at t is scored against labels[t] with no further shifting, and no position ever
predicts across a document boundary (the last token of each document has label -100).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

IGNORE_INDEX = -100


@dataclass
class MicroBatch:
    """One micro-batch for the forward/backward step.

    THD layout (padding_free / packing): every document of every sample concatenated into
    one row, shape [1, T]; `cu_seqlens` [segments + 1] (int32) gives the document boundaries for
    varlen attention and `max_seqlen` the longest segment. Padding, only when asked for
    (pad_to_multiple_of / fixed_length), is one extra segment at the end with labels -100.

    Padded layout: shape [b, s], one document per row, right-padded; `attention_mask` is True on
    real tokens (the Hugging Face convention, NOT megatron's "True = masked out").
    """

    tokens: torch.Tensor  # int64
    labels: torch.Tensor  # int64, -100 where no loss
    loss_mask: torch.Tensor  # float32, 1.0 where labels != -100
    position_ids: torch.Tensor  # int64, 0.. for each document
    cu_seqlens: torch.Tensor | None  # int32, THD only
    max_seqlen: int | None  # THD only
    attention_mask: torch.Tensor | None  # bool [b, s], padded layout only
    num_tokens: int  # real (non-padding) tokens
    num_loss_tokens: int  # labels != -100
    doc_lengths: list[int]  # real documents (for attention FLOPs: sum of squares)
    num_samples: int
    doc_ids: torch.Tensor | None = None  # int64, the dataset documents of this micro-batch
    ref_logps: torch.Tensor | None = None  # fp32 [documents], reference log-probs (rlhf)

    @property
    def is_thd(self) -> bool:
        return self.cu_seqlens is not None

    def to(self, device) -> "MicroBatch":
        moved = {
            k: (v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v)
            for k, v in self.__dict__.items()
        }
        return MicroBatch(**moved)


def shifted_labels(ids: np.ndarray, mask: np.ndarray) -> np.ndarray:
    labels = np.full(len(ids), IGNORE_INDEX, dtype=np.int64)
    labels[:-1] = np.where(np.asarray(mask[1:]) > 0, ids[1:], IGNORE_INDEX)
    return labels


def _padded_size(n: int, multiple: int, fixed: int | None) -> int:
    if fixed is not None:
        if n > fixed:
            raise ValueError(f"{n} tokens do not fit the fixed length {fixed}")
        return fixed
    return -(-n // multiple) * multiple


def collate_thd(
    docs: list[tuple[np.ndarray, np.ndarray]],
    num_samples: int,
    pad_token_id: int,
    pad_to_multiple_of: int = 1,
    fixed_length: int | None = None,
) -> MicroBatch:
    lengths = [len(ids) for ids, _ in docs]
    real = sum(lengths)
    total = _padded_size(real, pad_to_multiple_of, fixed_length)
    tokens = np.full(total, pad_token_id, dtype=np.int64)
    labels = np.full(total, IGNORE_INDEX, dtype=np.int64)
    positions = np.zeros(total, dtype=np.int64)
    at = 0
    for ids, mask in docs:
        n = len(ids)
        tokens[at : at + n] = ids
        labels[at : at + n] = shifted_labels(ids, mask)
        positions[at : at + n] = np.arange(n)
        at += n
    segments = lengths + ([total - real] if total > real else [])
    positions[real:] = np.arange(total - real)
    cu = np.zeros(len(segments) + 1, dtype=np.int32)
    np.cumsum(segments, out=cu[1:])
    return _micro_batch(
        tokens[None],
        labels[None],
        positions[None],
        torch.from_numpy(cu),
        max(segments),
        None,
        lengths,
        num_samples,
    )


def collate_padded(
    docs: list[tuple[np.ndarray, np.ndarray]],
    pad_token_id: int,
    pad_to_multiple_of: int = 1,
    fixed_length: int | None = None,
) -> MicroBatch:
    lengths = [len(ids) for ids, _ in docs]
    width = _padded_size(max(lengths), pad_to_multiple_of, fixed_length)
    tokens = np.full((len(docs), width), pad_token_id, dtype=np.int64)
    labels = np.full((len(docs), width), IGNORE_INDEX, dtype=np.int64)
    valid = np.zeros((len(docs), width), dtype=bool)
    for row, (ids, mask) in enumerate(docs):
        tokens[row, : len(ids)] = ids
        labels[row, : len(ids)] = shifted_labels(ids, mask)
        valid[row, : len(ids)] = True
    positions = np.broadcast_to(np.arange(width, dtype=np.int64), (len(docs), width)).copy()
    return _micro_batch(
        tokens, labels, positions, None, None, torch.from_numpy(valid), lengths, len(docs)
    )


def _micro_batch(
    tokens, labels, positions, cu_seqlens, max_seqlen, attention_mask, lengths, num_samples
) -> MicroBatch:
    labels_t = torch.from_numpy(labels)
    loss_mask = (labels_t != IGNORE_INDEX).float()
    return MicroBatch(
        tokens=torch.from_numpy(tokens),
        labels=labels_t,
        loss_mask=loss_mask,
        position_ids=torch.from_numpy(positions),
        cu_seqlens=cu_seqlens,
        max_seqlen=max_seqlen,
        attention_mask=attention_mask,
        num_tokens=sum(lengths),
        num_loss_tokens=int(loss_mask.sum().item()),
        doc_lengths=lengths,
        num_samples=num_samples,
    )
