"""Dataset specs (`path#N`), reading .jsonl/.json rows with their line numbers, and `#N`
sampling."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from remote_runtime.spec.errors import DataError

EXTENSIONS = (".jsonl", ".json")


@dataclass(frozen=True)
class DatasetSpec:
    spec: str  # as the user wrote it, for messages
    path: Path
    sample: int | None  # N of `path#N`: how many rows to draw (with repetition when N > rows)


def parse_dataset_specs(specs: list[str]) -> list[DatasetSpec]:
    """Parse `--dataset` entries; every file must exist and be .jsonl or .json."""
    if not specs:
        raise DataError(
            "no dataset given: set --dataset to one or more .jsonl/.json files", "data.dataset"
        )
    out = []
    for spec in specs:
        path, sep, count = spec.rpartition("#")
        if not sep or not count.isdigit():
            path, count = spec, ""  # a '#' that is part of the file name
        if count and int(count) <= 0:
            raise DataError(f"{spec!r}: the part after # must be a row count > 0", "data.dataset")
        p = Path(path).expanduser()
        if not p.is_file():
            raise DataError(
                f"dataset file not found: {p} (from --dataset {spec!r})", "data.dataset"
            )
        if p.suffix.lower() not in EXTENSIONS:
            raise DataError(
                f"{p}: unsupported file type {p.suffix!r}; use .jsonl or .json", "data.dataset"
            )
        out.append(DatasetSpec(spec=spec, path=p, sample=int(count) if count else None))
    return out


def _read_text(path: Path) -> str:
    data = path.read_bytes()
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = data[: exc.start].count(b"\n") + 1
        raise DataError(
            f"not UTF-8 text ({exc.reason} at byte {exc.start})", str(path), line
        ) from None


def read_rows(path: Path) -> list[tuple[int, object]]:
    """Rows of a .jsonl or .json file as (line number, payload).

    A JSON Lines payload is the line's text (parsed later, in the tokenizer workers); a .json
    array's payload is the parsed row. A .json file that does not start with `[` is read as
    JSON Lines, as the Hugging Face `json` loader does.
    """
    text = _read_text(path)
    if path.suffix.lower() == ".json" and text.lstrip().startswith("["):
        return _json_array_rows(text, str(path))
    rows = []
    for number, line in enumerate(text.splitlines(), start=1):
        if line.strip():
            rows.append((number, line))
    return rows


def parse_json_line(payload: object, path: str, line: int) -> object:
    if not isinstance(payload, str):
        return payload
    try:
        return json.loads(payload)
    except json.JSONDecodeError as exc:
        hint = (
            "; a .json file must hold one array of rows or one JSON object per line"
            if path.endswith(".json")
            else ""
        )
        raise DataError(f"invalid JSON: {exc.msg} (column {exc.colno}){hint}", path, line) from None


def _json_array_rows(text: str, path: str) -> list[tuple[int, object]]:
    """Parse a top-level JSON array element by element, keeping each element's line number."""
    decoder = json.JSONDecoder()
    rows: list[tuple[int, object]] = []
    line, seen = 1, 0

    def line_at(pos: int) -> int:
        nonlocal line, seen
        line += text.count("\n", seen, pos)
        seen = pos
        return line

    def skip(pos: int) -> int:
        while pos < len(text) and text[pos] in " \t\r\n":
            pos += 1
        return pos

    pos = skip(skip(0) + 1)
    if pos < len(text) and text[pos] == "]":
        return rows
    while True:
        start = line_at(pos)
        try:
            obj, pos = decoder.raw_decode(text, pos)
        except json.JSONDecodeError as exc:
            raise DataError(
                f"invalid JSON: {exc.msg} (column {exc.colno})", path, exc.lineno
            ) from None
        rows.append((start, obj))
        pos = skip(pos)
        if pos < len(text) and text[pos] == ",":
            pos = skip(pos + 1)
            continue
        if pos < len(text) and text[pos] == "]":
            return rows
        raise DataError(
            "invalid JSON: expected ',' or ']' after a row", path, line_at(min(pos, len(text)))
        )


def sample_rows(n_rows: int, count: int | None, seed: int | list[int]) -> np.ndarray:
    """Row indices for `path#count`, as ms-swift samples them.

    count <= rows: a random subset without repetition. count > rows: every row count // rows
    times, plus a random subset for the remainder. No count: every row once, in file order.
    """
    if count is None:
        return np.arange(n_rows, dtype=np.int64)
    if n_rows == 0:
        return np.zeros(0, dtype=np.int64)
    repeats, remain = divmod(count, n_rows)
    parts = [np.tile(np.arange(n_rows, dtype=np.int64), repeats)]
    if remain:
        parts.append(np.random.default_rng(seed).permutation(n_rows)[:remain].astype(np.int64))
    return np.concatenate(parts)
