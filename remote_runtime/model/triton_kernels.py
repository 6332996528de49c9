"""The Triton kernels behind `ops.py` (imported on first use; see there).

They live at module level because Triton's CPU interpreter (TRITON_INTERPRET=1, read when this
module is imported) swaps `triton.language` in the kernels' module globals.
"""

import triton
import triton.language as tl


@triton.jit
def rms_norm_fwd(
    X, W, Y, RSTD, M, N, stride_x, stride_y, eps, ROWS: tl.constexpr, BLOCK_N: tl.constexpr
):
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
    tl.store(
        Y + r64[:, None] * stride_y + cols[None, :],
        (xhat * w[None, :]).to(Y.dtype.element_ty),
        mask=mask,
    )
    tl.store(RSTD + rows, rstd, mask=rmask)


@triton.jit
def rms_norm_bwd(
    DY,
    X,
    W,
    RSTD,
    DX,
    DW,
    M,
    N,
    stride_dy,
    stride_x,
    stride_dx,
    blocks_per_program,
    ROWS: tl.constexpr,
    BLOCK_N: tl.constexpr,
    ACCUMULATE: tl.constexpr,
):
    """dx, and the weight gradient: per-program partial sums DW[pid] or, with ACCUMULATE, added
    atomically into DW (megatron's fp32 main_grad)."""
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
        x = tl.load(X + r64[:, None] * stride_x + cols[None, :], mask=mask, other=0.0).to(
            tl.float32
        )
        dy = tl.load(DY + r64[:, None] * stride_dy + cols[None, :], mask=mask, other=0.0).to(
            tl.float32
        )
        rstd = tl.load(RSTD + rows, mask=rmask, other=0.0)
        xhat = x * rstd[:, None]
        # the weight multiplied the rounded xhat; its gradient sees the same rounding
        dw += tl.sum(dy * xhat.to(DX.dtype.element_ty).to(tl.float32), axis=0)
        g = dy * w[None, :]
        dx = rstd[:, None] * (g - xhat * (tl.sum(g * xhat, axis=1) / N)[:, None])
        tl.store(
            DX + r64[:, None] * stride_dx + cols[None, :], dx.to(DX.dtype.element_ty), mask=mask
        )
    if ACCUMULATE:
        tl.atomic_add(DW + cols, dw, mask=cmask)
    else:
        tl.store(DW + pid * N + cols, dw, mask=cmask)


