"""The Triton backend's GEMM strategy, host side: layer 1 as large-tile GEMMs
(:mod:`sbpet.kernels.layer_gemm`) around kernel 2 run on the saved pre-activation (``a1``).

Forward, per group of layers: a1 = the layer-1 GEMM with the context half in its epilogue
(METHOD.md steps 2-3), then kernel 2 reads a1 and does the rest of g, the residual and the loss
(steps 3-7). Backward, per group: a1 again (the recompute that keeps memory bounded), kernel 2's
backward turns it into layer 1's gradient da1 in place and reduces the context half's share per
(tile, sequence) without atomics, then one GEMM writes every regularised row's gradient
``da1 @ W1[:, H:]`` with its context share added, once, in the states' dtype (kernel 1's backward has
written the context share of every other token of the group just before). With a trained g, W1's
token half gets ``da1^T @ rows`` layer by layer (cuBLAS, fixed order).

Memory: a group holds ``G`` layers of a1 ([G, N, d1] in the dots' operand dtype) and nothing else
of that size; G is the largest count within :data:`GROUP_BUDGET` of the states' bytes. Nothing of
size [L+1, N, H] is allocated. The a1 of the forward is not kept for the backward (it would cost
(d1 / H) x (rows / tokens) of the states, 20% at llama7b-clm: benchmarks/NOTES.md, issue 11 step 2).
"""

from __future__ import annotations

import torch

from ..core.precision import matmul

__all__ = ["GROUP_BUDGET", "layer_groups", "token_weight", "gemm_forward", "gemm_backward"]

GROUP_BUDGET = 0.04  # a group's a1 may take this fraction of the hidden states' bytes

_WEIGHTS: dict = {}  # id -> (key, tensor): W1's token half in the operand dtype, one per weight


