"""Building the training dataset: specs -> cached tokenized files -> sampled documents + stats.

Distributed runs: every rank calls `build_dataset`; on each node the rank with
`should_build=True` (local rank 0) tokenizes what the cache lacks, every rank then calls
`barrier()`, and the others load the finished cache entries. If the builder fails it still
enters the barrier (so nobody hangs) and re-raises; the others raise a DataError pointing to it.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

from megafleet.transfer import file_sha256  # the hash the operator checks uploads with
from remote_runtime.data.cache import cache_key, load_entry, save_entry, tokenizer_fingerprint
from remote_runtime.data.encode import (
    ROW_NO_LOSS,
    ROW_TOO_LONG,
    ROW_TRUNCATED,
    EncodeSettings,
    FileTokens,
    docs_per_row,
    tokenize_file,
)
from remote_runtime.data.sources import parse_dataset_specs, sample_rows
from remote_runtime.spec.errors import DataError

log = logging.getLogger("remote_runtime.data")


@dataclass
class SourceStats:
    """Counts for one `--dataset` entry."""

    spec: str
    format: str
    rows_in_file: int
    rows: int  # rows taken (after `#N` sampling, repeats included)
    truncated: int
    dropped_no_loss: int  # no assistant token left to train on (after truncation)
    dropped_too_long: int  # longer than max_length with truncation_strategy=delete
    documents: int
    tokens: int
    loss_tokens: int
    cache_hit: bool


@dataclass
class DataStats:
    sources: list[SourceStats]
    warnings: list[str] = field(default_factory=list)
    validation: dict | None = None  # the held-out set: how it was made and its size

    def _sum(self, name: str) -> int:
        return sum(getattr(s, name) for s in self.sources)

    rows = property(lambda self: self._sum("rows"))
    truncated = property(lambda self: self._sum("truncated"))
    dropped_no_loss = property(lambda self: self._sum("dropped_no_loss"))
    dropped_too_long = property(lambda self: self._sum("dropped_too_long"))
    dropped = property(lambda self: self.dropped_no_loss + self.dropped_too_long)
    documents = property(lambda self: self._sum("documents"))
    tokens = property(lambda self: self._sum("tokens"))
    loss_tokens = property(lambda self: self._sum("loss_tokens"))
    cache_hits = property(lambda self: sum(s.cache_hit for s in self.sources))
    cache_misses = property(lambda self: sum(not s.cache_hit for s in self.sources))

    def to_dict(self) -> dict:
        totals = {
            name: getattr(self, name)
            for name in (
                "rows",
                "truncated",
                "dropped",
                "dropped_no_loss",
                "dropped_too_long",
                "documents",
                "tokens",
                "loss_tokens",
                "cache_hits",
                "cache_misses",
            )
        }
        return {
            **totals,
            "sources": [asdict(s) for s in self.sources],
            "warnings": self.warnings,
            "validation": self.validation,
        }

    def summary(self) -> str:
        text = (
            f"data: {self.rows} rows -> {self.documents} documents, {self.tokens} tokens "
            f"({self.loss_tokens} trained); truncated {self.truncated}, dropped "
            f"{self.dropped}; cache {self.cache_hits} hit / {self.cache_misses} built"
        )
        v = self.validation
        if v:
            text += (
                f"\nvalidation: {v['rows']} rows held out ({v['source']}), "
                f"{v['train_rows']} rows left to train on"
            )
        return text


class TokenizedDataset:
    """The training documents: document i is (ids int32, loss mask uint8) of one row.

    `loss_mask[t] == 1` means token t is a training target (predicted from token t-1); the
    batch code turns this into shifted labels. Arrays are memory-mapped from the cache.
    Documents come in units of `group` that are never separated (2 for preference pairs:
    document 2k is the chosen answer of pair k, 2k+1 the rejected one).
    """

    def __init__(
        self,
        files: list[FileTokens],
        doc_file: np.ndarray,
        doc_index: np.ndarray,
        fingerprint: str,
        group: int = 1,
    ):
        self.files = files
        self.group = group
        self.doc_file = doc_file
        self.doc_index = doc_index
        self.fingerprint = fingerprint  # identifies the documents and their order
        starts = np.zeros(len(doc_file), np.int64)
        ends = np.zeros(len(doc_file), np.int64)
        loss = np.zeros(len(doc_file), np.int64)
        for f, tokens in enumerate(files):
            sel = doc_file == f
            idx = doc_index[sel]
            starts[sel], ends[sel] = tokens.offsets[idx], tokens.offsets[idx + 1]
            loss[sel] = tokens.doc_loss[idx]
        self._starts = starts
        self.lengths = ends - starts  # int64 [documents]
        self.loss_counts = loss  # int64 [documents]: training targets (token 0 is never one)

    def __len__(self) -> int:
        return len(self.doc_file)

    @property
    def num_units(self) -> int:
        """Rows (pairs for preference data) in the dataset."""
        return len(self) // self.group

    def unit_docs(self, units: np.ndarray) -> np.ndarray:
        """The documents of these units, in order."""
        units = np.asarray(units, np.int64)
        return (units[:, None] * self.group + np.arange(self.group)).ravel()

    def subset(self, units: np.ndarray, tag: str) -> "TokenizedDataset":
        """The dataset of these units (rows, or pairs), in this order."""
        docs = self.unit_docs(units)
        fingerprint = hashlib.sha256(
            f"{self.fingerprint}/{tag}/".encode() + np.asarray(units, np.int64).tobytes()
        ).hexdigest()
        return TokenizedDataset(
            self.files, self.doc_file[docs], self.doc_index[docs], fingerprint, self.group
        )

    def document(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        tokens = self.files[self.doc_file[i]]
        a, b = self._starts[i], self._starts[i] + self.lengths[i]
        return np.asarray(tokens.ids[a:b]), np.asarray(tokens.loss_mask[a:b])


def default_cache_dir(job) -> Path:
    return Path(job.data.data_cache_dir or Path(job.checkpoint.output_dir) / ".data_cache")


def build_dataset(
    job,
    tokenizer,
    *,
    should_build: bool = True,
    barrier: Callable[[], None] | None = None,
    cache_dir: str | Path | None = None,
) -> tuple[TokenizedDataset, DataStats]:
    """The dataset of a JobConfig (data.*, task, train.seed, checkpoint.output_dir)."""
    d = job.data
    settings = EncodeSettings(
        task=job.task,
        max_length=d.max_length,
        truncation_strategy=d.truncation_strategy,
        system=d.system,
    )
    return load_dataset(
        d.dataset,
        tokenizer,
        settings,
        seed=job.train.seed,
        num_proc=d.dataset_num_proc,
        cache_dir=cache_dir or default_cache_dir(job),
        should_build=should_build,
        barrier=barrier,
    )


def load_dataset(
    specs: list[str],
    tokenizer,
    settings: EncodeSettings,
    *,
    cache_dir: str | Path,
    seed: int = 42,
    num_proc: int = 1,
    should_build: bool = True,
    barrier: Callable[[], None] | None = None,
) -> tuple[TokenizedDataset, DataStats]:
    """Tokenize (or load from cache) `specs` and select the rows of each `path#N`."""
    parsed = parse_dataset_specs(specs)
    if settings.task in ("sft", "rlhf") and not getattr(tokenizer, "chat_template", None):
        raise DataError(
            "the tokenizer has no chat template; sft renders conversations with it "
            "(use a chat model's tokenizer, or task pt with text rows)",
            "model.model",
        )
    cache_dir = Path(cache_dir)
    tok_fp = tokenizer_fingerprint(tokenizer)
    keys = {}
    for spec in parsed:
        if spec.path not in keys:
            keys[spec.path] = cache_key(file_sha256(spec.path), tok_fp, settings)
    built: set[str] = set()
    failure: BaseException | None = None
    if should_build:
        try:
            built = _build_missing(keys, tokenizer, settings, num_proc, cache_dir)
        except BaseException as exc:  # still enter the barrier, or the other ranks hang in it
            failure = exc
    if barrier is not None:
        barrier()
    if failure is not None:
        raise failure
    entries = {}
    for path, key in keys.items():
        entries[path] = load_entry(cache_dir, key)
        if entries[path] is None:
            raise DataError(
                f"no tokenized cache entry {key[:12]} in {cache_dir}: the rank that "
                f"builds the dataset on this node failed or was not run first; see "
                f"its log",
                str(path),
            )
    return _select(parsed, keys, entries, built, seed, settings)


def _build_missing(keys: dict, tokenizer, settings, num_proc: int, cache_dir: Path) -> set[str]:
    built = set()
    for path, key in keys.items():
        if load_entry(cache_dir, key) is not None:
            continue
        tokens = tokenize_file(path, tokenizer, settings, num_proc)
        save_entry(
            cache_dir,
            key,
            tokens,
            {"source": str(path), "settings": asdict(settings), "rows": tokens.num_rows},
        )
        log.info("tokenized %s: %d rows (cache %s)", path, tokens.num_rows, key[:12])
        built.add(key)
    return built


def _select(parsed, keys, entries, built, seed, settings):
    """Apply `#N` sampling per spec and gather the documents and the counts."""
    files = list(entries.values())
    file_no = {path: i for i, path in enumerate(entries)}
    doc_file, doc_index, sources = [], [], []
    for n, spec in enumerate(parsed):
        tokens = entries[spec.path]
        rows = sample_rows(tokens.num_rows, spec.sample, seed=[seed, n])
        status = np.asarray(tokens.row_status)[rows]
        docs = np.asarray(tokens.row_doc)[rows]
        docs = docs[docs >= 0]
        per_row = docs_per_row(settings.task)
        docs = (docs[:, None] + np.arange(per_row)).ravel()  # a pair's two documents
        doc_file.append(np.full(len(docs), file_no[spec.path], np.int64))
        doc_index.append(docs)
        sources.append(
            SourceStats(
                spec=spec.spec,
                format=tokens.format,
                rows_in_file=tokens.num_rows,
                rows=len(rows),
                truncated=int((status == ROW_TRUNCATED).sum()),
                dropped_no_loss=int((status == ROW_NO_LOSS).sum()),
                dropped_too_long=int((status == ROW_TOO_LONG).sum()),
                documents=len(docs),
                tokens=0,
                loss_tokens=0,
                cache_hit=keys[spec.path] not in built,
            )
        )
    fingerprint = hashlib.sha256(
        json.dumps([[keys[s.path], s.sample] for s in parsed] + [seed]).encode()
    ).hexdigest()
    dataset = TokenizedDataset(
        files,
        np.concatenate(doc_file),
        np.concatenate(doc_index),
        fingerprint,
        docs_per_row(settings.task),
    )
    start = 0
    for s in sources:
        s.tokens = int(dataset.lengths[start : start + s.documents].sum())
        s.loss_tokens = int(dataset.loss_counts[start : start + s.documents].sum())
        start += s.documents
    stats = DataStats(sources, _warnings(sources, settings))
    for warning in stats.warnings:
        log.warning(warning)
    if len(dataset) == 0:
        raise DataError(
            "no rows left to train on after dropping: " + "; ".join(stats.warnings), "data.dataset"
        )
    return dataset, stats


def _warnings(sources: list[SourceStats], settings: EncodeSettings) -> list[str]:
    out = []
    what = "tokens to predict" if settings.task == "pt" else "assistant tokens"
    for s in sources:
        if s.dropped_no_loss:
            out.append(
                f"{s.spec}: dropped {s.dropped_no_loss} of {s.rows} rows with no {what} "
                f"within max_length={settings.max_length}"
            )
        if s.dropped_too_long:
            out.append(
                f"{s.spec}: dropped {s.dropped_too_long} of {s.rows} rows longer than "
                f"max_length={settings.max_length} (truncation_strategy=delete)"
            )
        if s.truncated:
            out.append(
                f"{s.spec}: truncated {s.truncated} of {s.rows} rows to "
                f"max_length={settings.max_length} (truncation_strategy="
                f"{settings.truncation_strategy})"
            )
    return out
