"""Building datasets: truncation and drops with counts, file:line errors, sampling, the cache,
multiprocess tokenization and the build-on-one-rank protocol."""

from __future__ import annotations

import json
import threading

import numpy as np
import pytest
from data_fixtures import QWEN25_TEMPLATE, tokenizer, with_template, write_jsonl  # noqa: F401

from remote_runtime.data import cache as cache_mod
from remote_runtime.data.dataset import build_dataset, load_dataset
from remote_runtime.data.demo_data import write_demo_dataset
from remote_runtime.data.encode import EncodeSettings
from remote_runtime.spec.config import JobConfig
from remote_runtime.spec.errors import DataError

pytestmark = pytest.mark.runtime


def chat(question: str, answer: str) -> dict:
    return {
        "messages": [
            {"role": "user", "content": question},
            {"role": "assistant", "content": answer},
        ]
    }


def load(paths, tok, tmp_path, **settings):
    options = {
        k: settings.pop(k) for k in ("seed", "num_proc", "should_build", "barrier") if k in settings
    }
    return load_dataset(
        [str(p) for p in paths],
        tok,
        EncodeSettings(**settings),
        cache_dir=tmp_path / "cache",
        **options,
    )


def docs(dataset):
    return [tuple(np.asarray(a).tolist() for a in dataset.document(i)) for i in range(len(dataset))]


def test_build_dataset_from_job_and_summary(tokenizer, tmp_path):
    path = write_demo_dataset(tmp_path / "demo.jsonl", num_rows=60)
    job = JobConfig()
    job.data.dataset = [str(path)]
    job.checkpoint.output_dir = str(tmp_path / "out")
    dataset, stats = build_dataset(job, tokenizer)
    assert (tmp_path / "out" / ".data_cache").is_dir()
    assert len(dataset) == stats.documents == stats.rows == 60
    assert stats.tokens == int(dataset.lengths.sum()) and stats.loss_tokens == int(
        dataset.loss_counts.sum()
    )
    assert 0 < stats.loss_tokens < stats.tokens and stats.warnings == []
    assert stats.to_dict()["sources"][0]["format"] == "messages"
    assert "60 rows -> 60 documents" in stats.summary()


def test_truncation_strategies_and_counts(tokenizer, tmp_path):
    long_answer = " ".join(["red fox blue sun"] * 20)
    rows = [chat("Hi", "Hello"), chat("Repeat after me", long_answer), chat("Hi", "Hi")]
    path = write_jsonl(tmp_path / "d.jsonl", rows)
    full, _ = load([path], tokenizer, tmp_path, max_length=4096)
    n_long = int(full.lengths[1])
    limit = n_long - 10
    assert full.lengths.max() == n_long and max(full.lengths[0], full.lengths[2]) < limit
    right, stats = load([path], tokenizer, tmp_path, max_length=limit, truncation_strategy="right")
    assert (stats.truncated, stats.dropped, len(right)) == (1, 0, 3)
    assert docs(right)[1][0] == docs(full)[1][0][:limit]
    assert "truncated 1 of 3 rows" in stats.warnings[0]
    left, stats = load([path], tokenizer, tmp_path, max_length=limit, truncation_strategy="left")
    assert stats.truncated == 1 and docs(left)[1][0] == docs(full)[1][0][-limit:]
    assert docs(left)[1][1] == docs(full)[1][1][-limit:]
    gone, stats = load([path], tokenizer, tmp_path, max_length=limit, truncation_strategy="delete")
    assert (stats.dropped_too_long, stats.truncated, len(gone)) == (1, 0, 2)
    assert "longer than max_length" in stats.warnings[0]


def test_rows_without_loss_tokens_are_dropped_and_counted(tokenizer, tmp_path, caplog):
    rows = [
        chat("Hi", "Hello"),
        {"messages": [{"role": "user", "content": "Only a question"}]},
        chat("A long question " * 10, "Short"),
    ]
    path = write_jsonl(tmp_path / "d.jsonl", rows)
    n_prompt = len(
        tokenizer.apply_chat_template(
            rows[2]["messages"][:1], tokenize=True, add_generation_prompt=True
        )["input_ids"]
    )
    with caplog.at_level("WARNING", logger="remote_runtime.data"):
        dataset, stats = load([path], tokenizer, tmp_path, max_length=n_prompt)
    # Row 2 lost its whole answer to truncation; row 1 never had one.
    assert (len(dataset), stats.dropped_no_loss, stats.rows) == (1, 2, 3)
    assert "dropped 2 of 3 rows with no assistant tokens" in caplog.text
    only_questions = write_jsonl(tmp_path / "q.jsonl", [rows[1]])
    with pytest.raises(DataError, match="no rows left to train on"):
        load([only_questions], tokenizer, tmp_path)


