"""megafleet: fine-tune large language models with megatron-core on your own GPU machines.

The operator package. It never imports torch, megatron or boto3 at module level, so
`megafleet --help` starts in a fraction of a second on any laptop.
"""

__version__ = "0.1.0"
