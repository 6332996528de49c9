"""Build the megatron-core GPTModel for this rank's pipeline stage from a model family.

    chunks = build_model(family, hf_config, ModelOptions(dtype="bfloat16"), dist)

returns `[GPTModel]`: one chunk (this pipeline stage), as megatron's schedules and DDP expect a
list. Settings come from `family.transformer_config_kwargs(hf_config)` (model shape, norms, rope,
biases, tying) plus `ModelOptions` (dtype, parallelism extras, recompute, fusions, attention).
Parameters are allocated on the current device and left uninitialised unless
`init_weights=True`: the bridge fills every one of them from the checkpoint.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import importlib.util
import os
import shutil
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from remote_runtime.platform import DistInfo
from remote_runtime.spec.config import ConfigError
from remote_runtime.spec.families.base import MODEL_KEYS, ModelFamily
from remote_runtime.spec.resolve import padded_vocab_size

ACTIVATIONS = {"silu": F.silu, "gelu": F.gelu}
DTYPES = {"bfloat16": torch.bfloat16, "float32": torch.float32, "float16": torch.float16}


@dataclass
class ModelOptions:
    """Runtime choices that are not properties of the checkpoint."""

    dtype: str = "bfloat16"  # parameters and compute
    transformer_impl: str = "auto"  # auto | local | transformer_engine
    attention_backend: str = "auto"  # auto | flash | fused | unfused | local
    # packs whose documents all have one length: dense causal SDPA on this kernel (auto: by
    # attention_backend, cuDNN first on GPU) or "varlen" to treat them like any pack
    uniform_packs: str = "auto"
    sequence_parallel: bool = False
    recompute_granularity: str = "none"  # none | selective | full
    recompute_method: str | None = None  # uniform | block (full only; default uniform)
    recompute_num_layers: int | None = None  # full only; default 1
    cross_entropy_loss_fusion: bool = True  # used on GPU; on CPU torch.compile is not worth it
    # Kernels for RMSNorm, RoPE and SwiGLU in the local spec: auto (GPU: triton), triton (ours,
    # `ops.py`), compile (torch.compile'd, `compiled.py`), eager. The three switches below
    # turn single fusions off for ablations.
    kernels: str = "auto"
    fused_norm: bool = True
    fused_rope: bool = True  # through megatron's fused-RoPE hook (no TE)
    # triton: q/k norm + RoPE + q/k/v split in one kernel (self_attention.py; Qwen3's q/k norms)
    fused_qk_norm_rope: bool = True
    bias_activation_fusion: bool = True  # SwiGLU
    triton_loss: bool = True  # triton, TP=1: our cross entropy instead of megatron's fused one
    # Weight gradients accumulated in the fp32 DDP buffers by the GEMM itself (GPU; needs the
    # model wrapped in megatron DDP before any backward, as training does).
    gradient_accumulation_fusion: bool = True
    # ... and the word embedding's gradient added row by row into it (model/embedding.py; TP 1)
    fused_embedding_grad: bool = True
    init_weights: bool = False  # random init; off when a checkpoint is loaded right after
    variable_seq_lengths: bool = True  # pipeline stages exchange shapes (packed batches vary)
    extra_config: dict = field(default_factory=dict)  # further TransformerConfig fields
    # the job's MoE options (spec.config.MoEConfig; spec.experts.moe_settings turns them into
    # TransformerConfig fields for MoE models). None: the defaults.
    moe: object = None
    # MoE experts' weight gradients accumulated into the fp32 main_grad by a Triton grouped GEMM
    # (with kernels=triton) instead of a bf16 gradient that DDP's hook adds
    moe_wgrad_fusion: bool = True
    # ... and added once per this many micro-batches (model/expert_wgrad.py): an int, or auto
    # (measured in the first step: as many as half the memory it left unused holds)
    moe_wgrad_defer: int | str = "auto"

    @classmethod
    def from_job(cls, job, **overrides) -> "ModelOptions":
        """Options from a JobConfig (remote_runtime.spec.config)."""
        values = dict(
            dtype=job.model.torch_dtype,
            transformer_impl=job.model.transformer_impl,
            attention_backend=job.model.attention_backend,
            sequence_parallel=job.parallel.sequence_parallel,
            recompute_granularity=job.recompute.recompute_granularity,
            recompute_method=job.recompute.recompute_method,
            recompute_num_layers=job.recompute.recompute_num_layers,
            cross_entropy_loss_fusion=job.train.cross_entropy_loss_fusion,
            moe=job.moe,
            moe_wgrad_defer=job.moe.moe_wgrad_defer,
        )
        values.update(overrides)
        return cls(**values)


def have_transformer_engine() -> bool:
    return importlib.util.find_spec("transformer_engine") is not None


def torch_compile_usable() -> bool:
    """megatron's fused SwiGLU and cross entropy are torch.compile'd (inductor + triton), and
    triton builds its launchers with a C compiler. Without one they would fail at the first
    forward, so fuse only when both are there."""
    has_cc = any(shutil.which(c) for c in (os.environ.get("CC") or "cc", "gcc", "clang"))
    return has_cc and importlib.util.find_spec("triton") is not None


def resolve_impl(requested: str) -> str:
    if requested == "auto":
        return "transformer_engine" if have_transformer_engine() else "local"
    if requested == "transformer_engine" and not have_transformer_engine():
        raise ConfigError(
            [
                (
                    "model.transformer_impl",
                    "transformer_engine was asked for but is not "
                    "installed; use --transformer_impl local (or auto)",
                )
            ]
        )
    if requested not in ("local", "transformer_engine"):
        raise ConfigError(
            [
                (
                    "model.transformer_impl",
                    f"{requested!r} is not one of: auto, local, transformer_engine",
                )
            ]
        )
    return requested


def packed_sequences_supported(options: ModelOptions) -> bool:
    """Megatron's own unfused attention (`attention_backend local` with the local spec) cannot
    take packed (THD) batches; ours and Transformer Engine's can."""
    return options.attention_backend != "local" or resolve_impl(options.transformer_impl) != "local"


