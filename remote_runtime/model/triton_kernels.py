"""The Triton kernels behind `kernels.py` (imported on first use; see there).

They live at module level because Triton's CPU interpreter (TRITON_INTERPRET=1, read when this
module is imported) swaps `triton.language` in the kernels' module globals.
"""

import triton
import triton.language as tl


@triton.jit
def rms_norm_fwd(X, W, Y, RSTD, M, N, stride_x, stride_y, eps,
                 ROWS: tl.constexpr, BLOCK_N: tl.constexpr):
    rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    cols = tl.arange(0, BLOCK_N)
    rmask, cmask = rows < M, cols < N
    mask = rmask[:, None] & cmask[None, :]
    r64 = rows.to(tl.int64)
    x = tl.load(X + r64[:, None] * stride_x + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    rstd = 1.0 / tl.sqrt(tl.sum(x * x, axis=1) / N + eps)
    # Hugging Face: round the normalised input to the model dtype, then scale by the weight
    xhat = (x * rstd[:, None]).to(Y.dtype.element_ty).to(tl.float32)
    w = tl.load(W + cols, mask=cmask, other=0.0).to(tl.float32)
    tl.store(Y + r64[:, None] * stride_y + cols[None, :], (xhat * w[None, :]).to(Y.dtype.element_ty),
             mask=mask)
    tl.store(RSTD + rows, rstd, mask=rmask)


@triton.jit
def rms_norm_bwd(DY, X, W, RSTD, DX, DW, M, N, stride_dy, stride_x, stride_dx, blocks_per_program,
                 ROWS: tl.constexpr, BLOCK_N: tl.constexpr):
    pid = tl.program_id(0)
    cols = tl.arange(0, BLOCK_N)
    cmask = cols < N
    w = tl.load(W + cols, mask=cmask, other=0.0).to(tl.float32)
    dw = tl.zeros([BLOCK_N], dtype=tl.float32)
    for i in range(0, blocks_per_program):
        rows = (pid * blocks_per_program + i) * ROWS + tl.arange(0, ROWS)
        rmask = rows < M
        mask = rmask[:, None] & cmask[None, :]
        r64 = rows.to(tl.int64)
        x = tl.load(X + r64[:, None] * stride_x + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        dy = tl.load(DY + r64[:, None] * stride_dy + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        rstd = tl.load(RSTD + rows, mask=rmask, other=0.0)
        xhat = x * rstd[:, None]
        # the weight multiplied the rounded xhat; its gradient sees the same rounding
        dw += tl.sum(dy * xhat.to(DX.dtype.element_ty).to(tl.float32), axis=0)
        g = dy * w[None, :]
        dx = rstd[:, None] * (g - xhat * (tl.sum(g * xhat, axis=1) / N)[:, None])
        tl.store(DX + r64[:, None] * stride_dx + cols[None, :], dx.to(DX.dtype.element_ty), mask=mask)
    tl.store(DW + pid * N + cols, dw, mask=cmask)


@triton.jit
def rope(X, F, POS, Y, H, stride_xt, stride_xh, stride_yt, stride_yh, stride_f,
         HALF: tl.constexpr, REST: tl.constexpr, BLOCK_H: tl.constexpr,
         BLOCK_HALF: tl.constexpr, BLOCK_REST: tl.constexpr, BACKWARD: tl.constexpr):
    """One token (all heads) per program; y = rotate(x, angle) or, backward, rotate(x, -angle)."""
    t = tl.program_id(0).to(tl.int64)
    pos = tl.load(POS + t).to(tl.int64)
    c = tl.arange(0, BLOCK_HALF)
    cm = c < HALF
    f1 = tl.load(F + pos * stride_f + c, mask=cm, other=0.0).to(tl.float32)
    f2 = tl.load(F + pos * stride_f + HALF + c, mask=cm, other=0.0).to(tl.float32)
    # cos/sin rounded to the model dtype, as Hugging Face and megatron's unfused RoPE do
    cos1 = tl.cos(f1).to(Y.dtype.element_ty).to(tl.float32)
    sin1 = tl.sin(f1).to(Y.dtype.element_ty).to(tl.float32)
    cos2 = tl.cos(f2).to(Y.dtype.element_ty).to(tl.float32)
    sin2 = tl.sin(f2).to(Y.dtype.element_ty).to(tl.float32)
    h = tl.arange(0, BLOCK_H)
    mask = (h < H)[:, None] & cm[None, :]
    xrow = X + t * stride_xt + h[:, None] * stride_xh
    yrow = Y + t * stride_yt + h[:, None] * stride_yh
    x1 = tl.load(xrow + c[None, :], mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(xrow + HALF + c[None, :], mask=mask, other=0.0).to(tl.float32)
    if BACKWARD:  # the transpose of the forward rotation
        y1 = x1 * cos1[None, :] + x2 * sin2[None, :]
        y2 = x2 * cos2[None, :] - x1 * sin1[None, :]
    else:
        y1 = x1 * cos1[None, :] - x2 * sin1[None, :]
        y2 = x2 * cos2[None, :] + x1 * sin2[None, :]
    tl.store(yrow + c[None, :], y1.to(Y.dtype.element_ty), mask=mask)
    tl.store(yrow + HALF + c[None, :], y2.to(Y.dtype.element_ty), mask=mask)
    if REST > 0:  # partial rotary: the remaining channels pass through
        r = tl.arange(0, BLOCK_REST)
        rmask = (h < H)[:, None] & (r < REST)[None, :]
        rest = tl.load(xrow + 2 * HALF + r[None, :], mask=rmask, other=0.0)
        tl.store(yrow + 2 * HALF + r[None, :], rest, mask=rmask)


@triton.jit
def swiglu_fwd(Y, O, F, stride_y, stride_o, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    c = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    m = c < F
    a = tl.load(Y + row * stride_y + c, mask=m, other=0.0).to(tl.float32)
    b = tl.load(Y + row * stride_y + F + c, mask=m, other=0.0).to(tl.float32)
    tl.store(O + row * stride_o + c, (a * tl.sigmoid(a) * b).to(O.dtype.element_ty), mask=m)


@triton.jit
def swiglu_bwd(G, Y, DY, F, stride_g, stride_y, stride_dy, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    c = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    m = c < F
    g = tl.load(G + row * stride_g + c, mask=m, other=0.0).to(tl.float32)
    a = tl.load(Y + row * stride_y + c, mask=m, other=0.0).to(tl.float32)
    b = tl.load(Y + row * stride_y + F + c, mask=m, other=0.0).to(tl.float32)
    s = tl.sigmoid(a)
    tl.store(DY + row * stride_dy + c, (g * b * s * (1.0 + a * (1.0 - s))).to(DY.dtype.element_ty),
             mask=m)
    tl.store(DY + row * stride_dy + F + c, (g * a * s).to(DY.dtype.element_ty), mask=m)
