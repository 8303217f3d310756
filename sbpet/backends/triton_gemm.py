"""The Triton backend's GEMM strategy, host side: layer 1 as large-tile GEMMs
(:mod:`sbpet.kernels.layer_gemm`) around kernel 2 run on the saved pre-activation (``a1``).

Forward, per group of layers: a1 = the layer-1 GEMM with the context half in its epilogue
(METHOD.md steps 2-3), then kernel 2 reads a1 and does the rest of g, the residual and the loss
(steps 3-7). Backward, per group: a1 again (the recompute that keeps memory bounded), kernel 2's
backward turns it into layer 1's gradient da1 in place and reduces the context half's share per
(tile, sequence) without atomics, then one GEMM writes every regularised row's gradient
``da1 @ W1[:, H:]`` with its context share added, once, in the states' dtype (kernel 1's backward has
written the context share of every other token of the group just before). When g or the tail
trains (or the chain is wider than kernel 2's spill-free backward), kernel 2's backward is replaced
by layers 2..k in torch on the saved a1 (``_TorchChain``), so that every gradient is summed in a
fixed order without atomics; with a trained g, W1's token half gets ``da1^T @ rows`` layer by layer
(cuBLAS, fixed order).

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
_TEMPORARIES = 10  # float32 [rows, d1]-sized tensors of the torch chain's chunk, counted generously

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
                 inv_var, precision, states_bytes, num_valid=None) -> torch.Tensor:
    """The float32 sum over (layer, row) of the bridge terms (see ``fused_bridge.bridge_forward``,
    same arguments, ``num_valid`` included; ``half`` float32 [L+1, B, d1]); N > 0."""
    from ..kernels import fused_bridge

    w1, groups, buffer = _setup(table, batch_index.shape[0], weights, precision, states_bytes, num_states)
    total = torch.zeros((), dtype=torch.float32, device=tail.device)
    for first, end in groups:
        a1 = _first_layer(table, first, end - first, batch_index, seq_index, half[first:end], w1, precision,
                          buffer[: end - first], num_valid)
        total = total + fused_bridge.bridge_forward(
            table, end - first, batch_index, seq_index, targets, half[first:end], weights, biases, tail,
            mean_coef[first:end], inv_var[first:end], precision, a1=a1, layer0=first, num_valid=num_valid,
        )
    return total


def gemm_backward(grad_loss, inv_pairs, table, batch_index, seq_index, targets, half, contexts, weights, biases,
                  tail, mean_coef, inv_var, train_mapping, train_tail, precision, states_bytes, rows_of, out,
                  out_strides, states_context=None, num_valid=None):
    """Backward of ``grad_loss * inv_pairs * gemm_forward(...)`` (``inv_pairs`` a float:
    1 / ((L+1) N), or with ``num_valid`` 1 / (L+1), the count folded into ``grad_loss`` on the device).

    Writes every regularised row's gradient into ``out`` (see ``layer_gemm.token_grads``):
    ``states_context`` = (kernel 1's ``Sequences``, the rows' batch and sequence indices) for the
    whole-states route, where ``out`` is the states' gradient [L+1, B, S, H], kernel 1's backward
    first writes every token's context share and the rows come named (context, flat position b * S
    + s) (``context.flat_table``);
    None for the parts route (``out`` [L+1, N, H], the context gradient returned apart).
    ``rows_of(layer, start, stop)`` gives rows start..stop of that layer's regularised rows [N, H]
    (for W1's gradient when g trains, gathered a chunk at a time within the budget; padding rows
    are zeroed here). ``num_valid``: see ``fused_bridge.bridge_forward``.
    Returns (float32 grad_half [L+1, B, d1], float32 grad_contexts [L+1, B, H],
    ``fused_bridge.ChainGrads``)."""
    from ..kernels import chain_config, fused_bridge
    from ..kernels import context as context_kernels

    num_states, batch, hidden = contexts.shape
    num_rows = batch_index.shape[0]
    live = None if num_valid is None else torch.arange(num_rows, device=batch_index.device) < num_valid
    w1, groups, buffer = _setup(table, num_rows, weights, precision, states_bytes, num_states)
    grads = fused_bridge.ChainGrads.zeros(weights, biases, tail, train_mapping, train_tail)
    grad_half = torch.empty_like(half)
    grad_contexts = torch.empty_like(contexts)
    scale = grad_loss * inv_pairs
    on_chip = not (train_mapping or train_tail) and chain_config.saved_chain_fits([w.shape[0] for w in weights])
    chain = None if on_chip else _TorchChain(scale, batch, batch_index, targets, weights, biases, tail, mean_coef,
                                             inv_var, grads, train_mapping, train_tail, precision, states_bytes, live)
    for first, end in groups:
        size = end - first
        a1 = _first_layer(table, first, size, batch_index, seq_index, half[first:end], w1, precision, buffer[:size],
                          num_valid)
        if chain is None:
            _, grad_half[first:end], _ = fused_bridge.bridge_backward(
                grad_loss, inv_pairs, table, size, batch_index, seq_index, targets, half[first:end], weights,
                biases, tail, mean_coef[first:end], inv_var[first:end], False, False, precision,
                a1=a1, layer0=first, grads=grads, num_valid=num_valid,
            )
        else:
            for layer in range(first, end):
                grad_half[layer] = chain.layer(layer, a1[layer - first])
        da1 = a1  # overwritten in place
        grad_contexts[first:end] = matmul(grad_half[first:end], weights[0][:, :hidden], precision)
        share = None
        if states_context is not None:
            sequences, rows, columns = states_context
            context_kernels.context_backward(grad_contexts[first:end], sequences, rows, columns,
                                             None, out.dtype, out=out[first:end])
            share = (grad_contexts[first:end], sequences.mask, sequences.inv_count)
        _token_grads(da1, w1, grad_loss, inv_pairs, batch_index, seq_index, out[first:end], out_strides,
                     precision, share, table.base.dtype)
        if train_mapping:  # da1^T @ rows, in row chunks within the budget (the rows are gathered)
            step = max(1, int(GROUP_BUDGET * states_bytes) // (4 * hidden * 4))  # a quarter of the budget
            for layer in range(first, end):
                for start in range(0, num_rows, step):
                    stop = min(start + step, num_rows)
                    rows = rows_of(layer, start, stop)
                    if live is not None:  # a padding row may hold a NaN: 0 * NaN would reach W1
                        rows = rows.masked_fill(~live[start:stop, None], 0)
                    grads.w1_token += matmul(da1[layer - first, start:stop].T, rows, precision).mul_(scale)
    if chain is not None:
        chain.finish()
    return grad_half, grad_contexts, grads


def _first_layer(table, layer0, num_layers, batch_index, seq_index, half, w1, precision, out, num_valid=None):
    """``layer_gemm.first_layer`` with its tile from :func:`.gemm_tuning.choose`."""
    from ..kernels import layer_gemm
    from . import gemm_tuning

    num_rows, width = out.shape[1], out.shape[2]
    candidates = layer_gemm.gemm_candidates(num_rows, precision, contiguous_h=table.contiguous_h)

    def key():
        return gemm_tuning.tuning_key("first_layer", w1.shape[1], width, table.base.dtype, out.dtype, precision,
                                      num_rows, table.contiguous_h, out.device)

    def run(cfg):
        return layer_gemm.first_layer(table, layer0, num_layers, batch_index, seq_index, half, w1, precision, out,
                                      cfg=cfg, num_valid=num_valid)

    return run(gemm_tuning.choose(key, candidates, run, out.device))


def _token_grads(da1, w1, grad_loss, inv_pairs, batch_index, seq_index, out, out_strides, precision, context,
                 states_dtype):
    """``layer_gemm.token_grads`` with its tile from :func:`.gemm_tuning.choose`."""
    from ..kernels import layer_gemm
    from . import gemm_tuning

    num_rows, width = da1.shape[1], da1.shape[2]
    candidates = layer_gemm.gemm_candidates(num_rows, precision, kernel="token_grad")

    def key():
        return gemm_tuning.tuning_key("token_grad", w1.shape[1], width, states_dtype, da1.dtype, precision, num_rows,
                                      context is not None, out.device)

    def run(cfg):
        return layer_gemm.token_grads(da1, w1, grad_loss, inv_pairs, batch_index, seq_index, out, out_strides,
                                      precision, context=context, cfg=cfg)

    return run(gemm_tuning.choose(key, candidates, run, out.device))


class _TorchChain:
    """Layers 2..k, the residual and their backward in torch on the saved a1 (the torch backend's
    ``chain_forward`` / ``chain_backward``: cuBLAS at the user's precision), when g or the tail
    trains or the chain is too wide for kernel 2's spill-free backward
    (``chain_config.saved_chain_fits``). Every gradient is summed in a fixed order: W2..Wk and b2..bk by cuBLAS,
    the context half per sequence and the tail per label by ``segments.sum_pairs`` over sorted rows.
    Kernel 2 would accumulate them with float32 atomics. A layer's rows go through in chunks whose
    float32 temporaries (about :data:`_TEMPORARIES` [rows, d1] tensors) stay within the budget."""

    def __init__(self, scale, batch, batch_index, targets, weights, biases, tail, mean_coef, inv_var, grads,
                 train_mapping, train_tail, precision, states_bytes, live=None):
        self.scale, self.batch, self.targets, self.live = scale, batch, targets, live
        # Padding rows (``live`` False: a fixed capacity) count as sequence B, after every real one,
        # so the rows stay sorted and their (zero) gradient falls outside the per-sequence sums.
        self.batch_index = batch_index if live is None else batch_index.masked_fill(~live, batch)
        self.weights, self.biases, self.grads = weights, biases, grads
        self.mean_coef, self.inv_var = mean_coef, inv_var
        self.train_mapping, self.train_tail, self.precision = train_mapping, train_tail, precision
        self.ends = tail[targets].to(torch.float32)
        self.tail_rows = torch.zeros_like(self.ends) if train_tail else None
        per_row = _TEMPORARIES * max(w.shape[0] for w in weights) * 4
        self.step = max(1, int(GROUP_BUDGET * states_bytes) // per_row)

    def layer(self, layer: int, a1: torch.Tensor) -> torch.Tensor:
        """Overwrite ``a1`` (one layer's [N, d1]) with the unscaled da1; return the layer's float32
        grad_half [B, d1] (scaled); accumulate the weight and tail gradients."""
        from ..kernels import segments
        from . import torch_backend

        grad_half = torch.zeros((self.batch, a1.shape[1]), dtype=torch.float32, device=a1.device)
        for start in range(0, a1.shape[0], self.step):
            rows = slice(start, start + self.step)
            pre, acts = torch_backend.chain_forward(a1[rows].to(torch.float32), self.weights, self.biases,
                                                    self.precision)
            dz = (pre[-1] - self.mean_coef[layer] * self.ends[rows]) * self.inv_var[layer]
            if self.live is not None:
                dz = dz.masked_fill(~self.live[rows, None], 0)
            if self.train_tail:
                self.tail_rows[rows] -= self.mean_coef[layer] * dz
            da1, layer_grads = torch_backend.chain_backward(dz, pre, acts, self.weights, self.precision,
                                                            self.train_mapping)
            for i, (grad_w, grad_b) in enumerate(layer_grads):
                self.grads.ws[i] += grad_w.mul_(self.scale)
                self.grads.bs[i] += grad_b.mul_(self.scale)
            a1[rows] = da1
            starts = _segment_starts(self.batch_index[rows], self.batch)
            grad_half += segments.sum_pairs(da1.mul_(self.scale)[None], starts, self.batch)[0]
        return grad_half

    def finish(self) -> None:
        """The tail's gradient: every row's share summed per label, rows in order within a label."""
        from ..kernels import segments

        if self.train_tail:
            order = torch.argsort(self.targets, stable=True)
            labels = self.grads.tail.shape[0]
            self.grads.tail += segments.sum_pairs((self.tail_rows * self.scale)[order][None],
                                                  _segment_starts(self.targets[order], labels), labels)[0]


def _segment_starts(sorted_index: torch.Tensor, count: int) -> torch.Tensor:
    """int64 [count + 1]: where each value 0..count-1 starts in the sorted ``sorted_index``, then the end."""
    if sorted_index.shape[0] > 1:
        torch._assert_async(torch.all(sorted_index[1:] >= sorted_index[:-1]), "rows must come sorted")
    return torch.searchsorted(sorted_index, torch.arange(count + 1, device=sorted_index.device))
