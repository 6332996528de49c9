"""The word embedding's gradient added straight into megatron DDP's fp32 main_grad, row by row.

megatron's VocabParallelEmbedding runs `F.embedding`, whose backward builds a dense gradient the
size of the whole table (Qwen3's 151,936 x 2048: a 622 MB bf16 memset and scatter) that DDP's
hook then adds into the fp32 main_grad (2.5 GB read and written), every micro-batch, although
only the batch's rows (4,096 of 151,936) are non-zero. Here the backward adds the rows that
occur with one `index_add_` in fp32 (tens of MB), marks the weight as megatron's fused
weight-gradient paths do (`grad_added_to_main_grad`) and hands autograd an unfilled placeholder.

Installed by the model builder at tensor-parallel size 1 (where the embedding is a plain lookup)
on GPU with gradient-accumulation fusion; elsewhere megatron's embedding runs unchanged. Without
a main_grad (no DDP, or a frozen weight) the backward is the ordinary dense gradient. Tied input
and output embeddings (`zero_out_wgrad`, see the backward) are handled: a GPU run before that
case was handled gave NaN losses on Qwen3-1.7B (tied); tests/runtime/test_embedding_grad.py
covers it.
"""

from __future__ import annotations

import types

import torch
import torch.nn.functional as F


class _EmbeddingIntoMainGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx, ids, weight):
        ctx.save_for_backward(ids, weight)
        return F.embedding(ids, weight)

    @staticmethod
    def backward(ctx, grad):
        ids, weight = ctx.saved_tensors
        if not ctx.needs_input_grad[1]:
            return None, None
        main_grad = getattr(weight, "main_grad", None)
        flat_ids = ids.reshape(-1)
        flat_grad = grad.reshape(-1, grad.shape[-1])
        if (
            main_grad is None
            or main_grad.dtype != torch.float32
            or not hasattr(weight, "grad_added_to_main_grad")
        ):
            return None, torch.ops.aten.embedding_dense_backward(
                grad, ids, weight.shape[0], -1, False
            )
        main_grad.index_add_(0, flat_ids, flat_grad.float())
        weight.grad_added_to_main_grad = True
        if getattr(weight, "zero_out_wgrad", False):
            # Tied with the output layer (megatron sets zero_out_wgrad on the shared weight): the
            # output layer hands autograd a zero placeholder, which DDP's hook adds to main_grad
            # (it adds whenever zero_out_wgrad is set). An unfilled placeholder from here would
            # be summed into it and added: garbage (NaN in a GPU run). No gradient from here
            # keeps the sum the output layer's zeros.
            return None, None
        return None, torch.empty_like(weight)  # a placeholder: DDP's hook skips its add


def embedding_into_main_grad(ids: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    return _EmbeddingIntoMainGrad.apply(ids, weight)


def _forward(self, input_):
    return embedding_into_main_grad(input_, self.weight)


def install(model) -> bool:
    """Route the first stage's word embedding through `embedding_into_main_grad` where that is
    exactly megatron's forward (TP 1, not deterministic mode); True when installed."""
    emb = getattr(getattr(model, "embedding", None), "word_embeddings", None)
    if emb is None or emb.tp_group.size() != 1 or getattr(emb, "deterministic_mode", False):
        return False
    if getattr(emb, "reduce_scatter_embeddings", False):
        return False
    emb.forward = types.MethodType(_forward, emb)
    return True
