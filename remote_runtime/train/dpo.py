"""Direct preference optimisation: per-sequence log-probabilities over packed documents, the
DPO losses (TRL's formulas and metric names) and megatron's loss function for a micro-batch.
The reference-free variants use the same path: SimPO (TRL's CPOTrainer, loss_type simpo, with
cpo_alpha's NLL) and ORPO (TRL's ORPOTrainer), both on answer log-probs averaged per token.

A micro-batch holds pairs as consecutive documents (chosen, rejected, chosen, rejected, ...),
packed (THD) or padded. The model returns the per-token cross entropy against the shifted
labels, so a token's log-probability is its negative; summed over each document's answer
tokens (the loss mask, as in SFT) it is the sequence log-probability log pi(y | x).

Loss normalisation: the loss function returns (sum of pair losses, number of pairs), so
megatron's per-token normalisation (optim.py) averages over the pairs of the whole global batch.
With `rpo_alpha` the NLL of the chosen answers is added as TRL's `sft` loss does it: the mean
over the chosen answer tokens of the global batch, which the loss function gets as a scale
(SimPO's `cpo_alpha` and ORPO's NLL term alike).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

# Sums reported per micro-batch (in this order), turned into TRL's metric names by dpo_metrics.
REPORT_FIELDS = (
    "pairs",
    "rewards_chosen",
    "rewards_rejected",
    "accurate",
    "margins",
    "logps_chosen",
    "logps_rejected",
    "nll",
    "chosen_tokens",
    "log_odds_ratio",
    "log_odds_chosen",
)


@dataclass(frozen=True)
class DpoSettings:
    beta: float = 0.1
    loss_type: str = "sigmoid"  # sigmoid | ipo | hinge
    label_smoothing: float = 0.0
    rpo_alpha: float | None = None
    reference_free: bool = False
    rlhf_type: str = "dpo"  # dpo | simpo | orpo
    simpo_gamma: float = 1.0
    cpo_alpha: float = 1.0

    @classmethod
    def from_job(cls, job) -> "DpoSettings":
        from remote_runtime.spec.config import effective_beta

        r = job.rlhf
        return cls(
            beta=effective_beta(r),
            loss_type=r.loss_type,
            label_smoothing=r.label_smoothing,
            rpo_alpha=r.rpo_alpha,
            reference_free=r.reference_free or r.rlhf_type != "dpo",
            rlhf_type=r.rlhf_type,
            simpo_gamma=r.simpo_gamma,
            cpo_alpha=r.cpo_alpha,
        )

    @property
    def nll_weight(self) -> float:
        """Weight of the chosen answers' token-mean NLL in the loss."""
        return {"simpo": self.cpo_alpha, "orpo": 1.0}.get(self.rlhf_type, self.rpo_alpha or 0.0)


def pair_losses(
    s: DpoSettings,
    chosen: torch.Tensor,
    rejected: torch.Tensor,
    ref_chosen: torch.Tensor,
    ref_rejected: torch.Tensor,
    chosen_tokens: torch.Tensor,
    rejected_tokens: torch.Tensor,
) -> torch.Tensor:
    """The DPO loss of each pair from sequence log-probs (policy and reference) and answer
    lengths. sigmoid (with label smoothing: conservative DPO), hinge and IPO (log-ratios averaged
    per answer token, as TRL does) follow TRL's DPOTrainer."""
    chosen_ratio, rejected_ratio = chosen - ref_chosen, rejected - ref_rejected
    delta = chosen_ratio - rejected_ratio
    if s.loss_type == "sigmoid":
        ls = s.label_smoothing
        return -F.logsigmoid(s.beta * delta) * (1 - ls) - F.logsigmoid(-s.beta * delta) * ls
    if s.loss_type == "hinge":
        return torch.relu(1 - s.beta * delta)
    if s.loss_type == "ipo":
        ipo_delta = chosen_ratio / chosen_tokens.clamp(
            min=1
        ) - rejected_ratio / rejected_tokens.clamp(min=1)
        return (ipo_delta - 1 / (2 * s.beta)) ** 2
    raise ValueError(f"unknown DPO loss_type {s.loss_type!r}")


def log1mexp(x: torch.Tensor) -> torch.Tensor:
    """log(1 - exp(x)) for x < 0, stable on both sides of -log 2 (as TRL's ORPO)."""
    return torch.where(
        x < -0.6931471805599453, torch.log1p(-torch.exp(x)), torch.log(-torch.expm1(x))
    )


def reference_free_losses(s: DpoSettings, chosen: torch.Tensor, rejected: torch.Tensor):
    """SimPO (TRL's CPOTrainer.cpo_loss, loss_type simpo) or ORPO (ORPOTrainer.odds_ratio_loss,
    sign included: the loss is minus its term) per pair, from per-token averaged log-probs;
    with ORPO's log-odds and log(sigmoid(log-odds)) per pair for its metrics (else None)."""
    if s.rlhf_type == "simpo":
        logits = chosen - rejected - s.simpo_gamma / s.beta
        ls = s.label_smoothing
        return (
            -F.logsigmoid(s.beta * logits) * (1 - ls) - F.logsigmoid(-s.beta * logits) * ls,
            None,
            None,
        )
    if s.rlhf_type == "orpo":
        log_odds = (chosen - rejected) - (log1mexp(chosen) - log1mexp(rejected))
        ratio = F.logsigmoid(log_odds)
        return -s.beta * ratio, log_odds, ratio
    raise ValueError(f"unknown reference-free rlhf_type {s.rlhf_type!r}")


