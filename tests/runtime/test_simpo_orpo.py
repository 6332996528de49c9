"""Reference-free preference training on the real runtime (CPU, fp32): SimPO and ORPO against
TRL 1.16's own loss functions (`CPOTrainer.cpo_loss` with loss_type simpo, and
`ORPOTrainer.odds_ratio_loss`, both in trl.experimental) and their NLL term.

TRL's side gets per-pair log-probs averaged over the answer tokens (its `get_batch_logps` with
average_log_prob) and the chosen answers' token-mean NLL (its `cross_entropy_loss`), computed
here with transformers on the runtime's own tokens at the starting weights: the runtime's first
logged step is the loss of those weights.
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from tests.runtime.test_dpo import answer_logps, dpo_args, our_tokens
from tests.runtime.train_helpers import check, read_log, run_runtime

pytestmark = [pytest.mark.runtime]

# name -> (runtime flags, TRL's beta); simpo's beta is ms-swift's default for it (2.0)
VARIANTS = {
    "simpo": ({"rlhf_type": "simpo", "simpo_gamma": 0.5, "cpo_alpha": 0.7}, 2.0),
    "orpo": ({"rlhf_type": "orpo", "beta": 0.3}, 0.3),
}


def per_pair_logps(model_dir, tokens):
    """(chosen, rejected) answer log-probs averaged per token, and the chosen token-mean NLL."""
    sums, counts = answer_logps(model_dir, tokens)
    avg = sums / counts
    return avg[:, 0], avg[:, 1], -sums[:, 0].sum() / counts[:, 0].sum()


def trl_loss(variant: str, beta: float, flags: dict, chosen, rejected, nll) -> dict:
    from trl.experimental.cpo import CPOTrainer
    from trl.experimental.orpo import ORPOTrainer

    device = SimpleNamespace(device="cpu")
    if variant == "simpo":
        trainer = SimpleNamespace(
            alpha=0.0,
            beta=beta,
            loss_type="simpo",
            simpo_gamma=flags["simpo_gamma"],
            label_smoothing=0.0,
            accelerator=device,
        )
        losses, reward_c, reward_r = CPOTrainer.cpo_loss(trainer, chosen, rejected)
        extra = {}
        loss = losses.mean() + flags["cpo_alpha"] * nll  # CPOTrainer.get_batch_loss_metrics
    else:
        trainer = SimpleNamespace(beta=beta, accelerator=device)
        losses, reward_c, reward_r, ratio, log_odds = ORPOTrainer.odds_ratio_loss(
            trainer, chosen, rejected
        )
        extra = {"log_odds_ratio": float(ratio), "log_odds_chosen": float(log_odds)}
        loss = nll - losses.mean()  # ORPOTrainer.get_batch_loss_metrics
    return {
        "loss": float(loss),
        "rewards/chosen": float(reward_c.mean()),
        "rewards/rejected": float(reward_r.mean()),
        "rewards/accuracies": float((reward_c > reward_r).double().mean()),
        "rewards/margins": float((reward_c - reward_r).mean()),
        "logps/chosen": float(chosen.mean()),
        "logps/rejected": float(rejected.mean()),
        "nll_loss": float(nll),
        **extra,
    }


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_step_zero_matches_trl_loss_functions(dpo_assets, variant, tmp_path):
    model, _, pairs = dpo_assets
    flags, beta = VARIANTS[variant]
    out = tmp_path / "out"
    proc = run_runtime(dpo_args(model, pairs, out, lr=1e-4, adam_eps=1e-8, **flags), task="rlhf")
    check(proc)
    # reference-free: no reference pass, no cache
    assert "reference log-probs" not in proc.stdout
    assert not list((out / ".data_cache").glob("reference-*.npy"))
    ours = read_log(out)[0]
    chosen, rejected, nll = per_pair_logps(model, our_tokens(model, pairs))
    theirs = trl_loss(variant, beta, flags, chosen, rejected, nll)
    assert theirs["rewards/margins"] != 0 and 0 < theirs["rewards/accuracies"] < 1
    for name, value in theirs.items():
        assert ours[name] == pytest.approx(value, rel=1e-5, abs=1e-6), name
