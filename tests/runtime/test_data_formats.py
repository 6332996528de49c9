"""Row formats, dataset specs, reading files with line numbers, `path#N` sampling (no torch)."""

from __future__ import annotations

import json
import pickle

import numpy as np
import pytest

from remote_runtime.data.sources import parse_dataset_specs, read_rows, sample_rows
from remote_runtime.spec.config import ConfigError
from remote_runtime.spec.errors import DataError, RowError
from remote_runtime.spec.formats import detect_format, row_to_example

CHAT = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]


@pytest.mark.parametrize(
    "row, fmt, expected",
    [
        ({"messages": CHAT}, "messages", CHAT),
        (
            {"messages": CHAT, "system": "S"},
            "messages",
            [{"role": "system", "content": "S"}] + CHAT,
        ),
        (
            {
                "conversations": [
                    {"from": "human", "value": "Hi"},
                    {"from": "gpt", "value": "Hello"},
                ]
            },
            "sharegpt",
            CHAT,
        ),
        (
            {
                "conversations": [
                    {"from": "system", "value": "S"},
                    {"from": "user", "value": "Hi"},
                    {"from": "assistant", "value": "Hello"},
                ]
            },
            "sharegpt",
            [{"role": "system", "content": "S"}] + CHAT,
        ),
        ({"instruction": "Hi", "output": "Hello"}, "alpaca", CHAT),
        (
            {"instruction": "Sum", "input": "1 2", "output": "3", "system": "S"},
            "alpaca",
            [
                {"role": "system", "content": "S"},
                {"role": "user", "content": "Sum\n1 2"},
                {"role": "assistant", "content": "3"},
            ],
        ),
        ({"query": "Hi", "response": "Hello"}, "query_response", CHAT),
        (
            {"query": "Q2", "response": "R2", "history": [["Hi", "Hello"]]},
            "query_response",
            CHAT + [{"role": "user", "content": "Q2"}, {"role": "assistant", "content": "R2"}],
        ),
        ({"text": "plain"}, "text", "plain"),
        (
            {
                "messages": [
                    {
                        "role": "user",
                        "content": [{"type": "text", "text": "H"}, {"type": "text", "text": "i"}],
                    },
                    {"role": "assistant", "content": "Hello"},
                ]
            },
            "messages",
            CHAT,
        ),
    ],
)
def test_formats_are_detected_and_converted(row, fmt, expected):
    assert detect_format(row) == fmt
    assert row_to_example(row, fmt) == expected


@pytest.mark.parametrize(
    "row, fmt, words",
    [
        ({"messages": []}, "messages", "'messages' must be a non-empty list"),
        (
            {"messages": [{"role": "bot", "content": "x"}]},
            "messages",
            "'messages[0].role' is 'bot'",
        ),
        ({"messages": [{"role": "user"}]}, "messages", "missing field 'messages[0].content'"),
        (
            {"messages": [{"role": "user", "content": 3}]},
            "messages",
            "'messages[0].content' must be a string",
        ),
        (
            {"conversations": [{"from": "alien", "value": "x"}]},
            "sharegpt",
            "'conversations[0].from'",
        ),
        (
            {"conversations": [{"from": "gpt"}]},
            "sharegpt",
            "missing field 'conversations[0].value'",
        ),
        ({"instruction": "x"}, "alpaca", "missing field 'output'"),
        ({"instruction": 1, "output": "x"}, "alpaca", "'instruction' must be a string"),
        ({"query": "q"}, "query_response", "missing field 'response'"),
        ({"query": "q", "response": "r", "history": [["a"]]}, "query_response", "'history[0]'"),
        ({"text": None}, "text", "missing field 'text'"),
        (["not", "a", "dict"], "messages", "must be a JSON object"),
    ],
)
def test_malformed_rows_name_the_field(row, fmt, words):
    with pytest.raises(RowError, match=None) as exc:
        row_to_example(row, fmt)
    assert words in str(exc.value)


def test_unknown_format_lists_the_expected_keys():
    with pytest.raises(RowError) as exc:
        detect_format({"prompt": "x", "answer": "y"})
    assert "['answer', 'prompt']" in str(exc.value) and "'messages'" in str(exc.value)