@triton.jit
def rope(
    X,
    F,
    POS,
    Y,
    H,
    stride_xt,
    stride_xh,
    stride_yt,
    stride_yh,
    stride_f,
    HALF: tl.constexpr,
    REST: tl.constexpr,
    BLOCK_H: tl.constexpr,
    BLOCK_HALF: tl.constexpr,
    BLOCK_REST: tl.constexpr,
    BACKWARD: tl.constexpr,
):
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
def swiglu_fwd(Y, Out, F, stride_y, stride_o, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    c = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    m = c < F
    a = tl.load(Y + row * stride_y + c, mask=m, other=0.0).to(tl.float32)
    b = tl.load(Y + row * stride_y + F + c, mask=m, other=0.0).to(tl.float32)
    tl.store(Out + row * stride_o + c, (a * tl.sigmoid(a) * b).to(Out.dtype.element_ty), mask=m)


@triton.jit
def _swiglu_grads(g, a, b):
    """(gradient of the gate, of the up projection) of silu(a) * b under upstream g, fp32."""
    s = tl.sigmoid(a)
    return g * b * s * (1.0 + a * (1.0 - s)), g * a * s


@triton.jit
def swiglu_bwd(G, Y, DY, F, stride_g, stride_y, stride_dy, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    c = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    m = c < F
    g = tl.load(G + row * stride_g + c, mask=m, other=0.0).to(tl.float32)
    a = tl.load(Y + row * stride_y + c, mask=m, other=0.0).to(tl.float32)
    b = tl.load(Y + row * stride_y + F + c, mask=m, other=0.0).to(tl.float32)
    d_gate, d_up = _swiglu_grads(g, a, b)
    tl.store(DY + row * stride_dy + c, d_gate.to(DY.dtype.element_ty), mask=m)
    tl.store(DY + row * stride_dy + F + c, d_up.to(DY.dtype.element_ty), mask=m)


@triton.jit
def swiglu_weighted_fwd(Y, P, Out, F, stride_y, stride_o, BLOCK: tl.constexpr):
    """Out = SwiGLU(Y) * P[row], rounded as the eager chain rounds: the SwiGLU output and the
    router weight to the activations' dtype, then their product."""
    row = tl.program_id(0).to(tl.int64)
    c = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    m = c < F
    dt = Out.dtype.element_ty
    a = tl.load(Y + row * stride_y + c, mask=m, other=0.0).to(tl.float32)
    b = tl.load(Y + row * stride_y + F + c, mask=m, other=0.0).to(tl.float32)
    p = tl.load(P + row).to(dt).to(tl.float32)
    s = (a * tl.sigmoid(a) * b).to(dt).to(tl.float32)
    tl.store(Out + row * stride_o + c, (s * p).to(dt), mask=m)


@triton.jit
def swiglu_weighted_bwd(G, Y, P, DY, DP, F, stride_g, stride_y, stride_dy, BLOCK: tl.constexpr):
    """One program per row: DY = SwiGLU'(Y) applied to G * P[row], and DP[row] = sum(G * s) over
    the row in fp32 (s: the SwiGLU output recomputed and rounded as the forward stored it)."""
    row = tl.program_id(0).to(tl.int64)
    dt = DY.dtype.element_ty
    p = tl.load(P + row).to(dt).to(tl.float32)
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    for start in range(0, F, BLOCK):
        c = start + tl.arange(0, BLOCK)
        m = c < F
        g = tl.load(G + row * stride_g + c, mask=m, other=0.0).to(tl.float32)
        a = tl.load(Y + row * stride_y + c, mask=m, other=0.0).to(tl.float32)
        b = tl.load(Y + row * stride_y + F + c, mask=m, other=0.0).to(tl.float32)
        acc += g * (a * tl.sigmoid(a) * b).to(dt).to(tl.float32)
        gp = (g * p).to(dt).to(tl.float32)  # the eager chain's gradient of the SwiGLU output
        d_gate, d_up = _swiglu_grads(gp, a, b)
        tl.store(DY + row * stride_dy + c, d_gate.to(dt), mask=m)
        tl.store(DY + row * stride_dy + F + c, d_up.to(dt), mask=m)
    tl.store(DP + row, tl.sum(acc, axis=0))


@triton.jit
def gather_sum_rows(Y, IDX, Out, H, stride_y, stride_o, K: tl.constexpr, BLOCK: tl.constexpr):
    """Out[t] = sum over j < K of Y[IDX[t * K + j]], in fp32, rounded once."""
    t = tl.program_id(0).to(tl.int64)
    c = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    m = c < H
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    for j in tl.static_range(K):
        r = tl.load(IDX + t * K + j).to(tl.int64)
        acc += tl.load(Y + r * stride_y + c, mask=m, other=0.0).to(tl.float32)
    tl.store(Out + t * stride_o + c, acc.to(Out.dtype.element_ty), mask=m)


# --- q/k RMSNorm + rotary embedding + q/k/v split, straight from the fused QKV projection ------


@triton.jit
def _norm_rope_fwd(
    src, dst, hmask, W, c, cos1, sin1, cos2, sin2, eps, D: tl.constexpr, HALF: tl.constexpr
):
    """Heads at src[h, :] (pointer block [H, 1]): RMSNorm (HF rounding), then rotate; to dst."""
    m = hmask[:, None]
    dt = dst.dtype.element_ty
    x1 = tl.load(src + c[None, :], mask=m, other=0.0).to(tl.float32)
    x2 = tl.load(src + HALF + c[None, :], mask=m, other=0.0).to(tl.float32)
    rstd = 1.0 / tl.sqrt((tl.sum(x1 * x1, axis=1) + tl.sum(x2 * x2, axis=1)) / D + eps)
    w1 = tl.load(W + c).to(tl.float32)
    w2 = tl.load(W + HALF + c).to(tl.float32)
    n1 = ((x1 * rstd[:, None]).to(dt).to(tl.float32) * w1[None, :]).to(dt).to(tl.float32)
    n2 = ((x2 * rstd[:, None]).to(dt).to(tl.float32) * w2[None, :]).to(dt).to(tl.float32)
    tl.store(dst + c[None, :], (n1 * cos1[None, :] - n2 * sin1[None, :]).to(dt), mask=m)
    tl.store(dst + HALF + c[None, :], (n2 * cos2[None, :] + n1 * sin2[None, :]).to(dt), mask=m)


@triton.jit
def _norm_rope_bwd(
    dsrc, src, ddst, hmask, W, c, cos1, sin1, cos2, sin2, eps, D: tl.constexpr, HALF: tl.constexpr
):
    """Backward of _norm_rope_fwd for one token's heads: writes dx to ddst, returns the weight
    gradient halves summed over the heads."""
    m = hmask[:, None]
    dt = ddst.dtype.element_ty
    dy1 = tl.load(dsrc + c[None, :], mask=m, other=0.0).to(tl.float32)
    dy2 = tl.load(dsrc + HALF + c[None, :], mask=m, other=0.0).to(tl.float32)
    du1 = dy1 * cos1[None, :] + dy2 * sin2[None, :]  # the rotation's transpose
    du2 = dy2 * cos2[None, :] - dy1 * sin1[None, :]
    x1 = tl.load(src + c[None, :], mask=m, other=0.0).to(tl.float32)
    x2 = tl.load(src + HALF + c[None, :], mask=m, other=0.0).to(tl.float32)
    rstd = 1.0 / tl.sqrt((tl.sum(x1 * x1, axis=1) + tl.sum(x2 * x2, axis=1)) / D + eps)
    xh1, xh2 = x1 * rstd[:, None], x2 * rstd[:, None]
    dw1 = tl.sum(du1 * xh1.to(dt).to(tl.float32), axis=0)
    dw2 = tl.sum(du2 * xh2.to(dt).to(tl.float32), axis=0)
    g1 = du1 * tl.load(W + c).to(tl.float32)[None, :]
    g2 = du2 * tl.load(W + HALF + c).to(tl.float32)[None, :]
    dot = (tl.sum(g1 * xh1, axis=1) + tl.sum(g2 * xh2, axis=1)) / D
    tl.store(ddst + c[None, :], (rstd[:, None] * (g1 - xh1 * dot[:, None])).to(dt), mask=m)
    tl.store(ddst + HALF + c[None, :], (rstd[:, None] * (g2 - xh2 * dot[:, None])).to(dt), mask=m)
    return dw1, dw2


@triton.jit
def _angles(F, POS, t, stride_f, c, OUT, HALF: tl.constexpr):
    """cos/sin of token t's angles (both halves), rounded to OUT's dtype as HF does."""
    dt = OUT.dtype.element_ty
    pos = tl.load(POS + t).to(tl.int64)
    f1 = tl.load(F + pos * stride_f + c).to(tl.float32)
    f2 = tl.load(F + pos * stride_f + HALF + c).to(tl.float32)
    return (
        tl.cos(f1).to(dt).to(tl.float32),
        tl.sin(f1).to(dt).to(tl.float32),
        tl.cos(f2).to(dt).to(tl.float32),
        tl.sin(f2).to(dt).to(tl.float32),
    )


@triton.jit
def qk_norm_rope_fwd(
    QKV,
    F,
    POS,
    WQ,
    WK,
    Q,
    K,
    V,
    stride_t,
    stride_f,
    eps,
    HQ: tl.constexpr,
    HK: tl.constexpr,
    QPG: tl.constexpr,
    D: tl.constexpr,
    BLOCK_HQ: tl.constexpr,
    BLOCK_HK: tl.constexpr,
):
    """One token per program. QKV row layout (megatron): per KV group g, QPG query heads, then
    the key head, then the value head, each D wide. Q [T, HQ, D], K and V [T, HK, D] out."""
    HALF: tl.constexpr = D // 2
    GROUP: tl.constexpr = (QPG + 2) * D
    t = tl.program_id(0).to(tl.int64)
    c = tl.arange(0, HALF)
    cos1, sin1, cos2, sin2 = _angles(F, POS, t, stride_f, c, Q, HALF)
    row = QKV + t * stride_t
    hq = tl.arange(0, BLOCK_HQ)
    q_src = row + ((hq // QPG) * GROUP + (hq % QPG) * D)[:, None]
    _norm_rope_fwd(
        q_src,
        Q + t * HQ * D + hq[:, None] * D,
        hq < HQ,
        WQ,
        c,
        cos1,
        sin1,
        cos2,
        sin2,
        eps,
        D,
        HALF,
    )
    hk = tl.arange(0, BLOCK_HK)
    k_src = row + (hk * GROUP + QPG * D)[:, None]
    _norm_rope_fwd(
        k_src,
        K + t * HK * D + hk[:, None] * D,
        hk < HK,
        WK,
        c,
        cos1,
        sin1,
        cos2,
        sin2,
        eps,
        D,
        HALF,
    )
    d = tl.arange(0, D)
    vmask = (hk < HK)[:, None]
    v = tl.load(row + (hk * GROUP + (QPG + 1) * D)[:, None] + d[None, :], mask=vmask, other=0.0)
    tl.store(V + t * HK * D + hk[:, None] * D + d[None, :], v, mask=vmask)


@triton.jit
def qk_norm_rope_bwd(
    DQ,
    DK,
    DV,
    QKV,
    F,
    POS,
    WQ,
    WK,
    DQKV,
    DWQ,
    DWK,
    T,
    stride_t,
    stride_dt,
    stride_f,
    eps,
    tokens_per_program,
    HQ: tl.constexpr,
    HK: tl.constexpr,
    QPG: tl.constexpr,
    D: tl.constexpr,
    BLOCK_HQ: tl.constexpr,
    BLOCK_HK: tl.constexpr,
    ACCUMULATE: tl.constexpr,
):
    """Gradient of the fused QKV output (all of it: q, k and v slots) and of both norm weights
    (partial sums per program, or added atomically into the fp32 main_grad with ACCUMULATE)."""
    HALF: tl.constexpr = D // 2
    GROUP: tl.constexpr = (QPG + 2) * D
    pid = tl.program_id(0)
    c = tl.arange(0, HALF)
    d = tl.arange(0, D)
    hq = tl.arange(0, BLOCK_HQ)
    hk = tl.arange(0, BLOCK_HK)
    q_off = ((hq // QPG) * GROUP + (hq % QPG) * D)[:, None]
    k_off = (hk * GROUP + QPG * D)[:, None]
    v_off = (hk * GROUP + (QPG + 1) * D)[:, None]
    dwq1 = tl.zeros([HALF], dtype=tl.float32)
    dwq2 = tl.zeros([HALF], dtype=tl.float32)
    dwk1 = tl.zeros([HALF], dtype=tl.float32)
    dwk2 = tl.zeros([HALF], dtype=tl.float32)
    for i in range(0, tokens_per_program):
        t = (pid * tokens_per_program + i).to(tl.int64)
        if t < T:
            cos1, sin1, cos2, sin2 = _angles(F, POS, t, stride_f, c, DQKV, HALF)
            a1, a2 = _norm_rope_bwd(
                DQ + t * HQ * D + hq[:, None] * D,
                QKV + t * stride_t + q_off,
                DQKV + t * stride_dt + q_off,
                hq < HQ,
                WQ,
                c,
                cos1,
                sin1,
                cos2,
                sin2,
                eps,
                D,
                HALF,
            )
            dwq1 += a1
            dwq2 += a2
            b1, b2 = _norm_rope_bwd(
                DK + t * HK * D + hk[:, None] * D,
                QKV + t * stride_t + k_off,
                DQKV + t * stride_dt + k_off,
                hk < HK,
                WK,
                c,
                cos1,
                sin1,
                cos2,
                sin2,
                eps,
                D,
                HALF,
            )
            dwk1 += b1
            dwk2 += b2
            vmask = (hk < HK)[:, None]
            dv = tl.load(DV + t * HK * D + hk[:, None] * D + d[None, :], mask=vmask, other=0.0)
            tl.store(DQKV + t * stride_dt + v_off + d[None, :], dv, mask=vmask)
    if ACCUMULATE:
        tl.atomic_add(DWQ + c, dwq1)
        tl.atomic_add(DWQ + HALF + c, dwq2)
        tl.atomic_add(DWK + c, dwk1)
        tl.atomic_add(DWK + HALF + c, dwk2)
    else:
        tl.store(DWQ + pid * D + c, dwq1)
        tl.store(DWQ + pid * D + HALF + c, dwq2)
        tl.store(DWK + pid * D + c, dwk1)
        tl.store(DWK + pid * D + HALF + c, dwk2)


# --- cross entropy over the (unsharded) vocabulary, gradient written over the logits ----------


@triton.jit
def cross_entropy_fwd(LOGITS, LABELS, LOSS, LSE, VALID, stride, BLOCK: tl.constexpr):
    """Per row (token): log-sum-exp over the first VALID columns (megatron pads the vocabulary
    past the checkpoint's) in one pass with a running max, and loss = lse - logit[label]
    (a label outside [0, VALID) contributes no logit, as in megatron's cross entropy)."""
    row = tl.program_id(0).to(tl.int64)
    base = LOGITS + row * stride
    cols = tl.arange(0, BLOCK)
    m = tl.full([BLOCK], -1e30, dtype=tl.float32)
    s = tl.zeros([BLOCK], dtype=tl.float32)
    for start in range(0, VALID, BLOCK):
        mask = start + cols < VALID
        x = tl.load(base + start + cols, mask=mask, other=-1e30).to(tl.float32)
        new_m = tl.maximum(m, x)
        s = s * tl.exp(m - new_m) + tl.where(mask, tl.exp(x - new_m), 0.0)
        m = new_m
    top = tl.max(m, axis=0)
    lse = top + tl.log(tl.sum(s * tl.exp(m - top), axis=0))
    label = tl.load(LABELS + row).to(tl.int64)
    hit = (label >= 0) & (label < VALID)
    picked = tl.load(base + tl.where(hit, label, 0)).to(tl.float32)
    tl.store(LOSS + row, lse - tl.where(hit, picked, 0.0))
    tl.store(LSE + row, lse)


@triton.jit
def cross_entropy_bwd(LOGITS, LABELS, LSE, DLOSS, V, VALID, stride, BLOCK: tl.constexpr):
    """d loss / d logits = (softmax - onehot(label)) * dloss, written over the logits; padded
    vocabulary columns get 0."""
    row = tl.program_id(0).to(tl.int64)
    base = LOGITS + row * stride
    cols = tl.arange(0, BLOCK)
    lse = tl.load(LSE + row)
    g = tl.load(DLOSS + row).to(tl.float32)
    label = tl.load(LABELS + row).to(tl.int64)
    for start in range(0, V, BLOCK):
        c = start + cols
        x = tl.load(base + c, mask=c < V, other=0.0).to(tl.float32)
        p = tl.exp(x - lse) - tl.where(c == label, 1.0, 0.0)
        p = tl.where(c < VALID, p, 0.0)
        tl.store(base + c, (p * g).to(LOGITS.dtype.element_ty), mask=c < V)


@triton.jit
def _segment_rows(OFFS, s, e, E):
    """(start, end) of expert e's rows in segment s (OFFS: [segments, E] cumulative counts)."""
    end = tl.load(OFFS + s * E + e)
    start = tl.where(e > 0, tl.load(OFFS + s * E + tl.maximum(e - 1, 0)), 0)
    return start, end


@triton.jit
def _wgrad_segment(
    acc, DY, X, start, end, rn, rk, nmask, kmask, stride_dy, stride_x, BLOCK_M: tl.constexpr
):
    """acc += DY[start:end]^T @ X[start:end]."""
    for m in range(start, end, BLOCK_M):
        rm = m + tl.arange(0, BLOCK_M)
        mmask = rm < end
        r64 = rm.to(tl.int64)
        dy = tl.load(
            DY + r64[:, None] * stride_dy + rn[None, :],
            mask=mmask[:, None] & nmask[None, :],
            other=0.0,
        )
        x = tl.load(
            X + r64[:, None] * stride_x + rk[None, :],
            mask=mmask[:, None] & kmask[None, :],
            other=0.0,
        )
        acc = tl.dot(tl.trans(dy), x, acc)
    return acc


@triton.jit
def expert_wgrad_accum(
    DYS,
    XS,
    OFFS,
    G,
    N,
    K,
    E,
    stride_dy,
    stride_x,
    SEGMENTS: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """G[e] += sum over segments s of DYS[s][rows of e]^T @ XS[s][rows of e] (DYS, XS: tuples of
    SEGMENTS tensors, rows grouped by expert in each; OFFS [SEGMENTS, E]: cumulative row counts),
    accumulated in place in fp32 (megatron's main_grad, layout [E, N, K]). A segment is one
    micro-batch's rows: the deferred expert weight gradient (model/expert_wgrad.py) reads and
    writes G once for several micro-batches."""
    pid_n, pid_k, e = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    rows = 0
    for s in tl.static_range(SEGMENTS):
        start, end = _segment_rows(OFFS, s, e, E)
        rows += end - start
    if rows > 0:
        rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        rk = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
        nmask, kmask = rn < N, rk < K
        ptr = G + e.to(tl.int64) * N * K + rn[:, None] * K + rk[None, :]
        mask = nmask[:, None] & kmask[None, :]
        # start from the old value: its load overlaps the first tiles' loads
        acc = tl.load(ptr, mask=mask, other=0.0)
        for s in tl.static_range(SEGMENTS):
            start, end = _segment_rows(OFFS, s, e, E)
            acc = _wgrad_segment(
                acc, DYS[s], XS[s], start, end, rn, rk, nmask, kmask, stride_dy, stride_x, BLOCK_M
            )
        tl.store(ptr, acc, mask=mask)


# --- AdamW over flat fp32 parameters (remote_runtime/train/adamw.py) ------------------------------


@triton.jit
def adamw_step(
    P,
    G,
    M,
    V,
    OUT,
    SCALARS,
    n,
    lr,
    beta1,
    beta2,
    eps,
    decay,
    HAS_OUT: tl.constexpr,
    BLOCK: tl.constexpr,
):
    """One AdamW update of n contiguous fp32 parameters P, in the order of torch's fused AdamW:
    P -= lr * decay * P; M, V the moments (fp32 or bf16, updated in fp32 and stored in their
    own dtype); P -= step_size * M / (sqrt(V) / sqrt(bias_correction2) + eps). SCALARS (fp32,
    on the device): [gradient factor, lr / bias_correction1, sqrt(bias_correction2)]. With
    HAS_OUT the updated P is also stored, rounded, into OUT (the bf16 model parameter)."""
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    factor = tl.load(SCALARS)
    step_size = tl.load(SCALARS + 1)
    bc2_sqrt = tl.load(SCALARS + 2)
    p = tl.load(P + offs, mask=mask, other=0.0)
    g = tl.load(G + offs, mask=mask, other=0.0).to(tl.float32) * factor
    m = tl.load(M + offs, mask=mask, other=0.0).to(tl.float32)
    v = tl.load(V + offs, mask=mask, other=0.0).to(tl.float32)
    p = p - lr * decay * p
    m = beta1 * m + (1.0 - beta1) * g
    v = beta2 * v + (1.0 - beta2) * g * g
    p = p - step_size * m / (tl.sqrt(v) / bc2_sqrt + eps)
    tl.store(P + offs, p, mask=mask)
    tl.store(M + offs, m.to(M.dtype.element_ty), mask=mask)
    tl.store(V + offs, v.to(V.dtype.element_ty), mask=mask)
    if HAS_OUT:
        tl.store(OUT + offs, p.to(OUT.dtype.element_ty), mask=mask)
