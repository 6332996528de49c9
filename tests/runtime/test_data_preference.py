"""Preference data (task rlhf): row formats, the SFT loss mask on both answers, truncation of
pairs with counts, pairs kept together by packing, per-document sums over packed documents,
and the deterministic held-out split."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from data_fixtures import tokenizer, write_jsonl  # noqa: F401

from remote_runtime.data.batches import collate_thd
from remote_runtime.data.chat import ChatEncoder
from remote_runtime.data.dataset import load_dataset
from remote_runtime.data.encode import EncodeSettings
from remote_runtime.data.packing import dataset_samples
from remote_runtime.data.validation import split_units
from remote_runtime.spec.errors import DataError, RowError
from remote_runtime.spec.formats import detect_format, row_to_example
from remote_runtime.train.dpo import sequence_logps

pytestmark = pytest.mark.runtime

USER = {"role": "user", "content": "What is 2 + 2?"}
GOOD = {"role": "assistant", "content": "2 + 2 = 4."}
BAD = {"role": "assistant", "content": "2 + 2 = 5."}
SYSTEM = {"role": "system", "content": "Be brief."}
ROWS = {
    "preference_messages": {"messages": [SYSTEM, USER, GOOD], "rejected_response": BAD["content"]},
    "preference_chat": {"chosen": [SYSTEM, USER, GOOD], "rejected": [SYSTEM, USER, BAD]},
    "preference_chat+prompt": {"prompt": [SYSTEM, USER], "chosen": [GOOD], "rejected": [BAD]},
    "preference_text": {
        "system": "Be brief.",
        "prompt": USER["content"],
        "chosen": GOOD["content"],
        "rejected": BAD["content"],
    },
}


@pytest.mark.parametrize("name", sorted(ROWS))
def test_every_preference_format_gives_the_same_pair(name):
    row = ROWS[name]
    fmt = detect_format(row)
    assert fmt == name.split("+")[0]
    assert row_to_example(row, fmt) == ([SYSTEM, USER, GOOD], [SYSTEM, USER, BAD])


@pytest.mark.parametrize(
    "row,message",
    [
        ({"messages": [USER], "rejected_response": "x"}, "last message of 'messages'"),
        (
            {"chosen": [USER, GOOD], "rejected": [{"role": "user", "content": "Other"}, BAD]},
            "share every message but the last",
        ),
        ({"prompt": [USER], "chosen": [GOOD], "rejected": [USER]}, "last message of 'rejected'"),
        ({"prompt": "Hi", "chosen": "a", "rejected": 3}, "'rejected' must be a string"),
    ],
)
def test_bad_preference_rows_name_the_field(row, message):
    with pytest.raises(RowError, match=message):
        row_to_example(row, detect_format(row))


def load(rows, tok, tmp_path, task="rlhf", **settings):
    tmp_path.mkdir(parents=True, exist_ok=True)
    path = write_jsonl(tmp_path / "pairs.jsonl", rows)
    return load_dataset(
        [str(path)], tok, EncodeSettings(task=task, **settings), cache_dir=tmp_path / "cache"
    )


def test_pairs_become_two_documents_with_the_sft_loss_mask(tokenizer, tmp_path):
    dataset, stats = load([ROWS["preference_text"], ROWS["preference_text"]], tokenizer, tmp_path)
    assert (len(dataset), dataset.num_units, dataset.group, stats.rows) == (4, 2, 2, 2)
    encoder = ChatEncoder(tokenizer)
    for doc, messages in enumerate([[SYSTEM, USER, GOOD], [SYSTEM, USER, BAD]] * 2):
        ids, mask = dataset.document(doc)
        want_ids, want_mask = encoder.encode_chat(messages)  # what sft trains on
        assert ids.tolist() == want_ids.tolist() and mask.tolist() == want_mask.tolist()


def test_preference_rows_need_rlhf_and_rlhf_needs_pairs(tokenizer, tmp_path):
    with pytest.raises(DataError, match="needs the rlhf task"):
        load([ROWS["preference_chat"]], tokenizer, tmp_path, task="sft")
    with pytest.raises(DataError, match="rlhf trains on preference pairs"):
        load([{"messages": [USER, GOOD]}], tokenizer, tmp_path / "b")


def test_truncation_of_pairs_is_counted_as_ms_swift_does(tokenizer, tmp_path):
    """Each answer is truncated on its own; a pair is dropped whole when either sequence is too
    long (delete) or has no answer token left (a prompt longer than max_length)."""
    long_prompt = {"role": "user", "content": " ".join(["red fox blue sun"] * 30)}
    long_answer = {
        "messages": [USER, {"role": "assistant", "content": "red fox " * 30}],
        "rejected_response": "no",
    }
    rows = [
        ROWS["preference_messages"],
        long_answer,
        {"messages": [long_prompt, GOOD], "rejected_response": "no"},
    ]
    full, _ = load(rows[:1], tokenizer, tmp_path / "full", max_length=4096)
    limit = int(full.lengths.max()) + 2  # the short pair fits
    right, stats = load(rows, tokenizer, tmp_path / "right", max_length=limit)
    assert (stats.rows, stats.truncated, stats.dropped_no_loss, right.num_units) == (3, 1, 1, 2)
    assert int(right.lengths.max()) == limit
    assert any("dropped 1 of 3 rows with no assistant tokens" in w for w in stats.warnings)
    gone, stats = load(
        rows, tokenizer, tmp_path / "delete", max_length=limit, truncation_strategy="delete"
    )
    assert (stats.dropped_too_long, gone.num_units) == (2, 1)


def test_packing_keeps_both_answers_of_a_pair_in_one_pack():
    lengths = np.array([30, 50, 10, 12, 60, 64, 5, 9, 40, 41])  # 5 pairs
    samples = dataset_samples(lengths, group=2, packing=True, max_length=64)
    seen = np.concatenate([samples[i] for i in range(len(samples))])
    assert sorted(seen.tolist()) == list(range(10))
    for i in range(len(samples)):
        docs = samples[i]
        assert len(docs) % 2 == 0 and (docs[0::2] % 2 == 0).all()
        assert (docs[1::2] == docs[0::2] + 1).all()
        assert lengths[docs].sum() <= 128
    plain = dataset_samples(lengths, group=2, packing=False, max_length=64)
    assert [plain[i].tolist() for i in range(len(plain))] == [
        [0, 1],
        [2, 3],
        [4, 5],
        [6, 7],
        [8, 9],
    ]


def test_sequence_logps_over_packed_documents_equal_each_document_alone():
    rng = np.random.default_rng(0)
    docs = [(rng.integers(0, 50, n), (rng.random(n) > 0.4).astype(np.uint8)) for n in (7, 4, 9)]
    packed = collate_thd(docs, 3, pad_token_id=0, pad_to_multiple_of=8)  # with a padding segment
    per_token = torch.rand(packed.tokens.shape, dtype=torch.float64)
    sums, counts = sequence_logps(packed, per_token)
    at = 0
    for i, (ids, mask) in enumerate(docs):
        alone = collate_thd([(ids, mask)], 1, pad_token_id=0)
        s, c = sequence_logps(alone, per_token[:, at : at + len(ids)])
        assert float(sums[i]) == pytest.approx(float(s[0])) and float(counts[i]) == float(c[0])
        assert float(c[0]) == mask[1:].sum()
        at += len(ids)
    assert len(sums) == 3


def test_split_is_deterministic_disjoint_and_takes_ceil_of_the_ratio():
    train, held = split_units(101, 0.05, seed=3)
    assert len(held) == 6 and len(train) == 95
    assert not set(train) & set(held) and sorted([*train, *held]) == list(range(101))
    again = split_units(101, 0.05, seed=3)
    assert (again[1] == held).all() and not (split_units(101, 0.05, seed=4)[1] == held).all()
    with pytest.raises(DataError, match="split_dataset_ratio"):
        split_units(1, 0.5, seed=0)