def transformer_config(tc: dict, options: ModelOptions, dist: DistInfo, kernels: str):
    """TransformerConfig from the family's kwargs (minus MODEL_KEYS), the runtime options and
    the resolved kernel family (`resolve_kernels`)."""
    from megatron.core.transformer.enums import AttnBackend
    from megatron.core.transformer.transformer_config import TransformerConfig

    known = {f.name for f in dataclasses.fields(TransformerConfig)}
    kw = {k: v for k, v in tc.items() if k not in MODEL_KEYS}
    unknown = sorted(set(kw) - known) + sorted(set(options.extra_config) - known)
    if unknown:
        raise ValueError(f"not TransformerConfig fields: {', '.join(unknown)}")
    dtype = DTYPES[options.dtype]
    fuse = compile_fusions(dist)  # megatron's own torch.compile'd kernels (cross entropy)
    rope_fusion = kernels != "eager" and options.fused_rope
    if rope_fusion:
        from remote_runtime.model.compiled import install_rope

        install_rope(kernels)
    local = resolve_impl(options.transformer_impl) == "local"
    glu = tc.get("gated_linear_unit", False) and tc["activation"] == "silu"
    # Our SwiGLU is an activation module over the whole [gate | up] output: megatron's MLP
    # builds it from the spec when use_te_activation_func is set (layer_spec does that).
    triton_swiglu = kernels == "triton" and local and glu and options.bias_activation_fusion
    grad_fusion = False
    if dist.device.type == "cuda" and options.gradient_accumulation_fusion:
        from remote_runtime.model.wgrad import install as install_wgrad

        grad_fusion = install_wgrad()
    recompute = (
        None if options.recompute_granularity in (None, "none") else options.recompute_granularity
    )
    kw.update(
        activation_func=ACTIVATIONS[tc["activation"]],
        tensor_model_parallel_size=dist.tp,
        pipeline_model_parallel_size=dist.pp,
        context_parallel_size=dist.cp,
        sequence_parallel=options.sequence_parallel and dist.tp > 1,
        params_dtype=dtype,
        pipeline_dtype=dtype,
        bf16=dtype == torch.bfloat16,
        fp16=dtype == torch.float16,
        perform_initialization=options.init_weights,
        use_cpu_initialization=False,
        gradient_accumulation_fusion=grad_fusion,
        # Fused kernels here are torch.compile'd (megatron's jit_fuser): worth it on GPU only.
        bias_activation_fusion=(
            kernels != "eager"
            and fuse
            and options.bias_activation_fusion
            and glu
            and not triton_swiglu
        ),
        use_te_activation_func=triton_swiglu,
        cross_entropy_loss_fusion=fuse and options.cross_entropy_loss_fusion,
        cross_entropy_fusion_impl="te" if have_transformer_engine() else "native",
        masked_softmax_fusion=False,
        bias_dropout_fusion=False,
        apply_rope_fusion=rope_fusion,
        persist_layer_norm=False,
        attention_softmax_in_fp32=True,
        recompute_granularity=recompute,
        recompute_method=(options.recompute_method or "uniform") if recompute == "full" else None,
        recompute_num_layers=(options.recompute_num_layers or 1) if recompute == "full" else None,
        variable_seq_lengths=options.variable_seq_lengths,
        # The config check refuses variable sequence lengths with the default (allgather) token
        # dispatcher, also for dense models; a family may choose its own.
        moe_token_dispatcher_type=tc.get("moe_token_dispatcher_type") or "alltoall",
        attention_backend=AttnBackend[options.attention_backend],
    )
    if tc.get("num_moe_experts"):
        from megatron.core import parallel_state

        from remote_runtime.spec.config import JobConfig, MoEConfig
        from remote_runtime.spec.experts import moe_settings

        kw.update(moe_settings(JobConfig(moe=options.moe or MoEConfig()), tc))
        # moe_grouped_gemm is honoured by our experts (layer_specs); megatron's own flag would
        # ask for its grouped_gemm / transformer-engine modules. EP and expert TP: as initialised.
        kw.update(
            expert_model_parallel_size=parallel_state.get_expert_model_parallel_world_size(),
            expert_tensor_parallel_size=parallel_state.get_expert_tensor_parallel_world_size(),
            moe_grouped_gemm=False,
        )
    kw.update(options.extra_config)
    return TransformerConfig(**kw)


