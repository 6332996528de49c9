"""The training loop on megatron-core (see entry.py for the run from start to end)."""
