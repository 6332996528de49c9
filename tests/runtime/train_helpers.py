"""Run the real runtime (`torchrun -m remote_runtime sft|pt`) on tiny models, on CPU."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def make_assets(
    root: Path, family: str = "qwen3", rows: int = 64, **model_overrides
) -> tuple[Path, Path]:
    """(model dir, dataset file): a tiny random model and the demo chat data."""
    from remote_runtime.data.demo_data import demo_corpus, write_demo_dataset
    from remote_runtime.tiny import build_model, build_tokenizer

    tok_dir = root / "tok"
    if not (tok_dir / "tokenizer.json").exists():
        build_tokenizer(tok_dir, corpus=demo_corpus())
    model = build_model(family, root / f"model-{family}", tokenizer_dir=tok_dir, **model_overrides)
    data = write_demo_dataset(root / "data.jsonl", num_rows=rows)
    return model, data


def run_runtime(
    args: list[str],
    nproc: int = 1,
    task: str = "sft",
    timeout: float = 300,
    env: dict | None = None,
    cwd: Path | None = None,
) -> subprocess.CompletedProcess:
    # the caller's PYTHONPATH stays after the checkout (GPU machines carry packages on it)
    path = os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH", "")) if p)
    full_env = dict(
        os.environ, PYTHONPATH=path, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", **(env or {})
    )
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        f"--nproc_per_node={nproc}",
        f"--master_port={free_port()}",
        "-m",
        "remote_runtime",
        task,
        *args,
    ]
    return subprocess.run(
        cmd, capture_output=True, text=True, timeout=timeout, env=full_env, cwd=cwd or REPO
    )


def base_args(model: Path, data: Path, out: Path, **kw) -> list[str]:
    opts = {
        "model": model,
        "dataset": data,
        "output_dir": out,
        "device": "cpu",
        "torch_dtype": "float32",
        "max_length": 64,
        "micro_batch_size": 2,
        "global_batch_size": 4,
        "lr": 1e-3,
        "min_lr": 1e-4,
        "train_iters": 5,
        "logging_steps": 1,
        "save_steps": 1000,
        "seed": 1,
    }
    opts.update(kw)
    args = []
    for k, v in opts.items():
        args += [f"--{k}", str(v)]
    return args


def read_log(out: Path) -> list[dict]:
    path = out / "logging.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def losses(out: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in read_log(out)}


def check(proc: subprocess.CompletedProcess) -> None:
    assert proc.returncode == 0, (
        f"exit {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    )


class SharedRuns:
    """Runs that several tests only read (losses, logs, checkpoints), started once per session:
    `get(model, data, nproc=..., task=..., **base_args overrides)` returns the output directory
    of the first run with exactly these arguments. Tests must not write into it."""

    def __init__(self, root: Path):
        self.root, self.done = root, {}

    def get(self, model: Path, data: Path, nproc: int = 1, task: str = "sft", **kw) -> Path:
        key = json.dumps(
            [str(model), str(data), nproc, task, sorted((k, str(v)) for k, v in kw.items())]
        )
        if key not in self.done:
            out = self.root / f"run{len(self.done)}"
            check(run_runtime(base_args(model, data, out, **kw), nproc=nproc, task=task))
            self.done[key] = out
        return self.done[key]
