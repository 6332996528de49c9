"""Evaluation on the held-out set during training (every `eval_steps` and at the end).

The held-out micro-batches are built once, in order (no shuffle), and split over the
data-parallel ranks; `eval_iters` global batches (or all of them with -1) are evaluated with the
model in eval mode and no gradient. Evaluation leaves the training trajectory alone: the
training data order is a function of the step only (sampler.py), and every RNG state (Python,
NumPy, torch, CUDA, megatron's tracker) is saved before and restored after.

The result is merged into the step's record of `logging.jsonl`: `eval_loss` (token mean for
sft/pt, pair mean for rlhf), `eval_tokens`, `eval_samples` and for rlhf TRL's metrics with the
`eval_` prefix (`eval_rewards/accuracies`, ...).
"""

from __future__ import annotations

import time
from typing import Callable

import torch


class Evaluator:
    def __init__(self, micro_batches: list, objective, loss_for: Callable, dist, forward_backward):
        self.micro = micro_batches
        self.objective, self.loss_for = objective, loss_for
        self.dist, self.forward_backward = dist, forward_backward
        self.samples = sum(mb.num_samples for mb in micro_batches)
        self.tokens = sum(mb.num_tokens for mb in micro_batches)

    def run(self, model: list) -> dict:
        from remote_runtime.train.checkpoint import _rng_state, _set_rng_state
        from remote_runtime.train.objective import all_reduced
        from remote_runtime.train.step import forward_only_step, sum_reports

        t0 = time.perf_counter()
        rng = _rng_state()
        try:
            micro = [mb.to(self.dist.device) for mb in self.micro]
            reports = forward_only_step(model, micro, self.forward_backward, self.loss_for)
        finally:
            _set_rng_state(rng)
        # Only last-stage ranks hold reports; the sums are ratios, so replicas counted more
        # than once (tensor-parallel ranks) do not change them.
        totals = all_reduced(
            sum_reports(reports, self.dist.device), self.objective.report_sizes, self.dist.device
        )
        lm = totals["lm loss"]
        record = {
            "eval_loss": float(lm[0] / lm[1]) if lm[1] > 0 else None,
            "eval_samples": self._world_sum(self.samples),
            "eval_tokens": self._world_sum(self.tokens),
            "eval_s": round(time.perf_counter() - t0, 3),
        }
        record.update({f"eval_{k}": v for k, v in self.objective.metrics(totals).items()})
        return record

    def _world_sum(self, n: int) -> int:
        """Summed over data-parallel ranks (every rank of a model replica holds the same n)."""
        from megatron.core import parallel_state

        t = torch.tensor([n], dtype=torch.int64, device=self.dist.device)
        torch.distributed.all_reduce(t, group=parallel_state.get_data_parallel_group())
        return int(t.item())
