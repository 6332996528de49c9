"""LoRA adapters on megatron-core's tensor-parallel linear layers, exact under TP and SP.

    settings = resolve_lora(job.tuner, family, hf_config)          (remote_runtime.spec.tuner)
    attach_lora(chunks, settings, dist, seed)                       after build_model, before DDP

Each targeted linear layer gets a `lora` child (`LoraAdapter`) and a forward hook that adds
`scale · B(A(dropout(x)))` to the layer's output. Everything else is frozen (requires_grad
False): megatron's DDP gives frozen weights no gradient buffer, its optimizer no master copy or
state, and its linear layers take the frozen-weight path (no weight gradient, no fused
`main_grad` accumulation). Only adapters (and `modules_to_save`) are trained.

Tensor parallelism, with the layer's own collectives mirrored on the rank-r path:

* column-parallel (linear_qkv, linear_fc1): A is replicated, B is split by output rows like the
  weight. h = A x is gathered (SP: all-gather over the sequence, backward reduce-scatter; A's
  gradient then covers local tokens only and is summed over TP by megatron, as for norms) or
  copied (backward all-reduce, so A's gradient is whole on every rank).
* row-parallel (linear_proj, linear_fc2): A is split by input columns, B is replicated. A x is a
  partial sum, reduced like the layer's output (all-reduce, or SP reduce-scatter; B's gradient
  then covers local tokens and is summed over TP).

A fused weight carries one (A, B) pair per Hugging Face module (q, k, v; gate, up). The hook
runs them as one low-rank product: A = [A_q; A_k; A_v] and a B laid out like the fused weight
(megatron's per-group q/k/v interleave, or [gate_r; up_r]) with each module's B in its own
column block, so the output lands in the layer's layout with two small GEMMs.

Routed experts (GroupedExperts in model/moe.py): the adapter of a stacked expert weight
[E_local, out, in] holds one such fused pair per local expert, lora_A [E_local, n·r, in] and
lora_B [E_local, out, n·r] (gate and up: two rank-r pairs, as the dense gate_up), marked like
the expert weights (`allreduce=False`: reduced over the expert-data-parallel group). The expert
MLP applies it on its tokens grouped by expert with the same grouped GEMM and offsets as the
weight (x A_eᵀ, then B_eᵀ: two torch._grouped_mm on GPU, no host sync). Expert TP splits B of fc1
and A of fc2 like the dense layers; the tokens are the same on every expert-TP rank (fc1) or the
output a partial sum the dispatcher reduces (fc2), so no collective runs on the rank-r path and
only the replicated matrix's gradient, a partial sum over those ranks, is all-reduced.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import math
import zlib

import torch
import torch.nn.functional as F

from remote_runtime.bridge.transforms import Layout
from remote_runtime.spec.families.base import fill
from remote_runtime.spec.tuner import SAVE_MODULES, LoraSettings, LoraTarget

PEFT_PREFIX = "base_model.model."


def peft_key(hf_module: str, which: str) -> str:
    """PEFT's name for a LoRA matrix: base_model.model.<module>.lora_A.weight."""
    return f"{PEFT_PREFIX}{hf_module}.lora_{which}.weight"


