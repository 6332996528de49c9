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
