"""Training throughput: megafleet's runtime vs Hugging Face transformers, same shape, same GPU.

    python benchmarks/train_throughput.py --shape qwen3-1.7b --seq-len 4096 --json out.json
    torchrun --standalone --nproc_per_node 2 benchmarks/train_throughput.py --shape qwen3-8b \
        --tp 2 --sp --json out.json

Both sides do full fine-tuning (or, with `--lora`, LoRA r=16 alpha 32 on q/k/v/o/gate/up/down, on
MoE shapes every routed expert's gate/up/down too: our adapters vs PEFT, fused AdamW on the
adapters) in bf16 of a randomly initialised model of the named
shape, on sequences of `--seq-len` tokens (`--docs-per-seq` documents packed per sequence for the
runtime; Hugging Face gets one document per sequence, the same FLOPs when docs-per-seq is 1), with
`--global-batch` sequences per optimizer step. Reported per side: tokens/s (all GPUs), TFLOP/s per
GPU and MFU (Megatron's formula, causal attention halved, peak 989 TFLOP/s on H100/H200), peak
memory (torch.cuda.max_memory_allocated, GiB), and the runtime/HF ratio.

The runtime keeps fp32 master weights, fp32 gradient buffers and Adam states (megatron's
mixed precision); Hugging Face trains in pure bf16 with fused AdamW (its usual bf16 setup).
Under torchrun the runtime uses all ranks (TP × PP × DP); Hugging Face runs on rank 0 only.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import gc
import json
import os
import platform
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import torch  # noqa: E402


def parse_args(argv=None):
    from megafleet.model_shape import NAMED_CONFIGS

    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--shape", default="qwen3-1.7b", choices=sorted(NAMED_CONFIGS))
    p.add_argument("--num-layers", type=int, help="cut the model to this many layers")
    p.add_argument("--seq-len", type=int, default=4096)
    p.add_argument("--docs-per-seq", type=int, default=1)
    p.add_argument("--global-batch", type=int, default=8, help="sequences per optimizer step")
    p.add_argument("--micro-batch", type=int, default=1, help="sequences per micro-batch")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--impl", default="runtime,hf")
    p.add_argument("--tp", type=int, default=1)
    p.add_argument("--pp", type=int, default=1)
    p.add_argument("--sp", action="store_true", help="sequence parallel (TP > 1)")
    p.add_argument("--no-distributed-optimizer", action="store_true")
    p.add_argument("--overlap", action="store_true", help="overlap grad reduce / param gather")
    p.add_argument(
        "--megatron-optimizer-step",
        action="store_true",
        help="megatron-core's own optimizer step (gradient scaling and clipping as separate "
        "passes) instead of the runtime's (folded into Adam): the ablation",
    )
    p.add_argument(
        "--adam",
        default="megafleet",
        choices=["megafleet", "torch"],
        help="megafleet's AdamW (one Triton pass, writes the bf16 weights) or torch's fused "
        "AdamW followed by megatron's copy (the ablation)",
    )
    p.add_argument(
        "--moments",
        default="fp32",
        choices=["fp32", "bf16"],
        help="Adam moment dtype (bf16: the precision-aware optimizer, megafleet's AdamW)",
    )
    p.add_argument("--lr", type=float, default=1e-5)
    p.add_argument("--recompute", default="none", choices=["none", "selective", "full"])
    p.add_argument("--recompute-layers", type=int, default=1)
    p.add_argument("--attention-backend", default="auto")
    p.add_argument("--transformer-impl", default="auto")
    p.add_argument(
        "--option",
        action="append",
        default=[],
        help="extra ModelOptions field=value (e.g. fused_norm=false) for ablations",
    )
    p.add_argument(
        "--lora",
        action="store_true",
        help="LoRA on every linear layer of attention and MLP (both sides)",
    )
    p.add_argument("--lora-rank", type=int, default=16)
    p.add_argument("--lora-alpha", type=int, default=32)
    p.add_argument("--lora-dropout", type=float, default=0.0)
    p.add_argument(
        "--lora-targets",
        help="HF module names, comma-separated (default: every linear layer; on MoE shapes also "
        "every expert's gate/up/down). q_proj,k_proj,v_proj,o_proj: attention only",
    )
    p.add_argument("--profile", help="write a torch.profiler summary of 2 runtime steps here")
    p.add_argument("--json", help="append the results to this JSON file")
    p.add_argument("--label", default="")
    p.add_argument(
        "--device",
        default="cuda",
        choices=["cuda", "cpu"],
        help="cpu: a smoke run of the same code (tiny shapes only; numbers meaningless)",
    )
    return p.parse_args(argv)


# ---- shared ------------------------------------------------------------------------------


def hf_config(args) -> dict:
    from megafleet.model_shape import NAMED_CONFIGS

    cfg = dict(NAMED_CONFIGS[args.shape])
    if args.num_layers:
        cfg["num_hidden_layers"] = args.num_layers
    return cfg


def flops_per_step(args, cfg: dict) -> float:
    from remote_runtime.spec.shape import ModelShape

    shape = ModelShape.from_hf_config(cfg)
    doc = args.seq_len // args.docs_per_seq
    docs = [doc] * args.docs_per_seq
    docs[-1] += args.seq_len - sum(docs)
    tokens = args.seq_len * args.global_batch
    return shape.training_flops(tokens, sum(d * d for d in docs) * args.global_batch)


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def timed(step_fn, warmup: int, steps: int) -> float:
    for _ in range(warmup):
        step_fn()
    sync()
    t0 = time.perf_counter()
    for _ in range(steps):
        step_fn()
    sync()
    return (time.perf_counter() - t0) / steps


def memory_stats() -> tuple[float, float]:
    if not torch.cuda.is_available():
        return 0.0, 0.0
    return torch.cuda.max_memory_allocated() / 2**30, torch.cuda.max_memory_reserved() / 2**30


def reset_memory_stats() -> None:
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()


def result(args, impl: str, cfg: dict, step_time: float, world: int, extra: dict) -> dict:
    from remote_runtime.train.metrics import peak_tflops

    flops = flops_per_step(args, cfg)
    tokens = args.seq_len * args.global_batch
    peak = peak_tflops(torch.cuda.get_device_name()) if torch.cuda.is_available() else None
    allocated, reserved = memory_stats()
    tflops = flops / step_time / world / 1e12
    return {
        "impl": impl,
        "label": args.label,
        "shape": args.shape,
        "model_config": cfg,
        "seq_len": args.seq_len,
        "docs_per_seq": args.docs_per_seq,
        "micro_batch_size": args.micro_batch,
        "global_batch_size": args.global_batch,
        "world_size": world,
        "step_time_s": round(step_time, 4),
        "tokens_per_s": round(tokens / step_time, 1),
        "tokens_per_s_per_gpu": round(tokens / step_time / world, 1),
        "tflops_per_gpu": round(tflops, 1),
        "mfu": round(tflops / peak, 4) if peak else None,
        "peak_mem_gb": round(allocated, 2),
        "peak_mem_unit": "GiB",
        "peak_reserved_gib": round(reserved, 2),
        **extra,
    }


# ---- the runtime ---------------------------------------------------------------------------


def runtime_batches(args, dist, vocab: int):
    """This DP rank's micro-batches of one global batch: random tokens, THD packed."""
    import numpy as np

    from remote_runtime.data.batches import collate_thd

    rng = np.random.default_rng(1234 + dist.dp_rank)
    per_rank = args.global_batch // dist.dp
    n_micro = per_rank // args.micro_batch
    doc = args.seq_len // args.docs_per_seq
    micro = []
    for _ in range(n_micro):
        docs = []
        for _ in range(args.micro_batch):
            for d in range(args.docs_per_seq):
                n = (
                    doc
                    if d < args.docs_per_seq - 1
                    else args.seq_len - doc * (args.docs_per_seq - 1)
                )
                docs.append((rng.integers(0, vocab, n).astype(np.int32), np.ones(n, np.uint8)))
        mb = collate_thd(
            docs,
            num_samples=args.micro_batch,
            pad_token_id=0,
            pad_to_multiple_of=dist.tp if args.sp else 1,
        )
        micro.append(mb.to(dist.device))
    return micro


