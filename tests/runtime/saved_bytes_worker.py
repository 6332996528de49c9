"""Measure what autograd keeps for backward in the runtime's real megatron model (CPU, bf16).

Run by tests/runtime/test_memory_saved_tensors.py as two gloo processes under torchrun: first
TP=2 (with and without sequence parallel), then TP=1 (DP=2). For each case it builds the model with
1 and 2 layers, runs one forward with labels on a padded [1, S] batch, and records the bytes of
every distinct storage saved for backward, leaving out parameters (they are counted as
weights). Rank 0 writes {case: bytes per token} as JSON to the path given.

    torchrun --standalone --nproc_per_node 2 saved_bytes_worker.py OUT.json CONFIG_JSON
"""

from __future__ import annotations

import json
import sys

import torch

from remote_runtime import platform
from remote_runtime.model.builder import ModelOptions, build_model
from remote_runtime.model.forward import padded_batch
from remote_runtime.spec.families import family_for_hf_config

SEQ = 256  # test_memory_saved_tensors.SEQ
RECOMPUTE = {
    "none": {},
    "selective": {"recompute_granularity": "selective"},
    "full": {
        "recompute_granularity": "full",
        "recompute_method": "uniform",
        "recompute_num_layers": 1,
    },
}


def saved_bytes_per_token(
    config: dict, layers: int, sequence_parallel: bool, recompute: str, dist
) -> float:
    hf = dict(config, num_hidden_layers=layers)
    options = ModelOptions(
        dtype="bfloat16",
        init_weights=True,
        sequence_parallel=sequence_parallel,
        **RECOMPUTE[recompute],
    )
    (model,) = build_model(family_for_hf_config(hf), hf, options, dist)
    model.train()
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen: dict[int, int] = {}

    def keep(t):
        storage = t.untyped_storage()
        if storage.data_ptr() not in params:
            seen[storage.data_ptr()] = storage.nbytes()
        return t

    torch.manual_seed(0)
    tokens = torch.randint(0, config["vocab_size"], (1, SEQ))
    labels = torch.randint(0, config["vocab_size"], (1, SEQ))
    batch = padded_batch(tokens)
    with torch.autograd.graph.saved_tensors_hooks(keep, lambda t: t):
        model(batch["tokens"], batch["position_ids"], None, labels=labels)
    return sum(seen.values()) / SEQ


def main() -> int:
    from megatron.core import parallel_state

    out, config = sys.argv[1], json.loads(sys.argv[2])
    results = {}
    for tp in (2, 1):
        if parallel_state.model_parallel_is_initialized():
            parallel_state.destroy_model_parallel()
        dist = platform.init_distributed("cpu", tensor_model_parallel_size=tp)
        for sp in (False, True) if tp > 1 else (False,):
            for recompute in RECOMPUTE:
                for layers in (1, 2):
                    key = f"tp{tp}{'-sp' if sp else ''}-{recompute}-L{layers}"
                    results[key] = saved_bytes_per_token(config, layers, sp, recompute, dist)
    if dist.rank == 0:
        with open(out, "w") as fh:
            json.dump(results, fh)
    platform.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
