"""Driving the wizard's real questionary prompts in a pseudo-terminal (pexpect).

    w = WizardPty(["wizard"], env={"MEGAFLEET_HOME": home}, cwd=tmp_path)
    w.choose("Where should training run", 2)        # the 2nd choice (its number key), Enter
    w.type("Host address", "user@10.0.0.5")         # replaces the default, Enter
    w.enter("SSH user")                             # takes the default
    w.yes("Add a new host", False)
    w.cancel("What kind of training")               # Ctrl-C at that prompt
    assert w.wait() == 130 and "Nothing was written" in w.text

`text` is the transcript without terminal escape codes. Every expect names the prompt, so a
flow that changes fails at the question that moved, with the transcript in the message.
"""

from __future__ import annotations

import io
import re
import sys
from pathlib import Path

import pexpect

from tests.conftest import REPO_ROOT, cli_env

ANSI = re.compile(r"\x1b\[[0-9;?]*[ -/]*[@-~]|\x1b[()][0-9A-B]|\x1b[=>]|\r")
CTRL_U, DOWN = "\x15", "\x1b[B"


class WizardPty:
    def __init__(
        self,
        argv: list[str],
        env: dict | None = None,
        cwd: str | Path | None = None,
        module: str = "megafleet",
        timeout: float = 60,
    ):
        full_env = cli_env(env)
        full_env.pop("COLUMNS", None)  # the pty's size decides
        full_env["PROMPT_TOOLKIT_NO_CPR"] = "1"  # no cursor-position round trips to wait for
        full_env["TERM"] = "xterm"
        self.log = io.StringIO()
        self.child = pexpect.spawn(
            sys.executable,
            ["-m", module, *argv],
            env=full_env,
            cwd=str(cwd or REPO_ROOT),
            encoding="utf-8",
            timeout=timeout,
            dimensions=(50, 220),
        )
        self.child.logfile_read = self.log

    @property
    def text(self) -> str:
        return ANSI.sub("", self.log.getvalue())

    def expect(self, pattern: str, timeout: float | None = None) -> None:
        try:
            self.child.expect(pattern, timeout=timeout if timeout is not None else -1)
        except (pexpect.TIMEOUT, pexpect.EOF) as exc:
            raise AssertionError(
                f"wizard: no {pattern!r} ({type(exc).__name__}); transcript:\n{self.text[-6000:]}"
            ) from None

    def run_id(self, timeout: float = 180) -> str:
        """Wait for the launch to report its run; the run id."""
        self.expect(r"is running", timeout)
        return re.findall(r"run (\S+) is running", self.text)[-1]

    def choose(self, question: str, number: int, timeout: float | None = None) -> None:
        """Pick the `number`-th choice (1-based: its shortcut key) of a select question."""
        self.expect(question, timeout)
        self.expect(r"\(arrows or number")
        self.child.send(str(number))
        self.child.send("\r")

    def type(self, question: str, text: str, timeout: float | None = None) -> None:
        self.expect(question, timeout)
        self.child.send(CTRL_U + text + "\r")

    def enter(self, question: str, timeout: float | None = None) -> None:
        self.expect(question, timeout)
        self.child.send("\r")

    def yes(self, question: str, answer: bool = True, timeout: float | None = None) -> None:
        self.expect(question, timeout)
        self.child.send("y" if answer else "n")

    def cancel(self, question: str, timeout: float | None = None) -> None:
        self.expect(question, timeout)
        self.child.sendintr()

    def wait(self, timeout: float = 120) -> int:
        self.expect(pexpect.EOF, timeout)
        self.child.close()
        if self.child.exitstatus is not None:
            return self.child.exitstatus
        return -self.child.signalstatus

    def close(self) -> None:
        if self.child.isalive():
            self.child.terminate(force=True)