def test_dataset_specs(tmp_path):
    a = tmp_path / "a.jsonl"
    a.write_text("{}\n")
    odd = tmp_path / "b#c.json"
    odd.write_text("[]")
    specs = parse_dataset_specs([str(a), f"{a}#50", str(odd)])
    assert [(s.path, s.sample) for s in specs] == [(a, None), (a, 50), (odd, None)]
    for bad, words in [
        (str(tmp_path / "missing.jsonl"), "dataset file not found"),
        (f"{a}#0", "row count > 0"),
        (str(tmp_path), "not found"),
    ]:
        with pytest.raises(DataError, match=words):
            parse_dataset_specs([bad])
    csv = tmp_path / "x.csv"
    csv.write_text("a,b\n")
    with pytest.raises(DataError, match="use .jsonl or .json"):
        parse_dataset_specs([str(csv)])
    with pytest.raises(DataError, match="no dataset given"):
        parse_dataset_specs([])


def test_read_rows_keeps_line_numbers(tmp_path):
    jl = tmp_path / "a.jsonl"
    jl.write_text('{"text": "a"}\n\n{"text": "b"}\n')
    assert [line for line, _ in read_rows(jl)] == [1, 3]
    arr = tmp_path / "a.json"
    arr.write_text('[\n  {"text": "a"},\n\n  {"text":\n "b"}\n]\n')
    assert read_rows(arr) == [(2, {"text": "a"}), (4, {"text": "b"})]
    lines_json = tmp_path / "lines.json"  # .json holding JSON Lines, as HF's loader accepts
    lines_json.write_text('{"text": "a"}\n{"text": "b"}\n')
    assert [line for line, _ in read_rows(lines_json)] == [1, 2]


def test_broken_json_array_names_the_line(tmp_path):
    arr = tmp_path / "bad.json"
    arr.write_text('[\n {"text": "a"},\n {"text": "b"\n]\n')
    with pytest.raises(DataError) as exc:
        read_rows(arr)
    assert str(exc.value).startswith(f"{arr}:4: invalid JSON")
    assert (exc.value.path, exc.value.line) == (str(arr), 4)


def test_non_utf8_file_names_the_line(tmp_path):
    p = tmp_path / "latin.jsonl"
    p.write_bytes(b'{"text": "a"}\n{"text": "caf\xe9"}\n')
    with pytest.raises(DataError, match=r"latin.jsonl:2: not UTF-8"):
        read_rows(p)


def test_data_error_is_a_config_error_and_pickles():
    exc = DataError("bad row", "d.jsonl", 7)
    assert isinstance(exc, ConfigError) and isinstance(exc, ValueError)
    assert str(exc) == "d.jsonl:7: bad row"
    back = pickle.loads(pickle.dumps(exc))
    assert (str(back), back.path, back.line) == (str(exc), "d.jsonl", 7)


def test_sampling_is_deterministic_and_repeats_like_ms_swift():
    a = sample_rows(10, 4, seed=[42, 0])
    assert np.array_equal(a, sample_rows(10, 4, seed=[42, 0]))
    assert len(set(a.tolist())) == 4  # no repetition when N <= rows
    assert not all(np.array_equal(a, sample_rows(10, 4, seed=[s, 0])) for s in range(43, 48))
    many = sample_rows(10, 25, seed=[42, 0])
    counts = np.bincount(many, minlength=10)
    assert len(many) == 25 and counts.min() == 2 and counts.max() == 3 and (counts == 3).sum() == 5
    assert np.array_equal(sample_rows(3, None, seed=0), [0, 1, 2])


def test_demo_data_is_deterministic_chat(tmp_path):
    from remote_runtime.data.demo_data import (
        DEMO_ANSWER,
        DEMO_PROMPT,
        write_demo_dataset,
        write_demo_pretrain,
    )

    a = write_demo_dataset(tmp_path / "a.jsonl")
    b = write_demo_dataset(tmp_path / "b.jsonl")
    assert a.read_text() == b.read_text()
    rows = [json.loads(line) for line in a.read_text().splitlines()]
    assert len(rows) == 200 and all(detect_format(r) == "messages" for r in rows)
    assert any(m["content"] == DEMO_PROMPT for r in rows for m in r["messages"])
    assert rows[-1]["messages"][-1]["content"] == DEMO_ANSWER
    assert sum(len(r["messages"]) > 3 for r in rows) >= 20  # multi-turn rows are in
    text = [
        json.loads(x) for x in write_demo_pretrain(tmp_path / "t.jsonl").read_text().splitlines()
    ]
    assert len(text) == 100 and all(detect_format(r) == "text" for r in text)
