"""What a training run writes into its output directory: names both sides rely on.

    <output_dir>/
      run_config.json                the resolved job (rank 0, at start)
      logging.jsonl                  one JSON record per logged step (global rank 0); fields below
      checkpoint-<step>/             a Hugging Face model (or adapter) plus
        megatron_state/              optimizer and RNG state for resuming
        trainer_state.json           step, data position, LR schedule, layout; written LAST:
                                     a checkpoint directory holding it is complete
      .checkpoint-<step>.partial/    a checkpoint being written (renamed when complete)

Stdlib only: the runtime writes these, the operator and the node helper (`nodectl`) read them.
"""

from __future__ import annotations

import re

RUN_CONFIG = "run_config.json"
METRICS_FILE = "logging.jsonl"
TRAINER_STATE = "trainer_state.json"
STATE_DIR = "megatron_state"  # optimizer shards and RNG states inside a checkpoint
CHECKPOINT_PREFIX = "checkpoint-"
_CHECKPOINT = re.compile(r"^checkpoint-(\d+)$")

# The fields of a logging.jsonl record (train/metrics.py writes them; `megafleet status` shows
# the progress subset). Absent or null where they do not apply (mfu on an unknown GPU).
METRICS_FIELDS = (
    "step",
    "train_iters",
    "epoch",
    "loss",
    "lr",
    "grad_norm",
    "tokens_per_s",
    "tflops_per_gpu",
    "mfu",
    "peak_mem_gb",
    "elapsed_s",
    "eta_s",
    "time",
    "tokens",  # real tokens this step
    "loss_tokens",  # tokens the loss was taken over
    # MoE only (model/moe_aux.py): transformers' load-balancing loss (mean over the micro-batches
    # since the last record) and, per MoE layer of rank 0's stage, max / mean tokens per expert
    "aux_loss",
    "expert_load_imbalance",
)
PROGRESS_FIELDS = METRICS_FIELDS[:13]
# rlhf (DPO) records add TRL's metrics: means over the pairs since the last record.
DPO_METRICS_FIELDS = (
    "rewards/chosen",
    "rewards/rejected",
    "rewards/accuracies",
    "rewards/margins",
    "logps/chosen",
    "logps/rejected",
)
# SimPO and ORPO records also have the chosen answers' token-mean NLL, ORPO its log odds ratio
# (mean log-sigmoid) and log odds (TRL's CPOTrainer / ORPOTrainer names).
PREFERENCE_EXTRA_FIELDS = ("nll_loss", "log_odds_ratio", "log_odds_chosen")
# A step that evaluated the held-out set (every eval_steps and the last step) adds these, and for
# rlhf the DPO metrics prefixed "eval_". `megafleet status` also gets `eval_step`: the step of
# the latest evaluation, whose eval_* fields it carries.
EVAL_FIELDS = ("eval_loss", "eval_samples", "eval_tokens", "eval_s")
STATUS_EXTRA_FIELDS = (
    "rewards/accuracies",
    "rewards/margins",
    "eval_step",
    "eval_loss",
    "eval_rewards/accuracies",
)


def checkpoint_name(step: int) -> str:
    return f"{CHECKPOINT_PREFIX}{step}"


def partial_checkpoint_name(step: int) -> str:
    return f".{CHECKPOINT_PREFIX}{step}.partial"


def checkpoint_step(name: str) -> int | None:
    """The step of a `checkpoint-<step>` directory name, else None."""
    m = _CHECKPOINT.match(name)
    return int(m.group(1)) if m else None