def compile_fusions(dist: DistInfo) -> bool:
    """megatron's fused kernels are torch.compile'd (its jit_fuser): worth it on GPU only."""
    return dist.device.type == "cuda" and torch_compile_usable()


KERNELS = ("auto", "triton", "compile", "eager")


def resolve_kernels(requested: str, dist: DistInfo) -> str:
    """triton | compile | eager for ModelOptions.kernels. `auto` takes Triton on GPU (it needs a
    C compiler, as torch.compile does) and eager PyTorch on CPU; `triton` on CPU runs only under
    Triton's interpreter (TRITON_INTERPRET=1, the tests)."""
    from remote_runtime.model import ops as triton_ops

    if requested == "auto":
        return "triton" if compile_fusions(dist) else "eager"
    if requested not in KERNELS:
        raise ConfigError([("kernels", f"{requested!r} is not one of: {', '.join(KERNELS)}")])
    if requested == "triton" and not (triton_ops.available() and torch_compile_usable()):
        raise ConfigError(
            [
                (
                    "kernels",
                    "triton needs the triton package, a C compiler and a GPU "
                    "(or TRITON_INTERPRET=1 on CPU); use kernels=auto",
                )
            ]
        )
    if requested == "compile" and not torch_compile_usable():
        raise ConfigError([("kernels", "compile needs triton and a C compiler; use kernels=auto")])
    return requested


def layer_spec(
    config,
    impl: str,
    attention_backend: str,
    norm_kernel: str = "eager",
    uniform_packs: str = "auto",
    qk_fused: bool = False,
):
    """The per-layer ModuleSpec: TE's, or megatron's local spec with our norm, attention,
    (when config.use_te_activation_func) our Triton SwiGLU and (qk_fused, with Triton norms,
    q/k norms and RoPE) the self-attention that fuses q/k norm and RoPE."""
    from megatron.core.models.gpt import gpt_layer_specs as specs
    from megatron.core.transformer.dot_product_attention import DotProductAttention

    from remote_runtime.model.attention import sdpa_core_attention
    from remote_runtime.model.norm import rms_norm_class

    if impl == "transformer_engine":
        spec = copy.deepcopy(
            specs.get_gpt_layer_with_transformer_engine_spec(qk_layernorm=config.qk_layernorm)
        )
        if attention_backend == "local":
            spec.submodules.self_attention.submodules.core_attention = DotProductAttention
        return spec
    spec = copy.deepcopy(
        specs.get_gpt_layer_local_spec(
            qk_layernorm=config.qk_layernorm, normalization=config.normalization
        )
    )
    layer, attn = spec.submodules, spec.submodules.self_attention.submodules
    if config.normalization != "RMSNorm":
        raise ValueError("the local spec here implements RMSNorm only")
    norm = rms_norm_class(norm_kernel)
    if config.use_te_activation_func:
        from remote_runtime.model.ops import SwiGLU

        layer.mlp.submodules.activation_func = SwiGLU
    layer.input_layernorm = layer.pre_mlp_layernorm = norm
    if config.qk_layernorm:
        attn.q_layernorm = attn.k_layernorm = norm
        if qk_fused and norm_kernel == "triton" and config.apply_rope_fusion:
            from remote_runtime.model.self_attention import qk_fused_self_attention_class

            layer.self_attention.module = qk_fused_self_attention_class()
    if attention_backend != "local":
        attn.core_attention = sdpa_core_attention(attention_backend, uniform_packs)
    return spec


