"""The deterministic, resumable order of samples: global batches split per data-parallel rank.

Step k (0-based) of training always gets the same global batch, whatever happened before:
epoch e = k // steps_per_epoch uses the permutation of samples drawn from (seed, e), and the
global batch is a slice of it; the last partial batch of each epoch is dropped (as Megatron's
and ms-swift's samplers do). Resuming is therefore just "continue from step k": the state
dict stores k and what the order depends on, and loading it into an iterator built over other
data, with another seed or another global batch size is an error.

Within a global batch, micro-batch i of DP rank r holds samples
[i*mbs*dp + r*mbs, i*mbs*dp + (r+1)*mbs) of it (Megatron's assignment). Every rank also gets
the token and loss-token counts of the whole global batch, so the loss can be normalised over
the global batch without an all-reduce.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from remote_runtime.data.batches import MicroBatch, collate_padded, collate_thd
from remote_runtime.data.packing import Samples, dataset_samples
from remote_runtime.spec.errors import DataError

STATE_VERSION = 1


@dataclass
class GlobalBatch:
    step: int  # 0-based index of this global batch (the iteration it trains)
    epoch: int  # 0-based
    batch_in_epoch: int
    steps_per_epoch: int
    micro_batches: list[MicroBatch]  # this DP rank's: global / (micro_batch_size * dp_size)
    num_samples: int  # whole global batch, all DP ranks
    num_tokens: int  # real tokens, whole global batch
    num_loss_tokens: int  # training targets, whole global batch
    sum_sq_doc_lengths: int  # sum of document length squared, whole global batch (attention FLOPs)
    doc_ids: np.ndarray | None = None  # the documents of the whole global batch, in order

    @property
    def epoch_progress(self) -> float:
        """Epochs completed once this batch is trained (e.g. 1.25)."""
        return self.epoch + (self.batch_in_epoch + 1) / self.steps_per_epoch


class BatchIterator:
    """Infinite iterator of GlobalBatch for one data-parallel rank; stop it at train_iters."""

    def __init__(
        self,
        dataset,
        *,
        global_batch_size: int,
        micro_batch_size: int,
        dp_rank: int = 0,
        dp_size: int = 1,
        seed: int = 42,
        shuffle: bool = True,
        packing: bool = False,
        padding_free: bool = True,
        max_length: int | None = None,
        pad_token_id: int = 0,
        pad_to_multiple_of: int = 1,
        fixed_length: int | None = None,
        for_eval: bool = False,
    ):
        if global_batch_size % (micro_batch_size * dp_size):
            raise DataError(
                f"global_batch_size={global_batch_size} is not a multiple of "
                f"micro_batch_size={micro_batch_size} x data-parallel size={dp_size}",
                "train.global_batch_size",
            )
        if packing and (not padding_free or max_length is None):
            raise ValueError("packing needs padding_free=True and max_length")
        self.dataset = dataset
        self.samples: Samples = dataset_samples(
            dataset.lengths, getattr(dataset, "group", 1), packing, max_length
        )
        self.global_batch_size, self.micro_batch_size = global_batch_size, micro_batch_size
        self.dp_rank, self.dp_size = dp_rank, dp_size
        self.seed, self.shuffle, self.packing = seed, shuffle, packing
        self.padding_free, self.pad_token_id = padding_free, pad_token_id
        self.pad_to_multiple_of, self.fixed_length = pad_to_multiple_of, fixed_length
        self.steps_per_epoch = len(self.samples) // global_batch_size
        if self.steps_per_epoch == 0 and not for_eval:
            kind = "packed sequences" if packing else "rows"
            unit = micro_batch_size * dp_size
            fit = len(self.samples) // unit * unit
            raise DataError(
                f"the dataset has {len(self.samples)} {kind}, fewer than "
                f"global_batch_size={global_batch_size}: "
                + (f"set --global_batch_size {fit}, or " if fit else "")
                + "add data (e.g. path#N repeats rows)",
                "train.global_batch_size",
            )
        self.step = 0
        self._epoch_order: tuple[int, np.ndarray] | None = None

    # ---- order --------------------------------------------------------------------------------
    def train_iters(self, num_train_epochs: float) -> int:
        """Steps for `num_train_epochs` epochs (partial last batches dropped), at least 1."""
        return max(1, int(self.steps_per_epoch * num_train_epochs))

    def epoch_order(self, epoch: int) -> np.ndarray:
        if self._epoch_order is None or self._epoch_order[0] != epoch:
            n = len(self.samples)
            order = (
                np.random.default_rng([self.seed, epoch]).permutation(n)
                if self.shuffle
                else np.arange(n)
            )
            self._epoch_order = (epoch, order)
        return self._epoch_order[1]

    def global_sample_ids(self, step: int) -> np.ndarray:
        epoch, b = divmod(step, self.steps_per_epoch)
        gbs = self.global_batch_size
        return self.epoch_order(epoch)[b * gbs : (b + 1) * gbs]

    def rank_sample_ids(self, step: int) -> list[np.ndarray]:
        """This rank's samples of global batch `step`, one array per micro-batch."""
        ids = self.global_sample_ids(step)
        mbs, per_micro = self.micro_batch_size, self.micro_batch_size * self.dp_size
        return [
            ids[i + self.dp_rank * mbs : i + (self.dp_rank + 1) * mbs]
            for i in range(0, len(ids), per_micro)
        ]

    # ---- batches ------------------------------------------------------------------------------
    def batch(self, step: int) -> GlobalBatch:
        """The global batch of training step `step` (random access; does not move the iterator)."""
        docs_all = np.concatenate([self.samples[s] for s in self.global_sample_ids(step)])
        lengths = self.dataset.lengths[docs_all].astype(np.int64)
        epoch, b = divmod(step, self.steps_per_epoch)
        return GlobalBatch(
            step=step,
            epoch=epoch,
            batch_in_epoch=b,
            steps_per_epoch=self.steps_per_epoch,
            micro_batches=[self._collate(ids) for ids in self.rank_sample_ids(step)],
            num_samples=self.global_batch_size,
            num_tokens=int(lengths.sum()),
            num_loss_tokens=int(self.dataset.loss_counts[docs_all].sum()),
            sum_sq_doc_lengths=int((lengths**2).sum()),
            doc_ids=docs_all,
        )

    def eval_batches(self, max_samples: int | None = None) -> list[MicroBatch]:
        """This rank's micro-batches over the first `max_samples` samples (all when None), in
        order: sample i goes to data-parallel rank i % dp_size; nothing is dropped, so the
        last micro-batch of a rank may be smaller and a rank may get one fewer."""
        n = len(self.samples) if max_samples is None else min(max_samples, len(self.samples))
        mine = np.arange(self.dp_rank, n, self.dp_size)
        mbs = self.micro_batch_size
        return [self._collate(mine[i : i + mbs]) for i in range(0, len(mine), mbs)]

    def _collate(self, sample_ids: np.ndarray) -> MicroBatch:
        doc_ids = [int(d) for s in sample_ids for d in self.samples[s]]
        docs = [self.dataset.document(d) for d in doc_ids]
        if self.padding_free:
            mb = collate_thd(
                docs, len(sample_ids), self.pad_token_id, self.pad_to_multiple_of, self.fixed_length
            )
        else:
            mb = collate_padded(docs, self.pad_token_id, self.pad_to_multiple_of, self.fixed_length)
        mb.doc_ids = torch.tensor(doc_ids, dtype=torch.int64)
        return mb

    def __iter__(self) -> "BatchIterator":
        return self

    def __next__(self) -> GlobalBatch:
        batch = self.batch(self.step)
        self.step += 1
        return batch

    # ---- resume -------------------------------------------------------------------------------
    def _identity(self) -> dict:
        return {
            "dataset": self.dataset.fingerprint,
            "num_samples": len(self.samples),
            "global_batch_size": self.global_batch_size,
            "seed": self.seed,
            "shuffle": self.shuffle,
            "packing": self.packing,
        }

    def state_dict(self) -> dict:
        """Position (the next step to yield) and what the order depends on; JSON-serialisable."""
        return {"version": STATE_VERSION, "step": self.step, **self._identity()}

    def load_state_dict(self, state: dict) -> None:
        mine = self._identity()
        differ = [
            f"{k}: checkpoint {state.get(k)!r}, now {v!r}"
            for k, v in mine.items()
            if state.get(k) != v
        ]
        if differ:
            raise DataError(
                "cannot resume the data order: the data or its settings changed since "
                "the checkpoint (" + "; ".join(differ) + "); restart without --resume "
                "or restore the original data",
                "checkpoint.resume",
            )
        self.step = int(state["step"])


def make_batch_iterator(
    job,
    dataset,
    *,
    dp_rank: int = 0,
    dp_size: int = 1,
    pad_token_id: int = 0,
    pad_to_multiple_of: int = 1,
    fixed_length: int | None = None,
    for_eval: bool = False,
) -> BatchIterator:
    """The BatchIterator of a JobConfig (train.*, data.packing/padding_free/max_length/shuffle);
    `for_eval`: in order, for `eval_batches`."""
    return BatchIterator(
        dataset,
        global_batch_size=job.train.global_batch_size,
        micro_batch_size=job.train.micro_batch_size,
        dp_rank=dp_rank,
        dp_size=dp_size,
        seed=job.train.seed,
        shuffle=job.data.dataset_shuffle and not for_eval,
        packing=job.data.packing,
        padding_free=job.data.padding_free,
        max_length=job.data.max_length,
        pad_token_id=pad_token_id,
        pad_to_multiple_of=pad_to_multiple_of,
        fixed_length=fixed_length,
        for_eval=for_eval,
    )
