"""The torch backend's recompute (issue 35): memory that stays flat when every token is regularised.

Each layer's share of R is one autograd node (:class:`_LayerLoss`) that keeps only references to
what it was given (the layer's states, the same storage the model keeps for its own backward, and
the rows' tail ends, shared by the layers), the layer's context [B, H] and g's weights. Its forward
runs g on the regularised rows a chunk at a time and keeps nothing of them; its backward gathers the
rows again, recomputes g's activations a chunk at a time (the cost: g's forward once more) and
writes the layer's gradient. No [L+1, N, d1] activation and no gathered copy of the rows outlives
a chunk. Every route gets it: :func:`recompute_bridge_loss` (the backend's ``loss``: module and
functional) sums the layers' nodes, and the hooks of :class:`sbpet.hf.BridgeCapture` make one node
per layer as the layer runs (:func:`layer_loss`, the backend's ``layer_loss``), so that the backward
reaches each node when the model's backward reaches that layer: one layer's gradient at a time.
"""

from __future__ import annotations

import os

import torch

from ..core.precision import matmul
from .reference import tail_points, valid_rows
from .torch_backend import chain_backward, chain_forward, context_weights, layer_context

__all__ = ["RECOMPUTE_ENV", "ROW_CHUNK_ELEMENTS", "layer_loss", "recompute_enabled", "normalise_layer_sums", "recompute_bridge_loss", "row_chunk"]

# Rows of g per chunk: the widest [rows, width] temporary holds at most ROW_CHUNK_ELEMENTS (1 MiB of
# float32) and at most 1/LAYER_FRACTION of the layer's elements, so that the backward's few such
# blocks stay small beside the one layer the model's backward holds; at least MIN_CHUNK_ROWS rows.
ROW_CHUNK_ELEMENTS = 1 << 18
LAYER_FRACTION = 8
MIN_CHUNK_ROWS = 16
RECOMPUTE_ENV = "SBPET_TORCH_RECOMPUTE"


def recompute_enabled() -> bool:
    """False when ``SBPET_TORCH_RECOMPUTE=0`` asks for the torch backend's save-everything path
    (the benchmark's yardstick: ``python -m benchmarks.memory --time``); read at every backend
    lookup (:func:`sbpet.backends.dispatch.get_backend`)."""
    return os.environ.get(RECOMPUTE_ENV, "1").strip() != "0"


