"""MoE expert weight gradients accumulated into megatron DDP's fp32 main_grad, optionally
deferred over micro-batches.

Why: an expert weight's gradient per micro-batch is a grouped GEMM with few rows per expert
(Qwen3-30B-A3B at 4096 tokens: 256 rows for a [1536, 2048] weight), so adding it into the fp32
main_grad is bound by memory: 8 bytes per expert parameter per micro-batch (read and write),
about 100 ms of a 560 ms step on one H200 for the 8-layer benchmark. Keeping each micro-batch's
(output gradient, input) rows until `depth` micro-batches have run and then adding all of them
in one pass (one Triton kernel over up to 8 segments) reads and writes main_grad once per
`depth` micro-batches. The price is memory: the kept rows (about 420 MB per MoE layer and
micro-batch at Qwen3-30B-A3B's size); `auto` measures them in the first step and defers only as
far as half the GPU's unused memory allows. The sum is the same up to fp32 rounding order.

The last micro-batch of a step always flushes inside its own backward, so the gradients are
complete before megatron reduces them (also with overlap_grad_reduce, whose hooks fire after
that backward).
"""

from __future__ import annotations

import logging
import weakref

import torch

from remote_runtime.spec.config import MOE_WGRAD_MAX_DEPTH as MAX_DEPTH

log = logging.getLogger(__name__)

AUTO_MEMORY_SHARE = 0.5  # of the memory the first step left unused


# Tiles from `benchmarks/expert_wgrad.py --sweep` (H100, Qwen3-30B-A3B's expert shapes, 112
# configurations; benchmarks/results/2026-12-05-h100-session10-expert-wgrad-sweep.json): one
# micro-batch's rows 2.10 ms per layer (fc1 + fc2) against 2.94 for session 9's tiles; eight
# micro-batches' 0.86 ms per micro-batch against 1.19.
WGRAD_BLOCKS = dict(BLOCK_M=64, BLOCK_N=64, BLOCK_K=128, num_warps=4, num_stages=3)
WGRAD_BLOCKS_DEFERRED = dict(BLOCK_M=32, BLOCK_N=128, BLOCK_K=128, num_warps=4, num_stages=4)


def accumulate_segments(
    main_grad: torch.Tensor, segments: list, blocks: dict | None = None
) -> None:
    """main_grad[e] (fp32 [E, N, K]) += sum over (dy, x, offsets) segments of
    dy[rows of e]^T @ x[rows of e] (rows grouped by expert, offsets the cumulative row counts
    [E] int32 on the device): one Triton launch, main_grad read and written once."""
    from remote_runtime.model import triton_kernels
    from remote_runtime.model.ops import triton_cdiv

    if not 1 <= len(segments) <= MAX_DEPTH:
        raise ValueError(f"{len(segments)} segments; the kernel takes 1 to {MAX_DEPTH}")
    e, n, k = main_grad.shape
    dys = [dy for dy, _, _ in segments]
    xs = [x for _, x, _ in segments]
    for dy, x in zip(dys, xs):
        if dy.stride() != dys[0].stride() or x.stride() != xs[0].stride():
            raise ValueError("deferred expert gradient segments must share their row strides")
    offsets = torch.stack([o for _, _, o in segments]) if len(segments) > 1 else segments[0][2]
    b = blocks or (WGRAD_BLOCKS if len(segments) == 1 else WGRAD_BLOCKS_DEFERRED)
    triton_kernels.expert_wgrad_accum[
        (triton_cdiv(n, b["BLOCK_N"]), triton_cdiv(k, b["BLOCK_K"]), e)
    ](
        tuple(dys),
        tuple(xs),
        offsets,
        main_grad,
        n,
        k,
        e,
        dys[0].stride(0),
        xs[0].stride(0),
        SEGMENTS=len(segments),
        **b,
    )