def run_runtime(args, cfg: dict) -> dict:
    from megatron.core.pipeline_parallel import get_forward_backward_func

    from remote_runtime.model.builder import ModelOptions, build_model
    from remote_runtime.platform import init_distributed
    from remote_runtime.spec.config import JobConfig
    from remote_runtime.spec.families import family_for_hf_config
    from remote_runtime.train.optim import build_optimizer, schedule_for, wrap_ddp
    from remote_runtime.train.step import train_step

    dist = init_distributed(args.device, args.tp, args.pp, seed=1234)
    job = JobConfig()
    job.parallel.tensor_model_parallel_size, job.parallel.pipeline_model_parallel_size = (
        args.tp,
        args.pp,
    )
    job.parallel.sequence_parallel = args.sp and args.tp > 1
    job.parallel.use_distributed_optimizer = not args.no_distributed_optimizer
    job.parallel.overlap_grad_reduce = job.parallel.overlap_param_gather = args.overlap
    job.recompute.recompute_granularity = args.recompute
    if args.recompute == "full":
        job.recompute.recompute_method, job.recompute.recompute_num_layers = (
            "uniform",
            args.recompute_layers,
        )
    job.train.micro_batch_size, job.train.global_batch_size = args.micro_batch, args.global_batch
    job.model.attention_backend, job.model.transformer_impl = (
        args.attention_backend,
        args.transformer_impl,
    )
    job.optim.lr = args.lr
    if args.moments != "fp32":
        job.optim.use_precision_aware_optimizer = True
        job.optim.exp_avg_dtype = job.optim.exp_avg_sq_dtype = args.moments
    if args.device == "cpu":
        job.model.torch_dtype = "float32"
    overrides = {}
    for item in args.option:
        key, _, value = item.partition("=")
        overrides[key] = {"true": True, "false": False}.get(value.lower(), value)
    options = ModelOptions.from_job(job, init_weights=True, **overrides)
    family = family_for_hf_config(cfg)
    chunks = build_model(family, cfg, options, dist)
    if args.lora:
        from remote_runtime.model.lora import attach_lora
        from remote_runtime.spec.tuner import resolve_lora

        job.tuner = lora_tuner(args)
        attach_lora(chunks, resolve_lora(job.tuner, family, cfg), cfg, dist)
    model = wrap_ddp(chunks, job)
    optimizer, scheduler = build_optimizer(
        model,
        job,
        schedule_for(job, 10**6),
        fold_grad_scaling=not args.megatron_optimizer_step,
        adam=args.adam,
    )
    micro = runtime_batches(args, dist, cfg["vocab_size"])
    fb = get_forward_backward_func()
    losses = []

    def step():
        loss_pair, _, _ = train_step(model, optimizer, scheduler, micro, fb)
        losses.append(loss_pair)

    reset_memory_stats()
    step_time = timed(step, args.warmup, args.steps)
    if args.profile:
        profile_steps(step, args.profile, dist.rank)
    total = torch.stack(losses).sum(0)
    torch.distributed.all_reduce(total)
    from remote_runtime.model.attention import PACKED_PATH
    from remote_runtime.model.builder import memory_assumptions
    from remote_runtime.model.expert_wgrad import deferrals

    extra = {
        "optimizer_step": "megatron" if args.megatron_optimizer_step else "folded",
        "adam": args.adam,
        "adam_moments": args.moments,
        "lr": args.lr,
        "tp": dist.tp,
        "pp": dist.pp,
        "dp": dist.dp,
        "sequence_parallel": job.parallel.sequence_parallel,
        "use_distributed_optimizer": job.parallel.use_distributed_optimizer,
        "recompute_granularity": args.recompute,
        "recompute_method": job.recompute.recompute_method,
        "recompute_num_layers": job.recompute.recompute_num_layers,
        "attention": dict(PACKED_PATH),
        "options": overrides,
        # MoE: micro-batches per expert weight-gradient pass (model/expert_wgrad.py)
        "moe_wgrad_defer": [d.depth for d in deferrals(model)],
        # ... and what that keeps beyond an undeferred step (memory_check adds it)
        "moe_wgrad_kept_gib": round(
            sum(d.held_bytes(len(micro)) for d in deferrals(model)) / 2**30, 2
        ),
        "gradient_accumulation_fusion": bool(model[0].module.config.gradient_accumulation_fusion),
        "transformer_impl": getattr(model[0].module, "megafleet_transformer_impl", None),
        "assumptions": memory_assumptions(model[0].module),
        "lora": lora_summary(args),  # for benchmarks/memory_check.py
        "mean_loss": round(float(total[0] / total[1]), 4) if total[1] > 0 else None,
    }
    res = result(args, "runtime", cfg, step_time, dist.world_size, extra)
    # every rank's peak: report the largest
    peak = torch.tensor([res["peak_mem_gb"]], device=dist.device)
    torch.distributed.all_reduce(peak, op=torch.distributed.ReduceOp.MAX)
    res["peak_mem_gb"] = round(float(peak.item()), 2)
    # free the memory; rebinding (not `del`) since the step() closure shares these names
    model = optimizer = micro = None
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return res


