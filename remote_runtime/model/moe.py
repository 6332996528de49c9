"""Mixture-of-experts layers on megatron-core's MoELayer without transformer-engine.

Plugged in through the layer spec (`moe_spec`, used by builder.layer_spec):

- `GroupedExperts`: all local experts' weights stacked (parameter contract in model/MOE_CONTRACT.md:
  `linear_fc1.weight` [E_loc, 2F, H] with rows [gate; up] per expert, `linear_fc2.weight`
  [E_loc, H, F]); forward on tokens grouped by expert: fc1 for every expert in one
  `torch._grouped_mm` (offsets from tokens_per_expert, no host sync), SwiGLU (the runtime's
  Triton kernel, or eager), router weights applied, fc2 in one more grouped GEMM. On CPU (the
  tests) an exact per-expert loop replaces the grouped GEMMs.
- `SoftmaxTopKRouter`: transformers' Qwen-MoE router: softmax over all experts (fp32 with
  `moe_router_dtype=fp32`), top-k, renormalised over the k when `moe_router_pre_softmax` is off
  (= HF `norm_topk_prob`). Records the load-balancing statistics (moe_aux.py).
- `GroupedMoELayer`: megatron's MoELayer; where no token leaves the rank (expert parallelism 1,
  expert TP 1, no capacity factor) routing, permutation and un-permutation run here without a
  host sync (`LocalDispatch`: index ops, and a Triton kernel that sums each token's k expert
  rows without a gathered copy); otherwise megatron's token dispatcher
  (all-to-all / all-gather) moves the tokens and our experts compute them.
"""

from __future__ import annotations

import functools
import logging

import torch
import torch.nn.functional as F

from remote_runtime.model import moe_aux

# --- permutation without a host sync -----------------------------------------------------------


def _sum_slots(y: torch.Tensor, inverse: torch.Tensor, k: int, fused: bool) -> torch.Tensor:
    """Each token's k rows of y (found through `inverse`, in token order) summed: one Triton
    pass on the GPU when `fused`, else gather then sum (the same fp32 sum, rounded once)."""
    if fused and y.is_cuda:
        from remote_runtime.model.ops import gather_sum_rows

        return gather_sum_rows(y, inverse, k)
    g = y.index_select(0, inverse)
    return g.view(-1, k, g.shape[-1]).sum(1)


class _GatherRows(torch.autograd.Function):
    """y = x[src] where every row of x appears `k` times in src (a token's k expert slots).
    Backward sums each token's k slot gradients by gathering them through the inverse
    permutation: deterministic, no atomics."""

    @staticmethod
    def forward(ctx, x, src, inverse, k, fused):
        ctx.save_for_backward(inverse)
        ctx.k, ctx.fused = k, fused
        return x.index_select(0, src)

    @staticmethod
    def backward(ctx, grad):
        (inverse,) = ctx.saved_tensors
        return _sum_slots(grad, inverse, ctx.k, ctx.fused), None, None, None, None


class _SumSlots(torch.autograd.Function):
    """out[t] = sum of the k rows of y that hold token t's expert outputs (inverse gathers them
    in token order). Backward: each row gets its token's gradient (gather by src)."""

    @staticmethod
    def forward(ctx, y, src, inverse, k, fused):
        ctx.save_for_backward(src)
        return _sum_slots(y, inverse, k, fused)

    @staticmethod
    def backward(ctx, grad):
        (src,) = ctx.saved_tensors
        return grad.index_select(0, src), None, None, None, None