def layer_groups(num_states: int, num_rows: int, width: int, dtype: torch.dtype, states_bytes: int):
    """[(first layer, end)] covering 0..num_states in order, each group's a1 within the budget
    (at least one layer per group)."""
    per_layer = max(1, num_rows * width * torch.empty((), dtype=dtype).element_size())
    size = max(1, min(num_states, int(GROUP_BUDGET * states_bytes) // per_layer))
    return [(first, min(first + size, num_states)) for first in range(0, num_states, size)]


def token_weight(weight: torch.Tensor, hidden: int, dtype: torch.dtype) -> torch.Tensor:
    """W1's token half [d1, H] in ``dtype``: a view when it already is, else a copy made once per
    weight version (optimizer steps bump it) and kept until the next."""
    token = weight[:, hidden:]
    if token.dtype == dtype:
        return token
    key = (weight.data_ptr(), weight._version, tuple(weight.shape), weight.dtype, dtype, weight.device)
    cached = _WEIGHTS.get(id(weight))
    if cached is None or cached[0] != key:
        cached = (key, token.to(dtype).contiguous())
        _WEIGHTS[id(weight)] = cached
        if len(_WEIGHTS) > 16:  # weights of models long gone
            _WEIGHTS.pop(next(iter(_WEIGHTS)))
    return cached[1]


def _setup(table, num_rows, weights, precision, states_bytes, num_states):
    from ..kernels import layer_gemm

    hidden = weights[0].shape[1] // 2
    width = weights[0].shape[0]
    dtype = layer_gemm.operand_dtype(precision)
    w1 = token_weight(weights[0], hidden, dtype)
    groups = layer_groups(num_states, num_rows, width, dtype, states_bytes)
    size = max(end - first for first, end in groups)
    buffer = torch.empty((size, num_rows, width), dtype=dtype, device=table.base.device)
    return w1, groups, buffer


def gemm_forward(table, num_states, batch_index, seq_index, targets, half, weights, biases, tail, mean_coef,
                 inv_var, precision, states_bytes) -> torch.Tensor:
    """The float32 sum over (layer, row) of the bridge terms (see ``fused_bridge.bridge_forward``,
    same arguments; ``half`` float32 [L+1, B, d1]); N > 0."""
    from ..kernels import fused_bridge, layer_gemm

    w1, groups, buffer = _setup(table, batch_index.shape[0], weights, precision, states_bytes, num_states)
    total = torch.zeros((), dtype=torch.float32, device=tail.device)
    for first, end in groups:
        a1 = layer_gemm.first_layer(table, first, end - first, batch_index, seq_index, half[first:end], w1,
                                    precision, buffer[: end - first])
        total = total + fused_bridge.bridge_forward(
            table, end - first, batch_index, seq_index, targets, half[first:end], weights, biases, tail,
            mean_coef[first:end], inv_var[first:end], precision, a1=a1, layer0=first,
        )
    return total


def gemm_backward(grad_loss, table, batch_index, seq_index, targets, half, contexts, weights, biases, tail,
                  mean_coef, inv_var, train_mapping, train_tail, precision, states_bytes, rows_of, out, out_strides,
                  states_context=None):
    """Backward of ``grad_loss * gemm_forward(...) / ((L+1) N)``.

    Writes every regularised row's gradient into ``out`` (see ``layer_gemm.token_grads``):
    ``states_context`` = (mask, inv_count) for the whole-states route, where ``out`` is the states'
    gradient [L+1, B, S, H] and kernel 1's backward first writes every token's context share;
    None for the parts route (``out`` [L+1, N, H], the context gradient returned apart).
    ``rows_of(layer, start, stop)`` gives rows start..stop of that layer's regularised rows [N, H]
    (for W1's gradient when g trains, gathered a chunk at a time within the budget).
    Returns (float32 grad_half [L+1, B, d1], float32 grad_contexts [L+1, B, H],
    ``fused_bridge.ChainGrads``)."""
    from ..kernels import context as context_kernels
    from ..kernels import fused_bridge, layer_gemm

    num_states, batch, hidden = contexts.shape
    num_rows = batch_index.shape[0]
    inv_pairs = 1.0 / (num_states * num_rows)
    w1, groups, buffer = _setup(table, num_rows, weights, precision, states_bytes, num_states)
    grads = fused_bridge.ChainGrads.zeros(weights, biases, tail, train_mapping, train_tail)
    grad_half = torch.empty_like(half)
    grad_contexts = torch.empty_like(contexts)
    scale = grad_loss * inv_pairs
    for first, end in groups:
        size = end - first
        a1 = layer_gemm.first_layer(table, first, size, batch_index, seq_index, half[first:end], w1, precision,
                                    buffer[:size])
        _, grad_half[first:end], _ = fused_bridge.bridge_backward(
            grad_loss, inv_pairs, table, size, batch_index, seq_index, targets, half[first:end], weights, biases,
            tail, mean_coef[first:end], inv_var[first:end], train_mapping, train_tail, precision,
            a1=a1, layer0=first, grads=grads,
        )
        da1 = a1  # overwritten in place
        grad_contexts[first:end] = matmul(grad_half[first:end], weights[0][:, :hidden], precision)
        share = None
        if states_context is not None:
            mask, inv_count = states_context
            context_kernels.context_backward(grad_contexts[first:end], mask, inv_count, batch_index, seq_index,
                                             None, out.dtype, out=out[first:end])
            share = (grad_contexts[first:end], mask, inv_count)
        layer_gemm.token_grads(da1, w1, grad_loss, inv_pairs, batch_index, seq_index, out[first:end], out_strides,
                               precision, context=share)
        if train_mapping:  # da1^T @ rows, in row chunks within the budget (the rows are gathered)
            step = max(1, int(GROUP_BUDGET * states_bytes) // (hidden * 4))
            for layer in range(first, end):
                for start in range(0, num_rows, step):
                    stop = min(start + step, num_rows)
                    grads.w1_token += matmul(da1[layer - first, start:stop].T, rows_of(layer, start, stop),
                                             precision) * scale
    return grad_half, grad_contexts, grads