def profile_steps(step_fn, path: str, rank: int) -> None:
    from torch.profiler import ProfilerActivity, profile

    sync()
    activities = [ProfilerActivity.CPU] + (
        [ProfilerActivity.CUDA] if torch.cuda.is_available() else []
    )
    with profile(activities=activities) as prof:
        for _ in range(2):
            step_fn()
        sync()
    if rank == 0:
        key = "cuda_time_total" if torch.cuda.is_available() else "cpu_time_total"
        table = prof.key_averages().table(sort_by=key, row_limit=45, max_name_column_width=70)
        cpu = prof.key_averages().table(
            sort_by="cpu_time_total", row_limit=25, max_name_column_width=70
        )
        Path(path).write_text(f"# sorted by CUDA time\n{table}\n\n# sorted by CPU time\n{cpu}\n")


def lora_tuner(args):
    from remote_runtime.spec.config import TunerConfig

    return TunerConfig(
        train_type="lora",
        lora_rank=args.lora_rank,
        lora_alpha=args.lora_alpha,
        lora_dropout=args.lora_dropout,
        target_modules=args.lora_targets.split(",") if args.lora_targets else ["all-linear"],
    )


def lora_summary(args) -> dict | None:
    if not args.lora:
        return None
    return {
        "r": args.lora_rank,
        "lora_alpha": args.lora_alpha,
        "lora_dropout": args.lora_dropout,
        "target_modules": args.lora_targets or "all-linear (q k v o gate up down)",
    }


