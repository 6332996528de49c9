"""Why a node's torchrun ended non-zero, in words (node side, stdlib only).

torchrun ends its output with a failure summary naming the first failed worker:

    Root Cause (first observed failure):
    [0]:
      ...
      rank      : 1 (local_rank: 0)
      exitcode  : -9 (pid: 4242)

A negative exit code is the signal that ended the worker. SIGKILL is what the kernel's
out-of-memory killer sends; when the kernel log is readable and says "Killed process <pid>",
the cause is named as such.
"""

from __future__ import annotations

import re
import signal
import subprocess
from pathlib import Path

_WORKER = r"rank\s*:\s*(\d+).*?exitcode\s*:\s*(-?\d+)\s*\(pid:\s*(\d+)\)"
_ROOT = re.compile(r"Root Cause.*?" + _WORKER, re.DOTALL)
_ANY = re.compile(_WORKER, re.DOTALL)


def signal_name(num: int) -> str:
    try:
        return signal.Signals(num).name
    except ValueError:
        return f"signal {num}"


def oom_killed(pid: int) -> bool | None:
    """True when the kernel log says the OOM killer took `pid`; None when it cannot be read."""
    try:
        out = subprocess.run(["dmesg"], capture_output=True, text=True, timeout=10, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return None
    if out.returncode != 0:
        return None
    return (
        re.search(rf"(Out of memory|oom-kill).*\b{pid}\b|Killed process {pid}\b", out.stdout)
        is not None
    )


def exit_cause(exit_code: int, log_text: str) -> dict:
    """{"exit_code", "rank", "signal", "oom", "text"} from torchrun's exit code and output."""
    cause = {
        "exit_code": exit_code,
        "rank": None,
        "signal": None,
        "oom": None,
        "text": f"exited with code {exit_code}",
    }
    if exit_code > 128:  # torchrun itself was killed (the shell reports 128 + signal)
        cause["signal"] = exit_code - 128
    m = _ROOT.search(log_text) or _ANY.search(log_text)
    if m:
        cause["rank"] = int(m.group(1))
        worker = int(m.group(2))
        if worker < 0:
            cause["signal"] = -worker
            if -worker == signal.SIGKILL:
                cause["oom"] = oom_killed(int(m.group(3)))
    cause["text"] = describe(cause)
    return cause


def describe(cause: dict) -> str:
    code, sig, rank = cause["exit_code"], cause.get("signal"), cause.get("rank")
    who = f"rank {rank}" if rank is not None else "torchrun"
    text = f"exited with code {code}"
    if sig:
        text += f": {who} was killed by {signal_name(sig)}"
        if cause.get("oom"):
            text += " (killed by the kernel's out-of-memory killer)"
        elif sig == signal.SIGKILL:
            text += " (the kernel's out-of-memory killer sends this signal; " + (
                "check the kernel log: dmesg)"
                if cause.get("oom") is None
                else "the kernel log does not say so)"
            )
    elif rank is not None:
        text += f": rank {rank} failed first"
    return text


def from_log(exit_code: int, log: Path, max_bytes: int = 256 * 1024) -> dict:
    try:
        with open(log, "rb") as f:
            f.seek(0, 2)
            f.seek(max(0, f.tell() - max_bytes))
            text = f.read().decode(errors="replace")
    except OSError:
        text = ""
    start = text.rfind("starting torchrun")  # this launch's output only (resume appends)
    return exit_cause(exit_code, text[max(start, 0) :])
