"""RMSNorm, RoPE and SwiGLU implementations side by side: GPU time and host (launch) time per call.

    python benchmarks/fused_ops.py --shape qwen3-1.7b --tokens 4096 --json out.json

For each op at the named model's sizes (hidden-size RMSNorm, per-head q/k RMSNorm, packed-sequence
RoPE on the query heads, SwiGLU on the fc1 output) and each implementation:
- `eager`: the PyTorch chain (Hugging Face's maths),
- `compile`: torch.compile'd (`remote_runtime/model/compiled.py`; SwiGLU: megatron's compiled one),
- `triton`: ours (`remote_runtime/model/ops.py`),
- `aten` (RMSNorm only): `torch.nn.functional.rms_norm`,
- `qk_norm_rope`: a layer's q/k work (split the fused QKV output, RMSNorm q and k per head, rotate
  both) as separate compiled or Triton ops, and as our one fused kernel (`triton-fused`),
- `cross_entropy` over the vocabulary (megatron's fused one as `compile`; the Triton one times an
  extra copy of the logits, which it overwrites with their gradient),
it reports the GPU time of forward and of forward+backward per call (CUDA events over many calls
at full size) and the host time of forward+backward per call (a tiny input, so the GPU waits on
the CPU: what the Python side costs per layer, the micro-batch-1 bottleneck).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402


def eager_rms_norm(x, w, eps):
    x32 = x.float()
    return w * (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)


def implementations():
    from megatron.core.fusions.fused_bias_swiglu import bias_swiglu_impl

    from remote_runtime.model import compiled, ops

    def eager_rope(t, cu, freqs):
        pos = compiled.packed_positions(cu, t.shape[0])
        return compiled._rope(t, freqs.reshape(freqs.shape[0], freqs.shape[-1])[pos].unsqueeze(1))

    def eager_swiglu(y):
        a, b = torch.chunk(y, 2, -1)
        return F.silu(a) * b

    def qk_block(norm, rope):
        """What megatron does without our fused attention: split, two norms, two rotations."""

        def run(qkv, wq, wk, cu, freqs, heads, groups, d):
            q, k, v = torch.split(qkv, [heads // groups * d, d, d], dim=3)
            q = q.reshape(q.shape[0] * q.shape[1], heads, d)
            k = k.reshape(k.shape[0] * k.shape[1], groups, d)
            q, k = rope(norm(q, wq, 1e-6), cu, freqs), rope(norm(k, wk, 1e-6), cu, freqs)
            return torch.cat([q.flatten(), k.flatten(), v.flatten()])  # one output to time

        return run

    def megatron_ce(logits, labels):
        from megatron.core import parallel_state
        from megatron.core.fusions.fused_cross_entropy import fused_vocab_parallel_cross_entropy

        return fused_vocab_parallel_cross_entropy(
            logits, labels, parallel_state.get_tensor_model_parallel_group()
        )

    def eager_ce(logits, labels):  # Hugging Face's: upcast, then torch's cross entropy
        return F.cross_entropy(
            logits.float().view(-1, logits.shape[-1]), labels.view(-1), reduction="none"
        )

    def triton_ce(logits, labels):
        return ops.cross_entropy(logits * 1, labels)  # a copy: the kernel overwrites its input

    def qk_fused(qkv, wq, wk, cu, freqs, heads, groups, d):
        out = ops.qk_norm_rope(qkv, wq, wk, 1e-6, freqs, heads, groups, d, cu_seqlens=cu)
        return torch.cat([t.flatten() for t in out])

    return {
        "rms_norm": {
            "eager": eager_rms_norm,
            "compile": compiled.rms_norm,
            "triton": ops.rms_norm,
            "aten": lambda x, w, eps: F.rms_norm(x, (x.shape[-1],), w, eps),
        },
        "rope": {"eager": eager_rope, "compile": compiled.rope_thd, "triton": ops.rope_thd},
        "swiglu": {
            "eager": eager_swiglu,
            "compile": lambda y: bias_swiglu_impl(y, None),
            "triton": ops.swiglu,
        },
        "qk_norm_rope": {
            "compile": qk_block(compiled.rms_norm, compiled.rope_thd),
            "triton": qk_block(ops.rms_norm, ops.rope_thd),
            "triton-fused": qk_fused,
        },
        "cross_entropy": {"eager": eager_ce, "compile": megatron_ce, "triton": triton_ce},
    }


def one_document(tokens: int, head_dim: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """(cu_seqlens, rotary angles [tokens, 1, 1, head_dim]) of one packed document
    (Qwen3's base)."""
    cu = torch.tensor([0, tokens], dtype=torch.int32, device=device)
    inv = 1.0 / (1e6 ** (torch.arange(0, head_dim, 2, device=device).float() / head_dim))
    f = torch.outer(torch.arange(tokens, device=device).float(), inv)
    return cu, torch.cat([f, f], -1)[:, None, None, :]


def make_inputs(op: str, cfg: dict, tokens: int, device, width: str = "hidden"):
    """(arguments of the op's implementations, the input to take gradients of)."""
    dt = torch.bfloat16
    hidden, heads = cfg["hidden_size"], cfg["num_attention_heads"]
    head_dim = cfg.get("head_dim") or hidden // heads
    if op == "rms_norm":
        shape = (tokens, 1, hidden) if width == "hidden" else (tokens, heads, head_dim)
        n = shape[-1]
        x = torch.randn(shape, device=device, dtype=dt, requires_grad=True)
        w = torch.rand(n, device=device, dtype=dt).add_(0.5).requires_grad_(True)
        return (x, w, 1e-6), x
    if op == "rope":
        x = torch.randn(tokens, heads, head_dim, device=device, dtype=dt, requires_grad=True)
        return (x, *one_document(tokens, head_dim, device)), x
    if op == "cross_entropy":
        logits = torch.randn(
            tokens, 1, cfg["vocab_size"], device=device, dtype=dt, requires_grad=True
        )
        labels = torch.randint(0, cfg["vocab_size"], (tokens, 1), device=device)
        return (logits, labels), logits
    if op == "qk_norm_rope":
        groups = cfg["num_key_value_heads"]
        qkv = torch.randn(
            tokens,
            1,
            groups,
            (heads // groups + 2) * head_dim,
            device=device,
            dtype=dt,
            requires_grad=True,
        )
        wq, wk = (
            torch.rand(head_dim, device=device, dtype=dt).add_(0.5).requires_grad_(True)
            for _ in range(2)
        )
        cu, freqs = one_document(tokens, head_dim, device)
        return (qkv, wq, wk, cu, freqs, heads, groups, head_dim), qkv
    y = torch.randn(
        tokens, 1, 2 * cfg["intermediate_size"], device=device, dtype=dt, requires_grad=True
    )
    return (y,), y


def gpu_times(fn, args, x, iters: int) -> tuple[float, float]:
    """(forward, forward+backward) GPU milliseconds per call."""
    out = fn(*args)
    g = torch.randn_like(out)
    for _ in range(3):
        fn(*args).backward(g)
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    with torch.no_grad():
        for _ in range(iters):
            fn(*args)
    end.record()
    torch.cuda.synchronize()
    fwd = start.elapsed_time(end) / iters
    start.record()
    for _ in range(iters):
        fn(*args).backward(g)
    end.record()
    torch.cuda.synchronize()
    return fwd, start.elapsed_time(end) / iters


def host_time(fn, args, iters: int) -> float:
    """Microseconds of CPU per forward+backward call when the GPU is never the bottleneck."""
    out = fn(*args)
    g = torch.ones_like(out)
    for _ in range(5):
        fn(*args).backward(g)
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(iters):
        fn(*args).backward(g)
    t1 = time.perf_counter()
    torch.cuda.synchronize()
    return (t1 - t0) / iters * 1e6


def main(argv=None) -> int:
    from megafleet.model_shape import NAMED_CONFIGS

    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--shape", default="qwen3-1.7b", choices=sorted(NAMED_CONFIGS))
    p.add_argument("--tokens", type=int, default=4096)
    p.add_argument("--iters", type=int, default=200)
    p.add_argument("--json")
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        print("fused_ops.py needs a GPU", file=sys.stderr)
        return 2
    cfg = NAMED_CONFIGS[args.shape]
    dev = torch.device("cuda")
    from remote_runtime import platform

    platform.init_distributed("cuda", 1, 1)  # megatron's cross entropy takes its TP group
    rows = []
    cases = [
        ("rms_norm", "hidden"),
        ("rms_norm", "head"),
        ("rope", ""),
        ("swiglu", ""),
        ("qk_norm_rope", ""),
        ("cross_entropy", ""),
    ]
    for op, width in cases:
        for impl, fn in implementations()[op].items():
            full, x = make_inputs(op, cfg, args.tokens, dev, width or "hidden")
            tiny, _ = make_inputs(op, cfg, 8, dev, width or "hidden")
            try:
                fwd, fwd_bwd = gpu_times(fn, full, x, args.iters)
                host = host_time(fn, tiny, args.iters)
                row = {
                    "op": op + (f"[{width}]" if width else ""),
                    "impl": impl,
                    "gpu_fwd_us": round(fwd * 1e3, 1),
                    "gpu_fwd_bwd_us": round(fwd_bwd * 1e3, 1),
                    "host_fwd_bwd_us": round(host, 1),
                }
            except Exception as exc:  # one implementation failing must not hide the others
                row = {"op": op, "impl": impl, "error": f"{type(exc).__name__}: {exc}"[:300]}
            rows.append(row)
            print(json.dumps(row), flush=True)
    print(f"\n{'op':<18}{'impl':<9}{'GPU fwd µs':>12}{'GPU fwd+bwd µs':>16}{'host fwd+bwd µs':>17}")
    for r in rows:
        if "error" in r:
            print(f"{r['op']:<18}{r['impl']:<9}  {r['error'][:60]}")
        else:
            print(
                f"{r['op']:<18}{r['impl']:<9}{r['gpu_fwd_us']:>12}{r['gpu_fwd_bwd_us']:>16}"
                f"{r['host_fwd_bwd_us']:>17}"
            )
    if args.json:
        meta = {
            "shape": args.shape,
            "tokens": args.tokens,
            "device": torch.cuda.get_device_name(),
            "torch": torch.__version__,
            "command": " ".join(sys.argv),
        }
        Path(args.json).write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
