"""The word embedding's gradient added row by row into fp32 main_grad (model/embedding.py)
equals F.embedding's dense gradient, repeated ids included; without a main_grad it is the dense
gradient itself; a frozen weight gets none."""

import torch
import torch.nn.functional as F

from remote_runtime.model.embedding import embedding_into_main_grad


def _batch(vocab=50, hidden=8):
    torch.manual_seed(0)
    ids = torch.randint(0, vocab, (2, 30))
    ids[0, :5] = 7  # a token repeated within and across sequences
    ids[1, -3:] = 7
    weight = torch.randn(vocab, hidden, requires_grad=True)
    dy = torch.randn(2, 30, hidden)
    return ids, weight, dy


def _dense_reference(ids, weight, dy):
    w = weight.detach().clone().requires_grad_()
    F.embedding(ids, w).backward(dy)
    return w.grad


def test_rows_are_added_into_main_grad():
    ids, weight, dy = _batch()
    expected = _dense_reference(ids, weight, dy)
    start = torch.randn(weight.shape)
    weight.main_grad = start.clone()
    weight.grad_added_to_main_grad = False
    out = embedding_into_main_grad(ids, weight)
    assert torch.equal(out, F.embedding(ids, weight))
    out.backward(dy)
    assert weight.grad_added_to_main_grad  # DDP's hook will not add the placeholder
    torch.testing.assert_close(weight.main_grad - start, expected, atol=1e-5, rtol=1e-5)
    untouched = torch.ones(weight.shape[0], dtype=torch.bool)
    untouched[ids.reshape(-1)] = False
    assert torch.equal(weight.main_grad[untouched], start[untouched])


def test_without_main_grad_the_dense_gradient_is_returned():
    ids, weight, dy = _batch()
    embedding_into_main_grad(ids, weight).backward(dy)
    torch.testing.assert_close(weight.grad, _dense_reference(ids, weight, dy))


def test_frozen_weight_gets_no_gradient():
    ids, weight, dy = _batch()
    weight.requires_grad_(False)
    x = torch.zeros(1, requires_grad=True)
    (embedding_into_main_grad(ids, weight) * x).sum().backward()
    assert weight.grad is None and x.grad is not None


def test_tied_output_layer_gets_the_exact_gradient(monkeypatch):
    """Tied input/output embeddings at PP 1 (Qwen3-1.7B): megatron sets `zero_out_wgrad` on the
    shared weight; its output layer (megatron's own autograd function, gradient-accumulation
    fusion on) adds its weight gradient into main_grad and hands autograd a zero placeholder that
    DDP's hook adds (megatron-core 0.16 distributed_data_parallel.py: the hook adds param.grad when
    `not grad_added_to_main_grad or zero_out_wgrad`). The embedding must then contribute no
    placeholder of its own: an unfilled one was summed and added (NaN losses on an H100)."""
    import types

    from megatron.core.tensor_parallel import layers

    monkeypatch.setattr(torch.cuda, "current_device", lambda: "cpu")  # its placeholders' device
    monkeypatch.setattr(
        layers,
        "fused_weight_gradient_mlp_cuda",
        types.SimpleNamespace(wgrad_gemm_accum_fp32=lambda x, g, mg: mg.addmm_(g.t(), x)),
        raising=False,
    )
    monkeypatch.setattr(layers, "_grad_accum_fusion_available", True)

    class OneRank:
        def size(self):
            return 1

        def rank(self):
            return 0

    ids, weight, _ = _batch()
    weight.main_grad = torch.zeros(weight.shape)
    weight.grad_added_to_main_grad = False
    weight.zero_out_wgrad = True

    def ddp_hook(param):
        if param.grad is not None and (
            not param.grad_added_to_main_grad or getattr(param, "zero_out_wgrad", False)
        ):
            param.main_grad.add_(param.grad.data)
        param.grad = None

    weight.register_post_accumulate_grad_hook(ddp_hook)
    hidden = embedding_into_main_grad(ids, weight)
    logits = layers.linear_with_grad_accumulation_and_async_allreduce(
        hidden, weight, None, True, False, False, tp_group=OneRank()
    )
    logits.logsumexp(-1).sum().backward()
    ref = weight.detach().clone().requires_grad_()
    F.linear(F.embedding(ids, ref), ref).logsumexp(-1).sum().backward()
    torch.testing.assert_close(weight.main_grad, ref.grad, atol=1e-5, rtol=1e-5)

    # the embedding alone hands autograd nothing for a zero_out_wgrad weight
    lone = torch.randn(50, 8, requires_grad=True)
    lone.main_grad = torch.zeros(50, 8)
    lone.grad_added_to_main_grad = False
    lone.zero_out_wgrad = True
    embedding_into_main_grad(ids, lone).sum().backward()
    assert lone.grad is None and lone.main_grad.abs().sum() > 0
