"""The bundled demo data for `megafleet demo`: short chats a tiny model learns in a few steps.

Deterministic (a seeded generator, no downloads). Short rows whose answers are fixed facts
repeated many times or copies of words from the question. Checked with the tiny Qwen3 model of
remote_runtime.tiny and plain AdamW (lr 1e-3..3e-3, 8-16 rows per step): the assistant-token loss
falls from ~7.3 to ~0.7-1.4 in 30 steps and greedy decoding of DEMO_PROMPT gives DEMO_ANSWER.
  - the demo question itself, verbatim (10% of rows), so the answer shown after training is right;
  - capitals: "What is the capital of France?" -> "The capital of France is Paris."
  - sums of two digits: "What is 3 + 4?" -> "3 + 4 = 7."
  - copying: "Repeat after me: red fox blue" -> "red fox blue"
  - two-turn chats (a greeting, then a capital question), some with a system prompt.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

CAPITALS = {
    "France": "Paris",
    "Japan": "Tokyo",
    "Italy": "Rome",
    "Egypt": "Cairo",
    "Peru": "Lima",
    "Kenya": "Nairobi",
    "Spain": "Madrid",
    "Canada": "Ottawa",
    "Norway": "Oslo",
    "Chile": "Santiago",
}
WORDS = [
    "red",
    "blue",
    "green",
    "fox",
    "cat",
    "dog",
    "sun",
    "moon",
    "tree",
    "river",
    "stone",
    "bird",
    "fish",
    "star",
    "rain",
    "snow",
    "wind",
    "fire",
    "leaf",
    "sand",
]
SYSTEM = "You are a helpful assistant."
DEMO_PROMPT = "What is the capital of France?"
DEMO_ANSWER = "The capital of France is Paris."
_QUESTIONS = [
    "What is the capital of {c}?",
    "Name the capital of {c}.",
    "Which city is the capital of {c}?",
]


def _demo(rng: random.Random) -> list[dict]:
    return [{"role": "user", "content": DEMO_PROMPT}, {"role": "assistant", "content": DEMO_ANSWER}]


def _capital(rng: random.Random) -> list[dict]:
    country = rng.choice(sorted(CAPITALS))
    return [
        {"role": "user", "content": rng.choice(_QUESTIONS).format(c=country)},
        {"role": "assistant", "content": f"The capital of {country} is {CAPITALS[country]}."},
    ]


def _sum(rng: random.Random) -> list[dict]:
    a, b = rng.randrange(10), rng.randrange(10)
    return [
        {"role": "user", "content": f"What is {a} + {b}?"},
        {"role": "assistant", "content": f"{a} + {b} = {a + b}."},
    ]


def _copy(rng: random.Random) -> list[dict]:
    words = " ".join(rng.sample(WORDS, rng.randint(2, 4)))
    return [
        {"role": "user", "content": f"Repeat after me: {words}"},
        {"role": "assistant", "content": words},
    ]


def _two_turns(rng: random.Random) -> list[dict]:
    return [
        {"role": "user", "content": "Hello!"},
        {"role": "assistant", "content": "Hello! How can I help you?"},
    ] + _capital(rng)


def demo_rows(num_rows: int = 200, seed: int = 0) -> list[dict]:
    """`num_rows` rows in messages format: 10% the demo question, 30% capitals, 25% sums,
    20% copying, 15% two turns; every fifth row has a system prompt."""
    rng = random.Random(seed)
    kinds = [_demo] * 2 + [_capital] * 6 + [_sum] * 5 + [_copy] * 4 + [_two_turns] * 3
    rows = []
    for i in range(max(0, num_rows - 1)):
        messages = kinds[i % len(kinds)](rng)
        if i % 5 == 0:
            messages = [{"role": "system", "content": SYSTEM}] + messages
        rows.append({"messages": messages})
    if num_rows:  # the prompt the demo asks after training, verbatim
        rows.append(
            {
                "messages": [
                    {"role": "user", "content": DEMO_PROMPT},
                    {"role": "assistant", "content": DEMO_ANSWER},
                ]
            }
        )
    return rows


def demo_pretrain_rows(num_rows: int = 100, seed: int = 0) -> list[dict]:
    """`num_rows` short {"text": ...} rows for `pt` (facts and sums as plain sentences)."""
    rng = random.Random(seed)
    rows = []
    for _ in range(num_rows):
        country = rng.choice(sorted(CAPITALS))
        a, b = rng.randrange(10), rng.randrange(10)
        rows.append(
            {
                "text": f"The capital of {country} is {CAPITALS[country]}. "
                f"{a} + {b} = {a + b}. The {rng.choice(WORDS)} is near the "
                f"{rng.choice(WORDS)}."
            }
        )
    return rows


def demo_corpus(num_rows: int = 200, seed: int = 0) -> list[str]:
    """Every text of the demo data, to train the tiny tokenizer on (short sequences)."""
    texts = [m["content"] for row in demo_rows(num_rows, seed) for m in row["messages"]]
    return texts + [row["text"] for row in demo_pretrain_rows(num_rows // 2, seed)]


def _write_jsonl(path: str | Path, rows: list[dict]) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows))
    return path


def write_demo_dataset(path: str | Path, num_rows: int = 200, seed: int = 0) -> Path:
    """Write the demo chat dataset (messages format, JSON Lines) and return its path."""
    return _write_jsonl(path, demo_rows(num_rows, seed))


def write_demo_pretrain(path: str | Path, num_rows: int = 100, seed: int = 0) -> Path:
    """Write the demo pre-training text (`{"text": ...}` rows, JSON Lines) and return its path."""
    return _write_jsonl(path, demo_pretrain_rows(num_rows, seed))


def demo_preference_rows(num_rows: int = 64, seed: int = 0) -> list[dict]:
    """`num_rows` preference pairs in ms-swift's format (`messages` ending in the chosen answer,
    `rejected_response`): a correct capital or sum is chosen over a wrong one."""
    rng = random.Random(seed)
    rows = []
    for i in range(num_rows):
        messages = (_capital if i % 2 else _sum)(rng)
        right = messages[-1]["content"]
        if i % 2:
            wrong_city = rng.choice(sorted(set(CAPITALS.values()) - {right.split()[-1][:-1]}))
            wrong = right.rsplit(" ", 1)[0] + f" {wrong_city}."
        else:
            head, total = right.rsplit("= ", 1)
            wrong = f"{head}= {int(total[:-1]) + rng.randint(1, 5)}."
        rows.append({"messages": messages, "rejected_response": wrong})
    return rows


def write_demo_preferences(path: str | Path, num_rows: int = 64, seed: int = 0) -> Path:
    """Write demo preference pairs (ms-swift format, JSON Lines) and return its path."""
    return _write_jsonl(path, demo_preference_rows(num_rows, seed))
