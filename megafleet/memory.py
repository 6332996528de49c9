"""Peak GPU memory of one training rank, from the model's shape and the job's parallel settings.

A bottom-up count of what megatron-core and our runtime keep on the GPU, per pipeline stage:

* static: bf16 weights, the DDP gradient buffer (fp32 with grad_reduce_in_fp32), fp32 master
  weights and Adam moments (12 bytes per parameter, 8 with bf16 moments; sharded over data
  parallel ranks by the distributed optimizer), sequence-parallel all-gather buffer;
* backward peak: the activations autograd saves for every microbatch in flight (1F1B: up to
  PP - stage on a stage), plus the largest transient: the logits and cross-entropy buffers on
  the last stage (the logits: vocab × tokens × 2 bytes with the runtime's Triton loss, 10 with
  megatron's, which keeps fp32 softmax and gradient copies) or the backward
  working set of one layer (plus the layers replayed by full recompute);
* optimizer-step peak: static plus the optimizer's temporaries (activations are freed by then).

With `lora` (LoRA training) the base weights stay but gradients, master weights and optimizer
states are the adapters' only; activations are the same (the adapters keep the inputs the
frozen layers no longer need for weight gradients, plus their rank-r outputs, negligible). On a
MoE model every routed expert has its own adapters, split by EP and expert TP and sharded by the
expert-data-parallel ranks like the experts (Qwen3-30B-A3B, r=16 on all linear layers: 844M).

Mixture-of-experts layers (`ModelShape.num_experts`): the routed experts' weights and gradients
are split over expert parallelism (EP ranks hold num_experts / EP experts each, expert-TP splits
each expert's FFN) and their optimizer states over the expert-data-parallel ranks
(world / (EP × expert-TP × PP)), the rest (attention, router, shared expert, embeddings) as for a
dense model. Activations: every token goes to top-k experts, so a rank keeps, per token, k × the
expert-TP / TP share of (the permuted input, the fc1 output its SwiGLU saves and the fc2 input;
the eager SwiGLU also keeps its output for the routing-weight gradient, which the fused kernel
recomputes), the router's fp32 logits and
probabilities, and the shared expert's activations like a dense MLP's; the all-to-all dispatch
and combine buffers (k copies of the layer's tokens, sent and received) join the transient peak.

Activations follow Korthikanti et al. ("Reducing Activation Recomputation in Large Transformer
Models") tensor by tensor, adapted to this model and runtime: SwiGLU MLP, grouped-query
attention, no dropout (p=0 stores no masks), SDPA/flash attention that keeps q, k, v, the output
and a log-sum-exp instead of the s×s score matrix, RMSNorm as the runtime implements it, RoPE's
cos/sin tables. `Assumptions` names every implementation detail the numbers depend on;
tests/runtime/test_memory_saved_tensors.py checks the per-layer terms against the bytes the real
model saves for backward (autograd's saved-tensor hooks).

Units: GiB (2**30 bytes) everywhere; `--gpu-mem 80` means 80 GiB. Torch-free.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

from megafleet.model_shape import ModelShape, as_shape
from remote_runtime.spec.resolve import padded_vocab_size

GIB = float(1 << 30)
STATIC = ("weights", "gradients", "optimizer_states", "comm_buffers")


@dataclass(frozen=True)
class Parallel:
    tp: int = 1  # tensor_model_parallel_size
    pp: int = 1  # pipeline_model_parallel_size
    dp: int = 1  # data parallel size (world / (tp·pp·cp))
    cp: int = 1  # context_parallel_size
    sequence_parallel: bool = False  # only meaningful with tp > 1
    distributed_optimizer: bool = True
    ep: int = 1  # expert_model_parallel_size (MoE)
    etp: int = 1  # expert_tensor_parallel_size (MoE)

    @property
    def world_size(self) -> int:
        return self.tp * self.pp * self.dp * self.cp

    @property
    def expert_dp(self) -> int:
        """Expert-data-parallel size: the ranks that hold the same experts (megatron-core)."""
        return max(1, self.tp * self.cp * self.dp // (self.ep * self.etp))


@dataclass(frozen=True)
class Recompute:
    granularity: str = "none"  # none | selective (core attention) | full
    method: str | None = None  # full only: uniform | block
    num_layers: int | None = None  # full: layers per checkpoint (uniform) / recomputed (block)

    def checkpointed_layers(self, stage_layers: int) -> int:
        """How many of a stage's layers are recomputed in backward."""
        if self.granularity != "full":
            return 0
        if (self.method or "uniform") == "block":
            return min(self.num_layers or 1, stage_layers)
        return stage_layers


