"""`python -m remote_runtime sft|pt`: the training run, top to bottom.

1. distributed start-up (gloo on CPU, NCCL on GPU) and the job resolved against config.json;
2. tokenizer and dataset (tokenized once per node, cached);
3. the megatron model for this rank, filled from the HF checkpoint (or the checkpoint resumed);
4. DDP, the (distributed) optimizer and the LR schedule; optimizer/RNG/data state on resume;
   for rlhf, the reference log-probs (cached, or one forward-only pass: reference.py);
5. the loop: one global batch per step, metrics every `logging_steps`, evaluation on the
   held-out set every `eval_steps` and at the end, a checkpoint every `save_steps`, at the end,
   and on SIGTERM (then exit 0).
"""

from __future__ import annotations

import json
import logging
import resource
import signal
import sys
import time
from pathlib import Path

import numpy as np
import torch

from remote_runtime.spec.config import ConfigError, JobConfig, normalize, uses_reference
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
        print(
            f"received {signal.Signals(signum).name}: saving a checkpoint at the end of this step",
            file=sys.stderr,
            flush=True,
        )


def run_training(job: JobConfig) -> int:
    """Run the job; returns the process exit code (0 also after a SIGTERM checkpoint)."""
    from remote_runtime.quiet import route_library_output

    logging.basicConfig(level=logging.INFO, format="%(message)s")
    route_library_output(job.checkpoint.output_dir)  # before megatron is imported
    stop = _StopRequest()
    try:
        return _train(job, stop)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr, flush=True)
        return 2


def _train(job: JobConfig, stop: _StopRequest) -> int:
    from megatron.core.pipeline_parallel import get_forward_backward_func

    from remote_runtime.platform import init_distributed, shutdown
    from remote_runtime.spec.families import family_for_hf_config
    from remote_runtime.spec.resolve import read_hf_config, resolve_job
    from remote_runtime.spec.shape import ModelShape
    from remote_runtime.spec.tuner import resolve_lora
    from remote_runtime.train import checkpoint as ckpt
    from remote_runtime.train.collectives import any_rank
    from remote_runtime.train.resume import find_resume_step
    from remote_runtime.train.step import train_step

    _check_checkpoint_dependencies()
    par = job.parallel
    dist = init_distributed(
        job.model.device,
        par.tensor_model_parallel_size,
        par.pipeline_model_parallel_size,
        par.context_parallel_size,
        seed=job.train.seed,
        expert_model_parallel_size=job.moe.expert_model_parallel_size,
        expert_tensor_parallel_size=job.moe.expert_tensor_parallel_size,
    )
    rank0 = dist.rank == 0
    _say(rank0, _accelerators(dist))
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

    data = _data(job, dist, rank0)
    dataset, batches, train_iters = data.train, data.batches, data.train_iters
    resume_from = find_resume_step(job.checkpoint.resume, output_dir, dist)
    forward_backward = get_forward_backward_func()
    lora = resolve_lora(job.tuner, family, hf_config, job.model.transformer_impl)
    ref_first = job.task == "rlhf" and _separate_reference(job, resume_from, lora)
    reference = _reference(job, dist, data, None, forward_backward, rank0) if ref_first else None
    model, optimizer, scheduler = _model(job, family, hf_config, dist, resume_from, train_iters)
    if job.task == "rlhf" and not ref_first:
        reference = _reference(job, dist, data, model, forward_backward, rank0)
    objective = _objective(job, data, reference)
    evaluator = _evaluator(job, data, objective, dist, forward_backward)
    layout = {
        "world_size": dist.world_size,
        "tp": dist.tp,
        "pp": dist.pp,
        "cp": dist.cp,
        "dp": dist.dp,
    }
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
    metrics = _Metrics(job, dist, shape, output_dir, train_iters, rank0, objective)
    eval_steps = job.eval.eval_steps or job.checkpoint.save_steps

    def save(step: int, loss: float | None) -> None:
        t0 = time.perf_counter()
        state = ckpt.TrainState(
            step=step,
            train_iters=train_iters,
            consumed_samples=step * job.train.global_batch_size,
            data=batches.state_dict(),
            scheduler=scheduler.state_dict(),
            layout=layout,
            has_optimizer=False,
            has_rng=False,
            loss=loss,
            version=_version(),
        )
        path = ckpt.save_checkpoint(
            output_dir,
            state,
            model,
            optimizer,
            dist,
            job.model.model,
            save_optim=not job.checkpoint.no_save_optim,
            save_rng=not job.checkpoint.no_save_rng,
            total_limit=job.checkpoint.save_total_limit,
        )
        _say(rank0, f"saved {path} ({time.perf_counter() - t0:.1f} s)")

    step = start_step
    _say(
        rank0,
        f"training {family.name} for {train_iters} steps from step {start_step} on "
        f"{dist.world_size} × {dist.device.type} (TP={dist.tp} PP={dist.pp} DP={dist.dp}); "
        f"{len(dataset)} documents",
    )
    metrics.start()
    while step < train_iters:
        gb = batches.batch(step)
        micro = [objective.prepare(mb).to(dist.device) for mb in gb.micro_batches]
        reports: dict = {}
        loss_pair, grad_norm, _ = train_step(
            model,
            optimizer,
            scheduler,
            micro,
            forward_backward,
            objective.loss_for(gb.doc_ids),
            reports,
        )
        step += 1
        stopping = any_rank(stop.requested)
        evaluated = None
        if (
            evaluator is not None
            and not stopping
            and (step % eval_steps == 0 or step == train_iters)
        ):
            evaluated = evaluator.run(model)
            metrics.pause(evaluated["eval_s"])
        metrics.after_step(step, gb, loss_pair, grad_norm, optimizer, reports, evaluated)
        # The last step always saves, so every run ends with a checkpoint.
        if stopping or step % job.checkpoint.save_steps == 0 or step == train_iters:
            save(step, metrics.last_loss)
        if stopping:
            _say(rank0, f"stopped by signal after step {step}; checkpoint saved")
            break
    metrics.close()
    if job.tuner.merge_lora and step == train_iters:
        _merge_and_save(model, job, output_dir, step, dist)
    shutdown()
    return 0


