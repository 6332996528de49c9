"""Known ways a node setup fails, recognised in the failing step's log, each with its fix.

`match_known_problem(lines, context)` returns the first problem (most specific first) whose
pattern occurs in the lines, with its fix filled in from `context`: the node's venv, python,
MAX_JOBS used, and the TE build plan (the real include paths found on that node).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Sequence


@dataclass(frozen=True)
class KnownProblem:
    id: str
    title: str
    pattern: str
    fix: str  # str.format fields: see _Fields.DEFAULTS

    def matches(self, text: str) -> bool:
        return re.search(self.pattern, text, re.I | re.M) is not None


PROBLEMS = (
    KnownProblem(
        "build_out_of_memory",
        "the compiler ran out of memory",
        r"Killed signal terminated program (cc1plus|cicc)|cc1plus: out of memory|"
        r"virtual memory exhausted|'cicc' died due to signal (9|KILL)|"
        r"nvcc error\s*:.*(signal 9|Killed)|c\+\+: fatal error: Killed|"
        r"fatal error: error writing to .*: Cannot allocate memory",
        "each parallel compile job needs about 6 GB of memory and the build used {jobs}: run "
        "setup again with fewer jobs:\n  megafleet setup --max-jobs {fewer_jobs} ...",
    ),
    KnownProblem(
        "no_space_left",
        "the disk is full",
        r"No space left on device|\[Errno 28\]|Disk quota exceeded|\[Errno 122\]",
        "free space on the disk holding {venv} and on $TMPDIR (pip unpacks and builds there; "
        "`df -h {venv} /tmp` shows both), or set TMPDIR to a larger disk in the node's "
        "~/.bashrc; then run setup again (finished steps are skipped)",
    ),
    KnownProblem(
        "missing_cudnn_h",
        "cudnn.h not found",
        r"cudnn\.h: No such file or directory|cudnn\.h.*not found|Could not find.*CUDNN|"
        r"CUDNN_INCLUDE_DIR-NOTFOUND|cuDNN.*(headers|include).*not found",
        "cuDNN's header is in the venv's nvidia-cudnn wheel; build with these variables (setup "
        "exports them; the wheel must be installed):\n  {pip} nvidia-cudnn-{cuda_tag}\n{exports}",
    ),
    KnownProblem(
        "missing_nccl_h",
        "nccl.h not found",
        r"nccl\.h: No such file or directory|nccl\.h.*not found|NCCL_INCLUDE_DIR-NOTFOUND",
        "NCCL's header is in the venv's nvidia-nccl wheel; build with these variables (setup "
        "exports them; the wheel must be installed):\n  {pip} nvidia-nccl-{cuda_tag}\n{exports}",
    ),
    KnownProblem(
        "nvcc_missing",
        "nvcc (the CUDA compiler) not found",
        r"nvcc: (command )?not found|No such file or directory: '[^']*nvcc'|"
        r"CUDA_HOME environment variable is not set|Could not find nvcc|nvcc was not found|"
        r"No CUDA runtime is found|CUDA_HOME.*(None|not set)|Failed to find nvcc",
        "install the CUDA toolkit matching torch's CUDA (e.g. `sudo apt-get install "
        "cuda-toolkit-13-0` on Ubuntu with NVIDIA's repository) and make CUDA_HOME point at it "
        "(/usr/local/cuda); then run setup again",
    ),
    KnownProblem(
        "wheel_not_in_wheelhouse",
        "a package is missing from the wheelhouse",
        r"No matching distribution found for|Could not find a version that satisfies|"
        r"Because .* was not found in the (provided package locations|package registry)",
        "the wheelhouse has no wheel of that package for this node's Python {python}: rebuild it "
        "on a connected machine for this Python and platform:\n  megafleet setup "
        "--build-wheelhouse {wheelhouse} --python-version {python_mm}",
    ),
    KnownProblem(
        "no_venv_module",
        "python cannot create venvs",
        r"ensurepip is not available|No module named (ensurepip|venv)|"
        r"The virtual environment was not created successfully",
        "install the venv module (`sudo apt-get install python3-venv`, or python3.X-venv for "
        "that Python), or install uv on the node; then run setup again",
    ),
)


def match_known_problem(lines: Sequence[str], context: dict | None = None) -> dict | None:
    """The first known problem found in `lines`, as {id, title, fix}; None if none matches."""
    text = "\n".join(lines)
    for problem in PROBLEMS:
        if problem.matches(text):
            return {
                "id": problem.id,
                "title": problem.title,
                "fix": problem.fix.format_map(_Fields(context or {})),
            }
    return None


class _Fields(dict):
    """format_map fields with readable fallbacks for what the failure did not report."""

    DEFAULTS = {
        "venv": "the venv",
        "python": "?",
        "python_mm": "3.X",
        "jobs": "?",
        "fewer_jobs": "2",
        "cuda_tag": "cu13",
        "wheelhouse": "DIR",
        "exports": "",
        "pip": "<venv>/bin/python -m pip install",
    }

    def __missing__(self, key):
        return self.DEFAULTS.get(key, "?")


def context_for(
    failed: dict, venv: str | None, python_version: str | None, wheelhouse: str | None
) -> dict:
    """Fields for the fixes from a node's failure report."""
    plan = failed.get("build_plan") or {}
    jobs = (plan.get("vars") or {}).get("MAX_JOBS")
    ctx = {
        "venv": venv or "the venv",
        "wheelhouse": wheelhouse or "DIR",
        "pip": f"{venv}/bin/python -m pip install" if venv else None,
    }
    if jobs:
        ctx["jobs"] = jobs
        ctx["fewer_jobs"] = str(max(1, int(jobs) // 2))
    if plan.get("export_lines"):
        ctx["exports"] = "\n".join("  " + line for line in plan["export_lines"])
    if failed.get("torch_cuda"):
        ctx["cuda_tag"] = "cu" + str(failed["torch_cuda"]).split(".")[0]
    if python_version:
        ctx["python"] = python_version
        ctx["python_mm"] = ".".join(python_version.split(".")[:2])
    return {k: v for k, v in ctx.items() if v}