class LocalDispatch:
    """Group the N*k (token, expert) slots by expert with a stable sort on the GPU. `fused`: sum
    each token's k slots with the Triton kernel (un-permutation forward, permutation backward)."""

    def __init__(self, indices: torch.Tensor, num_experts: int, fused: bool = False):
        n, self.k = indices.shape
        self.fused = fused
        flat = indices.reshape(-1)
        order = torch.argsort(flat, stable=True)
        self.src = order // self.k  # token of each grouped row
        self.order = order
        self.inverse = torch.empty_like(order)
        self.inverse[order] = torch.arange(order.numel(), device=order.device)
        self.tokens_per_expert = torch.zeros(num_experts, dtype=torch.int64, device=flat.device)
        self.tokens_per_expert.scatter_add_(0, flat, torch.ones_like(flat))

    def permute(self, x: torch.Tensor, weights: torch.Tensor):
        rows = _GatherRows.apply(x, self.src, self.inverse, self.k, self.fused)
        return rows, weights.reshape(-1).index_select(0, self.order)

    def unpermute(self, y: torch.Tensor) -> torch.Tensor:
        return _SumSlots.apply(y, self.src, self.inverse, self.k, self.fused)


# --- experts -----------------------------------------------------------------------------------


class ExpertWeight(torch.nn.Module):
    """A stacked expert weight [experts, out, in], as a module so that its name is
    `linear_fc1.weight` / `linear_fc2.weight` (the contract the bridge maps to)."""

    def __init__(self, experts: int, out_features: int, in_features: int, config, init_method):
        super().__init__()
        self.weight = torch.nn.Parameter(
            torch.empty(
                experts,
                out_features,
                in_features,
                dtype=config.params_dtype,
                device=torch.cuda.current_device(),
            )
        )
        if config.perform_initialization:
            with torch.no_grad():
                for e in range(experts):
                    init_method(self.weight[e])
        # megatron's marker for expert parameters: DDP and the distributed optimizer reduce and
        # shard them over the expert-data-parallel group
        self.weight.allreduce = False


def grouped_mm_usable(x: torch.Tensor) -> bool:
    return x.is_cuda and hasattr(torch, "_grouped_mm")


def _offsets(tokens_per_expert: torch.Tensor, device) -> torch.Tensor:
    return torch.cumsum(tokens_per_expert.to(device, non_blocking=True), 0, dtype=torch.int32)


def grouped_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    tokens_per_expert: torch.Tensor,
    offsets: torch.Tensor | None = None,
    fuse_wgrad=False,
) -> torch.Tensor:
    """y[rows of expert e] = x[rows of e] @ weight[e].T for x grouped by expert.

    With `offsets` (the cumulative row counts, on the device): one torch._grouped_mm (GPU).
    `fuse_wgrad`: True or an `expert_wgrad.ExpertWgrad` (which may defer over micro-batches)
    adds the weight gradient straight into megatron DDP's fp32 main_grad (GPU, grouped path).
    Without: a loop over experts (one host sync for the counts). The CPU tests take the loop:
    `_grouped_mm`'s CPU backward fails on expanded gradients in torch 2.13, and the reference
    comparisons need fp32."""
    if offsets is not None:
        if fuse_wgrad is True:
            from remote_runtime.model.expert_wgrad import ExpertWgrad

            fuse_wgrad = ExpertWgrad()
        return _GroupedLinear.apply(x, weight, offsets, fuse_wgrad or None)
    counts = tokens_per_expert.tolist()
    parts = [p @ w.t() for p, w in zip(torch.split(x, counts), weight)]
    # every expert takes part in the graph, so each gets a (possibly zero) gradient
    return torch.cat(parts) if parts else x.new_empty(0, weight.shape[1])


def _accumulates_into_main_grad(weight: torch.Tensor) -> bool:
    main_grad = getattr(weight, "main_grad", None)
    return (
        main_grad is not None
        and main_grad.dtype == torch.float32
        and hasattr(weight, "grad_added_to_main_grad")
    )