def moe_stats() -> dict:
    """MoE: `aux_loss` (transformers' load-balancing loss over all layers of all pipeline
    stages, mean over the micro-batches since the last log and the data-parallel ranks) and
    `expert_load_imbalance` (per MoE layer of the model, max / mean tokens per expert counted
    over all ranks); empty for dense models. Collective: every rank calls it."""
    from remote_runtime.model import moe_aux

    return moe_aux.pop_step_stats(reduce=True)


def _check_checkpoint_dependencies() -> None:
    """megatron-core's checkpoint writer needs psutil (undeclared there); without it the first
    save hangs in a worker process. Say so before any work is done."""
    import importlib.util

    if importlib.util.find_spec("psutil") is None:
        raise ConfigError(
            [
                (
                    "checkpoint.output_dir",
                    "saving checkpoints needs the psutil package, "
                    "which is not installed here: pip install psutil "
                    "(megafleet setup installs it)",
                )
            ]
        )


def _accelerators(dist) -> str:
    import torch

    from remote_runtime.quiet import accelerator_line

    name = torch.cuda.get_device_name(dist.device) if dist.device.type == "cuda" else None
    return accelerator_line(dist.device.type, dist.world_size, name)


def _say(rank0: bool, message: str) -> None:
    if rank0:
        print(message, flush=True)


def _version() -> str:
    from remote_runtime import __version__

    return __version__


class _Data:
    """The training set and its batches, the held-out set, and in-order batches of any set."""

    def __init__(self, job, dist, train, val, pad_id: int):
        from remote_runtime.data import make_batch_iterator

        sp = job.parallel.sequence_parallel and dist.tp > 1
        self.job, self.train, self.val = job, train, val
        self.layout = dict(
            dp_rank=dist.dp_rank,
            dp_size=dist.dp,
            pad_token_id=pad_id,
            pad_to_multiple_of=dist.tp if sp else 1,
        )
        self.batches = make_batch_iterator(job, train, **self.layout)
        self.train_iters = 0

    def in_order(self, dataset, max_samples: int | None = None) -> list:
        """This data-parallel rank's micro-batches over `dataset`, in order (eval, reference)."""
        from remote_runtime.data import make_batch_iterator

        it = make_batch_iterator(self.job, dataset, for_eval=True, **self.layout)
        return it.eval_batches(max_samples)


