"""DPO throughput: megafleet's runtime vs TRL's DPOTrainer, same shape, same pairs, same GPU.

    python benchmarks/dpo_throughput.py --shape qwen3-1.7b --micro-batch 2,4,8 --json out.json
    python benchmarks/dpo_throughput.py --micro-batch 2,4,8 --lora --json out.json

Pairs of random tokens: a prompt of 300-700 tokens and two answers of 300-600 tokens each, so a
sequence (prompt + one answer) is about 1,000 tokens and a pair about 2,000. Both sides train a
randomly initialised model of the named shape in bf16 with `--global-batch` pairs per optimizer
step in micro-batches of `--micro-batch` pairs, with precomputed reference log-probs
(`--micro-batch 2,4,8` sweeps the size: each size is a group of runs with its own ratios, and
`best` compares the fastest run of each implementation):

- runtime-dpo: the runtime's DPO step (train/dpo.py): both answers of each pair packed in THD
  micro-batches (no padding), per-document log-prob sums; megatron's mixed precision (fp32
  master weights, gradients and Adam states). The reference pass (train/reference.py's
  forward-only pass over every pair) is timed once and reported as `reference_pass_s`.
- runtime-sft: the same micro-batches trained with the SFT loss: the memory and speed DPO is
  measured against ("DPO costs what SFT costs").
- trl: TRL's DPOTrainer loss path (`_compute_loss`, fused LM head, its collator's right padding
  of [chosen..., rejected...] to the longest sequence of the micro-batch, SDPA attention), pure
  bf16 model and fused AdamW, precomputed reference log-probs as TRL's precompute option feeds
  them. If TRL cannot be imported, `trl` is skipped and the error recorded.

`--lora` trains LoRA adapters on every linear layer instead (r=16, alpha 32 by default) on all
three: the runtime's reference pass then runs the policy with its adapters disabled (the base
model, as `--train_type lora` DPO does), TRL gets a PEFT model (`peft_config`).

Tokens/s counts real tokens (every prompt + answer), the same number on both sides. Each
(implementation, micro-batch size) runs in its own process (a second model in the same process
would inherit the first one's allocations and peak memory), so `peak_mem_gib` of runtime-sft and
runtime-dpo are separate measurements of the same model and micro-batches
(`dpo_over_sft_peak_mem`; DPO should need no more than SFT: its reference is one cached number
per sequence). `static_mem_gib` is what is allocated once the model and optimizer are built,
before any step; `reference_pass_peak_gib` the peak of the runtime's reference pass.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

import numpy as np  # noqa: E402
import torch  # noqa: E402
import train_throughput as tt  # noqa: E402


def parse_args(argv=None):
    from megafleet.model_shape import NAMED_CONFIGS

    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--shape", default="qwen3-1.7b", choices=sorted(NAMED_CONFIGS))
    p.add_argument("--num-layers", type=int, help="cut the model to this many layers")
    p.add_argument("--hidden", type=int, help="CPU smoke runs: a narrower model")
    p.add_argument("--global-batch", type=int, default=16, help="pairs per optimizer step")
    p.add_argument(
        "--micro-batch",
        default="2",
        help="pairs per micro-batch; a comma list (2,4,8) sweeps them, each in its own processes",
    )
    p.add_argument(
        "--pad-multiple",
        type=int,
        default=1,
        help="runtime: pad each packed micro-batch to a multiple of this many tokens (GEMM "
        "alignment experiment; the runtime's data path pads to TP under SP only)",
    )
    p.add_argument("--lora", action="store_true", help="LoRA on every linear layer (all sides)")
    p.add_argument("--lora-rank", type=int, default=16)
    p.add_argument("--lora-alpha", type=int, default=32)
    p.add_argument("--lora-dropout", type=float, default=0.0)
    p.set_defaults(lora_targets=None)  # train_throughput's LoRA helpers: every linear layer
    p.add_argument("--prompt", default="300,700", help="prompt length range (tokens)")
    p.add_argument("--answer", default="300,600", help="answer length range (tokens)")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--impl", default="runtime-dpo,runtime-sft,trl")
    p.add_argument("--json")
    p.add_argument("--profile", help="write a torch.profiler summary of 2 runtime steps here")
    p.add_argument("--label", default="")
    p.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    return p.parse_args(argv)


def model_config(args) -> dict:
    cfg = tt.hf_config(args)
    if args.hidden:
        heads = max(2, args.hidden // 64)
        cfg.update(
            hidden_size=args.hidden,
            intermediate_size=args.hidden * 3,
            head_dim=64,
            num_attention_heads=heads,
            num_key_value_heads=heads // 2,
            vocab_size=min(cfg["vocab_size"], 4096),
        )
    return cfg


def make_pairs(args, vocab: int) -> list[dict]:
    """Per pair: prompt, chosen and rejected token ids (answer tokens are the trained ones)."""
    rng = np.random.default_rng(0)
    lo_p, hi_p = map(int, args.prompt.split(","))
    lo_a, hi_a = map(int, args.answer.split(","))
    pairs = []
    for _ in range(args.global_batch):
        prompt = rng.integers(0, vocab, rng.integers(lo_p, hi_p + 1))
        pairs.append(
            {
                "prompt": prompt,
                **{
                    k: rng.integers(0, vocab, rng.integers(lo_a, hi_a + 1))
                    for k in ("chosen", "rejected")
                },
            }
        )
    return pairs


def pair_tokens(pairs) -> int:
    return int(sum(2 * len(p["prompt"]) + len(p["chosen"]) + len(p["rejected"]) for p in pairs))


def result(args, impl, cfg, step_time, tokens, extra) -> dict:
    allocated, reserved = tt.memory_stats()
    return {
        "impl": impl,
        "label": args.label,
        "shape": args.shape,
        "model_config": cfg,
        "pairs_per_step": args.global_batch,
        "pairs_per_micro_batch": args.micro_batch,
        "lora": tt.lora_summary(args),
        "pad_multiple": args.pad_multiple,
        "tokens_per_step": tokens,
        "step_time_s": round(step_time, 4),
        "tokens_per_s": round(tokens / step_time, 1),
        "pairs_per_s": round(args.global_batch / step_time, 2),
        "peak_mem_gib": round(allocated, 2),
        "peak_reserved_gib": round(reserved, 2),
        **extra,
    }


def allocated_gib() -> float:
    """GiB allocated on the GPU now (0 on CPU)."""
    return round(torch.cuda.memory_allocated() / 2**30, 2) if torch.cuda.is_available() else 0.0


# ---- the runtime ---------------------------------------------------------------------------


def runtime_micro_batches(args, pairs, device):
    from remote_runtime.data.batches import collate_thd

    micro = []
    for start in range(0, len(pairs), args.micro_batch):
        docs = []
        for p in pairs[start : start + args.micro_batch]:
            for answer in (p["chosen"], p["rejected"]):
                ids = np.concatenate([p["prompt"], answer]).astype(np.int32)
                mask = np.zeros(len(ids), np.uint8)
                mask[len(p["prompt"]) :] = 1
                docs.append((ids, mask))
        mb = collate_thd(
            docs, num_samples=len(docs) // 2, pad_token_id=0, pad_to_multiple_of=args.pad_multiple
        )
        mb.doc_ids = torch.arange(start * 2, start * 2 + len(docs))
        micro.append(mb)
    return micro


def run_runtime(args, cfg, pairs, objective_name: str) -> dict:
    from megatron.core.pipeline_parallel import get_forward_backward_func

    from remote_runtime.model.builder import ModelOptions, build_model
    from remote_runtime.model.lora import adapters_disabled, attach_lora
    from remote_runtime.platform import init_distributed
    from remote_runtime.spec.config import JobConfig
    from remote_runtime.spec.families import family_for_hf_config
    from remote_runtime.spec.tuner import resolve_lora
    from remote_runtime.train.dpo import DpoSettings
    from remote_runtime.train.objective import PreferenceObjective, TokenObjective
    from remote_runtime.train.optim import build_optimizer, schedule_for, wrap_ddp
    from remote_runtime.train.reference import _compute
    from remote_runtime.train.step import train_step

    dist = init_distributed(args.device, 1, 1, seed=1234)
    job = JobConfig()
    job.train.micro_batch_size, job.train.global_batch_size = 1, args.global_batch
    job.optim.lr = 1e-6
    if args.device == "cpu":
        job.model.torch_dtype = "float32"
    family = family_for_hf_config(cfg)
    chunks = build_model(family, cfg, ModelOptions.from_job(job, init_weights=True), dist)
    if args.lora:
        job.tuner = tt.lora_tuner(args)
        job.optim.lr = 1e-4
        attach_lora(chunks, resolve_lora(job.tuner, family, cfg), cfg, dist)
    model = wrap_ddp(chunks, job)
    optimizer, scheduler = build_optimizer(model, job, schedule_for(job, 10**6))
    fb = get_forward_backward_func()
    micro = runtime_micro_batches(args, pairs, dist.device)
    extra = {"static_mem_gib": allocated_gib()}
    if objective_name == "dpo":
        tt.sync()
        tt.reset_memory_stats()
        t0 = time.perf_counter()
        with adapters_disabled(model):  # LoRA: the reference is the base (no-op otherwise)
            ref = _compute(model, micro, 2 * len(pairs), dist, fb)
        tt.sync()
        extra["reference_pass_s"] = round(time.perf_counter() - t0, 3)
        extra["reference_pass_peak_gib"] = round(tt.memory_stats()[0], 2)

        class _Pairs:  # what nll_scale reads: answer tokens per document
            loss_counts = np.array(
                [m for p in pairs for m in (len(p["chosen"]), len(p["rejected"]))]
            )

        objective = PreferenceObjective(DpoSettings(), {"train": _Pairs}, {"train": ref})
        micro = [objective.prepare(mb) for mb in micro]
    else:
        objective = TokenObjective()
    micro = [mb.to(dist.device) for mb in micro]
    loss_for = objective.loss_for(np.arange(2 * len(pairs)))
    losses = []

    def step():
        loss_pair, _, _ = train_step(model, optimizer, scheduler, micro, fb, loss_for)
        losses.append(loss_pair)

    tt.reset_memory_stats()
    step_time = tt.timed(step, args.warmup, args.steps)
    if args.profile:
        tt.profile_steps(step, args.profile, dist.rank)
    total = torch.stack(losses).sum(0)
    extra["mean_loss"] = round(float(total[0] / total[1]), 4)
    extra["optimizer"] = "megatron distributed Adam, fp32 master weights/grads/states" + (
        " (adapters only; frozen bf16 base)" if args.lora else ""
    )
    res = result(args, f"runtime-{objective_name}", cfg, step_time, pair_tokens(pairs), extra)
    return res


# ---- TRL ------------------------------------------------------------------------------------


def run_trl(args, cfg, pairs, tmp: Path) -> dict:
    import transformers
    import trl
    from datasets import Dataset
    from transformers import AutoModelForCausalLM

    from remote_runtime.tiny import build_tokenizer

    device = args.device
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    config_cls = getattr(
        transformers,
        {"qwen3": "Qwen3Config", "llama": "LlamaConfig", "qwen2": "Qwen2Config"}[cfg["model_type"]],
    )
    config = config_cls(
        **{k: v for k, v in cfg.items() if k not in ("model_type", "architectures")}
    )
    torch.manual_seed(0)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype, attn_implementation="sdpa")
    peft_config = None
    if args.lora:
        from peft import LoraConfig

        peft_config = LoraConfig(
            r=args.lora_rank,
            lora_alpha=args.lora_alpha,
            lora_dropout=args.lora_dropout,
            target_modules="all-linear",
            task_type="CAUSAL_LM",
        )
    tok = build_tokenizer(tmp / "tok")
    dummy = Dataset.from_list([{"prompt": "Hi", "chosen": "Hello.", "rejected": "No."}])
    dpo_args = trl.DPOConfig(
        output_dir=str(tmp / "trl"),
        report_to=[],
        bf16=device == "cuda",
        use_cpu=device == "cpu",
        per_device_train_batch_size=args.micro_batch,
        precompute_ref_log_probs=True,
        max_length=None,
    )
    trainer = trl.DPOTrainer(
        model=model,
        ref_model=None,
        args=dpo_args,
        train_dataset=dummy,
        processing_class=tok,
        peft_config=peft_config,
    )
    model = trainer.model  # the PEFT model with --lora
    trainer.precompute_ref_logps = True  # reference log-probs come with the batch
    rng = np.random.default_rng(1)
    examples = [
        {
            "prompt_ids": p["prompt"].tolist(),
            "chosen_ids": p["chosen"].tolist(),
            "rejected_ids": p["rejected"].tolist(),
            "ref_chosen_logps": float(-rng.random() * 100),
            "ref_rejected_logps": float(-rng.random() * 100),
        }
        for p in pairs
    ]
    batches = [
        {
            k: v.to(device)
            for k, v in trainer.data_collator(examples[i : i + args.micro_batch]).items()
        }
        for i in range(0, len(examples), args.micro_batch)
    ]
    padded = sum(int(b["input_ids"].numel()) for b in batches)
    trainable = [p for p in model.parameters() if p.requires_grad]
    lr = 1e-4 if args.lora else 1e-6
    optimizer = torch.optim.AdamW(trainable, lr=lr, fused=device == "cuda")
    static = allocated_gib()
    model.train()

    def step():
        for batch in batches:
            loss = trainer._compute_loss(model, batch, False) / len(batches)
            loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    tt.reset_memory_stats()
    step_time = tt.timed(step, args.warmup, args.steps)
    res = result(
        args,
        "trl",
        cfg,
        step_time,
        pair_tokens(pairs),
        {
            "trl": trl.__version__,
            "transformers": transformers.__version__,
            "attn_implementation": "sdpa",
            "padded_tokens_per_step": padded,
            "optimizer": "torch AdamW fused, bf16 params and states",
            "reference": "precomputed (batch ref_chosen_logps/ref_rejected_logps)",
            "static_mem_gib": static,
            "peft": tt._version("peft") if args.lora else None,
        },
    )
    return res


def run_here(args, cfg, pairs, impls: list[str]) -> tuple[list, dict]:
    import tempfile
    import traceback

    runs, errors = [], {}
    for impl in impls:
        try:
            if impl.startswith("runtime-"):
                runs.append(run_runtime(args, cfg, pairs, impl.split("-", 1)[1]))
            elif impl == "trl":
                with tempfile.TemporaryDirectory() as tmp:
                    runs.append(run_trl(args, cfg, pairs, Path(tmp)))
        except Exception as exc:  # record and go on: one side failing must not lose the other
            traceback.print_exc()
            errors[impl] = f"{type(exc).__name__}: {exc}"
            print(f"{impl} failed: {errors[impl]}", flush=True)
    return runs, errors


def run_each_in_its_own_process(argv, impls: list[str], sizes: list[int]) -> tuple[list, dict]:
    """Every (micro-batch size, implementation) in a fresh process of this script."""
    import subprocess
    import tempfile

    argv = list(sys.argv[1:] if argv is None else argv)
    base = strip_options(argv, ("--impl", "--json", "--micro-batch"))
    runs, errors = [], {}
    for size in sizes:
        for impl in impls:
            name = f"{impl}@mb{size}"
            with tempfile.TemporaryDirectory() as tmp:
                out = Path(tmp) / "run.json"
                cmd = [sys.executable, __file__, *base, "--micro-batch", str(size)]
                proc = subprocess.run(cmd + ["--impl", impl, "--json", str(out)])
                if proc.returncode or not out.exists():
                    errors[name] = f"exit {proc.returncode}"
                    continue
                doc = json.loads(out.read_text())[0]
                runs += doc["runs"]
                errors.update({f"{k}@mb{size}": v for k, v in doc["errors"].items()})
    return runs, errors


def strip_options(argv: list[str], names: tuple[str, ...]) -> list[str]:
    """argv without these options and their values."""
    out, skip = [], False
    for item in argv:
        if skip:
            skip = False
        elif item in names:
            skip = True
        elif not item.startswith(tuple(f"{n}=" for n in names)):
            out.append(item)
    return out


def comparisons(runs: list[dict]) -> dict:
    """Per micro-batch size and for the fastest run of each implementation: runtime-dpo over
    TRL (tokens/s) and runtime-dpo over runtime-sft (peak memory)."""

    def ratios(by: dict) -> dict:
        out = {}
        if "runtime-dpo" in by and "trl" in by:
            out["ratio_tokens_per_s"] = round(
                by["runtime-dpo"]["tokens_per_s"] / by["trl"]["tokens_per_s"], 3
            )
        if "runtime-dpo" in by and "runtime-sft" in by and by["runtime-sft"]["peak_mem_gib"]:
            out["dpo_over_sft_peak_mem"] = round(
                by["runtime-dpo"]["peak_mem_gib"] / by["runtime-sft"]["peak_mem_gib"], 3
            )
        return out

    per_size: dict = {}
    for r in runs:
        per_size.setdefault(r["pairs_per_micro_batch"], {})[r["impl"]] = r
    best: dict = {}
    for r in runs:
        if r["impl"] not in best or r["tokens_per_s"] > best[r["impl"]]["tokens_per_s"]:
            best[r["impl"]] = r
    out = {f"mb{size}": ratios(by) for size, by in sorted(per_size.items())}
    out["best"] = {
        **ratios(best),
        "micro_batch": {impl: r["pairs_per_micro_batch"] for impl, r in best.items()},
    }
    return out


def main(argv=None) -> int:
    args = parse_args(argv)
    os.environ.setdefault("CUDA_DEVICE_MAX_CONNECTIONS", "1")
    cfg = model_config(args)
    pairs = make_pairs(args, cfg["vocab_size"])
    impls = args.impl.split(",")
    sizes = [int(x) for x in str(args.micro_batch).split(",")]
    if len(impls) * len(sizes) > 1:
        runs, errors = run_each_in_its_own_process(argv, impls, sizes)
    else:
        args.micro_batch = sizes[0]
        runs, errors = run_here(args, cfg, pairs, impls)
    doc = {**tt.environment(), "runs": runs, "errors": errors}
    doc["comparisons"] = comparisons(runs)
    for r in runs:
        print(
            f"{r['impl']:12} mb {r['pairs_per_micro_batch']:2} {r['tokens_per_s']:10.0f} tok/s "
            f"{r['pairs_per_s']:7.2f} pairs/s peak {r['peak_mem_gib']:6.2f} GiB "
            f"(static {r.get('static_mem_gib', 0):6.2f})"
        )
    print(json.dumps(doc["comparisons"]))
    if args.json:
        path = Path(args.json)
        existing = json.loads(path.read_text()) if path.exists() else []
        path.write_text(json.dumps(existing + [doc], indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
