"""The training data pipeline: dataset files -> tokenized documents -> batches.

    dataset, stats = build_dataset(job, tokenizer, should_build=local_rank == 0, barrier=...)
    batches = make_batch_iterator(job, dataset, dp_rank=..., dp_size=...,
                                  pad_token_id=tokenizer.pad_token_id)
    batches.load_state_dict(saved)            # when resuming
    for step in range(start, train_iters):
        gb = next(batches)                    # GlobalBatch: gb.micro_batches, gb.num_loss_tokens
    saved = batches.state_dict()

Names are imported lazily: only `batches`/`sampler` need torch; formats, chat templates,
tokenization and the cache do not.
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "DataError": "errors",
    "build_dataset": "dataset",
    "load_dataset": "dataset",
    "default_cache_dir": "dataset",
    "TokenizedDataset": "dataset",
    "DataStats": "dataset",
    "SourceStats": "dataset",
    "EncodeSettings": "encode",
    "ChatEncoder": "chat",
    "preview": "chat",
    "Samples": "packing",
    "pack_documents": "packing",
    "MicroBatch": "batches",
    "IGNORE_INDEX": "batches",
    "GlobalBatch": "sampler",
    "BatchIterator": "sampler",
    "make_batch_iterator": "sampler",
    "write_demo_dataset": "demo_data",
    "write_demo_pretrain": "demo_data",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
