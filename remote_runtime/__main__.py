"""`python -m remote_runtime sft|pt|rlhf|check-convert ...` (usually started by torchrun)."""

from __future__ import annotations

import os
import sys

USAGE = """usage: python -m remote_runtime {sft,pt,rlhf} [--config job.yaml] [--option value ...]
       python -m remote_runtime check-convert --model DIR [options]

Options use Megatron-SWIFT names; `--dry_run true` validates the job from config.json alone.
"""


def options_help() -> str:
    """Every option with its default and where it lives in a job file (torch-free)."""
    from remote_runtime.spec.config import LEAVES

    lines = ["options (default; job-file field):"]
    for leaf, (dotted, _, default) in LEAVES.items():
        if leaf != "task":
            lines.append(f"  --{leaf:<34} {default!r}  ({dotted})")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE)
        return 0 if argv else 2
    command, rest = argv[0], argv[1:]
    if command in ("sft", "pt", "rlhf") and ("-h" in rest or "--help" in rest):
        print(USAGE + "\n" + options_help())
        return 0
    if command in ("sft", "pt", "rlhf"):
        from remote_runtime.spec.config import ConfigError

        try:
            from remote_runtime.spec.flags import job_from_argv

            job = job_from_argv(rest, task=command)
            if job.check.dry_run:
                from remote_runtime.spec.resolve import print_dry_run

                return print_dry_run(job)
            if job.parallel.tensor_model_parallel_size > 1:
                # Megatron's tensor/sequence-parallel communication relies on kernels being
                # queued in issue order; must be set before CUDA starts.
                os.environ.setdefault("CUDA_DEVICE_MAX_CONNECTIONS", "1")
        except ConfigError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
        from remote_runtime.train.entry import run_training

        return run_training(job)
    if command == "check-convert":
        from remote_runtime.check_convert import main as check_convert_main

        return check_convert_main(rest)
    print(f"error: unknown command {command!r}\n\n{USAGE}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
