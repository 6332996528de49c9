"""All terminal output of the operator goes through this module.

People get rich tables, ✓/✗ rows, progress bars and next-step hints; agents get JSON on stdout
(`--json`), and nothing else is written to stdout in that mode. Colour is used only on a
terminal (rich decides, and honours NO_COLOR).
"""

from __future__ import annotations

import json
import sys
from typing import Any, Iterable, Sequence

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from megafleet.errors import MegafleetError

console = Console(highlight=False)
err_console = Console(stderr=True, highlight=False)

STATUS_STYLE = {
    "pass": ("✓", "green"),
    "ok": ("✓", "green"),
    "warn": ("!", "yellow"),
    "warning": ("!", "yellow"),
    "fail": ("✗", "red"),
    "error": ("✗", "red"),
    "skip": ("-", "dim"),
    "info": ("·", "cyan"),
}


def emit_json(obj: Any) -> None:
    """Write one JSON document to stdout (the `--json` contract: nothing else goes there)."""
    sys.stdout.write(json.dumps(obj, indent=2, sort_keys=False, default=str) + "\n")
    sys.stdout.flush()


def emit_json_line(obj: Any) -> None:
    """One compact JSON object on one line (JSON Lines, for streams such as `logs --json`)."""
    sys.stdout.write(json.dumps(obj, default=str) + "\n")
    sys.stdout.flush()


def symbol(status: str) -> str:
    mark, style = STATUS_STYLE.get(status, ("?", "magenta"))
    return f"[{style}]{mark}[/{style}]"


def styled_status(status: str) -> str:
    mark, style = STATUS_STYLE.get(status, ("?", "magenta"))
    return f"[{style}]{mark} {status}[/{style}]"


def check_row(status: str, label: str, detail: str = "") -> None:
    """One ✓/✗ line: `✓ label  detail`."""
    console.print(f"{symbol(status)} {label}" + (f"  [dim]{detail}[/dim]" if detail else ""))


def table(title: str | None, columns: Sequence[str], rows: Iterable[Sequence[Any]]) -> Table:
    t = Table(title=title, title_justify="left", header_style="bold")
    for c in columns:
        t.add_column(c, overflow="fold")
    for r in rows:
        t.add_row(*["" if v is None else str(v) for v in r])
    return t


def show(renderable: Any) -> None:
    console.print(renderable)


def info(message: str) -> None:
    console.print(message)


def warn(message: str) -> None:
    err_console.print(f"[yellow]warning:[/yellow] {message}")


def hint(*commands: str, title: str = "Next") -> None:
    """Next-step hints: the commands a person would most likely run now."""
    console.print(f"[bold]{title}:[/bold]")
    for c in commands:
        console.print(f"  [cyan]{c}[/cyan]")


def print_error(exc: BaseException, debug: bool = False, as_json: bool = False) -> None:
    """Report an error: JSON on stdout in `--json` mode, else one red line and the hint."""
    if as_json:
        payload = (
            exc.to_dict()
            if isinstance(exc, MegafleetError)
            else {"error": type(exc).__name__, "message": str(exc), "hint": None}
        )
        emit_json(payload)
        return
    if debug:
        err_console.print_exception()
    message = exc.message if isinstance(exc, MegafleetError) else f"{type(exc).__name__}: {exc}"
    err_console.print(f"[red]error:[/red] {escape(message)}")
    hint_text = getattr(exc, "hint", None)
    if hint_text:
        err_console.print(f"[bold]fix:[/bold] {escape(hint_text)}")


def show_check_matrix(
    hosts: Sequence[str],
    rows: Iterable[tuple[str, bool, Sequence[tuple[str, str]]]],
    title: str | None = None,
) -> None:
    """A check × host table: each cell a ✓/✗ symbol and a short value; rows whose value differs
    across hosts are marked with ≠ and shown in bold magenta."""
    t = Table(title=title, title_justify="left", header_style="bold")
    t.add_column("check", overflow="fold")
    for h in hosts:
        t.add_column(escape(h), overflow="fold")
    for check_id, differs, cells in rows:
        label = escape(check_id)
        if differs:
            label = f"[bold magenta]≠ {label}[/bold magenta]"
        rendered = []
        for status, text in cells:
            value = escape(text)
            rendered.append(
                f"{symbol(status)} "
                + (f"[bold magenta]{value}[/bold magenta]" if differs else value)
            )
        t.add_row(label, *rendered)
    console.print(t)


