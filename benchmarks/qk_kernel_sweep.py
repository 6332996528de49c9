"""Launch settings of the fused q/k kernel and the RMSNorm backward, measured as kernel time.

    python benchmarks/qk_kernel_sweep.py --shape qwen3-1.7b --json out.json

Each setting of `remote_runtime/model/ops.py`'s launch constants (warps of the q/k forward
and backward, programs per SM of the q/k and RMSNorm backward) runs 20 forward+backward calls at
4096 tokens under torch.profiler, and the table gives the GPU time per call of each kernel (not
wall time: at these sizes the host is slower than the kernels).
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import torch  # noqa: E402


def kernel_us(fn, names: tuple[str, ...], iters: int = 20) -> dict[str, float]:
    from torch.profiler import ProfilerActivity, profile

    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(iters):
            fn()
        torch.cuda.synchronize()
    out = {}
    for event in prof.key_averages():
        for name in names:
            if event.key == name:
                out[name] = round(event.device_time_total / iters, 1)
    return out


def main(argv=None) -> int:
    from fused_ops import make_inputs  # the same inputs as the per-op benchmark

    from megafleet.model_shape import NAMED_CONFIGS
    from remote_runtime.model import ops as kernels

    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--shape", default="qwen3-1.7b", choices=sorted(NAMED_CONFIGS))
    p.add_argument("--tokens", type=int, default=4096)
    p.add_argument("--json")
    args = p.parse_args(argv)
    cfg = NAMED_CONFIGS[args.shape]
    dev = torch.device("cuda")
    qk_args, qkv = make_inputs("qk_norm_rope", cfg, args.tokens, dev)
    _, wq, wk, cu, freqs, heads, groups, d = qk_args
    for weight in (wq, wk):  # as under megatron's DDP: gradients added into main_grad
        weight.main_grad = torch.zeros(d, device=dev)
        weight.grad_added_to_main_grad = False
    grads = None

    def qk_step():
        nonlocal grads
        out = kernels.qk_norm_rope(qkv, wq, wk, 1e-6, freqs, heads, groups, d, cu_seqlens=cu)
        grads = grads or [torch.randn_like(t) for t in out]
        torch.autograd.backward(out, grads)

    (x, w, _), _ = make_inputs("rms_norm", cfg, args.tokens, dev)
    w.main_grad, w.grad_added_to_main_grad = torch.zeros(w.numel(), device=dev), False
    gx = torch.randn_like(x)
    hidden = x.shape[-1]

    def norm_step():
        kernels.rms_norm(x, w, 1e-6).backward(gx)

    rows = []
    defaults = (kernels.QK_FWD_WARPS, kernels.QK_BWD_WARPS, kernels.QK_BWD_PROGRAMS_PER_SM)
    for fw, bw, per_sm in itertools.product((2, 4, 8), (2, 4, 8), (4, 8, 16, 32)):
        kernels.QK_FWD_WARPS, kernels.QK_BWD_WARPS, kernels.QK_BWD_PROGRAMS_PER_SM = fw, bw, per_sm
        t = kernel_us(qk_step, ("qk_norm_rope_fwd", "qk_norm_rope_bwd"))
        rows.append(
            {"kernel": "qk", "fwd_warps": fw, "bwd_warps": bw, "programs_per_sm": per_sm, **t}
        )
        print(json.dumps(rows[-1]), flush=True)
    kernels.QK_FWD_WARPS, kernels.QK_BWD_WARPS, kernels.QK_BWD_PROGRAMS_PER_SM = defaults
    for per_sm in (1, 2, 4, 8, 16):
        kernels.NORM_BWD_PROGRAMS_PER_SM = per_sm
        t = kernel_us(norm_step, ("rms_norm_fwd", "rms_norm_bwd"))
        rows.append({"kernel": "rms_norm", "hidden": hidden, "programs_per_sm": per_sm, **t})
        print(json.dumps(rows[-1]), flush=True)
    if args.json:
        Path(args.json).write_text(
            json.dumps(
                {
                    "shape": args.shape,
                    "tokens": args.tokens,
                    "device": torch.cuda.get_device_name(),
                    "defaults": defaults,
                    "rows": rows,
                },
                indent=1,
            )
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