def _data(job: JobConfig, dist, rank0: bool) -> _Data:
    """The datasets (tokenized once per node, cached), the batch iterator and train_iters."""
    from transformers import AutoTokenizer

    from remote_runtime.data import build_dataset
    from remote_runtime.data.validation import with_validation
    from remote_runtime.train.collectives import barrier

    tokenizer = AutoTokenizer.from_pretrained(job.model.model)
    dataset, stats = build_dataset(
        job, tokenizer, should_build=dist.local_rank == 0, barrier=barrier
    )
    dataset, val = with_validation(
        job, tokenizer, dataset, stats, should_build=dist.local_rank == 0, barrier=barrier
    )
    _say(rank0, stats.summary())
    pad_id = (
        tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    )
    data = _Data(job, dist, dataset, val, pad_id or 0)
    batches = data.batches
    if job.train.train_iters is not None:
        train_iters = job.train.train_iters
    else:
        train_iters = batches.train_iters(job.train.num_train_epochs)
    if train_iters <= 0:
        raise ConfigError(
            [
                (
                    "train.global_batch_size",
                    f"{job.train.global_batch_size} is larger than the {len(dataset)} "
                    "documents of the dataset: no full global batch per epoch",
                )
            ]
        )
    data.train_iters = train_iters
    return data


def _separate_reference(job: JobConfig, resume_from, lora) -> bool:
    """Whether the reference needs its own model (built, used and freed before the policy):
    a `--ref_model`; a resumed full fine-tuning run (its weights are no longer the base); LoRA
    whose fully trained `modules_to_save` come from an adapter or a resumed checkpoint (disabling
    the adapters would not restore them). Otherwise the policy itself runs the pass before its
    first step, with LoRA's adapters disabled: the reference is then the base model."""
    rl = job.rlhf
    if not uses_reference(rl):
        return False
    if rl.ref_model is not None:
        return True
    if lora is None:
        return resume_from is not None
    continued = resume_from is not None or lora.adapter_dir is not None
    return continued and bool(lora.modules_to_save)


def _reference(job: JobConfig, dist, data: _Data, model, forward_backward, rank0: bool) -> dict:
    """{"train": per-document reference log-probs, "val": ... or None}; see reference.py."""
    import contextlib
    from functools import partial

    from remote_runtime.data import default_cache_dir
    from remote_runtime.model.lora import adapters_disabled, lora_settings
    from remote_runtime.train.reference import ReferenceSource, reference_logps

    if not uses_reference(job.rlhf):
        return {}
    # LoRA: the policy with its adapters disabled is the base model (no second model)
    disable = (
        partial(adapters_disabled, model)
        if model is not None and lora_settings(model) is not None
        else contextlib.nullcontext
    )
    source = ReferenceSource(job.rlhf.ref_model or job.model.model, chunks=model, disable=disable)
    sets = {"train": data.train, **({"val": data.val} if data.val is not None else {})}
    values = reference_logps(
        list(sets.values()),
        source,
        job=job,
        dist=dist,
        make_eval_batches=data.in_order,
        build_reference=lambda path: _build_reference(job, dist, path),
        forward_backward=forward_backward,
        cache_dir=default_cache_dir(job),
        say=lambda m: _say(rank0, m),
    )
    return dict(zip(sets, values))


def _build_reference(job: JobConfig, dist, model_dir: str) -> list:
    from remote_runtime.bridge import load_hf_checkpoint
    from remote_runtime.model.builder import ModelOptions, build_model
    from remote_runtime.spec.families import family_for_hf_config
    from remote_runtime.spec.resolve import read_hf_config

    hf_config = read_hf_config(model_dir)
    chunks = build_model(
        family_for_hf_config(hf_config), hf_config, ModelOptions.from_job(job), dist
    )
    load_hf_checkpoint(chunks, model_dir, dist)
    return chunks


