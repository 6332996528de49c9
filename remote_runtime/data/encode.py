"""Tokenizing the rows of one file, in `dataset_num_proc` worker processes.

Each row becomes a document (ids + loss mask) or is dropped; the result keeps, per row, the
document it became and why it was changed or dropped, so `path#N` sampling and the statistics
can be applied later without tokenizing again.
"""

from __future__ import annotations

import multiprocessing
import os
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from remote_runtime.data.chat import ChatEncoder
from remote_runtime.data.sources import parse_json_line, read_rows
from remote_runtime.spec.errors import DataError, RowError
from remote_runtime.spec.formats import detect_format, row_to_example

# Row status codes, stored in the cache.
ROW_OK, ROW_TRUNCATED, ROW_NO_LOSS, ROW_TOO_LONG = 0, 1, 2, 3


@dataclass(frozen=True)
class EncodeSettings:
    """Everything besides the data and the tokenizer that changes the tokens (part of the cache
    key)."""

    task: str = "sft"  # sft, rlhf: loss on assistant tokens; pt: loss on every token
    max_length: int = 2048
    truncation_strategy: str = "right"  # right | left | delete
    system: str | None = None  # default system prompt for chat rows without one


@dataclass
class FileTokens:
    """The tokenized rows of one file. Arrays may be memory-mapped from the cache."""

    ids: np.ndarray  # int32, every document's tokens, concatenated
    loss_mask: np.ndarray  # uint8, 1 where the token is a training target
    offsets: np.ndarray  # int64 [documents + 1]: document d is ids[offsets[d]:offsets[d+1]]
    doc_loss: np.ndarray  # int64 [documents]: training targets per document (mask[1:].sum())
    row_doc: np.ndarray  # int64 [rows]: the document of each row, -1 if it was dropped
    row_status: np.ndarray  # int8 [rows]: ROW_OK | ROW_TRUNCATED | ROW_NO_LOSS | ROW_TOO_LONG
    format: str

    @property
    def num_rows(self) -> int:
        return len(self.row_doc)


def truncate(ids: np.ndarray, mask: np.ndarray, settings: EncodeSettings):
    """(ids, mask, status) after applying max_length and the truncation strategy."""
    n, limit = len(ids), settings.max_length
    status = ROW_OK
    if n > limit:
        if settings.truncation_strategy == "delete":
            return ids, mask, ROW_TOO_LONG
        keep = slice(0, limit) if settings.truncation_strategy == "right" else slice(n - limit, n)
        ids, mask, status = ids[keep], mask[keep], ROW_TRUNCATED
    # Token 0 is never a target (nothing predicts it), so it does not count as a loss token.
    if not mask[1:].any():
        return ids, mask, ROW_NO_LOSS
    return ids, mask, status


def docs_per_row(task: str) -> int:
    """Documents one row becomes: 2 for preference pairs (chosen, then rejected), else 1."""
    return 2 if task == "rlhf" else 1


def encode_row(encoder: ChatEncoder, example, settings: EncodeSettings):
    """(documents [(ids, mask)], status) of one row after truncation; no documents if dropped.

    A preference pair is kept or dropped whole: each answer is truncated on its own (as ms-swift
    encodes each of the two sequences), and if either is too long (delete) or has no answer
    token left, the pair is dropped.
    """
    wants_pair = settings.task == "rlhf"
    if isinstance(example, tuple) != wants_pair:
        raise RowError(
            "a preference row (chosen/rejected) needs the rlhf task"
            if not wants_pair
            else "rlhf trains on preference pairs: rows need 'messages' + "
            "'rejected_response', 'chosen' + 'rejected' (+ 'prompt')"
        )
    parts = example if wants_pair else (example,)
    docs, statuses = [], []
    for part in parts:
        ids, mask, status = truncate(*encode_example(encoder, part, settings), settings)
        docs.append((ids, mask))
        statuses.append(status)
    for bad in (ROW_TOO_LONG, ROW_NO_LOSS):
        if bad in statuses:
            return [], bad
    return docs, max(statuses)


def encode_example(encoder: ChatEncoder, example: list[dict] | str, settings: EncodeSettings):
    if isinstance(example, str):
        if settings.task != "pt":
            raise RowError(
                "a 'text' row has no assistant turn to train on; text rows are for "
                "pre-training (`pt`); for `sft` use messages, sharegpt, alpaca or "
                "query/response rows"
            )
        return encoder.encode_text(example)
    return encoder.encode_chat(example, train_all=settings.task == "pt")