def layer_specs(config, spec, offset: int, count: int, options: ModelOptions, norm) -> list:
    """This stage's per-layer specs: the dense spec, or for MoE layers (megatron's
    moe_layer_freq) the same spec with the MoE block of `moe.py` as its MLP and a pre-MLP
    `norm` where the dense spec fuses it into fc1 (transformer-engine)."""
    if not config.num_moe_experts:
        return [spec] * count
    from remote_runtime.model.expert_wgrad import WgradDeferral
    from remote_runtime.model.moe import moe_layer_pattern, moe_spec

    swiglu = spec.submodules.mlp.submodules.activation_func
    moe = copy.copy(spec)
    moe.submodules = copy.copy(spec.submodules)
    moe.submodules.mlp = moe_spec(
        config,
        "triton" if config.use_te_activation_func else "eager",
        shared_activation=swiglu,
        grouped=options.moe is None or options.moe.moe_grouped_gemm,
        fuse_wgrad=options.moe_wgrad_fusion,
        wgrad_deferral=WgradDeferral(options.moe_wgrad_defer),
    )
    from megatron.core.transformer.identity_op import IdentityOp

    if moe.submodules.pre_mlp_layernorm is IdentityOp:
        moe.submodules.pre_mlp_layernorm = norm
    pattern = moe_layer_pattern(config)
    return [moe if pattern[offset + i] else spec for i in range(count)]


def build_model(
    family: ModelFamily, hf_config: dict, options: ModelOptions, dist: DistInfo
) -> list:
    """[GPTModel] for this rank's pipeline stage (parameters on dist.device, uninitialised)."""
    from megatron.core import parallel_state
    from megatron.core.transformer.transformer_block import (
        TransformerBlockSubmodules,
        get_num_layers_to_build,
    )
    from megatron.core.transformer.transformer_layer import get_transformer_layer_offset

    from remote_runtime.model.norm import rms_norm_class

    tc = family.transformer_config_kwargs(hf_config)
    kernels = resolve_kernels(options.kernels, dist)
    config = transformer_config(tc, options, dist, kernels)
    impl = resolve_impl(options.transformer_impl)
    from remote_runtime.model import moe_aux

    moe_aux.setup_pipeline(config, dist.device)  # MoE with PP > 1: collective; else a reset
    if dist.cp > 1 and impl != "transformer_engine":
        raise ConfigError(
            [
                (
                    "parallel.context_parallel_size",
                    f"{dist.cp} needs transformer-engine, which is not installed on this "
                    "node (megafleet setup --with-te), or use context_parallel_size=1",
                )
            ]
        )
    norm_kernel = kernels if options.fused_norm else "eager"
    spec = layer_spec(
        config,
        impl,
        options.attention_backend,
        norm_kernel,
        options.uniform_packs,
        qk_fused=options.fused_qk_norm_rope,
    )
    if impl == "transformer_engine":
        from megatron.core.extensions.transformer_engine import TENorm as final_norm
    else:
        final_norm = rms_norm_class(norm_kernel)
    block = TransformerBlockSubmodules(
        layer_specs=layer_specs(
            config,
            spec,
            get_transformer_layer_offset(config),
            get_num_layers_to_build(config),
            options,
            final_norm,
        ),
        layer_norm=final_norm,
    )
    model = VocabMaskedGPTModel(
        config=config,
        true_vocab_size=tc["vocab_size"],
        transformer_layer_spec=block,
        vocab_size=padded_vocab_size(tc["vocab_size"], dist.tp),
        max_sequence_length=tc["max_position_embeddings"],
        pre_process=parallel_state.is_pipeline_first_stage(),
        post_process=parallel_state.is_pipeline_last_stage(),
        parallel_output=True,
        share_embeddings_and_output_weights=tc["share_embeddings_and_output_weights"],
        position_embedding_type=tc["position_embedding_type"],
        rotary_percent=1.0,
        rotary_base=tc["rotary_base"],
    )
    if dist.device.type != "cpu":
        # megatron's Router builds its weight on the CPU (0.16); DDP moves only trainable
        # parameters into its GPU buffers, so a frozen router (LoRA, a DPO reference) stayed there
        model.to(dist.device)
    _apply_rope_scaling(model, tc["rope_scaling"])
    if config.gradient_accumulation_fusion and options.fused_embedding_grad and model.pre_process:
        from remote_runtime.model import embedding

        embedding.install(model)
    model.megafleet_family = family.name  # what the bridge and checks report
    model.megafleet_transformer_impl = impl
    model.megafleet_packed_sequences = packed_sequences_supported(options)
    # Triton cross entropy: one pass over the logits instead of megatron's fp32 copies; the
    # vocabulary-parallel (TP > 1) loss stays megatron's
    model.triton_loss = (
        kernels == "triton"
        and options.cross_entropy_loss_fusion
        and options.triton_loss
        and dist.tp == 1
    )
    return [model]