@dataclass(frozen=True)
class Lora:
    """LoRA training (`train_type: lora`): the base is frozen in bf16 (no gradient buffer, no
    master copy, no optimizer state); adapters of `rank` on `targets` are trained."""

    rank: int = 16
    targets: tuple[str, ...] = (
        "q_proj",
        "k_proj",
        "v_proj",
        "o_proj",
        "gate_proj",
        "up_proj",
        "down_proj",
    )


def _lora_params(lora: Lora, s: ModelShape, tp: int, attention: bool, ffn: int) -> int:
    """r × (in + out) per target module of the attention (if `attention`) and a SwiGLU MLP of
    FFN `ffn` (0: none), split by `tp`: the output side for column-parallel modules, the input
    side for row-parallel ones."""
    h, d = s.hidden_size, s.kv_channels
    q, kv = s.num_attention_heads * d, s.num_query_groups * d
    column, row = {}, {}
    if attention:
        column.update(q_proj=(h, q), k_proj=(h, kv), v_proj=(h, kv))
        row.update(o_proj=(q, h))
    if ffn:
        column.update(gate_proj=(h, ffn), up_proj=(h, ffn))
        row.update(down_proj=(ffn, h))
    total = 0
    for name in lora.targets:
        if name in column:
            total += column[name][0] + column[name][1] // tp
        elif name in row:
            total += row[name][0] // tp + row[name][1]
    return lora.rank * total