def problem(
    hosts: str, check_id: str, status: str, level: str, detail: str, fix: str | None
) -> None:
    """One failed or warning check with the hosts it applies to and its fix, indented."""
    tag = "" if level == "required" else " [dim](optional)[/dim]"
    console.print(
        f"{symbol(status)} [bold]{escape(check_id)}[/bold]{tag} on {escape(hosts)}: "
        f"{escape(detail)}"
    )
    for i, line in enumerate((fix or "").splitlines()):
        console.print(
            ("    [bold]fix:[/bold] " if i == 0 else "         ") + escape(line), soft_wrap=True
        )


def is_terminal() -> bool:
    """Whether stdout is an interactive terminal (live displays only there)."""
    return console.is_terminal


def live(get_renderable, refresh_per_second: float = 4):
    """A live-updating display on stdout (a context manager); `get_renderable()` is called at
    each refresh, so it can show elapsed times without events."""
    from rich.live import Live

    return Live(
        get_renderable=get_renderable,
        console=console,
        refresh_per_second=refresh_per_second,
        transient=False,
    )


def plain(text: str) -> None:
    """Text printed as is (no markup): log tails, commands."""
    console.print(text, markup=False, highlight=False, soft_wrap=True)


# -- jobs: transfers and multi-node logs ----------------------------------------------------------

NODE_COLOURS = (
    "cyan",
    "magenta",
    "green",
    "yellow",
    "blue",
    "bright_red",
    "bright_cyan",
    "bright_magenta",
    "bright_green",
    "bright_yellow",
    "bright_blue",
    "red",
)


def node_colour(node: int) -> str:
    """The stable colour of a node's log lines (by node rank)."""
    return NODE_COLOURS[node % len(NODE_COLOURS)]


def log_line(prefix: str, colour: str, text: str, dim: bool = False) -> None:
    """One line of a run's log: `prefix │ text`, the prefix in the node's colour."""
    body = f"[dim]{escape(text)}[/dim]" if dim else escape(text)
    console.print(f"[{colour}]{escape(prefix)} │[/{colour}] {body}", soft_wrap=True)


class TransferBars:
    """Progress bars for uploads and downloads, on stderr (stdout stays clean for --json).
    `bar(label, total)` returns a `progress(done, total)` callback; safe from several threads."""

    def __init__(self, enabled: bool = True):
        self.enabled = enabled
        self._progress = None

    def __enter__(self) -> "TransferBars":
        if self.enabled:
            from rich.progress import (
                BarColumn,
                DownloadColumn,
                Progress,
                TextColumn,
                TimeRemainingColumn,
                TransferSpeedColumn,
            )

            self._progress = Progress(
                TextColumn("{task.description}"),
                BarColumn(),
                DownloadColumn(),
                TransferSpeedColumn(),
                TimeRemainingColumn(),
                console=err_console,
            )
            self._progress.start()
        return self

    def __exit__(self, *exc) -> None:
        if self._progress is not None:
            self._progress.stop()

    def bar(self, label: str, total: int):
        if self._progress is None:
            return None
        task = self._progress.add_task(escape(label), total=max(total, 1))
        if total == 0:
            self._progress.update(task, completed=1)

        def update(done: int, total_now: int) -> None:
            self._progress.update(task, completed=done, total=max(total_now, 1))

        return update


def confirm(yes: bool, question: str, default: bool = False, cancelled: str = "cancelled") -> None:
    """Ask before changing something; `--yes` skips the question. Without a terminal to ask
    (an agent, a pipe) the answer is no, and the error says to pass --yes."""
    import click

    from megafleet.errors import UsageError

    if yes:
        return
    if not sys.stdin.isatty():
        raise UsageError(f"not confirmed (no terminal to ask): {question}", hint="add --yes")
    if not click.confirm(question, default=default):
        raise UsageError(cancelled)