# ---- Hugging Face ---------------------------------------------------------------------------


# MoE: the module names, not all-linear (which PEFT 0.21 maps onto the router too). On
# transformers 5's fused experts PEFT turns gate/up/down into target_parameters: a rank-2r adapter
# on each expert's gate_up_proj and rank r on down_proj, as many parameters and FLOPs as ours.
HF_LORA_MODULES = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def run_hf(args, cfg: dict) -> dict:
    import transformers
    from transformers import AutoModelForCausalLM

    config_cls = getattr(
        transformers,
        {
            "qwen3": "Qwen3Config",
            "llama": "LlamaConfig",
            "qwen2": "Qwen2Config",
            "qwen3_moe": "Qwen3MoeConfig",
            "qwen2_moe": "Qwen2MoeConfig",
        }[cfg["model_type"]],
    )
    config = config_cls(
        **{k: v for k, v in cfg.items() if k not in ("model_type", "architectures")}
    )
    moe = "num_experts" in cfg
    # MoE: transformers' grouped-GEMM experts (its default is a Python loop over experts)
    kwargs = {"experts_implementation": "grouped_mm"} if moe else {}
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = AutoModelForCausalLM.from_config(
            config, dtype=torch.bfloat16, attn_implementation="sdpa", **kwargs
        )
    model.train()
    if args.recompute == "full":
        model.gradient_checkpointing_enable()
    if args.lora:
        from peft import LoraConfig, get_peft_model

        if args.recompute == "full":
            model.enable_input_require_grads()
        model = get_peft_model(
            model,
            LoraConfig(
                r=args.lora_rank,
                lora_alpha=args.lora_alpha,
                lora_dropout=args.lora_dropout,
                target_modules=(
                    args.lora_targets.split(",")
                    if args.lora_targets
                    else HF_LORA_MODULES
                    if moe
                    else "all-linear"
                ),
                task_type="CAUSAL_LM",
            ),
        )
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=1e-5, fused=True)
    n_micro = args.global_batch // args.micro_batch
    g = torch.Generator(device="cuda").manual_seed(0)
    batches = [
        torch.randint(
            0, cfg["vocab_size"], (args.micro_batch, args.seq_len), device="cuda", generator=g
        )
        for _ in range(n_micro)
    ]

    def step():
        for ids in batches:
            loss = model(input_ids=ids, labels=ids).loss / n_micro
            loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    torch.cuda.reset_peak_memory_stats()
    step_time = timed(step, args.warmup, args.steps)
    res = result(
        args,
        "hf",
        cfg,
        step_time,
        1,
        {
            "tp": 1,
            "pp": 1,
            "dp": 1,
            "transformers": transformers.__version__,
            "attn_implementation": "sdpa",
            "optimizer": "torch AdamW fused, bf16 params and states",
            "lora": lora_summary(args),
            "peft": _version("peft") if args.lora else None,
            **kwargs,
        },
    )
    # free the memory; rebinding (not `del`) since the step() closure shares these names
    model = optimizer = batches = None
    gc.collect()
    torch.cuda.empty_cache()
    return res


