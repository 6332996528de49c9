"""Samples: what one entry of a batch is. One document, or a pack of documents (packing).

Packing is best-fit decreasing bin packing: documents longest first, each into the pack whose
free space fits it most tightly, else a new pack; no pack exceeds max_length and every document
lands in exactly one pack. The result is deterministic (no randomness; the sample order is
shuffled later, per epoch). Documents stay separate inside a pack: the batch code gives each
its own position ids and cu_seqlens boundary, and the attention isolates them.
"""

from __future__ import annotations

from bisect import bisect_left, insort
from dataclasses import dataclass

import numpy as np


@dataclass
class Samples:
    """Sample i is the documents docs[offsets[i]:offsets[i+1]]."""

    offsets: np.ndarray  # int64 [samples + 1]
    docs: np.ndarray  # int64 document indices

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def __getitem__(self, i: int) -> np.ndarray:
        return self.docs[self.offsets[i] : self.offsets[i + 1]]


def one_document_per_sample(num_documents: int) -> Samples:
    return Samples(
        np.arange(num_documents + 1, dtype=np.int64), np.arange(num_documents, dtype=np.int64)
    )


def pack_documents(lengths: np.ndarray, max_length: int) -> Samples:
    """Best-fit decreasing packing of documents with these lengths into packs of <= max_length."""
    lengths = np.asarray(lengths, dtype=np.int64)
    if len(lengths) and int(lengths.max()) > max_length:
        raise ValueError(
            f"a document of {int(lengths.max())} tokens exceeds max_length={max_length}"
        )
    packs: list[list[int]] = []
    by_room: dict[int, list[int]] = {}  # free tokens -> packs with exactly that much room
    rooms: list[int] = []  # sorted keys of by_room
    for doc in np.argsort(-lengths, kind="stable").tolist():
        size = int(lengths[doc])
        i = bisect_left(rooms, size)
        if i < len(rooms):
            room = rooms[i]
            pack = by_room[room].pop()
            if not by_room[room]:
                del by_room[room]
                rooms.pop(i)
        else:
            room, pack = max_length, len(packs)
            packs.append([])
        packs[pack].append(doc)
        left = room - size
        if left > 0:
            if left not in by_room:
                by_room[left] = []
                insort(rooms, left)
            by_room[left].append(pack)
    offsets = np.zeros(len(packs) + 1, dtype=np.int64)
    np.cumsum([len(p) for p in packs], out=offsets[1:])
    docs = np.fromiter((d for p in packs for d in p), dtype=np.int64, count=int(offsets[-1]))
    return Samples(offsets, docs)


def sample_lengths(samples: Samples, doc_lengths: np.ndarray) -> np.ndarray:
    """Tokens per sample."""
    csum = np.concatenate([[0], np.cumsum(np.asarray(doc_lengths, np.int64)[samples.docs])])
    return csum[samples.offsets[1:]] - csum[samples.offsets[:-1]]


def dataset_samples(
    lengths: np.ndarray, group: int, packing: bool, max_length: int | None
) -> Samples:
    """The samples of a dataset whose documents come in units of `group` (2: preference pairs).

    Without packing a sample is one unit; with packing, units are packed whole (a pair's two
    answers always share a pack, hence a micro-batch) into packs of <= group x max_length tokens.
    """
    unit_lengths = np.asarray(lengths, np.int64).reshape(-1, group).sum(1)
    units = (
        pack_documents(unit_lengths, max_length * group)
        if packing
        else one_document_per_sample(len(unit_lengths))
    )
    if group == 1:
        return units
    docs = (units.docs[:, None] * group + np.arange(group)).ravel()
    return Samples(units.offsets * group, docs)