def _objective(job: JobConfig, data: _Data, reference: dict | None):
    from remote_runtime.train.objective import PreferenceObjective, TokenObjective

    if job.task != "rlhf":
        return TokenObjective()
    from remote_runtime.train.dpo import DpoSettings

    return PreferenceObjective(
        DpoSettings.from_job(job), {"train": data.train, "val": data.val}, reference or {}
    )


def _evaluator(job: JobConfig, data: _Data, objective, dist, forward_backward):
    """The evaluation of the held-out set, or None without one."""
    from remote_runtime.train.evaluate import Evaluator

    if data.val is None:
        return None
    it = job.eval.eval_iters
    micro = data.in_order(data.val, None if it == -1 else it * job.train.global_batch_size)
    micro = [objective.prepare(mb, "val") for mb in micro]
    all_docs = np.arange(len(data.val))
    return Evaluator(micro, objective, objective.loss_for(all_docs, "val"), dist, forward_backward)


def _model(job: JobConfig, family, hf_config: dict, dist, resume_from, train_iters: int):
    """Build this rank's model, fill it from the HF weights, wrap it, build the optimizer."""
    from remote_runtime.bridge import load_hf_checkpoint
    from remote_runtime.model.builder import ModelOptions, build_model
    from remote_runtime.spec.tuner import resolve_lora
    from remote_runtime.train.optim import build_optimizer, schedule_for, wrap_ddp

    chunks = build_model(family, hf_config, ModelOptions.from_job(job), dist)
    lora = resolve_lora(job.tuner, family, hf_config, job.model.transformer_impl)
    # A LoRA checkpoint is an adapter: the base always comes from --model
    weights = resume_from if resume_from is not None and lora is None else job.model.model
    report = load_hf_checkpoint(chunks, weights, dist)
    _say(dist.rank == 0, f"loaded {weights} ({report.seconds:.1f} s)")
    if lora is not None:
        _attach_adapters(chunks, lora, hf_config, dist, job.train.seed, resume_from)
    if job.check.test_convert_precision:
        _check_conversion(chunks, job, dist)
    model = wrap_ddp(chunks, job)
    optimizer, scheduler = build_optimizer(model, job, schedule_for(job, train_iters))
    return model, optimizer, scheduler


def _attach_adapters(chunks, lora, hf_config: dict, dist, seed: int, resume_from) -> None:
    """Freeze the base, add the LoRA adapters; continue the resumed or given adapter."""
    from remote_runtime.bridge.adapter import load_adapter
    from remote_runtime.model.lora import attach_lora

    adapters = attach_lora(chunks, lora, hf_config, dist, seed)
    source = resume_from if resume_from is not None else lora.adapter_dir
    if source is not None:
        load_adapter(chunks, source, dist)
    trained = sum(p.numel() for c in chunks for p in c.parameters() if p.requires_grad)
    _say(
        dist.rank == 0,
        f"LoRA r={lora.rank} alpha={lora.alpha:g} on {len(adapters)} layers "
        f"({', '.join(lora.target_names())}); {trained / 1e6:.2f}M trainable parameters on "
        f"rank 0" + (f"; adapter from {source}" if source is not None else ""),
    )


def _merge_and_save(model, job: JobConfig, output_dir: Path, step: int, dist) -> None:
    """--merge_lora: the adapters folded into the base, written as a full HF model."""
    from remote_runtime.bridge import save_hf_checkpoint
    from remote_runtime.model.lora import merge_lora

    merge_lora(model)
    path = output_dir / f"checkpoint-{step}-merged"
    save_hf_checkpoint(model, path, job.model.model, dist, overwrite=True)
    _say(dist.rank == 0, f"saved the merged model {path}")


def _check_conversion(chunks, job: JobConfig, dist) -> None:
    from remote_runtime.check_convert import compare_with_hf
    from remote_runtime.model.builder import DTYPES

    result = compare_with_hf(chunks, job.model.model, dist, DTYPES[job.model.torch_dtype])
    _say(dist.rank == 0, "conversion check: " + json.dumps(result, default=str))
    if not result.get("ok"):
        raise ConfigError(
            [
                (
                    "check.test_convert_precision",
                    "Megatron and Hugging Face logits differ beyond the tolerance "
                    f"for {job.model.torch_dtype}; see the report above",
                )
            ]
        )