def _version(name: str):
    import importlib.metadata as md

    try:
        return md.version(name)
    except md.PackageNotFoundError:
        return None


# ---- main -----------------------------------------------------------------------------------


def environment() -> dict:
    import importlib.metadata as md

    def version(name):
        try:
            return md.version(name)
        except md.PackageNotFoundError:
            return None

    return {
        "date": _dt.date.today().isoformat(),
        "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
        "gpus": torch.cuda.device_count(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "megatron_core": version("megatron-core"),
        "transformers": version("transformers"),
        "transformer_engine": version("transformer-engine") or version("transformer_engine"),
        "command": " ".join([os.path.basename(sys.executable)] + sys.argv),
        "world_size": int(os.environ.get("WORLD_SIZE", "1")),
    }


def print_table(runs: list[dict]) -> None:
    head = (
        f"{'impl':8} {'label':18} {'shape':11} {'layout':14} {'tok/s':>9} "
        f"{'TFLOP/s/GPU':>11} {'MFU':>6} {'peak GiB':>8}"
    )
    print(head)
    for r in runs:
        layout = f"TP{r['tp']} PP{r['pp']} DP{r['dp']}" + (
            " SP" if r.get("sequence_parallel") else ""
        )
        mfu = f"{100 * r['mfu']:.1f}%" if r.get("mfu") is not None else "-"
        print(
            f"{r['impl']:8} {r['label'][:18]:18} {r['shape']:11} {layout:14} "
            f"{r['tokens_per_s']:9.0f} {r['tflops_per_gpu']:11.1f} {mfu:>6} {r['peak_mem_gb']:8.1f}"
        )


def main(argv=None) -> int:
    args = parse_args(argv)
    os.environ.setdefault("CUDA_DEVICE_MAX_CONNECTIONS", "1")
    if args.device == "cuda":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    cfg = hf_config(args)
    impls = args.impl.split(",")
    runs = []
    rank = int(os.environ.get("RANK", "0"))
    if "runtime" in impls:
        runs.append(run_runtime(args, cfg))
    if "hf" in impls and rank == 0:
        runs.append(run_hf(args, cfg))
    if torch.distributed.is_initialized():
        torch.distributed.barrier()
    if rank != 0:
        return 0
    doc = {**environment(), "runs": runs}
    by = {r["impl"]: r for r in runs}
    if "runtime" in by and "hf" in by:
        doc["ratio_tokens_per_s_per_gpu"] = round(
            by["runtime"]["tokens_per_s_per_gpu"] / by["hf"]["tokens_per_s_per_gpu"], 3
        )
        doc["ratio_peak_mem"] = round(by["runtime"]["peak_mem_gb"] / by["hf"]["peak_mem_gb"], 3)
    print_table(runs)
    if "ratio_tokens_per_s_per_gpu" in doc:
        print(
            f"runtime / hf tokens per second per GPU: {doc['ratio_tokens_per_s_per_gpu']}x; "
            f"peak memory ratio {doc['ratio_peak_mem']}x"
        )
    if args.json:
        path = Path(args.json)
        existing = json.loads(path.read_text()) if path.exists() else []
        existing.append(doc)
        path.write_text(json.dumps(existing, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