class _GroupedLinear(torch.autograd.Function):
    """y = x @ weight[e].T per expert group (torch._grouped_mm). The weight gradient comes out
    in the parameter's own [E, out, in] layout (autograd's would be the transposed view, which
    the gradient accumulation copies), or with `fuse_wgrad` straight into megatron DDP's fp32
    main_grad by a Triton grouped GEMM that accumulates in place (`wgrad`: an
    expert_wgrad.ExpertWgrad, which may keep the rows for a later micro-batch's launch)."""

    @staticmethod
    def forward(ctx, x, weight, offsets, wgrad):
        ctx.save_for_backward(x, weight, offsets)
        ctx.wgrad = wgrad
        return torch._grouped_mm(x, weight.transpose(1, 2), offs=offsets)

    @staticmethod
    def backward(ctx, dy):
        x, weight, offsets = ctx.saved_tensors
        dy = dy.contiguous()
        dx = torch._grouped_mm(dy, weight, offs=offsets) if ctx.needs_input_grad[0] else None
        if not ctx.needs_input_grad[1]:  # a frozen weight (LoRA): no weight-gradient GEMM
            dw = None
        elif ctx.wgrad is not None and _accumulates_into_main_grad(weight):
            ctx.wgrad.add(weight.main_grad, dy, x, offsets)
            weight.grad_added_to_main_grad = True
            dw = torch.empty_like(weight)  # a placeholder: DDP's hook skips its add
        else:
            dw = torch._grouped_mm(dy.t(), x, offs=offsets)
        return dx, dw, None, None


class GroupedExperts(torch.nn.Module):
    """All local experts of one MoE layer (megatron's experts interface:
    forward(permuted tokens, tokens_per_expert, permuted probs) -> (output, None))."""

    def __init__(
        self,
        num_local_experts: int,
        config,
        pg_collection=None,
        activation="eager",
        grouped: bool = True,
        fuse_wgrad: bool = True,
        wgrad_deferral=None,
        **_unused,
    ):
        super().__init__()
        if not config.gated_linear_unit or config.activation_func is not F.silu:
            raise ValueError("GroupedExperts implements SwiGLU experts (gated silu) only")
        if config.add_bias_linear:
            raise ValueError("GroupedExperts has no biases (add_bias_linear must be False)")
        self.config = config
        self.num_local_experts = num_local_experts
        etp = pg_collection.expt_tp.size() if pg_collection is not None else 1
        ffn = config.moe_ffn_hidden_size
        if ffn % etp:
            raise ValueError(f"moe_ffn_hidden_size {ffn} is not divisible by expert TP {etp}")
        h = config.hidden_size
        self.linear_fc1 = ExpertWeight(
            num_local_experts, 2 * ffn // etp, h, config, config.init_method
        )
        self.linear_fc2 = ExpertWeight(
            num_local_experts, h, ffn // etp, config, config.output_layer_init_method
        )
        self.activation = activation
        self.grouped = grouped  # moe_grouped_gemm: one grouped GEMM, else a loop over experts
        # weight gradients accumulated into DDP's fp32 main_grad by a Triton kernel (GPU)
        self.fuse_wgrad = fuse_wgrad and activation == "triton"
        # expert_wgrad.WgradDeferral shared by the model's MoE layers (None: add every
        # micro-batch's gradient at once)
        self.wgrad_deferral = wgrad_deferral
        self._wgrad = None
        if self.fuse_wgrad:
            from remote_runtime.model.expert_wgrad import ExpertWgrad

            self._wgrad = (ExpertWgrad(wgrad_deferral), ExpertWgrad(wgrad_deferral))

    def _weighted_swiglu(self, y: torch.Tensor, probs: torch.Tensor) -> torch.Tensor:
        """SwiGLU times each row's router weight, the weight in the activations' dtype as
        transformers multiplies it (the Triton kernel does both in one pass)."""
        if self.activation == "triton" and y.is_cuda:
            from remote_runtime.model.ops import swiglu

            return swiglu(y, probs)
        gate, up = y.chunk(2, dim=-1)
        return F.silu(gate) * up * probs.unsqueeze(-1).to(y.dtype)

    def forward(self, x: torch.Tensor, tokens_per_expert: torch.Tensor, probs: torch.Tensor):
        grouped = self.grouped and grouped_mm_usable(x)
        offsets = _offsets(tokens_per_expert, x.device) if grouped else None
        fc1, fc2 = self.linear_fc1, self.linear_fc2
        wgrad1, wgrad2 = self._wgrad or (False, False)
        h = grouped_linear(x, fc1.weight, tokens_per_expert, offsets, wgrad1)
        if hasattr(fc1, "lora"):  # LoRA adapters per expert (remote_runtime/model/lora.py)
            h = fc1.lora.add_grouped(x, h, tokens_per_expert, offsets)
        a = self._weighted_swiglu(h, probs)
        y = grouped_linear(a, fc2.weight, tokens_per_expert, offsets, wgrad2)
        if hasattr(fc2, "lora"):
            y = fc2.lora.add_grouped(a, y, tokens_per_expert, offsets)
        return y, None

    def backward_dw(self):  # megatron's delayed weight-gradient hook (not used here)
        pass


