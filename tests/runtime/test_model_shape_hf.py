"""The planner counts parameters exactly as the Hugging Face checkpoints hold them."""

import json
import math
import struct

import pytest

from megafleet.model_shape import load_model_config, shape_from_hf_config

pytestmark = pytest.mark.runtime


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    from remote_runtime.tiny import build_tokenizer

    out = tmp_path_factory.mktemp("tokenizer")
    build_tokenizer(out)
    return out


def checkpoint_params(model_dir) -> int:
    """Sum of the tensor sizes in the safetensors files, read from their headers."""
    total = 0
    for path in model_dir.glob("*.safetensors"):
        with open(path, "rb") as fh:
            (length,) = struct.unpack("<Q", fh.read(8))
            header = json.loads(fh.read(length))
        total += sum(math.prod(v["shape"]) for k, v in header.items() if k != "__metadata__")
    return total


@pytest.mark.parametrize(
    "family,overrides",
    [
        ("qwen3", {}),
        ("qwen3", {"tie_word_embeddings": True}),
        ("qwen2", {}),
        ("qwen2", {"tie_word_embeddings": True}),
        ("llama", {}),
        ("llama", {"tie_word_embeddings": False}),
        # MoE with dense MLP layers among the MoE layers
        ("qwen3_moe", {"num_hidden_layers": 4, "mlp_only_layers": [2]}),
        ("qwen2_moe", {"num_hidden_layers": 4, "decoder_sparse_step": 2}),
        ("qwen2_moe", {}),
    ],
)
def test_parameter_count_matches_the_checkpoint(tmp_path, tokenizer_dir, family, overrides):
    from remote_runtime.tiny import build_model

    model_dir = build_model(family, tmp_path / family, tokenizer_dir=tokenizer_dir, **overrides)
    shape = shape_from_hf_config(load_model_config(str(model_dir)))
    assert shape.family == family
    assert shape.total_params() == checkpoint_params(model_dir)
