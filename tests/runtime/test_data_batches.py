"""Packing, THD / padded micro-batches, shifted labels, data-parallel split and resume."""

from __future__ import annotations

import numpy as np
import pytest
from data_fixtures import tokenizer  # noqa: F401

from remote_runtime.data.batches import IGNORE_INDEX, collate_thd, shifted_labels
from remote_runtime.data.dataset import load_dataset
from remote_runtime.data.demo_data import write_demo_dataset
from remote_runtime.data.encode import EncodeSettings
from remote_runtime.data.packing import pack_documents, sample_lengths
from remote_runtime.data.sampler import BatchIterator, make_batch_iterator
from remote_runtime.spec.config import JobConfig
from remote_runtime.spec.errors import DataError

pytestmark = pytest.mark.runtime
MAX = 96


@pytest.fixture(scope="module")
def dataset(tokenizer, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("batches")
    path = write_demo_dataset(tmp / "demo.jsonl", num_rows=120)
    return load_dataset(
        [str(path)], tokenizer, EncodeSettings(max_length=MAX), cache_dir=tmp / "c"
    )[0]


def iterator(dataset, **kw):
    options = dict(global_batch_size=8, micro_batch_size=2, seed=3, pad_token_id=0)
    options.update(kw)
    return BatchIterator(dataset, **options)


def test_packing_respects_max_length_and_keeps_every_document():
    rng = np.random.default_rng(0)
    lengths = rng.integers(1, 500, size=2000)
    samples = pack_documents(lengths, 512)
    assert sorted(samples.docs.tolist()) == list(range(2000))
    per_pack = sample_lengths(samples, lengths)
    assert per_pack.max() <= 512 and per_pack.sum() == lengths.sum()
    assert len(samples) <= int(np.ceil(lengths.sum() / 512) * 1.05) + 1  # near-optimal
    assert np.array_equal(pack_documents(lengths, 512).docs, samples.docs)  # deterministic
    with pytest.raises(ValueError, match="exceeds max_length"):
        pack_documents([10, 600], 512)


def check_thd(mb, dataset=None):
    tokens, labels, pos = mb.tokens[0], mb.labels[0], mb.position_ids[0]
    cu = mb.cu_seqlens.tolist()
    assert (
        mb.cu_seqlens.dtype.is_floating_point is False and str(mb.cu_seqlens.dtype) == "torch.int32"
    )
    assert cu[0] == 0 and cu[-1] == tokens.numel() and mb.attention_mask is None
    segments = np.diff(cu).tolist()
    assert segments[: len(mb.doc_lengths)] == mb.doc_lengths and mb.max_seqlen == max(segments)
    for a, b in zip(cu, cu[1:]):
        assert pos[a:b].tolist() == list(range(b - a))  # positions restart per document
        assert labels[b - 1] == IGNORE_INDEX  # never predict across a boundary
        inside = labels[a : b - 1]
        keep = inside != IGNORE_INDEX
        assert (inside[keep] == tokens[a + 1 : b][keep]).all()
    assert mb.num_loss_tokens == int((labels != IGNORE_INDEX).sum()) == int(mb.loss_mask.sum())
    assert mb.num_tokens == sum(mb.doc_lengths)


def test_packed_batches_are_thd_with_document_boundaries(dataset):
    it = iterator(dataset, packing=True, max_length=MAX)
    assert len(it.samples) < len(dataset)  # several documents per pack
    gb = next(it)
    assert len(gb.micro_batches) == 4  # 8 / (2 x dp 1)
    for mb in gb.micro_batches:
        check_thd(mb)
        assert mb.num_samples == 2 and mb.tokens.shape[1] <= 2 * MAX
    assert gb.num_tokens == sum(mb.num_tokens for mb in gb.micro_batches)
    assert gb.num_loss_tokens == sum(mb.num_loss_tokens for mb in gb.micro_batches)
    assert gb.sum_sq_doc_lengths == sum(n * n for mb in gb.micro_batches for n in mb.doc_lengths)


def test_labels_follow_the_loss_mask_of_each_document(dataset):
    docs = [dataset.document(i) for i in range(3)]
    mb = collate_thd(docs, num_samples=3, pad_token_id=0)
    expected = np.concatenate([shifted_labels(ids, mask) for ids, mask in docs])
    assert mb.labels[0].tolist() == expected.tolist()
    for ids, mask in docs:  # a target is trained exactly where the next token is an assistant token
        labels = shifted_labels(ids, mask)
        assert ((labels[:-1] != IGNORE_INDEX) == (mask[1:] == 1)).all()
    assert mb.num_loss_tokens == int(dataset.loss_counts[:3].sum())


def test_padding_free_without_packing_and_padding_to_a_multiple(dataset):
    gb = iterator(dataset, pad_to_multiple_of=16).batch(0)
    for mb in gb.micro_batches:
        check_thd(mb)
        assert len(mb.doc_lengths) == 2 and mb.tokens.shape[1] % 16 == 0
        assert mb.num_tokens == sum(mb.doc_lengths) <= mb.tokens.shape[1]
    fixed = iterator(dataset, fixed_length=2 * MAX).batch(0).micro_batches[0]
    assert fixed.tokens.shape == (1, 2 * MAX)


def test_padded_batches(dataset):
    it = iterator(dataset, padding_free=False, pad_to_multiple_of=8)
    for mb in it.batch(1).micro_batches:
        b, s = mb.tokens.shape
        assert b == 2 and s % 8 == 0 and s >= max(mb.doc_lengths) and mb.cu_seqlens is None
        assert mb.attention_mask.sum(1).tolist() == mb.doc_lengths
        assert (mb.labels[~mb.attention_mask] == IGNORE_INDEX).all()
        for row, n in enumerate(mb.doc_lengths):
            assert mb.labels[row, n - 1] == IGNORE_INDEX
            assert (mb.tokens[row, n:] == 0).all()
        assert mb.num_loss_tokens == int((mb.labels != IGNORE_INDEX).sum())


def test_data_parallel_ranks_split_the_global_batch(dataset):
    ranks = [iterator(dataset, dp_size=2, dp_rank=r, packing=True, max_length=MAX) for r in (0, 1)]
    for step in (0, 5):
        parts = [ranks[r].rank_sample_ids(step) for r in (0, 1)]
        assert all(len(p) == 2 and all(len(m) == 2 for m in p) for p in parts)
        flat = sorted(int(s) for p in parts for m in p for s in m)
        assert flat == sorted(ranks[0].global_sample_ids(step).tolist())
        batches = [ranks[r].batch(step) for r in (0, 1)]
        assert (
            batches[0].num_loss_tokens
            == batches[1].num_loss_tokens
            == sum(mb.num_loss_tokens for b in batches for mb in b.micro_batches)
        )


def test_epochs_are_shuffled_permutations(dataset):
    it = iterator(dataset)
    assert it.steps_per_epoch == len(dataset) // 8 == 15
    assert it.train_iters(2.5) == 37 and it.train_iters(0.01) == 1
    first = np.concatenate([it.global_sample_ids(s) for s in range(15)])
    second = np.concatenate([it.global_sample_ids(s) for s in range(15, 30)])
    assert sorted(first.tolist()) == sorted(second.tolist()) == list(range(120))
    assert not np.array_equal(first, second)
    gb = it.batch(16)
    assert (gb.epoch, gb.batch_in_epoch, gb.epoch_progress) == (1, 1, 1 + 2 / 15)
    plain = iterator(dataset, shuffle=False)
    assert plain.global_sample_ids(0).tolist() == list(range(8))
    with pytest.raises(DataError, match="fewer than global_batch_size=256"):
        iterator(dataset, global_batch_size=256)
    with pytest.raises(
        DataError, match="not a multiple of micro_batch_size=2 x data-parallel size=3"
    ):
        iterator(dataset, dp_size=3)


def test_resume_gives_the_same_batches(dataset):
    run = iterator(dataset, packing=True, max_length=MAX, global_batch_size=8, micro_batch_size=2)
    assert run.steps_per_epoch < 10  # the run below crosses an epoch boundary
    straight = [next(run) for _ in range(12)]
    first = iterator(dataset, packing=True, max_length=MAX, global_batch_size=8, micro_batch_size=2)
    for _ in range(5):
        next(first)
    state = first.state_dict()
    assert state["step"] == 5
    resumed = iterator(
        dataset, packing=True, max_length=MAX, global_batch_size=8, micro_batch_size=2
    )
    resumed.load_state_dict(state)
    for expected in straight[5:]:
        got = next(resumed)
        assert got.step == expected.step
        for a, b in zip(got.micro_batches, expected.micro_batches):
            assert a.tokens.tolist() == b.tokens.tolist() and a.labels.tolist() == b.labels.tolist()
    other = iterator(
        dataset, packing=True, max_length=MAX, global_batch_size=8, micro_batch_size=2, seed=4
    )
    with pytest.raises(DataError, match="seed: checkpoint 3, now 4"):
        other.load_state_dict(state)


def test_make_batch_iterator_reads_the_job(dataset):
    job = JobConfig()
    job.train.global_batch_size, job.train.micro_batch_size, job.train.seed = 4, 2, 7
    job.data.packing, job.data.max_length = True, MAX
    it = make_batch_iterator(job, dataset, dp_rank=1, dp_size=2, pad_token_id=5)
    assert (it.packing, it.seed, it.dp_rank, it.pad_token_id) == (True, 7, 1, 5)
    assert len(next(it).micro_batches) == 1
