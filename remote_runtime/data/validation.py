"""The held-out set for evaluation during training: `--val_dataset` files, or a deterministic
`--split_dataset_ratio` share of the training rows.

The split is drawn from (seed, "validation") and takes whole rows (whole pairs for preference
data): the same job always holds out the same rows, whatever the number of processes, and the
training rows keep their order, so the training data order depends only on the rows left.
"""

from __future__ import annotations

import math
from typing import Callable

import numpy as np

from remote_runtime.data.dataset import (
    DataStats,
    TokenizedDataset,
    build_dataset,
    default_cache_dir,
)
from remote_runtime.spec.errors import DataError

SPLIT_STREAM = 0x5EED  # the random stream of the split, apart from the shuffle's (seed, epoch)


def split_units(num_units: int, ratio: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(train units, validation units), each sorted; ceil(ratio x units) held out (at least 1)."""
    held = min(max(1, math.ceil(ratio * num_units)), num_units - 1)
    if num_units < 2 or held < 1:
        raise DataError(
            f"split_dataset_ratio={ratio} needs at least 2 rows, the dataset has {num_units}",
            "eval.split_dataset_ratio",
        )
    order = np.random.default_rng([seed, SPLIT_STREAM]).permutation(num_units)
    return np.sort(order[held:]), np.sort(order[:held])


def with_validation(
    job,
    tokenizer,
    dataset: TokenizedDataset,
    stats: DataStats,
    *,
    should_build: bool = True,
    barrier: Callable[[], None] | None = None,
    cache_dir=None,
) -> tuple[TokenizedDataset, TokenizedDataset | None]:
    """(training set, held-out set or None); records the held-out set in `stats.validation`."""
    ev = job.eval
    if ev.val_dataset:
        view = _JobView(job, ev.val_dataset)
        val, val_stats = build_dataset(
            view,
            tokenizer,
            should_build=should_build,
            barrier=barrier,
            cache_dir=cache_dir or default_cache_dir(job),
        )
        stats.validation = {
            "source": "val_dataset " + " ".join(ev.val_dataset),
            "rows": val.num_units,
            "train_rows": dataset.num_units,
            "tokens": int(val.lengths.sum()),
            "warnings": val_stats.warnings,
        }
        return dataset, val
    if not ev.split_dataset_ratio:
        return dataset, None
    train_units, val_units = split_units(dataset.num_units, ev.split_dataset_ratio, job.train.seed)
    train = dataset.subset(train_units, "train")
    val = dataset.subset(val_units, "validation")
    stats.validation = {
        "source": f"split_dataset_ratio {ev.split_dataset_ratio}, seed {job.train.seed}",
        "rows": len(val_units),
        "train_rows": len(train_units),
        "tokens": int(val.lengths.sum()),
    }
    return train, val


class _JobView:
    """The job with `data.dataset` replaced (build_dataset reads only these groups)."""

    def __init__(self, job, dataset: list[str]):
        import dataclasses

        self.task, self.train, self.checkpoint = job.task, job.train, job.checkpoint
        self.data = dataclasses.replace(job.data, dataset=list(dataset))
