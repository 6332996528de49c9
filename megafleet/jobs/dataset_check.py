"""The dataset, checked on the operator's machine before anything is uploaded: every row of every
local file, read as a stream (a file far larger than memory is fine), with the rules of the
runtime's row formats (remote_runtime.spec.formats). Problems name the file and line; the report
counts rows and the tokens training learns from (assistant turns for `sft`, all text for `pt`).

Token counts are exact when the `tokenizers` package is here, the model directory has a
`tokenizer.json` and the files hold at most EXACT_LIMIT bytes (tokenizing more would take
minutes); otherwise they are estimated as characters / 4 and marked as estimates.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from megafleet.errors import FieldProblem, ValidationError

CHARS_PER_TOKEN = 4  # a rough average of BPE tokenizers on English text and code
EXACT_LIMIT = 64 << 20  # bytes of dataset up to which tokens are counted with the tokenizer
MAX_PROBLEMS = 10


@dataclass
class FileReport:
    path: str
    format: str | None = None
    rows: int = 0
    trainable_tokens: int = 0
    total_tokens: int = 0


@dataclass
class DatasetReport:
    files: list[FileReport] = field(default_factory=list)
    tokens_exact: bool = False

    @property
    def rows(self) -> int:
        return sum(f.rows for f in self.files)

    def to_dict(self) -> dict:
        return {
            "rows": self.rows,
            "trainable_tokens": sum(f.trainable_tokens for f in self.files),
            "total_tokens": sum(f.total_tokens for f in self.files),
            "tokens": (
                "exact" if self.tokens_exact else f"estimated (characters / {CHARS_PER_TOKEN})"
            ),
            "files": [vars(f) for f in self.files],
        }


class _Counter:
    """Tokens of a text: with the model's tokenizer.json when possible, else characters / 4."""

    def __init__(self, model_dir: Path | None, data_bytes: int = 0):
        self.tokenizer = None
        path = model_dir / "tokenizer.json" if model_dir else None
        if path is not None and path.is_file() and data_bytes <= EXACT_LIMIT:
            try:
                from tokenizers import Tokenizer

                self.tokenizer = Tokenizer.from_file(str(path))
            except Exception:  # not installed here, or a format it cannot read: estimate
                self.tokenizer = None

    def __call__(self, text: str) -> int:
        if self.tokenizer is not None:
            return len(self.tokenizer.encode(text, add_special_tokens=False).ids)
        return -(-len(text) // CHARS_PER_TOKEN)


def _rows(path: Path):
    """(line number, parsed row) of a .jsonl file or a .json array, as a stream for JSON Lines.
    Raises ValueError with the line for bytes that are not UTF-8 or lines that are not JSON."""
    with open(path, "rb") as f:
        head = f.read(4096).lstrip()
    if path.suffix.lower() == ".json" and head.startswith(b"["):
        try:
            rows = json.loads(path.read_bytes().decode("utf-8-sig"))
        except UnicodeDecodeError as exc:
            raise ValueError(f"not UTF-8 text ({exc.reason} at byte {exc.start})") from None
        except json.JSONDecodeError as exc:
            raise ValueError(f"line {exc.lineno}: invalid JSON: {exc.msg}") from None
        yield from ((None, row) for row in rows)
        return
    with open(path, "rb") as f:
        for number, raw in enumerate(f, start=1):
            try:
                line = raw.decode("utf-8-sig" if number == 1 else "utf-8")
            except UnicodeDecodeError as exc:
                raise ValueError(
                    f"line {number}: not UTF-8 text ({exc.reason} at byte {exc.start} of the line)"
                ) from None
            if line.strip():
                try:
                    yield number, json.loads(line)
                except json.JSONDecodeError as exc:
                    raise ValueError(
                        f"line {number}: invalid JSON: {exc.msg} (column {exc.colno})"
                    ) from None


def check_file(path: Path, task: str, count) -> tuple[FileReport, list[str]]:
    """One file: its report and its problems ("line N: why"), at most MAX_PROBLEMS."""
    from remote_runtime.spec.errors import RowError
    from remote_runtime.spec.formats import detect_format, row_to_example

    report, problems = FileReport(str(path)), []
    try:
        for number, row in _rows(path):
            where = f"line {number}" if number else f"row {report.rows + 1}"
            try:
                report.format = report.format or detect_format(row)
                example = row_to_example(row, report.format)
                _measure(report, example, task, count)
            except RowError as exc:
                problems.append(f"{where}: {exc}")
            report.rows += 1
            if len(problems) >= MAX_PROBLEMS:
                problems.append("(more problems not shown)")
                break
    except ValueError as exc:
        problems.append(str(exc))
    if not report.rows and not problems:
        problems.append("the file holds no rows")
    return report, problems


def _measure(report: FileReport, example, task: str, count) -> None:
    if isinstance(example, tuple):  # a preference pair: the chosen and the rejected conversation
        for conversation in example:
            _measure(report, conversation, task, count)
        return
    if isinstance(example, str):  # a text row
        if task != "pt":
            from remote_runtime.spec.errors import RowError

            raise RowError(
                "a 'text' row has no assistant turn to train on; text rows are for "
                "pre-training (`pt`); for `sft` use messages, sharegpt, alpaca or "
                "query/response rows"
            )
        n = count(example)
        report.total_tokens += n
        report.trainable_tokens += n
        return
    sizes = [(m["role"], count(m["content"])) for m in example]
    answers = [n for role, n in sizes if role == "assistant"]
    if task != "pt" and not answers:
        from remote_runtime.spec.errors import RowError

        raise RowError("no assistant turn: nothing to train on in this row")
    report.total_tokens += sum(n for _, n in sizes)
    report.trainable_tokens += sum(n for _, n in sizes) if task == "pt" else sum(answers)


def check_datasets(job, model_dir: Path | None) -> DatasetReport:
    """Every local file of `job.data.dataset`; raises ValidationError naming file and line."""
    local = [
        p for p in (Path(s.partition("#")[0]).expanduser() for s in job.data.dataset) if p.is_file()
    ]  # other paths are on the nodes: the runtime checks them there
    count = _Counter(model_dir, sum(p.stat().st_size for p in local))
    out = DatasetReport(tokens_exact=count.tokenizer is not None)
    problems = []
    for path in local:
        report, found = check_file(path, job.task, count)
        out.files.append(report)
        problems += [FieldProblem("data.dataset", f"{path}: {p}") for p in found]
    if problems:
        raise ValidationError(
            problems,
            hint="fix those rows (each names its line); the formats "
            "are described in references/dataset-formats.md",
        )
    return out


def samples_per_epoch(report: DatasetReport, job) -> tuple[int, int]:
    """(at least, at most) training sequences per epoch. Without packing both are the rows
    (`path#N` counts N). With packing a pack holds one row or more (at most: the rows), and
    all tokens need at least tokens / max_length packs (at least: content tokens only, the
    chat template adds more)."""
    rows = 0
    local = [s for s in job.data.dataset if Path(s.partition("#")[0]).expanduser().is_file()]
    for spec, f in zip(local, report.files):
        n = spec.partition("#")[2]
        rows += int(n) if n.isdigit() else f.rows
    if not job.data.packing:
        return rows, rows
    total = sum(f.total_tokens for f in report.files)
    return min(rows, max(1, -(-total // job.data.max_length))), rows