class WgradDeferral:
    """One model's setting and bookkeeping: how many micro-batches an expert weight gradient is
    deferred over (`depth`), the step's micro-batch count (the last one always flushes), and in
    `auto` mode the bytes kept per micro-batch, measured in the first step."""

    def __init__(self, requested: int | str = 1):
        if isinstance(requested, str) and requested.isdigit():
            requested = int(requested)
        if requested != "auto" and not (isinstance(requested, int) and 1 <= requested):
            raise ValueError(
                f"moe_wgrad_defer must be 'auto' or a micro-batch count >= 1, got {requested!r}"
            )
        self.depth = 1 if requested == "auto" else min(int(requested), MAX_DEPTH)
        self.micro_batches: int | None = None  # None outside a training step: no deferral
        self.step = 0
        self.decided = requested != "auto"
        self.kept_bytes = 0  # bytes of (dy, x) rows seen in the first step
        self.bytes_per_micro_batch: float | None = None  # measured in the first step
        self._weights: weakref.WeakSet = weakref.WeakSet()

    def register(self, wgrad: "ExpertWgrad") -> None:
        self._weights.add(wgrad)

    def begin_step(self, micro_batches: int) -> None:
        self.step += 1
        self.micro_batches = micro_batches
        self.kept_bytes = 0

    def end_step(self, device=None) -> None:
        """After the step's backward: nothing may be left over (the gradients were already
        reduced); in auto mode the first step's measurement sets the depth."""
        pending = sum(len(w.pending) for w in self._weights)
        micro_batches, self.micro_batches = self.micro_batches, None
        if pending:
            raise RuntimeError(
                f"{pending} deferred expert weight gradients were not added to main_grad by the "
                "step's last micro-batch; run with moe_wgrad_defer=1 and report this"
            )
        if self.bytes_per_micro_batch is None and self.kept_bytes and micro_batches:
            self.bytes_per_micro_batch = self.kept_bytes / micro_batches
            if not self.decided:
                self.decided = True
                self.depth = auto_depth(self.bytes_per_micro_batch, device)

    def held_bytes(self, micro_batches: int) -> float:
        """What deferring keeps at most beyond an undeferred step (measured rows x the extra
        micro-batches held), for the memory check of benchmarks."""
        extra = min(self.depth, micro_batches) - 1
        return extra * (self.bytes_per_micro_batch or 0.0)


def auto_depth(bytes_per_micro_batch: float, device=None) -> int:
    """Micro-batches to defer over: 1 plus as many as fit in AUTO_MEMORY_SHARE of the memory the
    measured step left unused (free on the device plus cached by torch beyond its peak)."""
    if not torch.cuda.is_available() or bytes_per_micro_batch <= 0:
        return 1
    device = torch.device("cuda", torch.cuda.current_device()) if device is None else device
    free, _ = torch.cuda.mem_get_info(device)
    spare = free + torch.cuda.memory_reserved(device) - torch.cuda.max_memory_allocated(device)
    depth = depth_for(spare, bytes_per_micro_batch)
    log.info(
        "MoE expert weight gradients: added to main_grad every %d micro-batch(es) "
        "(%.1f GiB kept per micro-batch, %.1f GiB unused after the first step; "
        "moe_wgrad_defer: 1 keeps none)",
        depth,
        bytes_per_micro_batch / 2**30,
        spare / 2**30,
    )
    return depth


def depth_for(spare_bytes: float, bytes_per_micro_batch: float) -> int:
    extra = int(max(0.0, AUTO_MEMORY_SHARE * spare_bytes) // bytes_per_micro_batch)
    return max(1, min(MAX_DEPTH, 1 + extra))


class ExpertWgrad:
    """One stacked expert weight's gradient path: each micro-batch's (dy, x, offsets) is kept
    until the deferral's depth is reached or the step's last micro-batch has run, then all are
    added to main_grad in one kernel launch. Without a deferral (or outside a training step)
    every micro-batch is added at once."""

    def __init__(self, deferral: WgradDeferral | None = None):
        self.deferral = deferral
        self.pending: list = []
        self.calls = 0
        self.step = -1
        if deferral is not None:
            deferral.register(self)

    def add(self, main_grad: torch.Tensor, dy: torch.Tensor, x: torch.Tensor, offsets) -> None:
        d = self.deferral
        if d is None or not d.micro_batches:  # outside a training step: no deferral
            accumulate_segments(main_grad, [(dy, x, offsets)])
            return
        if self.step != d.step:
            self.step, self.calls = d.step, 0
        self.calls += 1
        self.pending.append((dy, x, offsets))
        if d.bytes_per_micro_batch is None:
            d.kept_bytes += dy.numel() * dy.element_size() + x.numel() * x.element_size()
        if len(self.pending) >= d.depth or self.calls >= d.micro_batches:
            segments, self.pending = self.pending, []
            accumulate_segments(main_grad, segments)


def deferrals(model_chunks) -> list[WgradDeferral]:
    """The distinct WgradDeferral objects of a model's MoE experts (cached on the first chunk)."""
    if not model_chunks:
        return []
    first = model_chunks[0]
    found = getattr(first, "_megafleet_wgrad_deferrals", None)
    if found is None:
        seen = {}
        for chunk in model_chunks:
            for module in chunk.modules():
                d = getattr(module, "wgrad_deferral", None)
                if isinstance(d, WgradDeferral):
                    seen[id(d)] = d
        found = first._megafleet_wgrad_deferrals = list(seen.values())
    return found
