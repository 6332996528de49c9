"""The one error type of the data pipeline: bad input, named by file and line."""

from __future__ import annotations

from remote_runtime.spec.config import ConfigError


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