def row_chunk(hidden: int, weights, layer_elements: int | None = None) -> int:
    """Rows per chunk for states of width ``hidden`` (``layer_elements`` = B * S * H of the layer,
    None: no bound from it) and g's ``weights`` (see ROW_CHUNK_ELEMENTS)."""
    widest = max(hidden, *(w.shape[0] for w in weights))
    budget = ROW_CHUNK_ELEMENTS if layer_elements is None else min(ROW_CHUNK_ELEMENTS, layer_elements // LAYER_FRACTION)
    return max(MIN_CHUNK_ROWS, budget // widest, 1)


def _chunks(num_rows, chunk: int) -> list[slice]:
    """The row slices of the chunks; one slice of every row inside ``torch.compile``, where the row
    count may be data-dependent and cannot drive a Python loop (the compiler plans that memory)."""
    if torch.compiler.is_compiling():
        return [slice(0, None)]
    return [slice(start, start + chunk) for start in range(0, num_rows, chunk)]


def _gather_rows(states, batch_index, seq_index, valid, acc):
    """A chunk's regularised rows [c, H] in ``acc``; fixed-capacity padding rows zeroed (whatever a
    padded position holds never reaches g)."""
    rows = states[batch_index, seq_index].to(acc)
    if valid is not None:
        rows.masked_fill_(~valid[:, None], 0)
    return rows


def _add_context_share(grad, weights, index, share, slots: int) -> None:
    """``grad`` [B, S, H] += each position's weight times its sequence's context share ``share``
    [G, H] (computed in the accumulation dtype, one rounding into ``grad``'s); a bounded chunk of
    columns at a time when rows are packed (one row's columns read different contexts)."""
    batch, seq, hidden = grad.shape
    if slots == 1:  # one sequence per row: a broadcast, no gather
        grad.add_((weights[:, :, None] * share[:, None, :]).to(grad.dtype))
        return
    chunk = max(1, (grad.numel() // 8) // max(1, batch * hidden))
    for start in range(0, seq, chunk):
        cols = slice(start, start + chunk)
        grad[:, cols] += (weights[:, cols, None] * share[index[:, cols]]).to(grad.dtype)


class _LayerLoss(torch.autograd.Function):
    """One layer's share of R (METHOD.md steps 1-7 for layer l): ``sum_n w_n ||g(c_b, h_l[b, s]) -
    mean_coef_l e_n||^2 / (2 variance_l)`` over the rows n = (b, s), w_n 1 (0 for fixed-capacity
    padding). Unnormalised: the caller divides by (L+1) * N.

    Saves references to its inputs (the states, the tail ends: no copy), the context [B, H] and
    nothing of g's activations; the forward and the backward run g on ``chunk`` rows at a time (the
    backward recomputes the chunk's activations and gathers its rows again)."""

    @staticmethod
    def forward(ctx, precision, chunk, mask_weights, index, slot_weights, batch_index, seq_index, row_context, valid,
                mean_coef, variance, states, ends, *params):
        weights, biases = params[0::2], params[1::2]
        acc, hidden = mask_weights.dtype, states.shape[-1]
        row_context = batch_index if row_context is None else row_context
        context = layer_context(states, slot_weights)
        w1 = weights[0]
        half = matmul(context, w1[:, :hidden].T, precision) + biases[0]
        w1_token = w1[:, hidden:].T
        total = half.new_zeros(())
        for part in _chunks(batch_index.shape[0], chunk):
            rows_b, rows_s = batch_index[part], seq_index[part]
            part_valid = None if valid is None else valid[part]
            rows = _gather_rows(states, rows_b, rows_s, part_valid, acc)
            pre, _ = chain_forward(matmul(rows, w1_token, precision) + half[row_context[part]], weights, biases,
                                   precision)
            residual = pre[-1] - mean_coef.to(pre[-1]) * ends[part].to(pre[-1])
            per_row = residual.square().sum(-1)
            if part_valid is not None:
                per_row = per_row * part_valid
            total = total + per_row.sum()
        ctx.precision, ctx.chunk, ctx.has_valid = precision, chunk, valid is not None
        ctx.slots = slot_weights.shape[1]
        ctx.save_for_backward(mask_weights, index, batch_index, seq_index, row_context,
                              valid if valid is not None else batch_index.new_empty(0), mean_coef, variance, states,
                              ends, context, *params)
        return total / (2 * variance.to(total))

    @staticmethod
    def backward(ctx, grad_total):
        (mask_weights, index, batch_index, seq_index, row_context, valid, mean_coef, variance, states, ends, context,
         *params) = ctx.saved_tensors
        valid = valid if ctx.has_valid else None
        precision, chunk = ctx.precision, ctx.chunk
        weights, biases = params[0::2], params[1::2]
        needs = ctx.needs_input_grad
        need_states, need_ends, train = needs[11], needs[12], any(needs[13:])
        acc, hidden, dtype = mask_weights.dtype, states.shape[-1], states.dtype
        w1 = weights[0]
        half = matmul(context, w1[:, :hidden].T, precision) + biases[0]
        w1_token = w1[:, hidden:]
        grad_half = half.new_zeros(half.shape)
        grad_ends = torch.zeros_like(ends) if need_ends else None
        # Weight gradients summed over the chunks in float32 (float64): [W1 token half, (W_i, b_i) for i >= 2].
        grad_w1_token = half.new_zeros(w1_token.shape) if train else None
        layer_sums = [[half.new_zeros(w.shape), half.new_zeros(b.shape)] for w, b in zip(weights[1:], biases[1:])] \
            if train else []
        # The rows' gradients: written into the layer's gradient as they come when it is in the
        # accumulation dtype (the context's share is added at the end, one rounding as before);
        # a 16-bit layer keeps them in float32 until the share is known ([N, H], one layer at a time),
        # so that each element is rounded to 16 bits once.
        grad = rows_grad = None
        if need_states:
            if dtype == acc:
                grad = torch.zeros_like(states, memory_format=torch.contiguous_format)
            else:
                rows_grad = half.new_empty((batch_index.shape[0], hidden))
        dz_scale = grad_total.to(half) / variance.to(half)
        for part in _chunks(batch_index.shape[0], chunk):
            rows_b, rows_s = batch_index[part], seq_index[part]
            part_valid = None if valid is None else valid[part]
            rows = _gather_rows(states, rows_b, rows_s, part_valid, acc)
            rows_c = row_context[part]
            pre, acts = chain_forward(matmul(rows, w1_token.T, precision) + half[rows_c], weights, biases, precision)
            latents = pre.pop()
            coef = mean_coef.to(latents)
            dz = (latents - coef * ends[part].to(latents)).mul_(dz_scale)
            del latents
            if part_valid is not None:
                dz.mul_(part_valid[:, None])
            if need_ends:
                grad_ends[part] = (-coef * dz).to(ends.dtype)
            grad_pre1, layer_grads = chain_backward(dz, pre, acts, weights, precision, train)
            del pre, acts, dz
            grad_half.index_add_(0, rows_c, grad_pre1)
            if train:
                grad_w1_token += matmul(grad_pre1.T, rows, precision)
                for sums, (gw, gb) in zip(layer_sums, layer_grads):
                    sums[0] += gw
                    sums[1] += gb
            if need_states:
                grad_rows = matmul(grad_pre1, w1_token, precision)
                if grad is not None:
                    grad[rows_b, rows_s] = grad_rows.to(dtype)
                else:
                    rows_grad[part] = grad_rows
        grad_states = None
        if need_states:
            share = matmul(grad_half, w1[:, :hidden], precision)
            if grad is not None:
                _add_context_share(grad, mask_weights, index, share, ctx.slots)
            else:
                grad = torch.zeros(states.shape, dtype=dtype, device=states.device)
                _add_context_share(grad, mask_weights, index, share, ctx.slots)
                row_weights = mask_weights[batch_index, seq_index][:, None]
                grad[batch_index, seq_index] = rows_grad.addcmul_(row_weights, share[row_context]).to(dtype)
            grad_states = grad
        grad_params = [None] * len(params)
        if train:
            grad_w1_context = matmul(grad_half.T, context, precision)
            grad_params[0] = torch.cat([grad_w1_context, grad_w1_token], dim=1).to(w1.dtype)
            grad_params[1] = grad_half.sum(0).to(biases[0].dtype)
            for i, (gw, gb) in enumerate(layer_sums, start=1):
                grad_params[2 * i], grad_params[2 * i + 1] = gw.to(weights[i].dtype), gb.to(biases[i].dtype)
            grad_params = [g if needed else None for g, needed in zip(grad_params, needs[13:])]
        return (None,) * 11 + (grad_states, grad_ends, *grad_params)


def layer_loss(states, attention_mask, batch_index, seq_index, ends, mean_coef, variance, mapping,
               precision: str = "fp32", num_valid=None, segments=None) -> torch.Tensor:
    """One layer's unnormalised share of R, with the recompute (:class:`_LayerLoss`).

    Args:
        states: the layer [B, S, H] (any float dtype, any strides): referenced, not copied.
        attention_mask: [B, S], nonzero for real tokens.
        batch_index, seq_index: int64 [N], the regularised positions.
        ends: [N, D] the rows' tail points (``tail[targets]``, METHOD.md step 4).
        mean_coef, variance: 0-d tensors, this layer's bridge marginals.
        mapping: :class:`~sbpet.BridgeMapping` g.
        precision: how g's products run (:mod:`sbpet.core.precision`).
        num_valid: None, or a fixed capacity's 0-d int64 device count.
        segments: None (one sequence per row), or the packed rows' sequences
            (:class:`sbpet.core.positions.Segments`): one context per sequence.

    Returns:
        0-d: ``sum_n ||z_n - mean_coef e_n||^2 / (2 variance)`` over the (valid) rows, float32
        (float64 for float64 states or mapping); R is the sum over the L+1 layers divided by
        (L+1) * N. The hooks of :class:`sbpet.hf.BridgeCapture` call it as each layer runs.

    Example:
        >>> import torch, sbpet
        >>> from sbpet.backends.torch_recompute import layer_loss
        >>> g = sbpet.BridgeMapping(16, dims=(8, 4))
        >>> states, ends = torch.randn(2, 5, 16), torch.randn(3, 4)
        >>> b, s = torch.tensor([0, 1, 1]), torch.tensor([1, 2, 4])
        >>> layer_loss(states, torch.ones(2, 5), b, s, ends, torch.tensor(0.5), torch.tensor(0.25), g).shape
        torch.Size([])
    """
    mask_weights, index, slot_weights = context_weights(attention_mask, states.dtype, segments)
    row_context = None if segments is None else index[batch_index, seq_index]  # None: each row's own
    params = [t for layer in mapping.layers for t in (layer.weight, layer.bias)]
    valid = None if num_valid is None else valid_rows(batch_index.shape[0], num_valid)
    chunk = row_chunk(states.shape[-1], [layer.weight for layer in mapping.layers], states.numel())
    return _LayerLoss.apply(precision, chunk, mask_weights, index, slot_weights, batch_index, seq_index, row_context,
                            valid, mean_coef, variance, states, ends, *params)


def normalise_layer_sums(total: torch.Tensor, num_states: int, num_rows: int, num_valid=None) -> torch.Tensor:
    """R from the sum of the L+1 :func:`layer_loss` values: the mean over the (L+1) * N pairs
    (over the valid rows with a fixed capacity); exactly 0 when N == 0."""
    if num_valid is None:
        return total / max(num_states * num_rows, 1)
    return total / (num_valid.clamp(min=1) * num_states).to(total.dtype)



def recompute_bridge_loss(hidden_states, attention_mask, batch_index, seq_index, targets, mapping, tail, mean_coef,
                          variance, precision: str = "fp32", num_valid=None, segments=None):
    """R from the whole hidden states with one :func:`layer_loss` node per layer: same arguments
    and result as :func:`sbpet.backends.reference.reference_bridge_loss` (the torch backend's
    ``loss`` unless ``SBPET_TORCH_RECOMPUTE=0``)."""
    ends = tail_points(tail, targets)
    total = sum(
        layer_loss(h, attention_mask, batch_index, seq_index, ends, mean_coef[l], variance[l], mapping, precision,
                   num_valid, segments)
        for l, h in enumerate(hidden_states)
    )
    return normalise_layer_sums(total, len(hidden_states), batch_index.shape[0], num_valid)
