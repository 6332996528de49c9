"""Triton kernels for RMSNorm, rotary embeddings and SwiGLU, with thin autograd wrappers.

Each is one kernel per direction, like the torch.compile'd versions in `compiled.py`, but called
through a plain `torch.autograd.Function` and a direct Triton launch. That matters on the host:
at a few thousand tokens per micro-batch the GPU finishes a layer's norms and activations in
tens of microseconds, and a compiled region's per-call cost (guards, AOTAutograd wrappers) was
over a third of the step's CPU time in the Qwen3-1.7B profile (`benchmarks/results/README.md`).

The maths is Hugging Face's, as in `compiled.py`: RMSNorm normalises in fp32, rounds to the input
dtype, then scales by the weight; RoPE is megatron's non-interleaved rotation with cos/sin
rounded to the input dtype; SwiGLU is silu(gate) * up on megatron's [gate | up] layout. Only
the intermediate roundings of the eager chains are skipped (one rounding at the store).

The kernels are built on first use, so `TRITON_INTERPRET=1` (Triton's CPU interpreter) can run
them on CPU tensors: that is how the CPU test suite checks them against eager PyTorch.
"""

from __future__ import annotations

import functools
import os

import torch


def available() -> bool:
    """Triton importable, and either a GPU or Triton's CPU interpreter to run on."""
    import importlib.util

    if importlib.util.find_spec("triton") is None:
        return False
    return torch.cuda.is_available() or interpreted()


def interpreted() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def _pow2(n: int) -> int:
    return 1 << max(0, (int(n) - 1).bit_length())


@functools.lru_cache(maxsize=None)
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def _split(work: int, device: torch.device, per_sm: int, fallback: int = 4) -> tuple[int, int]:
    """(programs, items per program) for a backward kernel that also sums a weight gradient over
    its rows: each program loops over its share of the `work` items, then adds its partial sum.
    Enough programs to fill the GPU, few enough that the atomic adds of the partial sums stay
    cheap (benchmarks/qk_kernel_sweep.py: on an H200 both kernels are fastest with 2-4 per SM)."""
    if device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        wanted = _sm_count(index) * per_sm
    else:
        wanted = fallback
    per_program = triton_cdiv(work, max(1, min(work, wanted)))
    return triton_cdiv(work, per_program), per_program


def _kernels():
    """The kernel module, imported on first use (Triton is only needed once a kernel runs)."""
    from remote_runtime.model import triton_kernels

    return triton_kernels


def _rows(x: torch.Tensor, n: int) -> torch.Tensor:
    """x as [rows, n] with unit stride along n (a view when the layout allows)."""
    x2 = x.reshape(-1, n)
    return x2 if x2.stride(-1) == 1 else x2.contiguous()


# --- RMSNorm -----------------------------------------------------------------------------------

NORM_BWD_PROGRAMS_PER_SM = 4  # see _split (2-4 best: 23-24 µs at 2,048 columns; 16: 45)


