"""The compiled RMSNorm and RoPE compute what the eager versions compute (CPU inductor here;
the same code is what runs on GPU)."""

import pytest
import torch

pytestmark = pytest.mark.runtime


@pytest.fixture(scope="module")
def megatron_config():
    from megatron.core.transformer.transformer_config import TransformerConfig

    return TransformerConfig(
        num_layers=1, hidden_size=64, num_attention_heads=4, use_cpu_initialization=True
    )


def test_compiled_rope_matches_megatron_unfused_bshd_and_thd(megatron_config):
    from megatron.core.models.common.embeddings import rope_utils

    from remote_runtime.model.compiled import rope_bshd, rope_thd

    torch.manual_seed(0)
    d, heads = 32, 4
    freqs = torch.randn(40, 1, 1, d)
    t = torch.randn(40, 2, heads, d, dtype=torch.float32)
    ref = rope_utils._apply_rotary_pos_emb_bshd(t, freqs)
    assert torch.allclose(rope_bshd(t, freqs), ref, atol=1e-5)

    lengths = [7, 20, 13]
    cu = torch.tensor([0, 7, 27, 40], dtype=torch.int32)
    packed = torch.randn(40, heads, d)
    expected = torch.cat(
        [
            rope_utils._apply_rotary_pos_emb_bshd(packed[s:e].unsqueeze(1), freqs[: e - s]).squeeze(
                1
            )
            for s, e in zip(cu[:-1].tolist(), cu[1:].tolist())
        ]
    )
    assert sum(lengths) == 40
    assert torch.allclose(rope_thd(packed, cu, freqs), expected, atol=1e-5)


def test_compiled_rms_norm_matches_eager_forward_and_backward(megatron_config, monkeypatch):
    from remote_runtime.model.norm import CompiledRMSNorm, RMSNorm

    monkeypatch.setattr(torch.cuda, "current_device", lambda: "cpu")  # where megatron allocates

    torch.manual_seed(0)
    eager, compiled = RMSNorm(megatron_config, 64), CompiledRMSNorm(megatron_config, 64)
    with torch.no_grad():
        eager.weight.uniform_(0.5, 1.5)
        compiled.weight.copy_(eager.weight)
    x1 = torch.randn(10, 3, 64, requires_grad=True)
    x2 = x1.detach().clone().requires_grad_(True)
    y1, y2 = eager(x1), compiled(x2)
    assert torch.allclose(y1, y2, atol=1e-5)
    g = torch.randn_like(y1)
    y1.backward(g)
    y2.backward(g)
    assert torch.allclose(x1.grad, x2.grad, atol=1e-5)
    assert torch.allclose(eager.weight.grad, compiled.weight.grad, atol=1e-4)