@pytest.mark.parametrize(
    "good, bad, words",
    [
        (
            chat("a", "b"),
            {"messages": [{"role": "robot", "content": "x"}]},
            "'messages[0].role' is 'robot'",
        ),
        (
            {"conversations": [{"from": "human", "value": "a"}, {"from": "gpt", "value": "b"}]},
            {"conversations": [{"from": "human"}]},
            "missing field 'conversations[0].value'",
        ),
        (
            {"instruction": "a", "output": "b"},
            {"instruction": "a", "input": "x"},
            "missing field 'output'",
        ),
        (
            {"query": "a", "response": "b"},
            {"query": "a", "response": ["b"]},
            "'response' must be a string",
        ),
        ({"text": "a"}, {"txt": "a"}, "missing field 'text'"),
    ],
)
def test_malformed_row_error_names_file_and_line(tokenizer, tmp_path, good, bad, words):
    task = "pt" if "text" in good else "sft"
    path = write_jsonl(tmp_path / "d.jsonl", [good, good, bad, good], raw_lines={2: ""})
    with pytest.raises(DataError) as exc:
        load([path], tokenizer, tmp_path, task=task, num_proc=2)
    assert str(exc.value).startswith(f"{path}:4: ") and words in str(exc.value)
    assert exc.value.line == 4


def test_invalid_json_and_bad_first_row(tokenizer, tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [chat("a", "b")], raw_lines={1: '{"messages": ['})
    with pytest.raises(DataError, match=r"d.jsonl:2: invalid JSON"):
        load([path], tokenizer, tmp_path)
    arr = tmp_path / "d.json"
    arr.write_text(f'[\n {json.dumps(chat("a", "b"))},\n\n {{"prompt":\n "x"}}\n]\n')
    with pytest.raises(DataError) as exc:
        load([arr], tokenizer, tmp_path)
    assert str(exc.value).startswith(f"{arr}:4: ") and "missing field 'messages'" in str(exc.value)
    unknown = write_jsonl(tmp_path / "u.jsonl", [{"prompt": "x", "answer": "y"}])
    with pytest.raises(DataError, match=r"u.jsonl:1: cannot tell the row format"):
        load([unknown], tokenizer, tmp_path)
    text = write_jsonl(tmp_path / "t.jsonl", [{"text": "plain"}])
    with pytest.raises(DataError, match=r"t.jsonl:1: .*text rows are for pre-training"):
        load([text], tokenizer, tmp_path)


def test_sampling_path_n_is_deterministic(tokenizer, tmp_path):
    path = write_demo_dataset(tmp_path / "demo.jsonl", num_rows=30)
    a, stats = load([f"{path}#10"], tokenizer, tmp_path, seed=1)
    b, _ = load([f"{path}#10"], tokenizer, tmp_path, seed=1)
    c, _ = load([f"{path}#10"], tokenizer, tmp_path, seed=2)
    assert stats.rows == 10 and docs(a) == docs(b) and docs(a) != docs(c)
    assert a.fingerprint == b.fingerprint != c.fingerprint
    many, stats = load([f"{path}#75", path], tokenizer, tmp_path, seed=1)
    assert (stats.rows, len(many), stats.sources[0].rows_in_file) == (105, 105, 30)
    assert stats.cache_misses == 0  # one file, tokenized once, sampled twice


