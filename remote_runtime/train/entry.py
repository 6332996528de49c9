"""`python -m remote_runtime sft|pt`: the training run, top to bottom.

1. distributed start-up (gloo on CPU, NCCL on GPU) and the job resolved against config.json;
2. tokenizer and dataset (tokenized once per node, cached);
3. the megatron model for this rank, filled from the HF checkpoint (or the checkpoint resumed);
4. DDP, the (distributed) optimizer and the LR schedule; optimizer/RNG/data state on resume;
5. the loop: one global batch per step, metrics every `logging_steps`, a checkpoint every
   `save_steps`, at the end, and on SIGTERM (then exit 0).
"""

from __future__ import annotations

import json
import logging
import resource
import signal
import sys
import time
from pathlib import Path

import torch

from remote_runtime.spec.config import ConfigError, JobConfig, normalize
from remote_runtime.spec.layout import RUN_CONFIG

log = logging.getLogger("remote_runtime.train")


class _StopRequest:
    """SIGTERM/SIGINT set a flag; the loop saves a checkpoint at the next step boundary."""

    def __init__(self):
        self.requested = False
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, self._handle)

    def _handle(self, signum, _frame):
        self.requested = True
        print(f"received {signal.Signals(signum).name}: saving a checkpoint at the end of this step",
              file=sys.stderr, flush=True)


def run_training(job: JobConfig) -> int:
    """Run the job; returns the process exit code (0 also after a SIGTERM checkpoint)."""
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    stop = _StopRequest()
    try:
        return _train(job, stop)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr, flush=True)
        return 2


def _train(job: JobConfig, stop: _StopRequest) -> int:
    from megatron.core.pipeline_parallel import get_forward_backward_func

    from remote_runtime.spec.resolve import read_hf_config, resolve_job
    from remote_runtime.spec.families import family_for_hf_config
    from remote_runtime.platform import init_distributed, shutdown
    from remote_runtime.train import checkpoint as ckpt
    from remote_runtime.train.collectives import any_rank
    from remote_runtime.spec.shape import ModelShape
    from remote_runtime.train.step import train_step

    _check_checkpoint_dependencies()
    par = job.parallel
    dist = init_distributed(job.model.device, par.tensor_model_parallel_size,
                            par.pipeline_model_parallel_size, par.context_parallel_size,
                            seed=job.train.seed,
                            expert_model_parallel_size=job.moe.expert_model_parallel_size,
                            expert_tensor_parallel_size=job.moe.expert_tensor_parallel_size)
    rank0 = dist.rank == 0
    hf_config = read_hf_config(job.model.model)
    resolved = resolve_job(job, dist.world_size, hf_config)
    job = normalize(job)  # what resolve_job reported: the adjustments of its warnings applied
    for warning in resolved["warnings"]:
        _say(rank0, f"warning: {warning}")
    family = family_for_hf_config(hf_config)
    output_dir = Path(job.checkpoint.output_dir).expanduser().resolve()
    if rank0:
        output_dir.mkdir(parents=True, exist_ok=True)
        resolved["device"] = str(dist.device)
        (output_dir / RUN_CONFIG).write_text(json.dumps(resolved, indent=2, default=str))

    dataset, batches, train_iters = _data(job, dist, rank0)
    resume_from = ckpt.find_resume_step(job.checkpoint.resume, output_dir, dist)
    model, optimizer, scheduler = _model(job, family, hf_config, dist, resume_from, train_iters)
    layout = {"world_size": dist.world_size, "tp": dist.tp, "pp": dist.pp, "cp": dist.cp,
              "dp": dist.dp}
    if dist.ep > 1 or dist.etp > 1:  # MoE: the optimizer shards experts over expert-DP
        layout.update(ep=dist.ep, etp=dist.etp)
    start_step = 0
    if resume_from is not None:
        state = ckpt.load_training_state(resume_from, model, optimizer, dist, layout)
        batches.load_state_dict(state.data)
        scheduler.load_state_dict(state.scheduler)
        start_step = state.step
        _say(rank0, f"resumed from {resume_from} at step {start_step}")

    shape = ModelShape.from_transformer_config(resolved["transformer_config"], family.name)
    metrics = _Metrics(job, dist, shape, output_dir, train_iters, rank0)
    forward_backward = get_forward_backward_func()

    def save(step: int, loss: float | None) -> None:
        t0 = time.perf_counter()
        state = ckpt.TrainState(
            step=step, train_iters=train_iters, consumed_samples=step * job.train.global_batch_size,
            data=batches.state_dict(), scheduler=scheduler.state_dict(), layout=layout,
            has_optimizer=False, has_rng=False, loss=loss, version=_version())
        path = ckpt.save_checkpoint(output_dir, state, model, optimizer, dist, job.model.model,
                                    save_optim=not job.checkpoint.no_save_optim,
                                    save_rng=not job.checkpoint.no_save_rng,
                                    total_limit=job.checkpoint.save_total_limit)
        _say(rank0, f"saved {path} ({time.perf_counter() - t0:.1f} s)")

    step = start_step
    _say(rank0, f"training {family.name} for {train_iters} steps from step {start_step} on "
         f"{dist.world_size} × {dist.device.type} (TP={dist.tp} PP={dist.pp} DP={dist.dp}); "
         f"{len(dataset)} documents")
    metrics.start()
    while step < train_iters:
        gb = batches.batch(step)
        micro = [mb.to(dist.device) for mb in gb.micro_batches]
        loss_pair, grad_norm, _ = train_step(model, optimizer, scheduler, micro, forward_backward)
        step += 1
        metrics.after_step(step, gb, loss_pair, grad_norm, optimizer)
        stopping = any_rank(stop.requested)
        # The last step always saves, so every run ends with a checkpoint.
        if stopping or step % job.checkpoint.save_steps == 0 or step == train_iters:
            save(step, metrics.last_loss)
        if stopping:
            _say(rank0, f"stopped by signal after step {step}; checkpoint saved")
            break
    metrics.close()
    shutdown()
    return 0


