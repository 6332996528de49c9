"""What a step optimises and reports: token cross entropy (sft, pt) or a preference loss (rlhf).

An objective gives the loss function of each micro-batch (megatron's loss_func), the report
tensors the loss functions return (name -> size, known to every rank so that ranks without
reports, off the last pipeline stage, join the all-reduce with zeros), the extra metrics made
from the summed reports, and `prepare`, which attaches what a micro-batch needs besides its
tokens (the reference log-probs of its documents) before it goes to the device.
"""

from __future__ import annotations

import numpy as np
import torch

from remote_runtime.train.step import token_loss_for


class TokenObjective:
    report_sizes = {"lm loss": 2}

    def loss_for(self, doc_ids=None, split: str = "train"):
        return token_loss_for

    def prepare(self, mb, split: str = "train"):
        return mb

    def metrics(self, totals: dict) -> dict:
        return {}


class PreferenceObjective:
    """DPO over pairs, with per-document reference log-probs for the train and eval sets."""

    def __init__(self, settings, datasets: dict, reference: dict[str, np.ndarray | None]):
        from remote_runtime.train.dpo import REPORT_FIELDS

        self.settings, self.datasets, self.reference = settings, datasets, reference
        self.report_sizes = {"lm loss": 2, "dpo": len(REPORT_FIELDS)}

    def loss_for(self, doc_ids, split: str = "train"):
        """Loss functions for micro-batches of a global batch whose documents are `doc_ids`
        (the chosen-NLL weight of rpo_alpha depends on the whole global batch)."""
        from functools import partial

        from remote_runtime.train.dpo import dpo_loss_func, nll_scale

        scale = nll_scale(self.datasets[split], doc_ids)
        return lambda mb: partial(dpo_loss_func, mb, self.settings, scale)

    def prepare(self, mb, split: str = "train"):
        ref = self.reference.get(split)
        if ref is not None:
            mb.ref_logps = torch.from_numpy(ref[mb.doc_ids.numpy()]).float()
        return mb

    def metrics(self, totals: dict) -> dict:
        from remote_runtime.train.dpo import dpo_metrics

        return dpo_metrics(totals["dpo"], self.settings.rlhf_type) if "dpo" in totals else {}


def all_reduced(totals: dict, sizes: dict, device) -> dict:
    """Every report summed over all ranks (zeros where a rank has none)."""
    out = {}
    for name, size in sizes.items():
        value = totals.get(name)
        value = (
            torch.zeros(size, dtype=torch.float32, device=device)
            if value is None
            else value.float().clone()
        )
        torch.distributed.all_reduce(value)
        out[name] = value
    return out
