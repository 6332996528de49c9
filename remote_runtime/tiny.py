"""Tiny random Hugging Face checkpoints and a tiny tokenizer, built offline in about a second.

Used by `megafleet demo`, the CPU tests and benchmarks: no model or dataset can be downloaded
at run time, so we build them with `transformers` config classes and the `tokenizers` library.
The tokenizer is a byte-level BPE trained on a small corpus, with Qwen's special tokens and a
ChatML chat template, so chat formatting and loss masking work as with a real Qwen tokenizer.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Iterable

CHATML_TEMPLATE = (
    "{%- if messages[0]['role'] != 'system' and default_system is defined and default_system %}"
    "{{- '<|im_start|>system\\n' + default_system + '<|im_end|>\\n' }}{%- endif %}"
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]

_DEFAULT_CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "Megatron splits a transformer over tensor, pipeline and data parallel ranks.",
    "Question: what is the capital of France? Answer: Paris is the capital of France.",
    "user assistant system: you are a helpful assistant. Please answer briefly.",
    "0 1 2 3 4 5 6 7 8 9 10 100 1000 + - * / = ( ) [ ] { } , . ; : ! ? ' \"",
    "GPU nodes, SSH hosts, checkpoints, safetensors, tokenizers and training loops.",
]

# Per family: the transformers config class name and the tiny shape (GQA, odd sizes on purpose).
TINY_SHAPES = {
    "qwen3": (
        "Qwen3Config",
        dict(
            hidden_size=64,
            intermediate_size=160,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            head_dim=32,
            rms_norm_eps=1e-6,
            rope_theta=1_000_000.0,
            tie_word_embeddings=False,
        ),
    ),
    "qwen2": (
        "Qwen2Config",
        dict(
            hidden_size=64,
            intermediate_size=160,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            rms_norm_eps=1e-6,
            rope_theta=1_000_000.0,
            tie_word_embeddings=False,
        ),
    ),
    "llama": (
        "LlamaConfig",
        dict(
            hidden_size=64,
            intermediate_size=160,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            rms_norm_eps=1e-5,
            rope_theta=500_000.0,
            tie_word_embeddings=True,
            rope_scaling={
                "rope_type": "llama3",
                "factor": 8.0,
                "low_freq_factor": 1.0,
                "high_freq_factor": 4.0,
                "original_max_position_embeddings": 64,
            },
        ),
    ),
    # Mixture of experts: 8 experts, top 2 (Qwen3-MoE renormalises the top k, Qwen2-MoE does not
    # and adds a gated shared expert); expert FFN 48 so that expert-TP 2 splits it evenly.
    "qwen3_moe": (
        "Qwen3MoeConfig",
        dict(
            hidden_size=64,
            intermediate_size=160,
            moe_intermediate_size=48,
            num_experts=8,
            num_experts_per_tok=2,
            norm_topk_prob=True,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            head_dim=32,
            rms_norm_eps=1e-6,
            rope_theta=1_000_000.0,
            tie_word_embeddings=False,
        ),
    ),
    "qwen2_moe": (
        "Qwen2MoeConfig",
        dict(
            hidden_size=64,
            intermediate_size=160,
            moe_intermediate_size=48,
            num_experts=8,
            num_experts_per_tok=2,
            norm_topk_prob=False,
            shared_expert_intermediate_size=96,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            rms_norm_eps=1e-6,
            rope_theta=1_000_000.0,
            tie_word_embeddings=False,
        ),
    ),
}


def build_tokenizer(
    out_dir: str | Path, corpus: Iterable[str] | None = None, vocab_size: int = 500
) -> "object":
    """Train a byte-level BPE tokenizer and save it as a Hugging Face tokenizer in out_dir.

    Returns the loaded `PreTrainedTokenizerFast`.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    texts = list(corpus) if corpus is not None else []
    tok.train_from_iterator(texts + _DEFAULT_CORPUS * 4, trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        bos_token=None,
        additional_special_tokens=["<|im_start|>"],
    )
    fast.chat_template = CHATML_TEMPLATE
    fast.save_pretrained(str(out))
    return fast


def build_model(
    family: str,
    out_dir: str | Path,
    *,
    seed: int = 0,
    vocab_size: int | None = None,
    tokenizer_dir: str | Path | None = None,
    max_shard_size: str | None = None,
    dtype: str = "float32",
    **overrides,
) -> Path:
    """Save a random `family` model (a TINY_SHAPES key: qwen3, qwen2, llama, qwen3_moe,
    qwen2_moe) to out_dir and return the path.

    The tokenizer from tokenizer_dir (or a freshly built one) is saved beside it. The model's
    vocab_size defaults to the tokenizer's size plus a few rows, an odd number, so Megatron's
    vocabulary padding is exercised. `overrides` change the config (e.g. num_hidden_layers=4).
    """
    import torch
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if tokenizer_dir is None:
        tokenizer = build_tokenizer(out)
    else:
        tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_dir))
        tokenizer.save_pretrained(str(out))
    if vocab_size is None:
        vocab_size = len(tokenizer) + 7
        vocab_size += 1 - vocab_size % 2  # odd
    class_name, shape = TINY_SHAPES[family]
    kwargs = dict(
        shape,
        vocab_size=vocab_size,
        max_position_embeddings=4096,
        eos_token_id=tokenizer.convert_tokens_to_ids("<|im_end|>"),
        pad_token_id=tokenizer.convert_tokens_to_ids("<|endoftext|>"),
        bos_token_id=None,
    )
    kwargs.update(overrides)
    config = getattr(transformers, class_name)(**kwargs)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=getattr(torch, dtype))
    with torch.no_grad():
        # Larger-than-default random weights so logits differ clearly between positions and any
        # mapping mistake shows up as a large logit difference.
        for p in model.parameters():
            p.normal_(0.0, 0.2) if p.dim() > 1 else p.uniform_(0.5, 1.5)
    save_kwargs = {"safe_serialization": True}
    if max_shard_size:
        save_kwargs["max_shard_size"] = max_shard_size
    model.save_pretrained(str(out), **save_kwargs)
    GenerationConfig(
        eos_token_id=config.eos_token_id, pad_token_id=config.pad_token_id, do_sample=False
    ).save_pretrained(str(out))
    return out


def read_config(model_dir: str | Path) -> dict:
    return json.loads((Path(model_dir) / "config.json").read_text())