def moe_stats() -> dict:
    """MoE: `aux_loss` (transformers' load-balancing loss, mean over the logged steps'
    micro-batches of the last one) and `expert_load_imbalance` (per MoE layer of this stage,
    max / mean tokens per expert); empty for dense models."""
    from remote_runtime.model import moe_aux

    return moe_aux.pop_step_stats()


def _check_checkpoint_dependencies() -> None:
    """megatron-core's checkpoint writer needs psutil (undeclared there); without it the first
    save hangs in a worker process. Say so before any work is done."""
    import importlib.util

    if importlib.util.find_spec("psutil") is None:
        raise ConfigError([("checkpoint.output_dir", "saving checkpoints needs the psutil package, "
                            "which is not installed here: pip install psutil "
                            "(megafleet setup installs it)")])


def _say(rank0: bool, message: str) -> None:
    if rank0:
        print(message, flush=True)


def _version() -> str:
    from remote_runtime import __version__

    return __version__


def _data(job: JobConfig, dist, rank0: bool):
    """(dataset, batch iterator, train_iters): tokenized once per node, cached."""
    from transformers import AutoTokenizer

    from remote_runtime.data import build_dataset, make_batch_iterator
    from remote_runtime.train.collectives import barrier

    tokenizer = AutoTokenizer.from_pretrained(job.model.model)
    dataset, stats = build_dataset(job, tokenizer, should_build=dist.local_rank == 0,
                                   barrier=barrier)
    _say(rank0, stats.summary())
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    sp = job.parallel.sequence_parallel and dist.tp > 1
    batches = make_batch_iterator(job, dataset, dp_rank=dist.dp_rank, dp_size=dist.dp,
                                  pad_token_id=pad_id or 0, pad_to_multiple_of=dist.tp if sp else 1)
    if job.train.train_iters is not None:
        train_iters = job.train.train_iters
    else:
        train_iters = batches.train_iters(job.train.num_train_epochs)
    if train_iters <= 0:
        raise ConfigError([("train.global_batch_size",
                            f"{job.train.global_batch_size} is larger than the {len(dataset)} "
                            "documents of the dataset: no full global batch per epoch")])
    return dataset, batches, train_iters