def document_sums(mb, values: torch.Tensor) -> torch.Tensor:
    """Per real document of the micro-batch, the sum of `values` (shaped like mb.tokens).

    Runs without a host sync (a data-dependent shape, e.g. repeat_interleave over the segment
    lengths, would stall the CPU until the forward pass finished, once per micro-batch)."""
    n_docs = len(mb.doc_lengths)
    if not mb.is_thd:
        return values.sum(dim=1)[:n_docs]
    flat = values.reshape(-1)
    cu = mb.cu_seqlens.to(values.device).long()
    # the segment of token t: the i with cu[i] <= t < cu[i + 1]
    position = torch.arange(flat.numel(), device=values.device)
    segment = torch.searchsorted(cu, position, right=True) - 1
    sums = torch.zeros(len(cu) - 1, dtype=values.dtype, device=values.device)
    sums.index_add_(0, segment, flat)
    return sums[:n_docs]


def sequence_logps(mb, per_token_loss: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(sum of answer-token log-probs, answer tokens) per document, fp32."""
    mask = mb.loss_mask.to(per_token_loss.device)
    return (document_sums(mb, -per_token_loss.float() * mask), document_sums(mb, mask))


def dpo_loss_func(mb, s: DpoSettings, nll_scale: float, per_token_loss: torch.Tensor):
    """megatron's loss function for a micro-batch of pairs: (sum of pair losses, pairs, reports).

    `nll_scale` (pairs / chosen answer tokens of the global batch) weighs the chosen NLL so that,
    after megatron divides by the pairs, it is the token mean (rpo_alpha, cpo_alpha, ORPO)."""
    logps, tokens = sequence_logps(mb, per_token_loss)
    nll = -logps[0::2].sum()
    log_odds = ratio = None
    if s.rlhf_type != "dpo":  # SimPO, ORPO: per-token means, no reference
        logps = logps / tokens.clamp(min=1)
        chosen, rejected = logps[0::2], logps[1::2]
        losses, log_odds, ratio = reference_free_losses(s, chosen, rejected)
        ref = torch.zeros_like(logps)
    else:
        chosen, rejected = logps[0::2], logps[1::2]
        if s.reference_free:
            ref = torch.zeros_like(logps)
        else:
            ref = mb.ref_logps.to(logps.device, torch.float32)
        losses = pair_losses(s, chosen, rejected, ref[0::2], ref[1::2], tokens[0::2], tokens[1::2])
    loss = losses.sum()
    if s.nll_weight:
        loss = loss + s.nll_weight * nll_scale * nll
    # torch.full fills on the device; torch.tensor(n, device=cuda) copies from the host and syncs
    pairs = torch.full((), len(chosen), dtype=torch.int, device=logps.device)
    with torch.no_grad():
        reward_c = s.beta * (chosen - ref[0::2])
        reward_r = s.beta * (rejected - ref[1::2])
        zero = torch.zeros((), device=logps.device)
        report = torch.stack(
            [
                pairs.float(),
                reward_c.sum(),
                reward_r.sum(),
                (reward_c > reward_r).float().sum(),
                (reward_c - reward_r).sum(),
                chosen.sum(),
                rejected.sum(),
                nll,
                tokens[0::2].sum(),
                zero if ratio is None else ratio.sum(),
                zero if log_odds is None else log_odds.sum(),
            ]
        )
    return loss, pairs, {"lm loss": torch.stack([loss.detach(), pairs.float()]), "dpo": report}


def dpo_metrics(report: torch.Tensor, rlhf_type: str = "dpo") -> dict:
    """TRL's metric names from summed `dpo` reports (means over pairs); SimPO and ORPO add
    `nll_loss` (the chosen answers' token mean), ORPO `log_odds_ratio` and `log_odds_chosen`."""
    r = dict(zip(REPORT_FIELDS, report.tolist()))
    pairs = r["pairs"] or float("nan")
    out = {
        "rewards/chosen": r["rewards_chosen"] / pairs,
        "rewards/rejected": r["rewards_rejected"] / pairs,
        "rewards/accuracies": r["accurate"] / pairs,
        "rewards/margins": r["margins"] / pairs,
        "logps/chosen": r["logps_chosen"] / pairs,
        "logps/rejected": r["logps_rejected"] / pairs,
    }
    if rlhf_type != "dpo":
        out["nll_loss"] = r["nll"] / (r["chosen_tokens"] or float("nan"))
    if rlhf_type == "orpo":
        out["log_odds_ratio"] = r["log_odds_ratio"] / pairs
        out["log_odds_chosen"] = r["log_odds_chosen"] / pairs
    return out


def nll_scale(dataset, doc_ids) -> float:
    """pairs / chosen answer tokens of a global batch whose documents are `doc_ids`."""
    chosen_tokens = int(dataset.loss_counts[doc_ids[0::2]].sum())
    return (len(doc_ids) // 2) / max(chosen_tokens, 1)
