"""Expert weight-gradient accumulation into fp32 main_grad: time per micro-batch by deferral depth.

    python3 benchmarks/expert_wgrad.py [--json FILE]

Qwen3-30B-A3B's expert shapes (128 experts, hidden 2048, expert FFN 768: fc1 [128, 1536, 2048],
fc2 [128, 2048, 768]), 8 micro-batches of 4096 tokens routed top-8 at random (32,768 rows each).
For each depth d the 8 micro-batches are added in ceil(8 / d) launches of
`expert_wgrad.accumulate_segments` (d = 1 is the undeferred path); the baseline is
torch._grouped_mm's bf16 weight gradient added to main_grad by a separate `add_` (the path with
moe_wgrad_fusion=false). Reports ms per micro-batch (fc1 + fc2), TFLOP/s and the main_grad
traffic's share of HBM bandwidth. Needs a GPU.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

EXPERTS, HIDDEN, FFN, TOKENS, TOPK, MICRO = 128, 2048, 768, 4096, 8, 8


def micro_batches(n: int, k: int):
    """(dy [rows, n], x [rows, k], offsets) per micro-batch, rows grouped by a random routing."""
    out = []
    for _ in range(MICRO):
        experts = torch.randint(0, EXPERTS, (TOKENS * TOPK,), device="cuda")
        counts = torch.bincount(experts, minlength=EXPERTS)
        rows = int(counts.sum())
        dy = torch.randn(rows, n, device="cuda", dtype=torch.bfloat16)
        x = torch.randn(rows, k, device="cuda", dtype=torch.bfloat16)
        out.append((dy, x, torch.cumsum(counts, 0, dtype=torch.int32)))
    return out


def timed(fn, repeat: int = 5) -> float:
    fn()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(repeat):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - t0) / repeat


def sweep(data, grads, flops) -> list:
    """ms per micro-batch (fc1 + fc2) of tile configurations at depth 1 and 8."""
    import itertools

    from remote_runtime.model.expert_wgrad import accumulate_segments

    out = []
    for bm, bn, bk, warps, stages in itertools.product(
        (32, 64, 128), (64, 128, 256), (64, 128, 256), (4, 8), (2, 3, 4)
    ):
        smem = stages * (bm * bn + bm * bk) * 2
        if smem > 200 * 1024 or bn * bk > 128 * 256 or (bn * bk >= 128 * 256 and warps < 8):
            continue
        blocks = dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, num_warps=warps, num_stages=stages)
        row = dict(blocks)
        for depth in (1, 8):

            def run(depth=depth, blocks=blocks):
                for name, mbs in data.items():
                    for i in range(0, MICRO, depth):
                        accumulate_segments(grads[name], mbs[i : i + depth], blocks)

            try:
                per_mb = timed(run, repeat=3) / MICRO
                row[f"depth_{depth}_ms"] = round(per_mb * 1e3, 3)
                row[f"depth_{depth}_tflops"] = round(flops / per_mb / 1e12, 1)
            except Exception as exc:  # out of resources: skip the configuration
                row["error"] = str(exc)[:80]
                break
        out.append(row)
        print(json.dumps(row), flush=True)
    return out


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--json")
    p.add_argument("--sweep", action="store_true", help="time kernel tile configurations")
    args = p.parse_args(argv)
    from remote_runtime.model.expert_wgrad import accumulate_segments

    torch.manual_seed(0)
    shapes = {"fc1": (2 * FFN, HIDDEN), "fc2": (HIDDEN, FFN)}
    data = {name: micro_batches(n, k) for name, (n, k) in shapes.items()}
    grads = {name: torch.zeros(EXPERTS, n, k, device="cuda") for name, (n, k) in shapes.items()}
    params = sum(g.numel() for g in grads.values())
    flops = sum(2 * TOKENS * TOPK * n * k for n, k in shapes.values())  # per micro-batch
    props = torch.cuda.get_device_properties(0)
    results = {"device": props.name, "params": params, "rows_per_micro_batch": TOKENS * TOPK}

    def baseline():
        for name, mbs in data.items():
            for dy, x, offs in mbs:
                grads[name].add_(torch._grouped_mm(dy.t(), x, offs=offs))

    per_mb = timed(baseline) / MICRO
    results["grouped_mm_then_add"] = {"ms_per_micro_batch": round(per_mb * 1e3, 3)}
    for depth in (1, 2, 4, 8):

        def run(depth=depth):
            for name, mbs in data.items():
                for i in range(0, MICRO, depth):
                    accumulate_segments(grads[name], mbs[i : i + depth])

        per_mb = timed(run) / MICRO
        passes = -(-MICRO // depth)
        traffic = passes * params * 8 / MICRO  # main_grad read + write, fp32, per micro-batch
        results[f"depth_{depth}"] = {
            "ms_per_micro_batch": round(per_mb * 1e3, 3),
            "tflops": round(flops / per_mb / 1e12, 1),
            "main_grad_tb_per_s": round(traffic / per_mb / 1e12, 2),
        }
    # exactness: depth 8 equals depth 1 up to fp32 rounding order
    for name, mbs in data.items():
        a, b = torch.zeros_like(grads[name]), torch.zeros_like(grads[name])
        for seg in mbs:
            accumulate_segments(a, [seg])
        accumulate_segments(b, mbs)
        results[f"{name}_depth8_vs_depth1_max_rel"] = float((a - b).abs().max() / a.abs().max())
    if args.sweep:
        results["sweep"] = sweep(data, grads, flops)
    print(json.dumps(results, indent=1))
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
