"""STAND-IN for the real training entry point (`python -m remote_runtime sft ...`).

NOT the runtime. The job-lifecycle tests launch it through torchrun with `-m
tests.standin_workload sft --config job.yaml` while the real train loop is written elsewhere;
it behaves like the runtime as far as the operator can see, in a second instead of minutes:

- reads the job with the runtime's own parser (remote_runtime.spec.flags.job_from_argv);
- `--dry_run true` prints a JSON document and exits 0 (2 with the problems as JSON), as the
  runtime does;
- joins a torch.distributed gloo group (torchrun's env), and each step all-reduces a tensor
  that also carries a stop flag, so every rank stops at the same step after a SIGTERM;
- rank 0 prints `step N/M loss L`, draws a `\\r` progress bar on stderr, appends logging.jsonl
  lines with the runtime's documented fields, and saves `checkpoint-<step>/` atomically (the
  model directory's Hugging Face files, then trainer_state.json last) every save_steps, at the
  end and after SIGTERM, then exits 0;
- env knobs (forwarded with launch.env): STANDIN_STEP_S (seconds per step),
  STANDIN_HANG_ON_PEER_FAILURE=1: when a collective fails because a peer died, hang like NCCL
  would (until SIGTERM) instead of exiting, so only the watcher can end it, and
  STANDIN_SPAWN_HELPERS=1: each rank starts what the real runtime's libraries start (a
  multiprocessing `spawn` child and the `resource_tracker`), which outlive a SIGKILLed worker.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import sys
import time
from pathlib import Path


def save_checkpoint(model_dir: Path, out: Path, step: int, loss: float) -> Path:
    final = out / f"checkpoint-{step}"
    if final.exists():
        return final
    tmp = out / f".checkpoint-{step}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    for f in sorted(model_dir.iterdir()):
        if f.is_file() and f.name != "trainer_state.json":
            shutil.copy2(f, tmp / f.name)
    state = tmp / "megatron_state" / "optimizer"  # the runtime's resume state, as it lays it out
    state.mkdir(parents=True)
    (state / "shard_0.bin").write_bytes(b"\0" * 4096)
    (tmp / "trainer_state.json").write_text(json.dumps({"global_step": step, "loss": loss}))
    os.replace(tmp, final)
    return final


def metrics(step: int, iters: int, loss: float, started: float) -> dict:
    elapsed = time.time() - started
    return {
        "step": step,
        "train_iters": iters,
        "epoch": step / iters,
        "loss": loss,
        "lr": 1e-4,
        "grad_norm": 1.0 / step,
        "tokens_per_s": 1000.0,
        "tflops_per_gpu": 0.0,
        "mfu": 0.0,
        "peak_mem_gb": 0.0,
        "elapsed_s": elapsed,
        "eta_s": elapsed / step * (iters - step),
        "time": time.time(),
    }


def dry_run(job) -> int:
    from remote_runtime.spec.config import ConfigError, validate
    from remote_runtime.spec.resolve import world_size_from_env

    try:
        validate(job)
    except ConfigError as exc:  # as the runtime: the problems as JSON, a line on stderr
        print(json.dumps(exc.to_dict()))
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(json.dumps({"standin": True, "world_size": world_size_from_env(), "job": job.to_dict()}))
    return 0


def _sleep_forever() -> None:
    while True:
        time.sleep(60)


def spawn_helpers() -> list:
    """A spawn-context child and the resource_tracker (started by the semaphore), as
    torch's and megatron's multiprocessing use leaves beside a worker."""
    import multiprocessing as mp

    ctx = mp.get_context("spawn")
    lock = ctx.Lock()  # a named semaphore: starts the resource_tracker
    child = ctx.Process(target=_sleep_forever, daemon=False)
    child.start()
    return [lock, child]


def train(job) -> int:
    import torch
    import torch.distributed as dist

    stop = {"flag": 0.0}
    signal.signal(signal.SIGTERM, lambda *_: stop.update(flag=1.0))
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    token = "set" if os.environ.get("HF_TOKEN") else "unset"
    print(
        f"stand-in rank {rank}/{world} ready on {socket.gethostname()} (HF_TOKEN {token})",
        flush=True,
    )
    step_s = float(os.environ.get("STANDIN_STEP_S", "0.05"))
    hang = os.environ.get("STANDIN_HANG_ON_PEER_FAILURE") == "1"
    helpers = spawn_helpers() if os.environ.get("STANDIN_SPAWN_HELPERS") == "1" else []
    out, model_dir = Path(job.checkpoint.output_dir), Path(job.model.model)
    iters, started, loss, step = job.train.train_iters or 10, time.time(), 0.0, 0
    for step in range(1, iters + 1):
        t = torch.tensor([float(rank + step), stop["flag"]])
        try:
            dist.all_reduce(t)
        except Exception as exc:  # a peer died
            print(
                f"rank {rank}: collective failed ({type(exc).__name__}); "
                + ("hanging like NCCL would" if hang else "exiting"),
                flush=True,
            )
            while hang and not stop["flag"]:
                time.sleep(0.1)
            return 0 if hang else 1
        if t[1] > 0:
            print(f"rank {rank}: SIGTERM: stopping at step {step}", flush=True)
            step -= 1
            break
        loss = 5.0 / step
        time.sleep(step_s)
        if rank == 0:
            _report(job, out, step, iters, loss, started, model_dir)
    if rank == 0 and step > 0:
        path = save_checkpoint(model_dir, out, step, loss)
        print(f"saved {path}", flush=True)
    for h in helpers:
        if hasattr(h, "terminate"):
            h.terminate()
    return 0


def _report(
    job, out: Path, step: int, iters: int, loss: float, started: float, model_dir: Path
) -> None:
    sys.stderr.write(f"\rtraining {step}/{iters} [{'#' * (10 * step // iters):<10}]")
    if step == iters:
        sys.stderr.write("\n")
    sys.stderr.flush()
    if step % job.logging.logging_steps == 0 or step == iters:
        out.mkdir(parents=True, exist_ok=True)
        with open(out / "logging.jsonl", "a") as f:
            f.write(json.dumps(metrics(step, iters, loss, started)) + "\n")
        print(f"step {step}/{iters} loss {loss:.4f}", flush=True)
    if step % job.checkpoint.save_steps == 0 and step < iters:
        save_checkpoint(model_dir, out, step, loss)


def main(argv: list[str] | None = None) -> int:
    from remote_runtime.spec.flags import job_from_argv

    argv = sys.argv[1:] if argv is None else argv
    job = job_from_argv(argv[1:], task=argv[0])
    return dry_run(job) if job.check.dry_run else train(job)


if __name__ == "__main__":
    sys.exit(main())