def test_cache_hit_and_invalidation(tokenizer, tmp_path, monkeypatch):
    path = write_demo_dataset(tmp_path / "demo.jsonl", num_rows=20)
    first, stats = load([path], tokenizer, tmp_path, max_length=512)
    assert (stats.cache_hits, stats.cache_misses) == (0, 1)
    second, stats = load([path], tokenizer, tmp_path, max_length=512)
    assert (stats.cache_hits, stats.cache_misses) == (1, 0) and docs(second) == docs(first)
    # Any input of the tokens changes the key: data, max_length, system, template, code.
    assert load([path], tokenizer, tmp_path, max_length=256)[1].cache_misses == 1
    assert load([path], tokenizer, tmp_path, max_length=512, system="S")[1].cache_misses == 1
    qwen = with_template(tokenizer, QWEN25_TEMPLATE)
    assert load([path], qwen, tmp_path, max_length=512)[1].cache_misses == 1
    monkeypatch.setattr(cache_mod, "code_fingerprint", lambda: "other code")
    assert load([path], tokenizer, tmp_path, max_length=512)[1].cache_misses == 1
    monkeypatch.undo()
    path.write_text(path.read_text() + json.dumps(chat("New?", "Yes.")) + "\n")
    changed, stats = load([path], tokenizer, tmp_path, max_length=512)
    assert stats.cache_misses == 1 and len(changed) == 21
    assert load([path], tokenizer, tmp_path, max_length=512)[1].cache_hits == 1


def test_multiprocess_tokenization_equals_single_process(tokenizer, tmp_path):
    path = write_demo_dataset(tmp_path / "demo.jsonl", num_rows=200)
    one, s1 = load_dataset([str(path)], tokenizer, EncodeSettings(), cache_dir=tmp_path / "c1")
    two, s2 = load_dataset(
        [str(path)], tokenizer, EncodeSettings(), cache_dir=tmp_path / "c2", num_proc=2
    )
    assert s2.cache_misses == 1 and s1.to_dict() == s2.to_dict()
    assert docs(one) == docs(two)


def test_one_rank_builds_the_others_wait_and_load(tokenizer, tmp_path):
    path = write_demo_dataset(tmp_path / "demo.jsonl", num_rows=40)
    barrier = threading.Barrier(2, timeout=60)
    results = {}

    def rank(r):
        results[r] = load([path], tokenizer, tmp_path, should_build=r == 0, barrier=barrier.wait)

    threads = [threading.Thread(target=rank, args=(r,)) for r in (1, 0)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert results[0][1].cache_misses == 1 and results[1][1].cache_hits == 1
    assert docs(results[0][0]) == docs(results[1][0])


def test_failed_builder_still_enters_the_barrier(tokenizer, tmp_path):
    bad = write_jsonl(tmp_path / "bad.jsonl", [{"messages": "nope"}])
    calls = []
    with pytest.raises(DataError, match="bad.jsonl:1"):
        load([bad], tokenizer, tmp_path, should_build=True, barrier=lambda: calls.append(0))
    assert calls == [0]
    with pytest.raises(DataError, match="the rank that builds the dataset on this node failed"):
        load([bad], tokenizer, tmp_path, should_build=False, barrier=lambda: calls.append(1))
    assert calls == [0, 1]


def test_sft_needs_a_chat_template(tokenizer, tmp_path):
    path = write_demo_dataset(tmp_path / "demo.jsonl", num_rows=5)
    with pytest.raises(DataError, match="no chat template"):
        load([path], with_template(tokenizer, None), tmp_path)


def test_pretraining_dataset_counts_every_token(tokenizer, tmp_path):
    from remote_runtime.data.demo_data import write_demo_pretrain

    path = write_demo_pretrain(tmp_path / "pt.jsonl", num_rows=10)
    dataset, stats = load([path], tokenizer, tmp_path, task="pt")
    assert stats.loss_tokens == stats.tokens - len(dataset)  # all but each document's first


def test_tokenizing_needs_neither_torch_nor_megatron(tmp_path):
    import subprocess
    import sys

    from tests.conftest import cli_env

    code = (
        "import sys; from remote_runtime.tiny import build_tokenizer; "
        "from remote_runtime.data import load_dataset, EncodeSettings; "
        "from remote_runtime.data.demo_data import write_demo_dataset; "
        f"p = write_demo_dataset({str(tmp_path / 'd.jsonl')!r}, num_rows=10); "
        f"tok = build_tokenizer({str(tmp_path / 'tok')!r}); "
        f"load_dataset([str(p)], tok, EncodeSettings(), cache_dir={str(tmp_path / 'c')!r}); "
        "print(sorted(m for m in ('torch', 'megatron') if m in sys.modules))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=cli_env(), timeout=120
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"
