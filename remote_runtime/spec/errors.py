"""The error types of the contract: invalid jobs and bad data, as structured problems.

A `ConfigError` carries `Problem(field, message, hint, kind)` tuples: the dotted job field (or
`path:line` for data), what is wrong, what to do, and whether the value is merely missing (a
template may leave such fields open) or invalid. They travel as data: `to_dict()` is what the
node's `--dry_run` prints as JSON and what the operator reads back, field names intact.
"""

from __future__ import annotations

from typing import NamedTuple


class Problem(NamedTuple):
    field: str
    message: str
    hint: str | None = None
    kind: str = "invalid"  # "invalid" | "missing" (required and not set yet)

    def to_dict(self) -> dict:
        return self._asdict()


class ConfigError(ValueError):
    """Invalid job configuration: every bad field at once, as `problems`.

    Accepts `Problem`s or plain (field, message[, hint[, kind]]) tuples.
    """

    def __init__(self, problems, source: str | None = None):
        self.problems = [p if isinstance(p, Problem) else Problem(*p) for p in problems]
        self.source = source
        prefix = f"{source}: " if source else ""
        lines = [
            f"{prefix}{p.field}: {p.message}" if p.field else f"{prefix}{p.message}"
            for p in self.problems
        ]
        super().__init__(
            lines[0] if len(lines) == 1 else "invalid job config:\n  " + "\n  ".join(lines)
        )

    def to_dict(self) -> dict:
        return {
            "error": "ConfigError",
            "source": self.source,
            "problems": [p.to_dict() for p in self.problems],
        }

    @classmethod
    def from_dict(cls, data: dict) -> "ConfigError":
        return cls([Problem(**p) for p in data.get("problems", [])], data.get("source"))


class DataError(ConfigError):
    """A dataset problem: `path:line: what is wrong`.

    A `ConfigError` (hence a `ValueError`), so the runtime's existing `except ConfigError`
    handlers print it as a one-line error and exit 2. `path` and `line` (1-based, or None when
    the problem is the whole file) stay available for tools. Picklable, so errors raised in
    tokenizer worker processes reach the parent intact.
    """

    def __init__(self, message: str, path: str | None = None, line: int | None = None):
        self.message = message
        self.path = path
        self.line = line
        where = f"{path}:{line}" if path and line else (path or "")
        super().__init__([(where, message)])

    def __reduce__(self):
        return (DataError, (self.message, self.path, self.line))


class RowError(ValueError):
    """A malformed row, before we know where it came from; wrapped into DataError by callers."""