class _Metrics:
    """Accumulates per-step numbers on the device; syncs and logs every `logging_steps`."""

    def __init__(
        self,
        job: JobConfig,
        dist,
        shape,
        output_dir: Path,
        train_iters: int,
        rank0: bool,
        objective,
    ):
        from remote_runtime.train.metrics import MetricsLog, peak_tflops

        self.job, self.dist, self.shape, self.train_iters = job, dist, shape, train_iters
        self.objective = objective
        self.log = MetricsLog(
            output_dir, enabled=rank0, tensorboard_dir=job.logging.tensorboard_dir
        )
        name = torch.cuda.get_device_name(dist.device) if dist.device.type == "cuda" else None
        self.peak = peak_tflops(name)
        self.last_loss = None
        self._reset()

    def _reset(self):
        self.loss_pair = torch.zeros(2, dtype=torch.float32, device=self.dist.device)
        self.reports: dict = {}
        self.tokens = self.loss_tokens = self.steps = 0
        self.flops = 0.0
        self.t0 = time.perf_counter()

    def start(self):
        self.t_start = time.perf_counter()
        self.step0 = None
        self._reset()

    def pause(self, seconds: float) -> None:
        """Leave time spent outside training (evaluation) out of the throughput."""
        self.t0 += seconds

    def after_step(
        self,
        step: int,
        gb,
        loss_pair,
        grad_norm,
        optimizer,
        reports: dict,
        evaluated: dict | None = None,
    ) -> None:
        from remote_runtime.train.optim import current_lr

        if self.step0 is None:
            self.step0 = step - 1
        self.loss_pair += loss_pair
        for name, value in reports.items():
            self.reports[name] = self.reports[name] + value if name in self.reports else value
        self.tokens += gb.num_tokens
        self.loss_tokens += gb.num_loss_tokens
        self.flops += self.shape.training_flops(gb.num_tokens, gb.sum_sq_doc_lengths)
        self.steps += 1
        if (
            step % self.job.logging.logging_steps
            and step != self.train_iters
            and step != 1
            and evaluated is None
        ):
            self.log.progress(step, self.train_iters, time.perf_counter() - self.t_start)
            return
        from remote_runtime.train.objective import all_reduced

        totals = self.loss_pair.clone()
        torch.distributed.all_reduce(totals)  # only last-stage ranks hold non-zero sums
        extra = self.objective.metrics(
            all_reduced(self.reports, self.objective.report_sizes, self.dist.device)
        )
        peak = torch.tensor([self._peak_memory_gb()], device=self.dist.device)
        torch.distributed.all_reduce(peak, op=torch.distributed.ReduceOp.MAX)
        elapsed = time.perf_counter() - self.t0
        loss = float(totals[0] / totals[1]) if totals[1] > 0 else None
        self.last_loss = loss
        tflops = self.flops / elapsed / self.dist.world_size / 1e12
        per_step = (time.perf_counter() - self.t_start) / max(step - self.step0, 1)
        self.log.log(
            {
                "step": step,
                "train_iters": self.train_iters,
                "epoch": round(gb.epoch_progress, 4),
                "loss": loss,
                "lr": current_lr(optimizer),
                "grad_norm": None if grad_norm is None else float(grad_norm),
                "tokens_per_s": self.tokens / elapsed,
                "tflops_per_gpu": tflops,
                "mfu": tflops / self.peak if self.peak else None,
                "peak_mem_gb": float(peak.item()),
                "elapsed_s": round(time.perf_counter() - self.t_start, 3),
                "eta_s": round(per_step * (self.train_iters - step), 1),
                "tokens": self.tokens,
                "loss_tokens": self.loss_tokens,
                **extra,
                **(evaluated or {}),
                **moe_stats(),
            }
        )
        self._reset()

    def _peak_memory_gb(self) -> float:
        if self.dist.device.type == "cuda":
            return torch.cuda.max_memory_allocated(self.dist.device) / 1e9
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6  # KiB -> GB (RSS)

    def close(self):
        self.log.close()
