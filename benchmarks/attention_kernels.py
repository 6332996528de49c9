"""Packed causal attention kernels of the runtime, forward + backward, on one GPU.

    python benchmarks/attention_kernels.py --heads 16 --groups 8 --head-dim 128 \
        --seq-len 4096 --docs 4 --json out.json

Times `SDPAttention._packed` on a THD pack of `--docs` documents of `--seq-len` tokens each (a
uniform pack) with each kernel the runtime can choose: flash varlen (the path for mixed-length
packs) and the dense causal SDPA kernels of the uniform-pack path (cuDNN with grouped K/V,
cuDNN with K/V repeated to all heads, flash, memory-efficient). Reports milliseconds and
TFLOP/s (causal attention halved: forward 2·2·n·L²·h·d / 2, backward 2.5× forward) and the
largest relative error of each kernel's output against flash varlen. A kernel this GPU/build
does not have for the shape is listed with the reason.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import torch  # noqa: E402

KERNELS = (
    "varlen",
    "cudnn",
    "cudnn-expand",
    "flash",
    "efficient",
)  # "varlen": the uniform path off


def module_for(kernel: str, heads: int, groups: int, head_dim: int):
    from remote_runtime.model.attention import SDPAttention

    return SDPAttention.bare(heads, groups, head_dim, uniform=kernel)


def main(argv=None) -> int:
    from megatron.core.packed_seq_params import PackedSeqParams

    from remote_runtime.model import attention as A

    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--heads", type=int, default=16)
    p.add_argument("--groups", type=int, default=8)
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--seq-len", type=int, default=4096)
    p.add_argument("--docs", type=int, default=1)
    p.add_argument("--iters", type=int, default=20)
    p.add_argument("--json")
    args = p.parse_args(argv)
    n, L, h, g, d = args.docs, args.seq_len, args.heads, args.groups, args.head_dim
    cu = torch.arange(0, (n + 1) * L, L, dtype=torch.int32, device="cuda")
    psp = PackedSeqParams(
        qkv_format="thd", cu_seqlens_q=cu, cu_seqlens_kv=cu, max_seqlen_q=L, max_seqlen_kv=L
    )
    torch.manual_seed(0)
    q, k, v = (
        torch.randn(n * L, heads, d, device="cuda", dtype=torch.bfloat16, requires_grad=True)
        for heads in (h, g, g)
    )
    grad = torch.randn(n * L, h * d, device="cuda", dtype=torch.bfloat16)
    fwd_flops = 2 * 2 * n * L * L * h * d / 2
    rows, reference = [], None
    for kernel in KERNELS:
        m = module_for(kernel, h, g, d)
        A.PACKED_PATH["uniform_errors"].clear()
        out = m._packed(q, k, v, psp, 0.0)
        used = A.PACKED_PATH["used"]
        expected = "varlen" if kernel == "varlen" else f"uniform SDPA ({kernel})"
        if used != expected:
            rows.append(
                {
                    "kernel": kernel,
                    "available": False,
                    "reason": json.dumps(A.PACKED_PATH["uniform_errors"])[:300],
                }
            )
            continue
        if reference is None:
            reference = out.detach().float()
        err = float((out.detach().float() - reference).norm() / reference.norm())

        def fwd():
            return m._packed(q, k, v, psp, 0.0)

        def fwd_bwd():
            torch.autograd.backward(fwd(), grad)

        timings = {}
        for name, fn in (("fwd", lambda: fwd()), ("fwd_bwd", fwd_bwd)):
            for _ in range(3):
                fn()
            torch.cuda.synchronize()
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(args.iters):
                fn()
            end.record()
            torch.cuda.synchronize()
            timings[name] = start.elapsed_time(end) / args.iters
        bwd = timings["fwd_bwd"] - timings["fwd"]
        rows.append(
            {
                "kernel": kernel,
                "available": True,
                "fwd_ms": round(timings["fwd"], 3),
                "bwd_ms": round(bwd, 3),
                "fwd_tflops": round(fwd_flops / timings["fwd"] / 1e9, 1),
                "bwd_tflops": round(2.5 * fwd_flops / bwd / 1e9, 1),
                "fwd_bwd_tflops": round(3.5 * fwd_flops / timings["fwd_bwd"] / 1e9, 1),
                "rel_err_vs_first": round(err, 5),
            }
        )
        q.grad = k.grad = v.grad = None
    doc = {
        "device": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "cudnn": torch.backends.cudnn.version(),
        "shape": vars(args),
        "kernels": rows,
    }
    for r in rows:
        if r["available"]:
            print(
                f"{r['kernel']:>13}: fwd {r['fwd_ms']:7.3f} ms {r['fwd_tflops']:6.1f} TF/s | "
                f"bwd {r['bwd_ms']:7.3f} ms {r['bwd_tflops']:6.1f} TF/s | "
                f"err {r['rel_err_vs_first']}"
            )
        else:
            print(f"{r['kernel']:>13}: not available: {r['reason']}")
    if args.json:
        existing = json.loads(Path(args.json).read_text()) if Path(args.json).exists() else []
        Path(args.json).write_text(json.dumps(existing + [doc], indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