# --- router ------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=None)
def _router_class():
    from megatron.core.transformer.moe.router import Router

    class SoftmaxTopKRouter(Router):
        """transformers' Qwen-MoE router on megatron's Router base (weight `router.weight`
        [E, H], computed in `moe_router_dtype`)."""

        def __init__(self, config, pg_collection=None):
            from megatron.core.transformer.moe.moe_utils import get_default_pg_collection

            super().__init__(config, pg_collection or get_default_pg_collection())
            if config.moe_router_score_function != "softmax":
                raise ValueError("SoftmaxTopKRouter implements moe_router_score_function=softmax")
            self.topk = config.moe_router_topk
            self.renormalise = not config.moe_router_pre_softmax

        def gating(self, x: torch.Tensor) -> torch.Tensor:
            """Router logits in `moe_router_dtype` (megatron's own gating needs
            transformer-engine in 0.16)."""
            dtype = {"fp32": torch.float32, "fp64": torch.float64}.get(
                self.config.moe_router_dtype, x.dtype
            )
            return F.linear(x.to(dtype), self.weight.to(dtype))

        def routing(self, logits: torch.Tensor):
            """(top-k weights [N, k] fp32, expert indices [N, k], all probs [N, E] fp32)."""
            probs = torch.softmax(logits.float(), dim=-1)
            weights, indices = torch.topk(probs, self.topk, dim=-1)
            if self.renormalise:
                weights = weights / weights.sum(dim=-1, keepdim=True)
            return weights, indices, probs

        def route(self, hidden: torch.Tensor):
            """(weights [N, k], indices [N, k]) with the aux-loss statistics recorded."""
            logits = self.gating(hidden.reshape(-1, self.config.hidden_size))
            weights, indices, probs = self.routing(logits)
            counts = torch.zeros(self.num_experts, dtype=torch.float32, device=probs.device)
            counts.scatter_add_(
                0, indices.reshape(-1), torch.ones(indices.numel(), device=probs.device)
            )
            group = self.tp_group if self.config.sequence_parallel else None
            weights = moe_aux.attach(
                weights,
                probs,
                counts,
                self.layer_number or 0,
                self.config.moe_aux_loss_coeff or 0.0,
                group,
            )
            return weights, indices

        def forward(self, hidden: torch.Tensor, padding_mask=None):
            """megatron's interface: (probs [N, E] zero outside the top-k, routing_map [N, E])."""
            weights, indices = self.route(hidden)
            probs = torch.zeros(
                indices.shape[0], self.num_experts, dtype=weights.dtype, device=weights.device
            ).scatter(1, indices, weights)
            routing_map = torch.zeros_like(probs, dtype=torch.bool).scatter(1, indices, True)
            cf = self.config.moe_expert_capacity_factor
            if cf is not None:
                from megatron.core.transformer.moe.moe_utils import apply_router_token_dropping

                probs, routing_map = apply_router_token_dropping(
                    probs,
                    routing_map,
                    router_topk=self.topk,
                    capacity_factor=cf,
                    drop_policy=self.config.moe_token_drop_policy,
                    pad_to_capacity=self.config.moe_pad_expert_input_to_capacity,
                )
            return probs, routing_map

    return SoftmaxTopKRouter


def SoftmaxTopKRouter(*args, **kwargs):  # noqa: N802 (a class, built lazily: no megatron at import)
    return _router_class()(*args, **kwargs)


# --- the MoE layer -----------------------------------------------------------------------------