def _model(job: JobConfig, family, hf_config: dict, dist, resume_from, train_iters: int):
    """Build this rank's model, fill it from the HF weights, wrap it, build the optimizer."""
    from remote_runtime.bridge import load_hf_checkpoint
    from remote_runtime.model.builder import ModelOptions, build_model
    from remote_runtime.train.optim import build_optimizer, schedule_for, wrap_ddp

    chunks = build_model(family, hf_config, ModelOptions.from_job(job), dist)
    weights = resume_from if resume_from is not None else job.model.model
    report = load_hf_checkpoint(chunks, weights, dist)
    _say(dist.rank == 0, f"loaded {weights} ({report.seconds:.1f} s)")
    if job.check.test_convert_precision:
        _check_conversion(chunks, job, dist)
    model = wrap_ddp(chunks, job)
    optimizer, scheduler = build_optimizer(model, job, schedule_for(job, train_iters))
    return model, optimizer, scheduler


def _check_conversion(chunks, job: JobConfig, dist) -> None:
    from remote_runtime.check_convert import compare_with_hf
    from remote_runtime.model.builder import DTYPES

    result = compare_with_hf(chunks, job.model.model, dist, DTYPES[job.model.torch_dtype])
    _say(dist.rank == 0, "conversion check: " + json.dumps(result, default=str))
    if not result.get("ok"):
        raise ConfigError([("check.test_convert_precision",
                            "Megatron and Hugging Face logits differ beyond the tolerance "
                            f"for {job.model.torch_dtype}; see the report above")])


class _Metrics:
    """Accumulates per-step numbers on the device; syncs and logs every `logging_steps`."""

    def __init__(self, job: JobConfig, dist, shape, output_dir: Path, train_iters: int, rank0: bool):
        from remote_runtime.train.metrics import MetricsLog, peak_tflops

        self.job, self.dist, self.shape, self.train_iters = job, dist, shape, train_iters
        self.log = MetricsLog(output_dir, enabled=rank0, tensorboard_dir=job.logging.tensorboard_dir)
        name = torch.cuda.get_device_name(dist.device) if dist.device.type == "cuda" else None
        self.peak = peak_tflops(name)
        self.last_loss = None
        self._reset()

    def _reset(self):
        self.loss_pair = torch.zeros(2, dtype=torch.float32, device=self.dist.device)
        self.tokens = self.loss_tokens = self.steps = 0
        self.flops = 0.0
        self.t0 = time.perf_counter()

    def start(self):
        self.t_start = time.perf_counter()
        self.step0 = None
        self._reset()

    def after_step(self, step: int, gb, loss_pair, grad_norm, optimizer) -> None:
        from remote_runtime.train.optim import current_lr

        if self.step0 is None:
            self.step0 = step - 1
        self.loss_pair += loss_pair
        self.tokens += gb.num_tokens
        self.loss_tokens += gb.num_loss_tokens
        self.flops += self.shape.training_flops(gb.num_tokens, gb.sum_sq_doc_lengths)
        self.steps += 1
        if step % self.job.logging.logging_steps and step != self.train_iters and step != 1:
            self.log.progress(step, self.train_iters, time.perf_counter() - self.t_start)
            return
        totals = self.loss_pair.clone()
        torch.distributed.all_reduce(totals)  # only last-stage ranks hold non-zero sums
        peak = torch.tensor([self._peak_memory_gb()], device=self.dist.device)
        torch.distributed.all_reduce(peak, op=torch.distributed.ReduceOp.MAX)
        elapsed = time.perf_counter() - self.t0
        loss = float(totals[0] / totals[1]) if totals[1] > 0 else None
        self.last_loss = loss
        tflops = self.flops / elapsed / self.dist.world_size / 1e12
        per_step = (time.perf_counter() - self.t_start) / max(step - self.step0, 1)
        self.log.log({
            "step": step, "train_iters": self.train_iters, "epoch": round(gb.epoch_progress, 4),
            "loss": loss, "lr": current_lr(optimizer),
            "grad_norm": None if grad_norm is None else float(grad_norm),
            "tokens_per_s": self.tokens / elapsed, "tflops_per_gpu": tflops,
            "mfu": tflops / self.peak if self.peak else None, "peak_mem_gb": float(peak.item()),
            "elapsed_s": round(time.perf_counter() - self.t_start, 3),
            "eta_s": round(per_step * (self.train_iters - step), 1),
            "tokens": self.tokens, "loss_tokens": self.loss_tokens, **moe_stats()})
        self._reset()

    def _peak_memory_gb(self) -> float:
        if self.dist.device.type == "cuda":
            return torch.cuda.max_memory_allocated(self.dist.device) / 1e9
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6  # KiB -> GB (RSS)

    def close(self):
        self.log.close()