def _norm_launch(n: int) -> tuple[int, int, int]:
    block = _pow2(n)
    rows = max(1, min(64, 4096 // block))
    warps = 8 if rows * block >= 8192 else 4
    return block, rows, warps


class _RMSNorm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, eps):
        n = x.shape[-1]
        x2 = _rows(x, n)
        m = x2.shape[0]
        y = torch.empty((m, n), dtype=x.dtype, device=x.device)
        rstd = torch.empty(m, dtype=torch.float32, device=x.device)
        block, rows, warps = _norm_launch(n)
        _kernels().rms_norm_fwd[(triton_cdiv(m, rows),)](
            x2,
            weight,
            y,
            rstd,
            m,
            n,
            x2.stride(0),
            y.stride(0),
            eps,
            ROWS=rows,
            BLOCK_N=block,
            num_warps=warps,
        )
        ctx.save_for_backward(x2, weight, rstd)
        ctx.shape = x.shape
        return y.view(x.shape)

    @staticmethod
    def backward(ctx, dy):
        x2, weight, rstd = ctx.saved_tensors
        m, n = x2.shape
        dy2 = _rows(dy, n)
        dx = torch.empty((m, n), dtype=x2.dtype, device=x2.device)
        block, rows, warps = _norm_launch(n)
        programs, per_program = _split(triton_cdiv(m, rows), x2.device, NORM_BWD_PROGRAMS_PER_SM)
        target, accumulate = _weight_grad_target(weight, programs)
        _kernels().rms_norm_bwd[(programs,)](
            dy2,
            x2,
            weight,
            rstd,
            dx,
            target,
            m,
            n,
            dy2.stride(0),
            x2.stride(0),
            dx.stride(0),
            per_program,
            ROWS=rows,
            BLOCK_N=block,
            ACCUMULATE=accumulate,
            num_warps=warps,
        )
        return dx.view(ctx.shape), _weight_grad(weight, target, accumulate), None


def _weight_grad_target(weight: torch.Tensor, programs: int) -> tuple[torch.Tensor, bool]:
    """Where a kernel puts a norm weight's gradient: straight into megatron DDP's fp32
    `main_grad` (atomically, as the linear layers' fused weight-gradient GEMMs do), or per-program
    partial sums to reduce here (no DDP wrapper, or a non-fp32 buffer)."""
    main_grad = getattr(weight, "main_grad", None)
    if (
        main_grad is not None
        and main_grad.dtype == torch.float32
        and hasattr(weight, "grad_added_to_main_grad")
    ):
        return main_grad, True
    return torch.empty((programs, weight.numel()), dtype=torch.float32, device=weight.device), False


def _weight_grad(weight: torch.Tensor, target: torch.Tensor, accumulated: bool) -> torch.Tensor:
    """The gradient autograd hands on: a placeholder when the kernel already added it to
    main_grad (megatron's DDP hook then skips its own add; it still runs, which the overlapped
    gradient reduce relies on), else the reduced partial sums."""
    if accumulated:
        weight.grad_added_to_main_grad = True
        return torch.empty_like(weight)
    return target.sum(0).to(weight.dtype).view(weight.shape)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    return _RMSNorm.apply(x, weight, eps)


# --- rotary embeddings -------------------------------------------------------------------------


def _rope_launch(t3: torch.Tensor, freqs2: torch.Tensor, pos: torch.Tensor, backward: bool):
    tokens, heads, d = t3.shape
    rot = freqs2.shape[-1]
    if rot % 2 or rot > d:
        raise ValueError(f"rotary dimension {rot} must be even and at most the head size {d}")
    y = torch.empty((tokens, heads, d), dtype=t3.dtype, device=t3.device)
    half, rest = rot // 2, d - rot
    _kernels().rope[(tokens,)](
        t3,
        freqs2,
        pos,
        y,
        heads,
        t3.stride(0),
        t3.stride(1),
        y.stride(0),
        y.stride(1),
        freqs2.stride(0),
        HALF=half,
        REST=rest,
        BLOCK_H=_pow2(heads),
        BLOCK_HALF=_pow2(half),
        BLOCK_REST=_pow2(max(rest, 1)),
        BACKWARD=backward,
        num_warps=4,
    )
    return y


def _tokens(t: torch.Tensor) -> torch.Tensor:
    """[..., h, d] as [tokens, h, d] with a unit stride along d."""
    t3 = t.reshape(-1, t.shape[-2], t.shape[-1])
    return t3 if t3.stride(-1) == 1 else t3.contiguous()


class _Rope(torch.autograd.Function):
    @staticmethod
    def forward(ctx, t, freqs2, pos):
        ctx.save_for_backward(freqs2, pos)
        ctx.shape = t.shape
        return _rope_launch(_tokens(t), freqs2, pos, backward=False).view(t.shape)

    @staticmethod
    def backward(ctx, dy):
        freqs2, pos = ctx.saved_tensors
        return _rope_launch(_tokens(dy), freqs2, pos, backward=True).view(ctx.shape), None, None


def _angles_at(
    freqs: torch.Tensor, s: int, b: int, device, cu_seqlens: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """(angles [positions, rot_dim], each row's position) for s × b rows: positions restart at
    every cu_seqlens boundary of a packed batch (b = 1), else a row's position is its s index."""
    if cu_seqlens is not None:
        from remote_runtime.model.compiled import packed_positions

        pos = packed_positions(cu_seqlens, s * b)
    else:
        pos = _BshdPositions.of(s, b, device)
    return freqs.reshape(freqs.shape[0], freqs.shape[-1]), pos


class _BshdPositions:
    """Row -> position for a [s, b] layout flattened to s*b rows (cached per shape and device)."""

    cache: dict = {}

    @classmethod
    def of(cls, s: int, b: int, device) -> torch.Tensor:
        key = (s, b, str(device))
        if key not in cls.cache:
            cls.cache = {key: torch.arange(s * b, device=device) // b}
        return cls.cache[key]


def rope_bshd(t: torch.Tensor, freqs: torch.Tensor, interleaved: bool = False) -> torch.Tensor:
    """megatron's fused_apply_rotary_pos_emb: t [s, b, h, d], freqs [s, 1, 1, rot_dim]."""
    if interleaved:
        raise NotImplementedError("interleaved rotary embeddings need Transformer Engine")
    return _Rope.apply(t, *_angles_at(freqs, t.shape[0], t.shape[1], t.device, None))


def rope_thd(
    t: torch.Tensor,
    cu_seqlens: torch.Tensor,
    freqs: torch.Tensor,
    cp_size: int = 1,
    cp_rank: int = 0,
) -> torch.Tensor:
    """megatron's fused_apply_rotary_pos_emb_thd: t [T, h, d] packed documents, positions
    restarting at each cu_seqlens boundary; freqs [max_len, 1, 1, rot_dim]."""
    if cp_size != 1:
        raise NotImplementedError("context parallelism needs Transformer Engine")
    return _Rope.apply(t, *_angles_at(freqs, t.shape[0], 1, t.device, cu_seqlens))


# --- q/k RMSNorm + RoPE + split of the fused QKV output ---------------------------------------

# Launch settings, from benchmarks/qk_kernel_sweep.py on an H200 at Qwen3-1.7B sizes (kernel
# time per call): forward 23 µs with 2 warps (41 with 8, 56 with 4); backward 49 µs with 2 warps
# and 4 programs per SM (96-100 with 8 warps, 98-153 with 4)
QK_FWD_WARPS = 2
QK_BWD_WARPS = 2
QK_BWD_PROGRAMS_PER_SM = 4


def qk_norm_rope_supported(head_dim: int, heads: int, groups: int) -> bool:
    return head_dim >= 2 and head_dim & (head_dim - 1) == 0 and heads % groups == 0


class _QKNormRope(torch.autograd.Function):
    @staticmethod
    def forward(ctx, qkv, wq, wk, freqs2, pos, eps, heads, groups, head_dim):
        s, b = qkv.shape[0], qkv.shape[1]
        tokens = s * b
        rows = _rows(qkv, qkv.numel() // tokens)  # [tokens, groups * (heads/groups + 2) * d]
        q = torch.empty((s, b, heads, head_dim), dtype=qkv.dtype, device=qkv.device)
        k = torch.empty((s, b, groups, head_dim), dtype=qkv.dtype, device=qkv.device)
        v = torch.empty_like(k)
        _kernels().qk_norm_rope_fwd[(tokens,)](
            rows,
            freqs2,
            pos,
            wq,
            wk,
            q,
            k,
            v,
            rows.stride(0),
            freqs2.stride(0),
            eps,
            HQ=heads,
            HK=groups,
            QPG=heads // groups,
            D=head_dim,
            BLOCK_HQ=_pow2(heads),
            BLOCK_HK=_pow2(groups),
            num_warps=QK_FWD_WARPS,
        )
        ctx.save_for_backward(rows, wq, wk, freqs2, pos)
        ctx.meta = (qkv.shape, eps, heads, groups, head_dim)
        return q, k, v

    @staticmethod
    def backward(ctx, dq, dk, dv):
        rows, wq, wk, freqs2, pos = ctx.saved_tensors
        shape, eps, heads, groups, head_dim = ctx.meta
        tokens = rows.shape[0]
        dq, dk, dv = dq.contiguous(), dk.contiguous(), dv.contiguous()
        dqkv = torch.empty_like(rows)
        programs, per_program = _split(tokens, rows.device, QK_BWD_PROGRAMS_PER_SM)
        tq, acc_q = _weight_grad_target(wq, programs)
        tk, acc_k = _weight_grad_target(wk, programs)
        if acc_q != acc_k:  # one kernel flag for both: fall back to partial sums for both
            tq = torch.empty((programs, head_dim), dtype=torch.float32, device=rows.device)
            tk, acc_q, acc_k = torch.empty_like(tq), False, False
        _kernels().qk_norm_rope_bwd[(programs,)](
            dq,
            dk,
            dv,
            rows,
            freqs2,
            pos,
            wq,
            wk,
            dqkv,
            tq,
            tk,
            tokens,
            rows.stride(0),
            dqkv.stride(0),
            freqs2.stride(0),
            eps,
            per_program,
            HQ=heads,
            HK=groups,
            QPG=heads // groups,
            D=head_dim,
            BLOCK_HQ=_pow2(heads),
            BLOCK_HK=_pow2(groups),
            ACCUMULATE=acc_q,
            num_warps=QK_BWD_WARPS,
        )
        return (
            dqkv.view(shape),
            _weight_grad(wq, tq, acc_q),
            _weight_grad(wk, tk, acc_k),
            None,
            None,
            None,
            None,
            None,
            None,
        )


def qk_norm_rope(
    qkv: torch.Tensor,
    wq: torch.Tensor,
    wk: torch.Tensor,
    eps: float,
    freqs: torch.Tensor,
    heads: int,
    groups: int,
    head_dim: int,
    cu_seqlens: torch.Tensor | None = None,
):
    """(q [s, b, heads, d], k and v [s, b, groups, d]) from megatron's fused QKV projection
    output `qkv` [s, b, groups, (heads/groups + 2) * d]: q and k RMS-normalised per head (weights
    wq, wk) and rotated by `freqs` [max_len, 1, 1, d] at each token's position (restarting at
    every `cu_seqlens` boundary for a packed [T, 1, ...] batch), v copied out. One kernel each way.
    """
    if freqs.shape[-1] != head_dim:
        raise ValueError(
            f"rotary dimension {freqs.shape[-1]} != head size {head_dim}: partial "
            "rotary needs the unfused path"
        )
    freqs2, pos = _angles_at(freqs, qkv.shape[0], qkv.shape[1], qkv.device, cu_seqlens)
    return _QKNormRope.apply(qkv, wq, wk, freqs2, pos, eps, heads, groups, head_dim)


# --- SwiGLU ------------------------------------------------------------------------------------

SWIGLU_BLOCK = 1024


class _SwiGLU(torch.autograd.Function):
    @staticmethod
    def forward(ctx, y):
        f = y.shape[-1] // 2
        y2 = _rows(y, 2 * f)
        m = y2.shape[0]
        out = torch.empty((m, f), dtype=y.dtype, device=y.device)
        _kernels().swiglu_fwd[(m, triton_cdiv(f, SWIGLU_BLOCK))](
            y2, out, f, y2.stride(0), out.stride(0), BLOCK=SWIGLU_BLOCK, num_warps=4
        )
        ctx.save_for_backward(y2)
        ctx.shape = y.shape
        return out.view(*y.shape[:-1], f)

    @staticmethod
    def backward(ctx, g):
        (y2,) = ctx.saved_tensors
        m, f = y2.shape[0], y2.shape[1] // 2
        g2 = _rows(g, f)
        dy = torch.empty_like(y2)
        _kernels().swiglu_bwd[(m, triton_cdiv(f, SWIGLU_BLOCK))](
            g2, y2, dy, f, g2.stride(0), y2.stride(0), dy.stride(0), BLOCK=SWIGLU_BLOCK, num_warps=4
        )
        return dy.view(ctx.shape)


class _WeightedSwiGLU(torch.autograd.Function):
    """SwiGLU times a per-row weight (a MoE expert's router weight) in one pass: the product's
    input is not kept for backward, which recomputes it from the fc1 output it keeps anyway."""

    @staticmethod
    def forward(ctx, y, weights):
        f = y.shape[-1] // 2
        y2 = _rows(y, 2 * f)
        m = y2.shape[0]
        p = weights.reshape(-1).contiguous()
        if p.numel() != m:
            raise ValueError(f"SwiGLU weights: {p.numel()} for {m} rows")
        out = torch.empty((m, f), dtype=y.dtype, device=y.device)
        if m:
            _kernels().swiglu_weighted_fwd[(m, triton_cdiv(f, SWIGLU_BLOCK))](
                y2, p, out, f, y2.stride(0), out.stride(0), BLOCK=SWIGLU_BLOCK, num_warps=4
            )
        ctx.save_for_backward(y2, p)
        ctx.shapes = (y.shape, weights.shape)
        return out.view(*y.shape[:-1], f)

    @staticmethod
    def backward(ctx, g):
        y2, p = ctx.saved_tensors
        m, f = y2.shape[0], y2.shape[1] // 2
        g2 = _rows(g, f)
        dy = torch.empty_like(y2)
        dp = torch.empty(m, dtype=torch.float32, device=y2.device)
        if m:
            _kernels().swiglu_weighted_bwd[(m,)](
                g2, y2, p, dy, dp, f, g2.stride(0), y2.stride(0), dy.stride(0),
                BLOCK=min(SWIGLU_BLOCK, _pow2(f)), num_warps=4,
            )  # fmt: skip
        y_shape, w_shape = ctx.shapes
        return dy.view(y_shape), dp.to(p.dtype).view(w_shape)


def swiglu(y: torch.Tensor, weights: torch.Tensor | None = None) -> torch.Tensor:
    """silu(y[..., :F]) * y[..., F:] for y [..., 2F] (megatron's fc1 output layout); with
    `weights` (one per row of y, e.g. router weights), each row times its weight, rounded like
    `swiglu(y) * weights.unsqueeze(-1).to(y.dtype)`."""
    if y.shape[-1] % 2:
        raise ValueError(f"SwiGLU input's last dimension ({y.shape[-1]}) must be even")
    if weights is None:
        return _SwiGLU.apply(y)
    return _WeightedSwiGLU.apply(y, weights)


class SwiGLU(torch.nn.Module):
    """The MLP activation module megatron builds from `MLPSubmodules.activation_func` (with
    `use_te_activation_func`), applied to the whole [gate | up] fc1 output."""

    def __init__(self, config=None, **_unused):
        super().__init__()
        if config is not None and (
            getattr(config, "activation_func_clamp_value", None) is not None
            or getattr(config, "glu_linear_offset", 0.0)
        ):
            raise ValueError("the Triton SwiGLU has no clamp or linear offset")

    def forward(self, y: torch.Tensor) -> torch.Tensor:
        return swiglu(y)


# --- MoE un-permutation ------------------------------------------------------------------------

GATHER_SUM_BLOCK = 1024


def gather_sum_rows(y: torch.Tensor, index: torch.Tensor, k: int) -> torch.Tensor:
    """out[t] = y[index[t*k]] + ... + y[index[t*k + k-1]] for y [R, H]: a token's k expert
    rows summed without materialising the gathered [N*k, H] copy (`y.index_select(0, index)
    .view(-1, k, H).sum(1)` in one pass). Not differentiable itself (the MoE dispatch's autograd
    functions call it in both directions)."""
    y2 = _rows(y, y.shape[-1])
    if index.numel() % k:
        raise ValueError(f"gather_sum_rows: {index.numel()} indices are not a multiple of k={k}")
    n, h = index.numel() // k, y2.shape[1]
    out = torch.empty((n, h), dtype=y.dtype, device=y.device)
    if n:
        _kernels().gather_sum_rows[(n, triton_cdiv(h, GATHER_SUM_BLOCK))](
            y2, index.contiguous(), out, h, y2.stride(0), out.stride(0),
            K=k, BLOCK=GATHER_SUM_BLOCK, num_warps=4,
        )  # fmt: skip
    return out


# --- cross entropy -----------------------------------------------------------------------------

CE_BLOCK = 4096


class _CrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, labels, valid):
        v = logits.shape[-1]
        rows = _rows(logits, v)
        flat_labels = labels.reshape(-1).contiguous()
        n = rows.shape[0]
        loss = torch.empty(n, dtype=torch.float32, device=logits.device)
        lse = torch.empty_like(loss)
        _kernels().cross_entropy_fwd[(n,)](
            rows, flat_labels, loss, lse, valid, rows.stride(0), BLOCK=CE_BLOCK, num_warps=8
        )
        ctx.save_for_backward(rows, flat_labels, lse)
        ctx.meta = (logits.shape, valid)
        return loss.view(logits.shape[:-1])

    @staticmethod
    def backward(ctx, dloss):
        rows, labels, lse = ctx.saved_tensors
        shape, valid = ctx.meta
        # the logits are not needed after this: their gradient overwrites them (saves a
        # vocabulary-sized buffer, the largest activation of a small model)
        _kernels().cross_entropy_bwd[(rows.shape[0],)](
            rows,
            labels,
            lse,
            dloss.reshape(-1).contiguous(),
            rows.shape[1],
            valid,
            rows.stride(0),
            BLOCK=CE_BLOCK,
            num_warps=8,
        )
        return rows.view(shape), None, None


def cross_entropy(
    logits: torch.Tensor, labels: torch.Tensor, valid: int | None = None
) -> torch.Tensor:
    """Per-token cross entropy (fp32) of logits [..., V] against labels [...], counting only the
    first `valid` vocabulary columns (the rest are padding). One pass over the logits forward;
    backward writes the gradient over the logits in place, so they must not be used afterwards
    (the training loss is their only reader)."""
    return _CrossEntropy.apply(logits, labels, logits.shape[-1] if valid is None else valid)


def triton_cdiv(a: int, b: int) -> int:
    return -(-a // b)
