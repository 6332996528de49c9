"""Reference log-probabilities for preference training, computed once and cached.

DPO compares the policy's sequence log-probs with a fixed reference's. Full fine-tuning would
need a second model in memory for that; instead the reference log-prob of every document is
computed in one forward-only pass before training and cached next to the tokenized data
(`<data_cache_dir>/reference-<key>.npy`), so a DPO step costs what an SFT step costs.

Which model the pass runs on (`ReferenceSource`):
  - no `--ref_model`, a fresh run: the policy itself, before its first step (no second copy);
  - `--ref_model DIR`, or a resumed run whose cache is gone: that model (or `--model`) is built
    alone, used for the pass and freed before the policy is built;
  - adapters (LoRA): the policy with its adapters disabled (`disable`, lora.adapters_disabled),
    which is the base model, also when `--adapters` continues an adapter or a run resumes: the
    reference is the base, as in ms-swift (TRL 1.16 instead freezes a copy of a continued
    adapter as its reference). With `modules_to_save` loaded from an adapter or checkpoint the
    base is built separately (disabling adapters does not restore fully trained modules).
The cache key covers the documents (dataset fingerprint), the reference weights (path, file
sizes and times) and the dtype, so a changed model or dataset never reuses stale numbers.
"""

from __future__ import annotations

import contextlib
import gc
import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from remote_runtime.train.dpo import sequence_logps


@dataclass
class ReferenceSource:
    """Where the reference log-probs come from (see the module docstring)."""

    model_dir: str  # the reference weights (HF directory); part of the cache key
    chunks: list | None = None  # a model to run on (the policy); None: build from model_dir
    disable: Callable[[], contextlib.AbstractContextManager] = field(
        default=contextlib.nullcontext
    )  # e.g. LoRA's adapters-disabled context


def weights_identity(model_dir: str) -> str:
    """A digest of an HF directory's weights and config: paths, sizes and modification times."""
    root = Path(model_dir).expanduser().resolve()
    files = sorted(
        p for p in root.iterdir() if p.suffix in (".safetensors", ".bin") or p.name == "config.json"
    )
    stats = [(p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in files]
    return hashlib.sha256(json.dumps([str(root), stats]).encode()).hexdigest()


def cache_path(cache_dir: Path, dataset, model_dir: str, dtype: str) -> Path:
    key = hashlib.sha256(
        json.dumps([dataset.fingerprint, weights_identity(model_dir), dtype]).encode()
    ).hexdigest()
    return Path(cache_dir) / f"reference-{key[:32]}.npy"


def reference_logps(
    datasets: list,
    source: ReferenceSource,
    *,
    job,
    dist,
    make_eval_batches,
    build_reference: Callable[[str], list],
    forward_backward,
    cache_dir: Path,
    say: Callable[[str], None],
) -> list[np.ndarray]:
    """Per-document reference log-probs (float64) of each dataset: from the cache, else
    computed with `source` and cached. Every rank returns the full arrays."""
    from remote_runtime.train.collectives import any_rank, barrier

    paths = [cache_path(cache_dir, ds, source.model_dir, job.model.torch_dtype) for ds in datasets]
    # Decided together: a node without the cache makes every rank take part in the pass.
    if not any_rank(not all(p.is_file() for p in paths)):
        say(f"reference log-probs: cached ({', '.join(p.name for p in paths)})")
        return [np.load(p) for p in paths]
    chunks = source.chunks if source.chunks is not None else build_reference(source.model_dir)
    out = []
    with source.disable():
        for ds, path in zip(datasets, paths):
            values = _compute(chunks, make_eval_batches(ds), len(ds), dist, forward_backward)
            if dist.local_rank == 0:  # one writer per node (atomic, so shared storage is fine)
                _save(path, values)
            out.append(values)
    if source.chunks is None:
        del chunks
        gc.collect()
        if dist.device.type == "cuda":
            torch.cuda.empty_cache()
    barrier()
    say(
        f"reference log-probs: computed with {source.model_dir} for "
        f"{sum(len(d) for d in datasets)} documents, cached in {cache_dir}"
    )
    return out


def _compute(chunks, micro_batches, num_docs: int, dist, forward_backward) -> np.ndarray:
    """One forward-only pass; each document's value comes from exactly one rank (its data-parallel
    rank's first tensor-parallel rank on the last pipeline stage) and is summed over the world."""
    from megatron.core import parallel_state

    from remote_runtime.train.step import forward_only_step

    def loss_for(mb):
        def loss(per_token_loss):
            logps, _ = sequence_logps(mb, per_token_loss)
            zero = torch.zeros((), device=logps.device)
            return zero, torch.tensor(1, dtype=torch.int), {"logps": logps}

        return loss

    micro = [mb.to(dist.device) for mb in micro_batches]
    reports = forward_only_step(chunks, micro, forward_backward, loss_for)
    values = torch.zeros(num_docs, dtype=torch.float64, device=dist.device)
    owner = (
        parallel_state.is_pipeline_last_stage()
        and parallel_state.get_tensor_model_parallel_rank() == 0
        and parallel_state.get_context_parallel_rank() == 0
    )
    if owner:
        for mb, report in zip(micro, reports):
            values[mb.doc_ids.to(dist.device)] = report["logps"].double()
    torch.distributed.all_reduce(values)
    return values.cpu().numpy()


def _save(path: Path, values: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "wb") as f:
        np.save(f, values)
    os.replace(tmp, path)
