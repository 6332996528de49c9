"""Error types and the stable exit codes of the `megafleet` command.

Every failure a user can cause or meet is a `MegafleetError` carrying a one-line message, an
optional hint (what to do next) and an exit code. The CLI prints them without a traceback
unless `--debug` is given. The exit codes are part of the interface (agents branch on them) and
are documented in README.md; never renumber them.
"""

from __future__ import annotations

from dataclasses import dataclass

EXIT_OK = 0
EXIT_FAILED = 1  # a check found an error-level problem, or a job ended non-zero
EXIT_USAGE = 2  # bad arguments, bad config or inventory: nothing was done
EXIT_UNREACHABLE = 3  # at least one host could not be reached or authenticated
EXIT_REMOTE = 4  # a command on a host failed
EXIT_INTERRUPTED = 130  # Ctrl-C

EXIT_CODES = {
    EXIT_OK: "success",
    EXIT_FAILED: "a check failed or the job ended with an error",
    EXIT_USAGE: "bad arguments, job config or inventory; nothing was changed",
    EXIT_UNREACHABLE: "a host could not be reached or authenticated",
    EXIT_REMOTE: "a command on a host failed",
    EXIT_INTERRUPTED: "interrupted (Ctrl-C)",
}


class MegafleetError(Exception):
    """A failure with a message for people, an optional fix, and an exit code."""

    exit_code = EXIT_FAILED

    def __init__(self, message: str, hint: str | None = None, exit_code: int | None = None):
        super().__init__(message)
        self.message = message
        self.hint = hint
        if exit_code is not None:
            self.exit_code = exit_code

    def to_dict(self) -> dict:
        return {"error": type(self).__name__, "message": self.message, "hint": self.hint}


class UsageError(MegafleetError):
    """Bad arguments or bad input files."""

    exit_code = EXIT_USAGE


@dataclass
class FieldProblem:
    """One invalid field: where it is (file, line, dotted field or host) and what is wrong."""

    field: str
    message: str
    source: str | None = None  # a file path
    line: int | None = None
    hint: str | None = None  # what to do about this field

    def __str__(self) -> str:
        where = ""
        if self.source:
            where = f"{self.source}:{self.line}: " if self.line else f"{self.source}: "
        return f"{where}{self.field}: {self.message}"


class ValidationError(UsageError):
    """One or more invalid fields; the message lists every one of them."""

    def __init__(self, problems: list[FieldProblem], hint: str | None = None):
        self.problems = list(problems)
        lines = [str(p) for p in self.problems]
        message = lines[0] if len(lines) == 1 else "\n".join(["invalid input:"] + lines)
        super().__init__(message, hint)

    def to_dict(self) -> dict:
        d = super().to_dict()
        d["problems"] = [vars(p) for p in self.problems]
        return d


class UnreachableError(MegafleetError):
    exit_code = EXIT_UNREACHABLE


class RemoteCommandError(MegafleetError):
    exit_code = EXIT_REMOTE
