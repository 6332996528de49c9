"""End-to-end SFT evidence on GPUs: the real runtime (`torchrun -m remote_runtime sft`) on a
random model of a named shape and a generated chat dataset, at several layouts, with the loss
curves compared.

    python benchmarks/sft_evidence.py --shape qwen3-0.6b --steps 200 \
        --layouts tp1:1,tp2:2,dp2:2 --out /tmp/sft-evidence --json result.json

Each layout is `name:nproc[:flags]`, flags separated by `+` (e.g.
`tp2:2:--tensor_model_parallel_size+2`); the names tp1/tp2/pp2/dp2 expand to the usual flags.
Records per layout: the loss curve (every `--log-every` steps), tokens/s, TFLOP/s per GPU, MFU and
peak memory from logging.jsonl, the wall time, and the largest relative loss difference to the first
layout.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

PRESETS = {
    "tp1": [],
    "dp2": [],
    "tp2": ["--tensor_model_parallel_size", "2", "--sequence_parallel", "true"],
    "pp2": ["--pipeline_model_parallel_size", "2"],
}


def build_assets(out: Path, shape: str, rows: int) -> tuple[Path, Path]:
    import torch
    import transformers

    from megafleet.model_shape import NAMED_CONFIGS
    from remote_runtime.data.demo_data import demo_corpus, write_demo_dataset
    from remote_runtime.tiny import build_tokenizer

    model_dir = out / f"model-{shape}"
    if shape == "tiny" and not (model_dir / "config.json").exists():  # CPU smoke runs
        from remote_runtime.tiny import build_model

        build_model(
            "qwen3",
            model_dir,
            tokenizer_dir=build_tokenizer(out / "tok", corpus=demo_corpus()) and out / "tok",
        )
    if not (model_dir / "config.json").exists():
        tok = build_tokenizer(out / "tok", corpus=demo_corpus())
        cfg = dict(NAMED_CONFIGS[shape])
        cls = getattr(
            transformers, {"qwen3": "Qwen3Config", "llama": "LlamaConfig"}[cfg["model_type"]]
        )
        config = cls(
            **{k: v for k, v in cfg.items() if k not in ("model_type", "architectures")},
            eos_token_id=tok.convert_tokens_to_ids("<|im_end|>"),
            pad_token_id=tok.convert_tokens_to_ids("<|endoftext|>"),
        )
        torch.manual_seed(0)
        model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
        model.save_pretrained(str(model_dir), max_shard_size="2GB")
        tok.save_pretrained(str(model_dir))
    data = out / "data.jsonl"
    if not data.exists():
        write_demo_dataset(data, num_rows=rows, seed=0)
    return model_dir, data


def run_layout(
    name: str, nproc: int, flags: list[str], model: Path, data: Path, args, out: Path
) -> dict:
    run_dir = out / name
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc_per_node={nproc}",
        "-m",
        "remote_runtime",
        "sft",
        "--model",
        str(model),
        "--dataset",
        str(data),
        "--output_dir",
        str(run_dir),
        "--max_length",
        str(args.max_length),
        "--packing",
        "true",
        "--micro_batch_size",
        str(args.micro_batch),
        "--global_batch_size",
        str(args.global_batch),
        "--train_iters",
        str(args.steps),
        "--lr",
        "1e-4",
        "--min_lr",
        "1e-5",
        "--lr_warmup_fraction",
        "0.05",
        "--logging_steps",
        str(args.log_every),
        "--save_steps",
        str(args.steps),
        "--dataset_num_proc",
        "8",
        "--seed",
        "42",
        "--no_save_optim",
        "true",
        *flags,
        *args.extra.split(),
    ]
    env = dict(
        os.environ,
        PYTHONUNBUFFERED="1",
        PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])),
    )
    t0 = time.time()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=REPO)
    wall = time.time() - t0
    (out / f"{name}.log").write_text(proc.stdout + "\n" + proc.stderr)
    log_path = run_dir / "logging.jsonl"
    records = (
        [json.loads(line) for line in log_path.read_text().splitlines()]
        if log_path.exists()
        else []
    )
    timed = [r for r in records if r["step"] > args.log_every]  # skip the compile/warm-up window
    summary = {
        "layout": name,
        "nproc": nproc,
        "flags": flags,
        "exit_code": proc.returncode,
        "wall_s": round(wall, 1),
        "losses": {r["step"]: r["loss"] for r in records},
        "command": " ".join(cmd[1:]),
    }
    if timed:
        summary.update(
            tokens_per_s=round(sum(r["tokens_per_s"] for r in timed) / len(timed), 1),
            tflops_per_gpu=round(sum(r["tflops_per_gpu"] for r in timed) / len(timed), 1),
            mfu=round(sum(r["mfu"] or 0 for r in timed) / len(timed), 4),
            peak_mem_gb=max(r["peak_mem_gb"] for r in records),
        )
    if proc.returncode:
        summary["error_tail"] = (proc.stdout + proc.stderr)[-3000:]
    return summary


def main(argv=None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--shape", default="qwen3-0.6b")
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--global-batch", type=int, default=8)
    p.add_argument("--micro-batch", type=int, default=1, help="packs per micro-batch")
    p.add_argument("--max-length", type=int, default=2048)
    p.add_argument("--rows", type=int, default=40000)
    p.add_argument("--log-every", type=int, default=10)
    p.add_argument("--layouts", default="tp1:1,tp2:2,dp2:2")
    p.add_argument("--out", default="/tmp/sft-evidence")
    p.add_argument("--json")
    p.add_argument("--extra", default="", help="flags added to every run (e.g. '--device cpu')")
    args = p.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    model, data = build_assets(out, args.shape, args.rows)
    results = []
    import torch

    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    doc = {
        "date": _dt.date.today().isoformat(),
        "device": device,
        "torch": torch.__version__,
        "shape": args.shape,
        "steps": args.steps,
        "global_batch": args.global_batch,
        "micro_batch": args.micro_batch,
        "max_length": args.max_length,
        "rows": args.rows,
        "runs": results,
    }
    for spec in args.layouts.split(","):
        name, nproc, *rest = spec.split(":")
        flags = rest[0].split("+") if rest else PRESETS.get(name, [])
        results.append(run_layout(name, int(nproc), flags, model, data, args, out))
        r = results[-1]
        print(
            f"{name}: exit {r['exit_code']} wall {r['wall_s']} s tok/s {r.get('tokens_per_s')} "
            f"MFU {r.get('mfu')} peak {r.get('peak_mem_gb')} GB "
            f"loss {min(r['losses'].items(), default=(0, None))} -> "
            f"{max(r['losses'].items(), default=(0, None))}",
            flush=True,
        )
        if args.json:  # after every layout, so a time limit loses only the run in progress
            Path(args.json).write_text(json.dumps(doc, indent=2))
    ref = results[0]["losses"]
    for r in results[1:]:
        common = [s for s in ref if s in r["losses"] and ref[s] and r["losses"][s]]
        r["max_rel_loss_diff_vs_" + results[0]["layout"]] = round(
            max((abs(r["losses"][s] - ref[s]) / abs(ref[s]) for s in common), default=float("nan")),
            5,
        )
    doc["setup_s"] = round(time.time() - t0 - sum(r["wall_s"] for r in results), 1)
    print(
        json.dumps(
            {
                r["layout"]: {
                    k: v for k, v in r.items() if k not in ("losses", "command", "error_tail")
                }
                for r in results
            },
            indent=1,
        )
    )
    if args.json:
        Path(args.json).write_text(json.dumps(doc, indent=2))
    return 0 if all(r["exit_code"] == 0 for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