@functools.lru_cache(maxsize=None)
def _layer_class():
    from megatron.core.transformer.moe.moe_layer import MoELayer

    class GroupedMoELayer(MoELayer):
        """megatron's MoELayer; tokens stay on the rank when no expert lives elsewhere."""

        def __init__(self, config, submodules=None, layer_number=None, pg_collection=None):
            super().__init__(config, submodules, layer_number, pg_collection)
            self.local = (
                self.ep_group.size() == 1
                and self.token_dispatcher.tp_size == 1
                and config.moe_expert_capacity_factor is None
            )

        def forward(self, hidden_states, intermediate_tensors=None, padding_mask=None):
            if not self.local or self.moe_layer_recompute or intermediate_tensors is not None:
                return super().forward(hidden_states, intermediate_tensors, padding_mask)
            shape = hidden_states.shape
            shared = self.shared_experts_compute(hidden_states)
            weights, indices = self.router.route(hidden_states)
            fused = getattr(self.experts, "activation", None) == "triton"  # the runtime's kernels
            dispatch = LocalDispatch(indices, self.config.num_moe_experts, fused)
            rows, row_probs = dispatch.permute(hidden_states.reshape(-1, shape[-1]), weights)
            out, _ = self.experts(rows, dispatch.tokens_per_expert, row_probs)
            out = dispatch.unpermute(out).view(shape)
            if shared is not None:
                out = out + shared
            return out, None

    return GroupedMoELayer


def GroupedMoELayer(*args, **kwargs):  # noqa: N802
    return _layer_class()(*args, **kwargs)


class _KnownMoELayer(logging.Filter):
    """megatron's TransformerLayer warns 'Unknown MLP type' for any MLP module outside its own
    list, so for our MoELayer subclass; it builds it right (the default process groups)."""

    def filter(self, record):
        return "Unknown MLP type" not in record.getMessage()


def moe_spec(
    config,
    activation: str,
    shared_activation=None,
    grouped: bool = True,
    fuse_wgrad: bool = True,
    wgrad_deferral=None,
):
    """The MoE `mlp` ModuleSpec: our layer, router and experts; megatron's SharedExpertMLP
    (Qwen2-MoE) on the local linear layers with the dense MLP's activation module."""
    from megatron.core.tensor_parallel.layers import ColumnParallelLinear, RowParallelLinear
    from megatron.core.transformer.mlp import MLPSubmodules
    from megatron.core.transformer.moe.moe_layer import MoESubmodules
    from megatron.core.transformer.moe.shared_experts import SharedExpertMLP
    from megatron.core.transformer.spec_utils import ModuleSpec

    logger = logging.getLogger("megatron.core.transformer.transformer_layer")
    if not any(isinstance(f, _KnownMoELayer) for f in logger.filters):
        logger.addFilter(_KnownMoELayer())
    shared = ModuleSpec(
        module=SharedExpertMLP,
        submodules=MLPSubmodules(
            linear_fc1=ColumnParallelLinear,
            linear_fc2=RowParallelLinear,
            activation_func=shared_activation,
        ),
    )
    experts = ModuleSpec(
        module=GroupedExperts,
        params={
            "activation": activation,
            "grouped": grouped,
            "fuse_wgrad": fuse_wgrad,
            "wgrad_deferral": wgrad_deferral,
        },
    )
    return ModuleSpec(
        module=_layer_class(),
        submodules=MoESubmodules(experts=experts, shared_experts=shared, router=_router_class()),
        metainfo={"fuse_pre_mlp_layernorm": False},
    )


def moe_layer_pattern(config) -> list[bool]:
    """Which of the model's layers are MoE (megatron's moe_layer_freq: int or 0/1 list)."""
    freq = config.moe_layer_freq
    if isinstance(freq, int):
        return [i % freq == 0 for i in range(config.num_layers)]
    if len(freq) != config.num_layers:
        raise ValueError(f"moe_layer_freq has {len(freq)} entries for {config.num_layers} layers")
    return [bool(f) for f in freq]