def _group_rows(transform: str, rows: int, lay: Layout) -> tuple[int, list[int]]:
    """(groups, rows of each HF module per group) of a fused column-parallel weight's local
    rows: qkv repeats [q heads of g | k_g | v_g] per local query group; gate_up is [gate; up]."""
    if transform == "qkv":
        hd = lay.head_dim
        return lay.groups // lay.tp, [lay.heads_per_group * hd, hd, hd]
    if transform in ("gate_up", "expert_gate_up"):
        return 1, [rows // 2, rows // 2]
    return 1, [rows]


class LoraAdapter(torch.nn.Module):
    """The LoRA pairs of one megatron linear layer, stored fused (see the module docstring):
    `lora_A` [n·r, in] stacks the active modules' A; `lora_B` [out, n·r] holds each module's B
    in its rows of the fused layout and its own r columns, zeros elsewhere. Those zeros stay
    zero: a mask clears their gradient, so Adam and weight decay never move them."""

    def __init__(
        self,
        target: LoraTarget,
        layer: int,
        settings: LoraSettings,
        weight,
        lay: Layout,
        sequence_parallel: bool,
    ):
        super().__init__()
        from megatron.core.tensor_parallel.layers import set_tensor_model_parallel_attributes

        # a stacked expert weight [E_local, out, in]: one pair per local expert, split by
        # expert TP (lay: the expert-TP size and rank as tp, tp_rank)
        self.experts = weight.shape[0] if target.per_expert else 0
        self.first_expert = lay.ep_rank * self.experts
        if self.experts:
            lay = dataclasses.replace(lay, tp=lay.etp, tp_rank=lay.etp_rank)
        self.transform, self.parallel, self.lay = target.transform, target.parallel, lay
        self.sp = sequence_parallel and lay.tp > 1 and not self.experts
        self.rank, self.scale, self.dropout = settings.rank, settings.scale, settings.dropout
        self.modules = [fill(h, layer) for h in target.hf]  # HF module names, fused order
        self.active = [j for j, on in enumerate(target.active) if on]
        rows, cols = weight.shape[-2:]
        self.groups, self.group_rows = (
            _group_rows(self.transform, rows, lay) if self.parallel == "column" else (1, [rows])
        )
        width = len(self.active) * settings.rank
        lead = (self.experts,) if self.experts else ()
        kw = dict(device=weight.device, dtype=weight.dtype)
        self.lora_A = torch.nn.Parameter(torch.zeros(*lead, width, cols, **kw))
        self.lora_B = torch.nn.Parameter(torch.zeros(*lead, rows, width, **kw))
        split, replicated = (
            (self.lora_B, self.lora_A) if self.parallel == "column" else (self.lora_A, self.lora_B)
        )
        dim = (0 if split is self.lora_B else 1) + len(lead)
        set_tensor_model_parallel_attributes(split, True, dim, 1)
        # the replicated matrix sees local tokens only under SP: megatron sums it over TP
        replicated.sequence_parallel = self.sp
        for p in (self.lora_A, self.lora_B):
            p.is_lora = True
            if self.experts:  # megatron's expert marker: reduced over expert-data-parallel
                p.allreduce = False
        mask = torch.zeros_like(self.lora_B)
        for _, _, b in self.pairs(lambda p: mask):
            b.fill_(1)
        if not bool(mask.all()):
            self.register_buffer("grad_mask", mask, persistent=False)
            self.lora_B.register_hook(lambda grad: grad * self.grad_mask)

    def pairs(self, of=lambda p: p) -> list[tuple[str, torch.Tensor, torch.Tensor]]:
        """(HF module, A_j, B_j) views of `of(lora_A)`, `of(lora_B)` for each adapted module
        (of each local expert: `{expert}` filled with its global number): A_j [r, in]; B_j
        [groups, rows per group, r] (a writable view; reshape it to the module's local
        [rows, r])."""
        a, b = of(self.lora_A), of(self.lora_B)
        if not self.experts:
            return self._pairs(a, b)
        return [
            (module.replace("{expert}", str(self.first_expert + e)), a_j, b_j)
            for e in range(self.experts)
            for module, a_j, b_j in self._pairs(a[e], b[e])
        ]

    def _pairs(self, a: torch.Tensor, b: torch.Tensor) -> list:
        r = self.rank
        grouped = b.view(self.groups, sum(self.group_rows), b.shape[-1])
        out = []
        for col, j in enumerate(self.active):
            start = sum(self.group_rows[:j])
            b_j = grouped[:, start : start + self.group_rows[j], col * r : (col + 1) * r]
            out.append((self.modules[j], a[col * r : (col + 1) * r], b_j))
        return out

    def split_dims(self) -> tuple[int | None, int | None]:
        """The dimension each of A and B is split along under TP (None: replicated)."""
        return (None, 0) if self.parallel == "column" else (1, None)

    def forward(self, x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        """The layer's output `out` plus the adapters' for its input `x` (the B product and the
        sum in one GEMM)."""
        from megatron.core import tensor_parallel as tpl

        if self.dropout and self.training:
            x = self._dropout(x)
        h = F.linear(x, self.lora_A)
        if self.lay.tp > 1 and self.parallel == "column":
            h = (
                tpl.gather_from_sequence_parallel_region(h, tensor_parallel_output_grad=True)
                if self.sp
                else tpl.copy_to_tensor_model_parallel_region(h)
            )
        elif self.lay.tp > 1:
            h = (
                tpl.reduce_scatter_to_sequence_parallel_region(h)
                if self.sp
                else tpl.reduce_from_tensor_model_parallel_region(h)
            )
        flat = torch.addmm(
            out.reshape(-1, out.shape[-1]),
            h.reshape(-1, h.shape[-1]),
            self.lora_B.t(),
            alpha=self.scale,
        )
        return flat.view(out.shape)

    def add_grouped(
        self,
        x: torch.Tensor,
        out: torch.Tensor,
        tokens_per_expert: torch.Tensor,
        offsets: torch.Tensor | None,
    ) -> torch.Tensor:
        """An expert weight's output `out` plus the local experts' adapters for their rows of
        `x` (grouped by expert): (x A_eᵀ) B_eᵀ with the expert MLP's grouped GEMM and offsets."""
        from remote_runtime.model.moe import grouped_linear

        if self.dropout and self.training:
            x = F.dropout(x, self.dropout, True)
        a, b = self.lora_A, self.lora_B
        if offsets is not None and (a.shape[1] * a.element_size()) % 16:
            # torch._grouped_mm needs 16-byte aligned rows (bf16: n·r a multiple of 8); smaller
            # ranks take the per-expert loop (one host sync)
            offsets = None
        if self.lay.tp > 1:  # expert TP: the replicated matrix's gradient is a partial sum
            from megatron.core import parallel_state
            from megatron.core.tensor_parallel import copy_to_tensor_model_parallel_region

            group = parallel_state.get_expert_tensor_parallel_group()
            if self.parallel == "column":
                a = copy_to_tensor_model_parallel_region(a, group)
            else:
                b = copy_to_tensor_model_parallel_region(b, group)
        h = grouped_linear(x, a, tokens_per_expert, offsets)
        return torch.add(out, grouped_linear(h, b, tokens_per_expert, offsets), alpha=self.scale)

    def tp_group(self):
        """The group this adapter's split matrix is split over (expert TP for experts)."""
        from megatron.core import parallel_state

        if self.experts:
            return parallel_state.get_expert_tensor_parallel_group()
        return parallel_state.get_tensor_model_parallel_group()

    def _dropout(self, x: torch.Tensor) -> torch.Tensor:
        """Replicated inputs (column layer, no SP) take one mask on all TP ranks (the default
        generator, in step across TP); partitioned inputs the per-rank tensor-parallel one."""
        if self.parallel == "column" and not self.sp:
            return F.dropout(x, self.dropout, True)
        from megatron.core.tensor_parallel import get_cuda_rng_tracker

        with get_cuda_rng_tracker().fork():
            return F.dropout(x, self.dropout, True)

    @torch.no_grad()
    def merge_into(self, weight: torch.Tensor) -> None:
        """weight += scale · B A (the local pieces, per expert for experts; fp32 product,
        rounded once)."""
        delta = self.lora_B.float() @ self.lora_A.float()
        weight.copy_((weight.float() + self.scale * delta).to(weight.dtype))


class _LoraLinear(torch.autograd.Function):
    """y = x Wᵀ (+ bias) + scale · (x_a Aᵀ) Bᵀ for a frozen W, as one autograd node (TP = 1).

    x_a is x, or dropout(x) passed in separately. Backward: one GEMM each for B's and A's
    gradients and the low-rank input gradient, the latter added in place onto the frozen
    weight's input gradient (no temporary of the input's size). `grad_scale` is scale, or
    scale times B's mask (see LoraAdapter)."""

    @staticmethod
    def forward(ctx, x, x_a, weight, bias, lora_a, lora_b, scale, grad_scale):
        x2 = x.reshape(-1, x.shape[-1])
        xa2 = x2 if x_a is None else x_a.reshape(-1, x_a.shape[-1])
        h = torch.mm(xa2, lora_a.t())
        out = torch.mm(x2, weight.t()) if bias is None else torch.addmm(bias, x2, weight.t())
        out.addmm_(h, lora_b.t(), alpha=scale)
        ctx.save_for_backward(xa2, weight, lora_a, lora_b, h)
        ctx.scale, ctx.grad_scale, ctx.separate = scale, grad_scale, x_a is not None
        ctx.x_shape = x.shape
        return out.view(*x.shape[:-1], out.shape[-1])

    @staticmethod
    def backward(ctx, grad):
        xa2, weight, lora_a, lora_b, h = ctx.saved_tensors
        g2 = grad.reshape(-1, grad.shape[-1])
        grad_h = torch.mm(g2, lora_b).mul_(ctx.scale)
        grad_x = torch.mm(g2, weight)
        grad_xa = None
        if ctx.separate:
            grad_xa = torch.mm(grad_h, lora_a).view(ctx.x_shape)
        else:
            grad_x.addmm_(grad_h, lora_a)
        grad_a = torch.mm(grad_h.t(), xa2)
        grad_b = torch.mm(g2.t(), h).mul_(ctx.grad_scale)
        return grad_x.view(ctx.x_shape), grad_xa, None, None, grad_a, grad_b, None, None


def _single_rank_forward(linear, input_, weight=None, runtime_gather_output=None):
    """The adapted layer's forward at TP = 1 (no collectives): base and adapter in one node.
    Same contract as megatron's Column/RowParallelLinear.forward: (output, output_bias)."""
    lora = linear.lora
    x_a = lora._dropout(input_) if lora.dropout and lora.training else None
    bias = None if linear.skip_bias_add else linear.bias
    grad_scale = lora.scale * lora.grad_mask if hasattr(lora, "grad_mask") else lora.scale
    out = _LoraLinear.apply(
        input_,
        x_a,
        linear.weight if weight is None else weight,
        bias,
        lora.lora_A,
        lora.lora_B,
        lora.scale,
        grad_scale,
    )
    return out, linear.bias if linear.skip_bias_add else None


def _add_lora_output(module, args, output):
    out, bias = output
    return module.lora(args[0], out), bias


def _require_grad(module, args, output):
    """Frozen embeddings give activations that need no gradient; full recompute (a checkpoint
    Function) then sees no input needing one and would skip every adapter's gradient."""
    return output if output.requires_grad else output.requires_grad_(True)


def layout(chunk, hf_config: dict, dist) -> Layout:
    from remote_runtime.bridge.load import layout_for
    from remote_runtime.spec.families import family_for_hf_config

    return layout_for(hf_config, family_for_hf_config(hf_config), dist)


def attach_lora(chunks, settings: LoraSettings, hf_config: dict, dist, seed: int = 42) -> list:
    """Freeze the base, add adapters to every targeted layer of this rank's chunks, initialise
    them as PEFT would (the same values at any TP size). Returns the adapters."""
    from remote_runtime.bridge.mapping import unwrap

    adapters = []
    for chunk in chunks:
        model = unwrap(chunk)
        lay = layout(model, hf_config, dist)
        for p in model.parameters():
            p.requires_grad_(False)
        _unfreeze_modules_to_save(model, settings)
        for layer_module in model.decoder.layers:
            layer = layer_module.layer_number - 1
            for target in settings.targets:
                # MoE models with dense MLP layers: a row of one layer kind only
                moe_layer = hasattr(layer_module.mlp, "router")
                if target.layers is not None and (target.layers == "moe") != moe_layer:
                    continue
                local = target.megatron.replace("decoder.layers.{layer}.", "")
                linear = layer_module.get_submodule(local)
                adapter = LoraAdapter(
                    target, layer, settings, linear.weight, lay, model.config.sequence_parallel
                )
                linear.lora = adapter
                if adapter.experts:
                    pass  # GroupedExperts.forward applies it (grouped by expert)
                elif dist.tp == 1 and not getattr(linear, "gather_output", False):
                    # one autograd node for base + adapter (the host is the bottleneck of
                    # small models at TP = 1); this instance's forward only
                    linear.forward = functools.partial(_single_rank_forward, linear)
                else:
                    linear.register_forward_hook(_add_lora_output)
                init_adapter(adapter, settings.init, seed)
                adapters.append(adapter)
        if model.pre_process:
            model.embedding.register_forward_hook(_require_grad)
        model.megafleet_lora = settings
    return adapters


def _unfreeze_modules_to_save(model, settings: LoraSettings) -> None:
    params = dict(model.named_parameters())
    for name in settings.modules_to_save:
        param = params.get(SAVE_MODULES[name][0])
        if param is not None:  # the embedding lives on the first stage, the head on the last
            param.requires_grad_(True)


@torch.no_grad()
def init_adapter(adapter: LoraAdapter, how: str, seed: int) -> None:
    """PEFT's initialisation (true: A Kaiming-uniform, B zero; gaussian: A normal(1/r), B zero;
    false: both as nn.Linear), drawn for the whole HF tensor from a generator seeded by the
    module's name, then cut to this rank's piece."""
    for module, a, b in adapter.pairs():
        gen = torch.Generator().manual_seed(seed + zlib.crc32(module.encode()))
        full_a = torch.empty(full_shape(adapter, a, 0))
        full_b = torch.zeros(full_shape(adapter, b, 1))
        if how == "gaussian":
            torch.nn.init.normal_(full_a, std=1 / adapter.rank, generator=gen)
        else:
            torch.nn.init.kaiming_uniform_(full_a, a=math.sqrt(5), generator=gen)
        if how == "false":
            torch.nn.init.kaiming_uniform_(full_b, a=math.sqrt(5), generator=gen)
        set_piece(adapter, a, full_a, 0)
        set_piece(adapter, b, full_b, 1)


def local_shape(view: torch.Tensor) -> tuple[int, int]:
    """A_j as it is; B_j's grouped view as the module's local [rows, r]."""
    return tuple(view.shape) if view.dim() == 2 else (view.shape[0] * view.shape[1], view.shape[2])


def full_shape(adapter: LoraAdapter, view: torch.Tensor, which: int) -> tuple[int, int]:
    """The HF (PEFT) shape of a pair's A (which=0) or B (which=1) view."""
    dim = adapter.split_dims()[which]
    shape = list(local_shape(view))
    if dim is not None:
        shape[dim] *= adapter.lay.tp
    return tuple(shape)


def local_piece(adapter: LoraAdapter, full: torch.Tensor, which: int) -> torch.Tensor:
    """This rank's piece of a full HF (PEFT) A or B tensor."""
    dim = adapter.split_dims()[which]
    if dim is None or adapter.lay.tp == 1:
        return full
    return full.chunk(adapter.lay.tp, dim=dim)[adapter.lay.tp_rank]


def get_piece(view: torch.Tensor) -> torch.Tensor:
    """A pair's A or B view as the module's local tensor [rows, cols]."""
    return view.reshape(local_shape(view))


def set_piece(adapter: LoraAdapter, view: torch.Tensor, full: torch.Tensor, which: int) -> None:
    """Copy this rank's piece of a full HF tensor into a pair's view (raises on a mismatch)."""
    piece = local_piece(adapter, full, which)
    if tuple(piece.shape) != local_shape(view):
        raise ValueError(
            f"shape {tuple(piece.shape)} does not match the local piece {local_shape(view)}"
        )
    view.copy_(piece.view(view.shape).to(device=view.device, dtype=view.dtype))


def adapters_of(chunks) -> list[LoraAdapter]:
    from remote_runtime.bridge.mapping import unwrap

    return [m for chunk in chunks for m in unwrap(chunk).modules() if isinstance(m, LoraAdapter)]


def lora_settings(chunks) -> LoraSettings | None:
    from remote_runtime.bridge.mapping import unwrap

    return getattr(unwrap(chunks[0]), "megafleet_lora", None)


@contextlib.contextmanager
def adapters_disabled(chunks):
    """The base model for the duration (PEFT's `disable_adapter()`): every adapter's scale is 0,
    so its term adds exactly 0 (0 · finite). `modules_to_save` are trained in place and are not
    restored by this; the DPO reference uses a separate base model when they were loaded."""
    adapters = adapters_of(chunks)
    scales = [a.scale for a in adapters]
    for a in adapters:
        a.scale = 0.0
    try:
        yield
    finally:
        for a, scale in zip(adapters, scales):
            a.scale = scale


def merge_lora(chunks) -> None:
    """Fold every adapter into its frozen weight (in place; the adapters stay but are then
    counted twice, so call this only when training is over)."""
    from remote_runtime.bridge.mapping import unwrap

    for chunk in chunks:
        for module in unwrap(chunk).modules():
            if isinstance(getattr(module, "lora", None), LoraAdapter):
                module.lora.merge_into(module.weight)
                module.lora.scale = 0.0
