"""The megafleet training runtime: Hugging Face checkpoints in and out, megatron-core inside.

Runs on GPU nodes (`torchrun -m remote_runtime sft ...`) and on CPU for validation and tests.
The operator imports only `remote_runtime.spec` (torch-free: the job schema, families, job
resolution, model shape, output layout, dataset formats); everything else here needs torch.
"""

from megafleet import __version__

__all__ = ["__version__"]