def lora_layer_param_split(
    s: ModelShape, lora: Lora, tp: int = 1, ep: int = 1, etp: int = 1
) -> tuple[int, int]:
    """(adapter parameters of one layer on one rank outside the routed experts, those of its
    routed experts): attention and the dense MLP or shared expert split by TP; on a MoE layer
    gate/up/down of each of this EP rank's num_experts / EP experts, split by expert TP."""
    if not s.is_moe:
        return _lora_params(lora, s, tp, True, s.ffn_hidden_size), 0
    dense = _lora_params(lora, s, tp, True, s.shared_expert_ffn_hidden_size)
    per_expert = _lora_params(lora, s, etp, False, s.moe_ffn_hidden_size)
    return dense, per_expert * (s.num_experts // ep)


def lora_layer_params(s: ModelShape, lora: Lora, tp: int = 1) -> int:
    """Adapter parameters of one layer on one TP rank (all its experts on a MoE layer)."""
    return sum(lora_layer_param_split(s, lora, tp))


@dataclass(frozen=True)
class Assumptions:
    """The runtime details the estimate depends on (each checked against megatron-core 0.16 and
    the runtime's model code; the training loop's choices are marked as expected)."""

    params_dtype_bytes: int = 2  # bf16 weights and activations (4 for float32 jobs)
    # Expected: the training loop's DDP config sets grad_reduce_in_fp32=True as Megatron-LM does
    # for bf16 (fp32 gradient buffer, 4 bytes per parameter); megatron-core's own default is False.
    grad_reduce_in_fp32: bool = True
    # Expected "fused": TE/apex FusedAdam or torch AdamW(fused=True), no temporaries. "foreach":
    # torch's default AdamW, which megatron-core 0.16 builds when TE and apex are missing: one
    # fp32 temporary per parameter of the shard (sqrt of the second moment) during the step.
    optimizer_impl: str = "fused"
    # Adam's moments, bytes per element each: 4 (fp32, the default) or 2 (bf16: megatron's
    # use_precision_aware_optimizer with exp_avg_dtype / exp_avg_sq_dtype bf16).
    exp_avg_bytes: int = 4
    exp_avg_sq_bytes: int = 4
    # "fused" (GPU: the runtime's Triton or compiled RMSNorm): saves only its input (2
    # bytes/element); "eager" (CPU): an fp32 copy of the input plus the bf16 normalised value (6).
    norm_impl: str = "fused"
    # q/k norms (Qwen3): "fused" = the runtime's one Triton kernel for q/k norm + RoPE + split
    # (GPU), which saves the fused QKV output (q + 2 kv); "separate" = each norm saves its input.
    qk_impl: str = "fused"
    # Cross entropy: "auto" = the runtime's Triton loss where it uses it (TP = 1: bf16 logits
    # only, their gradient written over them) and megatron's fused one elsewhere ("megatron":
    # bf16 logits, an fp32 softmax kept for backward and an fp32 gradient, 10 bytes/element).
    loss_impl: str = "auto"
    # "fused": megatron's SwiGLU kernel saves its input (2f elements; used on GPU when
    # torch.compile works); "eager": the fc1 output (kept by a view), silu's output and the
    # `x_linear + glu_linear_offset` copy (4f elements).
    swiglu_impl: str = "fused"
    # "packed": THD batches through varlen flash attention (v copied contiguous, fused QKV output
    # freed); "padded": [s, b] batches through SDPA, whose saved v view keeps the QKV output alive.
    attention_layout: str = "packed"
    cuda_context_gib: float = 0.75  # CUDA context, kernels, cuBLAS handles: outside the allocator
    nccl_gib_per_group: float = 0.5  # NCCL buffers per parallel dimension in use (tp, pp, dp)
    # Caching-allocator blocks reserved but not in use, as a fraction of what is allocated and
    # freed during a step (activations, transients). The static buffers are allocated once, whole.
    fragmentation: float = 0.10

    def __post_init__(self):
        for name, allowed in _CHOICES.items():
            if getattr(self, name) not in allowed:
                raise ValueError(
                    f"{name}={getattr(self, name)!r} is not one of: {', '.join(map(str, allowed))}"
                )


_CHOICES = {
    "params_dtype_bytes": (2, 4),
    "optimizer_impl": ("fused", "foreach"),
    "exp_avg_bytes": (2, 4),
    "exp_avg_sq_bytes": (2, 4),
    "norm_impl": ("eager", "fused"),
    "swiglu_impl": ("fused", "eager"),
    "attention_layout": ("packed", "padded"),
    "qk_impl": ("fused", "separate"),
    "loss_impl": ("auto", "triton", "megatron"),
}


@dataclass
class MemoryEstimate:
    """Per-GPU memory of the worst pipeline stage, in GiB."""

    components: dict[str, float]  # what is allocated at the peak; sums to allocated_gib
    allocated_gib: float  # comparable to torch.cuda.max_memory_allocated()
    overhead: dict[str, float]  # outside the tensors: CUDA context, NCCL, fragmentation
    total_gib: float  # allocated + overhead: compare with the GPU's memory
    peak_phase: str  # "backward" or "optimizer step"
    phases: dict[str, float]  # allocated GiB at the peak of each phase
    stage: int  # the pipeline stage with the largest peak
    params_per_gpu: int  # parameters held by that stage's rank (padded vocabulary)
    tokens_per_microbatch: int
    stages: list[dict] = field(default_factory=list)  # allocated GiB per stage

    def to_dict(self) -> dict:
        """Plain JSON values, GiB rounded to MiB precision."""
        return _rounded(asdict(self))


def _rounded(value):
    if isinstance(value, float):
        return round(value, 4)
    if isinstance(value, dict):
        return {k: _rounded(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_rounded(v) for v in value]
    return value


@dataclass(frozen=True)
class _Sizes:
    """Bytes per token of one layer's saved activations, by recompute mode."""

    layer: float  # no recompute
    layer_selective: float  # core attention recomputed
    checkpoint: float  # full recompute: the checkpointed chunk's input
    norm: float  # one norm's saved bytes per element
    hs: float  # elements per token in the norm/residual region (h, or h/tp with SP)


def _layer_sizes(s: ModelShape, par: Parallel, asm: Assumptions) -> _Sizes:
    e, t = asm.params_dtype_bytes, par.tp
    hs = s.hidden_size / t if (par.sequence_parallel and t > 1) else s.hidden_size
    norm = (4 + e if e < 4 else 2 * e) if asm.norm_impl == "eager" else e
    q = e * s.num_attention_heads * s.kv_channels / t
    kv = e * s.num_query_groups * s.kv_channels / t  # k or v
    lse = 4 * s.num_attention_heads / t
    qkv_out = q + 2 * kv
    kept_v = kv if asm.attention_layout == "packed" else qkv_out  # copy of v, or the whole QKV
    attn = q + kv + kept_v + q + lse  # q, k (after RoPE), v, output (= linear_proj input), lse
    attn_selective = q + kv + qkv_out + q  # checkpoint keeps q, k and the v view; output kept
    qk_norm = 0.0
    if s.qk_layernorm:
        qk_norm = (q + 2 * kv) if asm.qk_impl == "fused" else norm * (q + kv) / e
    f = (s.shared_expert_ffn_hidden_size if s.is_moe else s.ffn_hidden_size) / t
    mlp = (2 * e * f if asm.swiglu_impl == "fused" else 4 * e * f) + e * f  # + fc2 input
    if s.is_moe:
        mlp += _routed_bytes_per_token(s, par, asm)
    if s.has_dense_layers:  # dense-MLP layers among the MoE layers: count the larger kind
        f = s.ffn_hidden_size / t
        mlp = max(mlp, (2 * e * f if asm.swiglu_impl == "fused" else 4 * e * f) + e * f)
    norms_and_inputs = 2 * norm * hs + 2 * e * hs  # two norms, QKV and fc1 inputs
    rope = 4 * e * s.kv_channels  # cos and sin, made per call for q and for k, [s, 1, 1, d] each
    base = norms_and_inputs + qk_norm + mlp + rope
    return _Sizes(
        layer=base + attn,
        layer_selective=base + attn_selective,
        checkpoint=e * hs,
        norm=norm,
        hs=hs,
    )


def _routed_bytes_per_token(s: ModelShape, par: Parallel, asm: Assumptions) -> float:
    """What a MoE layer's router and routed experts keep per token of the microbatch."""
    e, fm = asm.params_dtype_bytes, s.moe_ffn_hidden_size / par.etp
    copies = s.moe_router_topk * par.etp / par.tp  # token copies this rank's experts process
    # fused: the Triton SwiGLU x router weight keeps only the fc1 output; eager: the SwiGLU's
    # own tensors and its output again (the router weight's gradient needs it)
    swiglu = 2 * e * fm if asm.swiglu_impl == "fused" else 5 * e * fm
    per_copy = e * s.hidden_size + swiglu + e * fm  # permuted input, SwiGLU, fc2 input
    router = 8 * s.num_experts / par.tp  # fp32 logits and probabilities
    return copies * per_copy + router


def _all_to_all_bytes(s: ModelShape, par: Parallel, asm: Assumptions, tokens: int) -> float:
    """Dispatch/combine buffers of one MoE layer: k copies of its tokens, sent and received."""
    if not s.is_moe:
        return 0.0
    copies = tokens * s.moe_router_topk * par.etp / par.tp
    return 2 * asm.params_dtype_bytes * s.hidden_size * copies


def activation_bytes_per_token(
    shape: ModelShape, parallel: Parallel, assumptions: Assumptions = Assumptions()
) -> dict[str, float]:
    """Bytes one layer keeps for backward per token (of one TP rank), by recompute mode:
    `layer` (none), `layer_selective` (core attention recomputed), `checkpoint` (full)."""
    sz = _layer_sizes(shape, parallel, assumptions)
    return {"layer": sz.layer, "layer_selective": sz.layer_selective, "checkpoint": sz.checkpoint}


def _stage_params(s: ModelShape, par: Parallel, stage: int) -> int:
    return sum(_stage_param_split(s, par, stage))


def _stage_param_split(s: ModelShape, par: Parallel, stage: int) -> tuple[int, int]:
    """(parameters outside the routed experts, routed expert parameters) on one rank: the
    experts split by EP and expert-TP, the rest as ModelShape.layer_param_groups says."""
    count = s.num_layers // par.pp
    groups = s.layers_param_groups(stage * count, count)  # each layer by its kind (MoE / dense)
    params = groups["tp_split"] // par.tp + groups["replicated"]
    experts = groups["experts"] // (par.ep * par.etp)
    h = s.hidden_size
    vocab_shard = padded_vocab_size(s.vocab_size, par.tp) * h // par.tp
    if stage == 0:
        params += vocab_shard
    if stage == par.pp - 1:
        params += h  # final norm
        if not (s.tie_word_embeddings and par.pp == 1):  # tied + PP: the last stage keeps a copy
            params += vocab_shard
    return params, experts


def _saved_per_token(
    s: ModelShape, sz: _Sizes, rc: Recompute, stage: int, pp: int, e: int
) -> tuple[float, int]:
    """(bytes saved per token of one microbatch on this stage, layers replayed at the peak)."""
    layers = s.num_layers // pp
    recomputed = rc.checkpointed_layers(layers)
    if rc.granularity == "full" and (rc.method or "uniform") == "uniform":
        # Backward replays the top chunk while every chunk's checkpoint is still held.
        per_token = math.ceil(layers / (rc.num_layers or 1)) * sz.checkpoint
        replay = min(rc.num_layers or 1, layers)
    elif rc.granularity == "full":
        # Block: the peak is at the start of backward, with the layers that are not recomputed
        # all held; by the time the recomputed (first) layers replay, those are freed.
        per_token = recomputed * sz.checkpoint + (layers - recomputed) * sz.layer
        replay = 1 if recomputed == layers else 0
    else:
        per_token = layers * (sz.layer_selective if rc.granularity == "selective" else sz.layer)
        replay = 0
    if stage == pp - 1:
        per_token += sz.norm * sz.hs + e * sz.hs  # final norm, output layer input
    if stage > 0:
        per_token += e * sz.hs  # the received stage input, kept by the schedule for backward
    return per_token, replay


def _stage_bytes(
    s: ModelShape,
    par: Parallel,
    rc: Recompute,
    asm: Assumptions,
    stage: int,
    tokens: int,
    microbatches: int,
    lora: Lora | None = None,
) -> dict[str, dict[str, float]]:
    """{"backward": {component: bytes}, "optimizer step": {...}} for one stage's rank."""
    e, t, pp = asm.params_dtype_bytes, par.tp, par.pp
    sz = _layer_sizes(s, par, asm)
    dense, experts = _stage_param_split(s, par, stage)
    params = dense + experts
    trained = params  # with LoRA: the adapters only, the base frozen
    shard = par.dp * par.cp if par.distributed_optimizer else 1
    expert_shard = par.expert_dp if par.distributed_optimizer else 1
    sharded = dense / shard + experts / expert_shard  # what this rank's optimizer holds
    if lora is not None:  # expert adapters split and sharded like the experts
        lora_dense, lora_experts = lora_layer_param_split(s, lora, t, par.ep, par.etp)
        trained = (s.num_layers // pp) * (lora_dense + lora_experts)
        sharded = (s.num_layers // pp) * (lora_dense / shard + lora_experts / expert_shard)
    master = 4 if e < 4 else 0
    grad_bytes = 4 if (asm.grad_reduce_in_fp32 or e == 4) else e
    static = {
        "weights": e * (params + (trained if lora is not None else 0)),
        "gradients": grad_bytes * trained,
        "optimizer_states": (master + asm.exp_avg_bytes + asm.exp_avg_sq_bytes) * sharded,
        "comm_buffers": e * tokens * s.hidden_size if (par.sequence_parallel and t > 1) else 0.0,
    }
    per_token, replay = _saved_per_token(s, sz, rc, stage, pp, e)
    in_flight = min(pp - stage, microbatches)
    last = stage == pp - 1
    vocab = padded_vocab_size(s.vocab_size, t) / t
    working = tokens * sz.layer * (1 + replay)  # one layer's gradient temporaries + replayed layers
    working += _all_to_all_bytes(s, par, asm, tokens)
    if last and s.tie_word_embeddings and pp == 1 and lora is None:
        working += e * vocab * s.hidden_size  # output-layer gradient held until the embedding's
    logits = 0.0
    triton_loss = asm.loss_impl == "triton" or (asm.loss_impl == "auto" and t == 1)
    if last and triton_loss:  # bf16 logits; their gradient overwrites them
        logits = e * tokens * vocab
    elif last:  # bf16 logits, fp32 softmax and fp32 gradient; then logits grad + weight grad
        logits = max(tokens * vocab * (e + 8), e * vocab * (tokens + s.hidden_size))
    backward = dict(
        static,
        activations=in_flight * tokens * per_token,
        logits_and_loss=logits if logits >= working else 0.0,
        backward_working_set=working if working > logits else 0.0,
    )
    step_temp = 0.0
    if master and grad_bytes < 4:
        step_temp += 4 * sharded  # the optimizer's fp32 copy of the bf16 gradient shard
    if asm.optimizer_impl == "foreach":
        step_temp += 4 * sharded
    step = dict(static, optimizer_step_temporaries=step_temp)
    return {"backward": backward, "optimizer step": step, "params": params}


def estimate_memory(
    model_config: dict | ModelShape,
    parallel: Parallel,
    seq_len: int,
    micro_batch_size: int = 1,
    recompute: Recompute = Recompute(),
    num_microbatches: int | None = None,
    assumptions: Assumptions = Assumptions(),
    lora: Lora | None = None,
) -> MemoryEstimate:
    """Peak memory per GPU of a training job. `model_config` is config.json (dict) or a shape.

    num_microbatches (per optimizer step and data-parallel rank) bounds how many microbatches a
    pipeline stage holds; by default the pipeline is assumed full (PP in flight on stage 0).
    """
    shape = as_shape(model_config)
    tokens = micro_batch_size * seq_len // parallel.cp
    microbatches = num_microbatches or parallel.pp
    per_stage = []
    for stage in range(parallel.pp):
        parts = _stage_bytes(
            shape, parallel, recompute, assumptions, stage, tokens, microbatches, lora
        )
        totals = {ph: sum(parts[ph].values()) for ph in ("backward", "optimizer step")}
        per_stage.append((max(totals.values()), stage, parts, totals))
    peak, stage, parts, totals = max(per_stage, key=lambda x: (x[0], -x[1]))
    phase = max(totals, key=totals.get)
    components = {k: v / GIB for k, v in parts[phase].items() if v}
    allocated = peak / GIB
    churn = allocated - sum(components.get(k, 0.0) for k in STATIC)
    groups = sum(
        1 for n in (parallel.tp, parallel.pp, parallel.dp * parallel.cp, parallel.ep) if n > 1
    )
    overhead = {
        "cuda_context": assumptions.cuda_context_gib,
        "nccl": assumptions.nccl_gib_per_group * groups,
        "fragmentation": assumptions.fragmentation * churn,
    }
    return MemoryEstimate(
        components=components,
        allocated_gib=allocated,
        overhead=overhead,
        total_gib=allocated + sum(overhead.values()),
        peak_phase=phase,
        phases={k: v / GIB for k, v in totals.items()},
        stage=stage,
        params_per_gpu=parts["params"],
        tokens_per_microbatch=tokens,
        stages=[{"stage": st, "allocated_gib": pk / GIB} for pk, st, _, _ in per_stage],
    )
