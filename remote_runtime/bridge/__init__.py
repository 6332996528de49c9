"""Hugging Face checkpoints <-> megatron-core parameters (see load.py and save.py).

    from remote_runtime.bridge import load_hf_checkpoint, save_hf_checkpoint

Name handling (`mapping`) is torch-free; loading and saving import torch when first used.
"""

from __future__ import annotations

__all__ = ["load_hf_checkpoint", "save_hf_checkpoint", "ConversionError"]


def __getattr__(name: str):
    if name == "load_hf_checkpoint":
        from remote_runtime.bridge.load import load_hf_checkpoint

        return load_hf_checkpoint
    if name == "save_hf_checkpoint":
        from remote_runtime.bridge.save import save_hf_checkpoint

        return save_hf_checkpoint
    if name == "ConversionError":
        from remote_runtime.bridge.mapping import ConversionError

        return ConversionError
    raise AttributeError(name)