def memory_assumptions(model) -> dict:
    """What this model's kernels keep for backward, in the terms of megafleet.memory.Assumptions
    (benchmarks record it with each run so the memory model is checked against what ran)."""
    from remote_runtime.model.norm import RMSNorm

    layers = list(model.decoder.layers) if getattr(model, "decoder", None) is not None else []
    config = model.config
    out = {
        "swiglu_impl": "fused"
        if (config.bias_activation_fusion or config.use_te_activation_func)
        else "eager",
        "loss_impl": "triton" if getattr(model, "triton_loss", False) else "megatron",
    }
    if layers:
        norm = layers[0].input_layernorm
        out["norm_impl"] = (
            "eager" if isinstance(norm, RMSNorm) and norm.kernel == "eager" else "fused"
        )
        out["qk_impl"] = (
            "fused" if getattr(layers[0].self_attention, "qk_fused", False) else "separate"
        )
    return out


@functools.lru_cache(maxsize=None)
def _gpt_model_class():
    from megatron.core.models.gpt import GPTModel

    class _VocabMaskedGPTModel(GPTModel):
        """GPTModel whose loss ignores the padded vocabulary rows.

        Megatron pads the vocabulary to a multiple of 128 × TP; those output rows are zeros, so
        their logits are 0 and would join the softmax, making the loss differ from Hugging
        Face's (by ~0.02 nats on a small random model) and training them. Setting them to the
        dtype's minimum before the cross entropy removes them from the softmax and their
        gradient: the loss is exactly the checkpoint's own.
        """

        def __init__(self, *args, true_vocab_size: int, **kwargs):
            super().__init__(*args, **kwargs)
            tp = self.pg_collection.tp
            part = self.vocab_size // tp.size()
            self.vocab_pad_start = min(max(true_vocab_size - tp.rank() * part, 0), part)

        triton_loss = False  # build_model: our Triton cross entropy (kernels=triton, TP=1)

        def compute_language_model_loss(self, labels, logits):
            if self.triton_loss:
                from remote_runtime.model.ops import cross_entropy

                # labels [b, s], logits [s, b, V] -> loss [b, s]; padded vocabulary left out
                return (
                    cross_entropy(logits, labels.transpose(0, 1), valid=self.vocab_pad_start)
                    .transpose(0, 1)
                    .contiguous()
                )
            if self.vocab_pad_start < logits.shape[-1]:
                logits[..., self.vocab_pad_start :].fill_(torch.finfo(logits.dtype).min)
            return super().compute_language_model_loss(labels, logits)

    return _VocabMaskedGPTModel


def VocabMaskedGPTModel(*args, **kwargs):  # noqa: N802 (a class, built lazily: no megatron at import)
    return _gpt_model_class()(*args, **kwargs)


def _apply_rope_scaling(model, scaling: dict | None) -> None:
    """llama3 rope scaling with the checkpoint's own parameters.

    GPTModel only takes a factor and assumes Llama 3.1's other constants (8192 original context,
    low/high frequency factors 1 and 4); the rotary module's own scaling routine takes them all.
    """
    if scaling is None:
        return
    if scaling["rope_type"] != "llama3":
        raise ValueError(f"rope scaling {scaling['rope_type']!r} is not implemented")
    rope = model.rotary_pos_emb
    rope.inv_freq = rope._apply_scaling(
        rope.inv_freq,
        factor=scaling["factor"],
        low_freq_factor=scaling["low_freq_factor"],
        high_freq_factor=scaling["high_freq_factor"],
        original_max_position_embeddings=scaling["original_max_position_embeddings"],
    )
