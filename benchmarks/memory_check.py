"""Compare the planner's memory estimates with peaks measured on a GPU.

    python benchmarks/memory_check.py benchmarks/results/throughput-*.json [--tolerance 0.2]

Reads the JSON of `benchmarks/train_throughput.py` (one run object, a list of runs, an object with a
"runs" list, or a list of such objects; any other JSON file is skipped) and, for every megatron run
in it, prints the estimate beside the measured peak and the relative error. Exit 0 when every
checked run is within the tolerance (and at least --min-runs were checked), 1 otherwise.

What a run must say (either spelling is accepted; groups may also be nested as "parallel",
"recompute", "train"):
  model shape   "model_config" (config.json dict) | "shape"/"model" (a name such as qwen3-1.7b,
                see megafleet.model_shape.NAMED_CONFIGS, or a config.json dict)
  layout        tensor_model_parallel_size|tp, pipeline_model_parallel_size|pp,
                data_parallel_size|dp (default: world_size / (tp·pp)), sequence_parallel,
                use_distributed_optimizer
  batch         seq_len|max_length, micro_batch_size, num_microbatches|global_batch_size
  recompute     recompute_granularity, recompute_method, recompute_num_layers
  measured      peak_mem_gb; peak_mem_unit "GiB" (default, 2**30 bytes) or "GB" (1e9);
                peak_mem_kind "allocated" (default: torch.cuda.max_memory_allocated),
                "reserved" (max_memory_reserved) or "device" (nvidia-smi)
  optional      "assumptions": {field: value} overriding megafleet.memory.Assumptions (say
                what the runtime did, e.g. {"optimizer_impl": "foreach"});
                "framework"/"impl": runs named hf/transformers are skipped;
                "moe_wgrad_kept_gib": what the runtime chose to keep from unused memory to
                defer MoE expert weight gradients (remote_runtime/model/expert_wgrad.py),
                added to the estimate
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from megafleet.memory import (  # noqa: E402
    GIB,
    Assumptions,
    Lora,
    Parallel,
    Recompute,
    estimate_memory,
)
from megafleet.model_shape import NAMED_CONFIGS, shape_from_hf_config  # noqa: E402

SKIPPED_FRAMEWORKS = ("hf", "transformers", "huggingface")


def runs_in(data) -> list[dict]:
    """The run objects of a results file ([] when it is not a throughput result)."""
    if isinstance(data, dict) and isinstance(data.get("runs"), list):
        data = data["runs"]
    items = data if isinstance(data, list) else [data]
    runs = []
    for item in items:
        if isinstance(item, dict) and isinstance(item.get("runs"), list):  # a list of sessions
            runs.extend(runs_in(item))
            continue
        if not isinstance(item, dict) or "peak_mem_gb" not in item:
            continue
        if not any(item.get(k) for k in ("seq_len", "max_length", "seq_length")):
            continue  # not a throughput run (e.g. an SFT evidence summary)
        framework = str(item.get("framework") or item.get("impl") or "").lower()
        if framework not in SKIPPED_FRAMEWORKS:
            runs.append(item)
    return runs


def _field(run: dict, *names, default=None):
    scopes = [run] + [run.get(group) for group in ("parallel", "recompute", "train")]
    for scope in scopes:
        for name in names:
            if isinstance(scope, dict) and scope.get(name) is not None:
                return scope[name]
    return default


def model_config_of(run: dict) -> dict:
    config = run.get("model_config") or run.get("hf_config")
    if isinstance(config, dict):
        return config
    named = run.get("shape") or run.get("model")
    if isinstance(named, dict):
        return named
    if isinstance(named, str) and named.lower() in NAMED_CONFIGS:
        return NAMED_CONFIGS[named.lower()]
    raise ValueError(f"run names no model shape I know ({named!r}); add model_config")


def estimate_run(run: dict):
    tp = int(_field(run, "tensor_model_parallel_size", "tp", default=1))
    pp = int(_field(run, "pipeline_model_parallel_size", "pp", default=1))
    world = int(_field(run, "world_size", default=tp * pp))
    dp = int(_field(run, "data_parallel_size", "dp", default=max(1, world // (tp * pp))))
    par = Parallel(
        tp=tp,
        pp=pp,
        dp=dp,
        sequence_parallel=bool(_field(run, "sequence_parallel", default=tp > 1)),
        distributed_optimizer=bool(_field(run, "use_distributed_optimizer", default=True)),
    )
    mbs = int(_field(run, "micro_batch_size", default=1))
    m = _field(run, "num_microbatches")
    if m is None and _field(run, "global_batch_size"):
        m = int(_field(run, "global_batch_size")) // (mbs * dp)
    granularity = _field(run, "recompute_granularity", default="none") or "none"
    rc = Recompute(
        granularity, _field(run, "recompute_method"), _field(run, "recompute_num_layers")
    )
    asm = dataclasses.replace(Assumptions(), **(run.get("assumptions") or {}))
    if _field(run, "adam_moments") == "bf16":  # train_throughput.py --moments bf16
        asm = dataclasses.replace(asm, exp_avg_bytes=2, exp_avg_sq_bytes=2)
    seq = int(_field(run, "seq_len", "max_length", "seq_length"))
    shape = shape_from_hf_config(model_config_of(run))
    lora = _lora(run.get("lora"))
    est = estimate_memory(shape, par, seq, mbs, rc, num_microbatches=m, assumptions=asm, lora=lora)
    return est, par, rc, seq, mbs


def _lora(summary: dict | None) -> Lora | None:
    """train_throughput --lora: r, and the --lora-targets list when it was not all-linear."""
    if not summary:
        return None
    targets = summary.get("target_modules") or ""
    if targets.startswith("all-linear"):
        return Lora(rank=int(summary["r"]))
    return Lora(rank=int(summary["r"]), targets=tuple(targets.split(",")))


def measured_gib(run: dict) -> float:
    value = float(run["peak_mem_gb"])
    return value * 1e9 / GIB if str(run.get("peak_mem_unit", "GiB")).lower() == "gb" else value


def compared_estimate(run: dict, est) -> float:
    kind = run.get("peak_mem_kind", "allocated")
    kept = float(run.get("moe_wgrad_kept_gib") or 0.0)
    if kind == "reserved":
        return est.allocated_gib + est.overhead["fragmentation"] + kept
    if kind == "device":
        return est.total_gib + kept
    return est.allocated_gib + kept


def check_file(path: Path, tolerance: float) -> list[dict]:
    rows = []
    for i, run in enumerate(runs_in(json.loads(path.read_text()))):
        est, par, rc, seq, mbs = estimate_run(run)
        measured = measured_gib(run)
        estimate = compared_estimate(run, est)
        error = (estimate - measured) / measured
        layout = f"TP{par.tp} PP{par.pp} DP{par.dp}" + (" SP" if par.sequence_parallel else "")
        recompute = rc.granularity + (f" {rc.method} {rc.num_layers}" if rc.method else "")
        rows.append(
            {
                "file": path.name,
                "run": run.get("name") or run.get("shape") or i,
                "layout": layout,
                "seq_len": seq,
                "micro_batch_size": mbs,
                "recompute": recompute,
                "estimate_gib": round(estimate, 2),
                "measured_gib": round(measured, 2),
                "error": round(error, 4),
                "ok": abs(error) <= tolerance,
                "components": est.components,
            }
        )
    return rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("files", nargs="+", type=Path)
    ap.add_argument("--tolerance", type=float, default=0.2, help="largest |relative error| allowed")
    ap.add_argument("--min-runs", type=int, default=1, help="fail when fewer runs were checked")
    ap.add_argument("--json", action="store_true", help="print the comparison as JSON")
    args = ap.parse_args(argv)
    rows = [row for f in args.files for row in check_file(f, args.tolerance)]
    ok = bool(rows) and len(rows) >= args.min_runs and all(r["ok"] for r in rows)
    if args.json:
        print(json.dumps({"ok": ok, "tolerance": args.tolerance, "runs": rows}, indent=2))
        return 0 if ok else 1
    print(
        f"{'run':28} {'layout':16} {'seq':>6} {'mbs':>4} {'recompute':16} {'est GiB':>8} "
        f"{'meas GiB':>9} {'error':>7}"
    )
    for r in rows:
        print(
            f"{str(r['run'])[:28]:28} {r['layout']:16} {r['seq_len']:>6} "
            f"{r['micro_batch_size']:>4} {r['recompute'][:16]:16} {r['estimate_gib']:>8.2f} "
            f"{r['measured_gib']:>9.2f} "
            f"{100 * r['error']:>+6.1f}%{'' if r['ok'] else '  <-- outside tolerance'}"
        )
    print(
        f"{len(rows)} run(s) checked, tolerance ±{100 * args.tolerance:.0f}%: "
        f"{'all within' if ok else 'NOT all within (or too few runs)'}"
    )
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
