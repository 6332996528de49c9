"""Keep megatron-core's and torch's chatter out of the run's output stream.

megatron-core logs every gradient bucket's parameter list, dumps its `OptimizerConfig(...)` and
warns at import that Transformer Engine and Apex are missing (this runtime's normal setup); torch
adds deprecation warnings. None of it helps the person watching `megafleet logs`, all of it may
help a developer: it goes to `<output_dir>/logs/debug-rank<R>.log` on the node instead.
Call `route_library_output` before megatron is first imported.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

LIBRARY_LOGGERS = ("megatron", "torch", "transformers", "py.warnings")


def debug_log_path(output_dir: str | Path, rank: int | None = None) -> Path:
    rank = int(os.environ.get("RANK", "0")) if rank is None else rank
    return Path(output_dir).expanduser() / "logs" / f"debug-rank{rank}.log"


def route_library_output(output_dir: str | Path) -> Path:
    """Send library loggers and Python warnings to this rank's debug log file; return its path."""
    path = debug_log_path(output_dir)
    path.parent.mkdir(parents=True, exist_ok=True)
    handler = logging.FileHandler(path, encoding="utf-8")
    handler.setFormatter(logging.Formatter("%(asctime)s %(name)s %(levelname)s %(message)s"))
    logging.captureWarnings(True)  # warnings.warn(...) -> the "py.warnings" logger
    for name in LIBRARY_LOGGERS:
        lib = logging.getLogger(name)
        lib.handlers = [handler]
        lib.propagate = False
        lib.setLevel(logging.INFO)
    return path


def accelerator_line(device_type: str, world_size: int, device_name: str | None) -> str:
    """One line on what the run computes with, e.g. `accelerators: 16 × NVIDIA H200 (cuda)`."""
    local = int(os.environ.get("LOCAL_WORLD_SIZE", world_size) or world_size)
    nodes = max(1, world_size // max(local, 1))
    where = f" on {nodes} nodes" if nodes > 1 else ""
    if device_type == "cuda":
        return f"accelerators: {world_size} × {device_name or 'GPU'} (cuda){where}"
    return f"accelerators: none, {world_size} CPU process(es) (gloo){where}"
