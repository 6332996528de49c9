"""The load-balancing auxiliary loss exactly as transformers computes it, and per-layer load.

transformers' `load_balancing_loss_func` (Qwen3-MoE, Qwen2-MoE, Mixtral) does not average
per-layer losses: it concatenates every layer's router outputs, so with C_e the top-k assignments
to expert e summed over all L MoE layers and N tokens, and P_e the router probabilities of e
summed likewise,

    aux = E * sum_e (C_e / (L N)) * (P_e / (L N))

and the causal-LM loss becomes `loss + router_aux_loss_coef * aux`. megatron-core's own
switch loss is per layer and divided by top-k, a different number; this module computes HF's.

How it reaches the gradient: each router records (C_l, P_l) of its layer in the current
`Record` and passes its top-k weights through `AuxLossGrad`, an identity whose backward adds
d(coeff * aux)/dP_l = coeff * E * C / (L N)^2 (C over all of the record's layers, known by then)
to the router probabilities' gradient. So the aux loss needs no path from the loss function back
to every layer (pipeline stages, recomputation), like megatron's MoEAuxLossAutoScaler.

Scale: the training loss here is a sum over loss tokens that megatron divides by the global
batch's loss tokens (`calculate_per_token_loss`), so each micro-batch's aux gradient is multiplied
by its own loss-token count (`start_micro_batch`): the aux loss enters as a token-weighted mean
over micro-batches, exactly HF's `loss + coeff * aux` for one micro-batch.

Limits: with pipeline parallelism C and L are this stage's MoE layers (HF's sum spans all); with
tensor/sequence parallelism the counts and sums are all-reduced over the TP group, so N is the
whole sequence, as in HF.
"""

from __future__ import annotations

import torch


class Record:
    """One micro-batch's router statistics on this rank: layer -> (counts [E], prob sums [E],
    tokens)."""

    def __init__(self, loss_tokens: torch.Tensor | None = None):
        self.loss_tokens = loss_tokens
        self.layers: dict[int, tuple[torch.Tensor, torch.Tensor, int]] = {}
        self._counts = None
        self.group = None  # TP group over which the sequence is split (sequence parallel)

    def add(self, layer: int, counts: torch.Tensor, prob_sum: torch.Tensor, tokens: int, group):
        self.layers[layer] = (counts.float(), prob_sum.detach().float(), tokens)
        self.group = group
        self._counts = None

    def _reduced(self, t: torch.Tensor) -> torch.Tensor:
        if self.group is not None and self.group.size() > 1:
            t = t.clone()
            torch.distributed.all_reduce(t, group=self.group)
        return t

    def totals(self) -> tuple[torch.Tensor, float]:
        """(C summed over layers and the TP group, L*N)."""
        if self._counts is None:
            counts = torch.stack([c for c, _, _ in self.layers.values()]).sum(0)
            self._counts = self._reduced(counts)
        rows = sum(n for _, _, n in self.layers.values())
        tp = self.group.size() if self.group is not None else 1
        return self._counts, float(rows * tp)

    def aux_loss(self) -> torch.Tensor:
        """HF's load_balancing_loss_func value (fp32 scalar, no gradient)."""
        if not self.layers:
            return torch.zeros(())
        counts, rows = self.totals()
        probs = self._reduced(torch.stack([p for _, p, _ in self.layers.values()]).sum(0))
        return counts.numel() * (counts * probs).sum() / (rows * rows)

    def imbalance(self) -> dict[int, torch.Tensor]:
        """layer -> max / mean tokens per expert (1.0 is perfectly balanced)."""
        out = {}
        for layer, (c, _, _) in self.layers.items():
            c = self._reduced(c)
            out[layer] = c.max() / c.mean().clamp(min=1e-9)
        return out


_current: Record | None = None
MAX_RECORDS = 4096
_step: list[Record] = []


def start_micro_batch(loss_mask: torch.Tensor | None = None) -> Record:
    """A fresh record for the next forward (the training step calls this per micro-batch)."""
    global _current
    _current = Record(None if loss_mask is None else loss_mask.sum().float())
    if len(_step) >= MAX_RECORDS:  # nobody reads them (benchmarks, evaluation): keep the last
        del _step[:-1]
    _step.append(_current)
    return _current


def current() -> Record:
    return _current if _current is not None else start_micro_batch()


def pop_step_stats() -> dict:
    """{'aux_loss': mean over this step's micro-batches, 'expert_load_imbalance': [per MoE
    layer, max/mean tokens per expert, summed over micro-batches]} and reset. Host syncs: call
    once per logged step, outside the hot path. Empty dict when no router ran."""
    global _current
    records = [r for r in _step if r.layers]
    _step.clear()
    _current = None
    if not records:
        return {}
    aux = torch.stack([r.aux_loss().to(records[0].totals()[0].device) for r in records]).mean()
    layers = sorted(records[0].layers)
    imbalance = []
    for layer in layers:
        counts = sum(r._reduced(r.layers[layer][0]) for r in records if layer in r.layers)
        imbalance.append(round(float(counts.max() / counts.mean().clamp(min=1e-9)), 4))
    return {"aux_loss": float(aux), "expert_load_imbalance": imbalance}


class AuxLossGrad(torch.autograd.Function):
    """Identity on the router's top-k weights; backward adds coeff * d aux / d P_layer to the
    full router probabilities (through prob_sum = probs.sum(0), which the caller passes)."""

    @staticmethod
    def forward(ctx, weights, prob_sum, record: Record, coeff: float):
        ctx.record, ctx.coeff = record, coeff
        ctx.num_experts = prob_sum.shape[0]
        return weights.view_as(weights)

    @staticmethod
    def backward(ctx, grad):
        record = ctx.record
        counts, rows = record.totals()
        scale = ctx.coeff * ctx.num_experts / (rows * rows)
        if record.loss_tokens is not None:
            scale = scale * record.loss_tokens.to(counts.device)
        from megatron.core.transformer.moe.moe_utils import MoEAuxLossAutoScaler

        # megatron's schedules set this to the loss scale (1 unless fp16 loss scaling)
        loss_scale = MoEAuxLossAutoScaler.main_loss_backward_scale
        if loss_scale is not None:
            scale = scale * loss_scale.to(counts.device)
        return grad, counts * scale, None, None


def attach(
    weights: torch.Tensor,
    probs: torch.Tensor,
    counts: torch.Tensor,
    layer: int,
    coeff: float,
    group,
) -> torch.Tensor:
    """Record this layer's statistics; return the weights with the aux gradient attached."""
    record = current()
    prob_sum = probs.float().sum(0)
    record.add(layer, counts, prob_sum, probs.shape[0], group)
    if coeff and torch.is_grad_enabled() and probs.requires_grad:
        return AuxLossGrad.apply(weights, prob_sum, record, coeff)
    return weights
