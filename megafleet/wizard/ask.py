"""Questions: questionary prompts on a terminal, or answers from a YAML file (`--answers`).

Every question has an id (the key an answers file uses), a message and a default. An answer
from the file is checked by the same validator as a typed one; a bad one is an error naming the
key (it is never re-asked in a loop). A question the file does not answer is asked on the
terminal; with no terminal it is an error, so a scripted run never guesses a confirmation.

Ctrl-C at a prompt raises KeyboardInterrupt (questionary's `unsafe_ask`), which the flow turns
into a clean cancel.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any, Callable, Sequence

from rich.markup import escape

from megafleet import ui
from megafleet.errors import UsageError

Validator = Callable[[str], "str | None"]  # text -> an error message, or None when fine


def load_answers(path: str | Path) -> dict:
    import yaml

    p = Path(path).expanduser()
    try:
        data = yaml.safe_load(p.read_text()) or {}
    except OSError as exc:
        raise UsageError(f"--answers {path}: {exc.strerror}") from None
    except yaml.YAMLError as exc:
        raise UsageError(f"--answers {path}: not valid YAML ({exc})") from None
    if not isinstance(data, dict):
        raise UsageError(f"--answers {path}: must be a mapping of question ids to answers")
    return data


class Asker:
    """Asks the wizard's questions (see the module docstring)."""

    def __init__(
        self,
        answers: dict | None = None,
        source: str | None = None,
        interactive: bool | None = None,
    ):
        self.answers = dict(answers or {})
        self.source = source or "answers file"
        self.interactive = sys.stdin.isatty() if interactive is None else interactive
        self.given: dict[str, Any] = {}  # every answer, by question id (for resume hints)

    # -- answers from the file -------------------------------------------------------------
    def preset(self, qid: str) -> tuple[bool, Any]:
        """(True, answer) when the answers file holds one for `qid` (consumed once)."""
        if qid in self.answers:
            return True, self.answers.pop(qid)
        return False, None

    def _from_file(self, qid: str, message: str, value: Any) -> Any:
        ui.info(
            f"[bold]?[/bold] {escape(message)} [cyan]{escape(str(value))}[/cyan] "
            f"[dim](from {escape(self.source)})[/dim]"
        )
        self.given[qid] = value
        return value

    def _need_terminal(self, qid: str, message: str) -> None:
        if not self.interactive:
            raise UsageError(
                f"no terminal to ask {message!r}",
                hint=f"add `{qid}: ...` to the answers file, or run in a terminal",
            )

    def _bad(self, qid: str, value: Any, why: str) -> UsageError:
        return UsageError(f"{self.source}: {qid}: {value!r}: {why}")

    # -- question kinds --------------------------------------------------------------------
    def select(
        self,
        qid: str,
        message: str,
        choices: Sequence[tuple[Any, str]],
        default: Any = None,
        disabled: dict[Any, str] | None = None,
    ) -> Any:
        """One of `choices` ((value, title) pairs); `disabled` values are shown, not selectable."""
        disabled = disabled or {}
        values = [v for v, _ in choices if v not in disabled]
        found, value = self.preset(qid)
        if found:
            if value not in values:
                raise self._bad(qid, value, "choose one of " + ", ".join(map(str, values)))
            return self._from_file(qid, message, value)
        self._need_terminal(qid, message)
        import questionary

        items = [
            questionary.Choice(title, value=v, disabled=disabled.get(v)) for v, title in choices
        ]
        start = next((c for c in items if c.value == default and not c.disabled), None)
        answer = questionary.select(
            message,
            choices=items,
            default=start,
            use_shortcuts=True,
            instruction="(arrows or number, Enter)",
        ).unsafe_ask()
        self.given[qid] = answer
        return answer

    def text(
        self,
        qid: str,
        message: str,
        default: str = "",
        validate: Validator | None = None,
        path: bool = False,
    ) -> str:
        found, value = self.preset(qid)
        if found:
            value = "" if value is None else str(value)
            why = validate(value) if validate else None
            if why:
                raise self._bad(qid, value, why)
            return self._from_file(qid, message, value)
        self._need_terminal(qid, message)
        import questionary

        def check(text: str):
            return True if validate is None else (validate(text) or True)

        prompt = questionary.path if path else questionary.text
        answer = prompt(message, default=default, validate=check).unsafe_ask()
        self.given[qid] = answer
        return answer

    def confirm(self, qid: str, message: str, default: bool = True) -> bool:
        found, value = self.preset(qid)
        if found:
            if not isinstance(value, bool):
                raise self._bad(qid, value, "answer true or false")
            return self._from_file(qid, message, value)
        self._need_terminal(qid, message)
        import questionary

        answer = questionary.confirm(message, default=default).unsafe_ask()
        self.given[qid] = answer
        return answer

    def checkbox(
        self,
        qid: str,
        message: str,
        choices: Sequence[tuple[Any, str]],
        checked: Sequence[Any] = (),
    ) -> list:
        found, value = self.preset(qid)
        values = [v for v, _ in choices]
        if found:
            value = list(value or [])
            unknown = [v for v in value if v not in values]
            if unknown:
                raise self._bad(qid, unknown, "choose from " + ", ".join(map(str, values)))
            return self._from_file(qid, message, value)
        self._need_terminal(qid, message)
        import questionary

        items = [questionary.Choice(title, value=v, checked=v in checked) for v, title in choices]
        answer = questionary.checkbox(
            message, choices=items, instruction="(Space toggles, Enter accepts)"
        ).unsafe_ask()
        self.given[qid] = answer
        return answer
