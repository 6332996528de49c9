"""The one ModelShape against real models: parameter counts equal transformers' own."""

import pytest

transformers = pytest.importorskip("transformers")

from remote_runtime.spec.shape import ModelShape  # noqa: E402
from remote_runtime.tiny import TINY_SHAPES  # noqa: E402


@pytest.mark.parametrize(
    "family,tied", [("llama", True), ("qwen2", False), ("qwen2", True), ("qwen3", False)]
)
def test_parameter_count_equals_transformers(family, tied):
    class_name, shape = TINY_SHAPES[family]
    config = getattr(transformers, class_name)(
        **dict(shape, vocab_size=301, tie_word_embeddings=tied)
    )
    model = transformers.AutoModelForCausalLM.from_config(config)
    hf = dict(config.to_dict(), architectures=[type(model).__name__])
    counted = ModelShape.from_hf_config(hf)
    assert counted.total_params() == sum(p.numel() for p in model.parameters())
    assert counted.family == family and counted.active_params() == counted.total_params()