# ---- worker side ----------------------------------------------------------------------------

_WORKER: dict = {}


def _init_worker(tokenizer, settings: EncodeSettings) -> None:
    # One worker per core already; the Rust tokenizer's own thread pool would oversubscribe.
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    _WORKER["encoder"] = ChatEncoder(tokenizer, settings.system)
    _WORKER["settings"] = settings


def _encode_chunk(job: tuple[str, str, list[tuple[int, object]]]):
    """Encode rows; returns (status int8 per row, then per kept document: lengths int64, loss
    int64, and the ids int32, mask uint8 of every kept document concatenated)."""
    path, fmt, rows = job
    encoder, settings = _WORKER["encoder"], _WORKER["settings"]
    statuses, lengths, losses, ids_parts, mask_parts = [], [], [], [], []
    for line, payload in rows:
        try:
            example = row_to_example(parse_json_line(payload, path, line), fmt)
            docs, status = encode_row(encoder, example, settings)
        except RowError as exc:
            raise DataError(
                f"{exc} (file format: {fmt}, detected from its first row)", path, line
            ) from None
        statuses.append(status)
        for ids, mask in docs:
            lengths.append(len(ids))
            losses.append(int(mask[1:].sum()))
            ids_parts.append(ids)
            mask_parts.append(mask)
    cat = lambda parts, dt: np.concatenate(parts).astype(dt) if parts else np.zeros(0, dt)  # noqa: E731
    return (
        np.asarray(statuses, np.int8),
        np.asarray(lengths, np.int64),
        np.asarray(losses, np.int64),
        cat(ids_parts, np.int32),
        cat(mask_parts, np.uint8),
    )


# ---- parent side ----------------------------------------------------------------------------


def detect_file_format(path: Path, rows: list[tuple[int, object]]) -> str:
    if not rows:
        raise DataError("the file has no rows", str(path))
    line, payload = rows[0]
    try:
        return detect_format(parse_json_line(payload, str(path), line))
    except RowError as exc:
        raise DataError(str(exc), str(path), line) from None


def _chunks(path: str, fmt: str, rows: list, num_proc: int):
    size = max(1, min(512, -(-len(rows) // (num_proc * 8))))
    return [(path, fmt, rows[i : i + size]) for i in range(0, len(rows), size)]


def tokenize_file(path: Path, tokenizer, settings: EncodeSettings, num_proc: int = 1) -> FileTokens:
    """Read, validate and tokenize every row of `path`. Raises DataError naming file:line."""
    rows = read_rows(path)
    fmt = detect_file_format(path, rows)
    chunks = _chunks(str(path), fmt, rows, num_proc)
    if num_proc > 1 and len(chunks) > 1:
        # fork: workers inherit the tokenizer and need no re-import (as DataLoader workers do).
        # An executor, not multiprocessing.Pool: a worker that dies raises instead of hanging.
        ctx = multiprocessing.get_context("fork" if os.name == "posix" else "spawn")
        with ProcessPoolExecutor(
            min(num_proc, len(chunks)),
            mp_context=ctx,
            initializer=_init_worker,
            initargs=(tokenizer, settings),
        ) as pool:
            results = list(pool.map(_encode_chunk, chunks))
    else:
        saved = dict(_WORKER)
        _WORKER.update(encoder=ChatEncoder(tokenizer, settings.system), settings=settings)
        try:
            results = [_encode_chunk(chunk) for chunk in chunks]
        finally:
            _WORKER.clear()
            _WORKER.update(saved)
    return _assemble(results, fmt, docs_per_row(settings.task))


def _assemble(results: list, fmt: str, per_row: int) -> FileTokens:
    status = np.concatenate([r[0] for r in results])
    lengths = np.concatenate([r[1] for r in results])
    kept = (status == ROW_OK) | (status == ROW_TRUNCATED)
    row_doc = np.full(len(status), -1, dtype=np.int64)
    row_doc[kept] = np.arange(int(kept.sum())) * per_row  # a pair's chosen; rejected is +1
    offsets = np.zeros(len(lengths) + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    return FileTokens(
        ids=np.concatenate([r[3] for r in results]),
        loss_mask=np.concatenate([r[4] for r in results]),
        offsets=offsets,
        doc_loss=np.concatenate([r[2] for r in results]),
        row_doc=row_doc,
        row_status=status,
        format=fmt,
    )
