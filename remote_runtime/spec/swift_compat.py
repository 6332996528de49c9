"""Megatron-SWIFT commands as users paste them: options accepted as no-ops, and the names of
ms-swift options that megafleet does not implement (so an error says so instead of suggesting a
neighbouring option that means something else).

Torch-free, like the rest of remote_runtime.spec. `config.py` composes `SwiftCompatConfig` into
the job (group `swift_compat`) and adds `compat_warnings(job)` to validation's warnings, which
the resolved job (dry run) reports.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Optional


@dataclass
class SwiftCompatConfig:
    """Megatron-SWIFT options that change nothing here (see NO_OP_REASONS). The runtime ignores
    this group; a value other than the default adds a note to the resolved job's warnings."""

    save_safetensors: Optional[bool] = None
    load_safetensors: Optional[bool] = None
    dataloader_num_workers: Optional[int] = None
    num_workers: Optional[int] = None
    dataloader_pin_memory: Optional[bool] = None
    dataloader_persistent_workers: Optional[bool] = None
    dataloader_prefetch_factor: Optional[int] = None
    load_from_cache_file: Optional[bool] = None
    model_author: list[str] = field(default_factory=list)
    model_name: list[str] = field(default_factory=list)
    use_hf: Optional[bool] = None
    check_model: Optional[bool] = None
    add_version: Optional[bool] = None
    lazy_tokenize: Optional[bool] = None
    log_throughput: Optional[bool] = None
    attention_softmax_in_fp32: Optional[bool] = None
    no_gradient_accumulation_fusion: Optional[bool] = None
    no_masked_softmax_fusion: Optional[bool] = None
    no_bias_swiglu_fusion: Optional[bool] = None
    no_bias_dropout_fusion: Optional[bool] = None
    no_rope_fusion: Optional[bool] = None


_CHECKPOINTS = "checkpoints are always Hugging Face safetensors"
_LOADER = "data is tokenized and packed once before training; there are no loader workers"
_FUSION = "the runtime picks its own kernels (see model.attention_backend)"
NO_OP_REASONS = {
    "save_safetensors": _CHECKPOINTS,
    "load_safetensors": "the model is always read from its Hugging Face safetensors",
    "dataloader_num_workers": _LOADER,
    "num_workers": _LOADER,
    "dataloader_pin_memory": _LOADER,
    "dataloader_persistent_workers": _LOADER,
    "dataloader_prefetch_factor": _LOADER,
    "load_from_cache_file": "tokenized data is cached under data.data_cache_dir and reused while "
    "the dataset and tokenizer are unchanged",
    "model_author": "only ms-swift's self-cognition dataset uses it",
    "model_name": "only ms-swift's self-cognition dataset uses it",
    "use_hf": "models and datasets are local paths; nothing is downloaded from a hub",
    "check_model": "the model directory is checked (config.json, weights) in every dry run",
    "add_version": "checkpoint.output_dir is used as given (no version subdirectory)",
    "lazy_tokenize": "data is tokenized once before training",
    "log_throughput": "tokens/s is always logged",
    "attention_softmax_in_fp32": "attention softmax already runs in fp32",
    "no_gradient_accumulation_fusion": _FUSION,
    "no_masked_softmax_fusion": _FUSION,
    "no_bias_swiglu_fusion": _FUSION,
    "no_bias_dropout_fusion": _FUSION,
    "no_rope_fusion": _FUSION,
}
assert set(NO_OP_REASONS) == {f.name for f in fields(SwiftCompatConfig)}


def compat_warnings(compat: SwiftCompatConfig) -> list[str]:
    """One note per no-op option given a value other than its default."""
    default = SwiftCompatConfig()
    return [
        f"--{f.name} {_shown(getattr(compat, f.name))}: accepted for Megatron-SWIFT "
        f"compatibility, changes nothing here ({NO_OP_REASONS[f.name]})"
        for f in fields(SwiftCompatConfig)
        if getattr(compat, f.name) != getattr(default, f.name)
    ]


def _shown(value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    return " ".join(map(str, value)) if isinstance(value, list) else str(value)


# ms-swift's transformers-style spellings (`swift sft`, ms-swift 4) of options we implement under
# their Megatron names: the same setting, so they map (config.ALIASES) instead of failing.
SWIFT_SPELLINGS = {
    "learning_rate": "lr",
    "warmup_ratio": "lr_warmup_fraction",
    "warmup_steps": "lr_warmup_iters",
    "max_grad_norm": "clip_grad",
    "max_steps": "train_iters",
    "adam_epsilon": "adam_eps",
    "per_device_train_batch_size": "micro_batch_size",
}


# ms-swift (3.x and 4.x, Megatron-SWIFT) options megafleet does not implement. An unknown
# option in this set is reported as "not implemented", never with a "did you mean" neighbour.
MS_SWIFT_ONLY = frozenset(
    """
tuner_backend adapter_load target_regex lora_bias lora_dtype freeze_vit freeze_aligner
freeze_parameters_regex freeze_parameters_ratio trainable_parameters trainable_parameters_regex
ref_load ref_adapter_load ref_adapters
f_divergence_type desirable_weight undesirable_weight calculate_KL center_rewards_coefficient
teacher_model lmbda seq_kd sft_alpha temperature num_generations max_completion_length
use_vllm vllm_mode reward_funcs reward_weights padded_vocab_size initialize_embedding
rope_scaling mlp_padding_free hub_token max_shard_size train_dataloader_shuffle group_by_length
enable_dft_loss enable_channel_loss task_type num_labels problem_type report_to vit_lr
aligner_lr recompute_modules use_cpu_initialization deterministic_mode
cross_entropy_fusion_impl calculate_per_token_loss use_flash_attn optimizer_offload_fraction
main_grads_dtype main_params_dtype dataloader_type manual_gc
manual_gc_interval lr_decay_iters sgd_momentum save_retain_interval no_load_optim no_load_rng
ckpt_format async_save distributed_backend distributed_timeout_minutes tp_comm_overlap
num_layers_per_virtual_pipeline_stage pipeline_model_parallel_layout num_experts
moe_router_topk moe_router_load_balancing_type moe_z_loss_coeff moe_enable_deepep
moe_layer_recompute mtp_num_layers fp8_param_gather log_params_norm wandb_project
wandb_exp_name tensorboard_log_interval eval_strategy seq_length
megatron_extra_kwargs packing_cache columns template agent_template norm_bbox
""".split()
)
