"""The megafleet training runtime: Hugging Face checkpoints in and out, megatron-core inside.

Runs on GPU nodes (`torchrun -m remote_runtime sft ...`) and on CPU for validation and tests.
Only `config`, `args`, `yamlio`, `dry_run` and `families` are torch-free; the operator imports
those to validate jobs.
"""

from megafleet import __version__

__all__ = ["__version__"]
