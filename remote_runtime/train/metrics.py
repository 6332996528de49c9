"""Training metrics: MFU, throughput, and the `logging.jsonl` record.

FLOPs are `remote_runtime.spec.shape.ModelShape.training_flops` (Megatron-LM's formula, causal
attention halved). Packed batches count attention per document (Σ sᵢ² rather than (Σ sᵢ)²),
since documents in a pack never attend to each other; only real tokens are counted.

`logging.jsonl` (one JSON object per logged step, appended by global rank 0) is read by
`megafleet status` / `logs`; its name and fields are part of the contract
(`remote_runtime.spec.layout.METRICS_FILE` / `METRICS_FIELDS`, `DPO_METRICS_FIELDS`,
`EVAL_FIELDS`).

rlhf (DPO) records add TRL's names (rewards/chosen, rewards/accuracies, logps/chosen, ...: means
over the pairs since the last record; `loss` is the mean pair loss). A step that evaluated the
held-out set (every eval_steps and the last step) adds eval_loss, eval_samples, eval_tokens,
eval_s and for rlhf the same DPO metrics prefixed `eval_` (eval_rewards/accuracies, ...).
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

from remote_runtime.spec.layout import DPO_METRICS_FIELDS, METRICS_FILE, PREFERENCE_EXTRA_FIELDS

DPO_METRICS = DPO_METRICS_FIELDS + PREFERENCE_EXTRA_FIELDS

# Dense bf16 peak of the GPUs we know (TFLOP/s); unknown GPUs report MFU as null.
PEAK_TFLOPS = {
    "H100": 989.0,
    "H200": 989.0,
    "H800": 989.0,
    "H20": 148.0,
    "A100": 312.0,
    "A800": 312.0,
    "L40S": 362.0,
    "A10G": 125.0,
    "L4": 121.0,
    "B200": 2250.0,
    "GB200": 2450.0,
}


def peak_tflops(device_name: str | None) -> float | None:
    """The dense bf16 peak for a GPU name such as 'NVIDIA H200', or None when unknown."""
    if not device_name:
        return None
    override = os.environ.get("MEGAFLEET_PEAK_TFLOPS")
    if override:
        return float(override)
    name = device_name.upper()
    # Longest key first so "GB200" is not read as "B200", "H200" not as "H20".
    for key in sorted(PEAK_TFLOPS, key=len, reverse=True):
        if key in name:
            return PEAK_TFLOPS[key]
    return None


class MetricsLog:
    """Appends records to <output_dir>/logging.jsonl (METRICS_FILE) and prints a readable line
    (rank 0 only)."""

    def __init__(self, output_dir: str | Path, enabled: bool, tensorboard_dir: str | None = None):
        self.enabled = enabled
        self.path = Path(output_dir) / METRICS_FILE
        self.tty = sys.stdout.isatty()
        self.tb = None
        if enabled:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            if tensorboard_dir:
                self.tb = _tensorboard_writer(tensorboard_dir)

    def log(self, record: dict) -> None:
        if not self.enabled:
            return
        record = {**record, "time": round(time.time(), 3)}
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")
        if self.tty:
            sys.stdout.write("\r\033[K")
        print(format_record(record), flush=True)
        if self.tb is not None:
            for key in ("loss", "lr", "grad_norm", "tokens_per_s", "mfu", *DPO_METRICS):
                if record.get(key) is not None:
                    self.tb.add_scalar(f"train/{key}", record[key], record["step"])
            for key in ("eval_loss", *(f"eval_{k}" for k in DPO_METRICS)):
                if record.get(key) is not None:
                    self.tb.add_scalar(f"eval/{key[5:]}", record[key], record["step"])

    def progress(self, step: int, total: int, elapsed: float) -> None:
        """A one-line progress bar with ETA, only when attached to a terminal."""
        if not (self.enabled and self.tty) or step <= 0:
            return
        width = 30
        filled = int(width * step / max(total, 1))
        eta = elapsed / step * (total - step)
        sys.stdout.write(
            f"\r[{'#' * filled}{'.' * (width - filled)}] {step}/{total} ETA {format_duration(eta)}"
        )
        sys.stdout.flush()

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()


def _tensorboard_writer(path: str):
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:  # tensorboard is optional; say so once instead of failing the run
        print(
            f"warning: tensorboard is not installed; --tensorboard_dir {path} ignored "
            "(pip install tensorboard)",
            file=sys.stderr,
        )
        return None
    return SummaryWriter(path)


def format_duration(seconds: float | None) -> str:
    if seconds is None:
        return "?"
    seconds = int(seconds)
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s"


def format_record(r: dict) -> str:
    parts = [
        f"step {r['step']}/{r['train_iters']}",
        f"epoch {r['epoch']:.2f}",
        f"loss {r['loss']:.4f}" if r.get("loss") is not None else "loss -",
        f"lr {r['lr']:.3g}",
    ]
    if r.get("grad_norm") is not None:
        parts.append(f"grad_norm {r['grad_norm']:.3f}")
    parts.append(f"{r['tokens_per_s']:.0f} tok/s")
    if r.get("tflops_per_gpu") is not None:
        parts.append(f"{r['tflops_per_gpu']:.3g} TFLOP/s/GPU")
    if r.get("mfu") is not None:
        parts.append(f"MFU {100 * r['mfu']:.1f}%")
    if r.get("rewards/accuracies") is not None:
        parts.append(f"reward acc {r['rewards/accuracies']:.2f} margin {r['rewards/margins']:.3g}")
    if r.get("peak_mem_gb") is not None:
        parts.append(f"mem {r['peak_mem_gb']:.1f} GB")
    if r.get("eval_loss") is not None:
        parts.append(f"eval_loss {r['eval_loss']:.4f}")
        if r.get("eval_rewards/accuracies") is not None:
            parts.append(f"eval reward acc {r['eval_rewards/accuracies']:.2f}")
    parts.append(f"ETA {format_duration(r.get('eta_s'))}")
    return " | ".join(parts)
