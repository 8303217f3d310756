"""The Triton backend: the fused kernels of :mod:`sbpet.kernels` behind two custom ops.

Same contract as :func:`sbpet.backends.reference.reference_bridge_loss`. ``sbpet::triton_bridge_forward``
and ``sbpet::triton_bridge_backward`` are registered with ``torch.library.custom_op`` (so a
``torch.compile``d function sees two opaque ops with fake implementations, and an autograd formula
joins them); this file only wires tensors: the context half of the first Linear and its small
gradients are plain torch matmuls on [L+1, B, *] tensors.
"""

from __future__ import annotations

from typing import Optional

import torch

from ..core.validation import check_finite_contexts
from .triton_host import (  # noqa: F401  (the checks are part of this backend's face)
    check_triton_available, kernel2_backward, kernel2_forward, prepare_states, segment_tensors, triton_is_usable,
    triton_strategy, zero_parameter_grads,
)
from .triton_parts import triton_capture_layer, triton_loss_from_parts  # noqa: F401  (the parts ops)

__all__ = [
    "triton_bridge_loss", "triton_capture_layer", "triton_loss_from_parts", "check_triton_available",
    "triton_is_usable",
]


@torch.library.custom_op("sbpet::triton_bridge_forward", mutates_args=())
def _bridge_forward(
    hidden_states: list[torch.Tensor],
    attention_mask: torch.Tensor,
    batch_index: torch.Tensor,
    seq_index: torch.Tensor,
    targets: torch.Tensor,
    weights: list[torch.Tensor],
    biases: list[torch.Tensor],
    tail: torch.Tensor,
    mean_coef: torch.Tensor,
    variance: torch.Tensor,
    precision: str,
    strategy: str,
    num_valid: Optional[torch.Tensor],
    segment_index: torch.Tensor,
    segment_start: torch.Tensor,
    segment_end: torch.Tensor,
    slots: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Returns (R as a float32 scalar, the float32 contexts [L+1, G, H] saved for backward, one per
    sequence: ``segment_*`` and ``slots`` are :class:`sbpet.core.positions.Segments`').
    ``num_valid``: a fixed capacity's device count (:mod:`sbpet.core.positions`), or None."""
    from ..kernels import context as context_kernels

    num_states = len(hidden_states)
    num_rows = batch_index.shape[0]
    segments = (segment_index, segment_start, segment_end, slots)
    table, flat, sequences, mean_coef_d, inv_var, weights, _states = prepare_states(
        hidden_states, attention_mask, weights, mean_coef, variance, segments
    )
    contexts = context_kernels.context_forward(table, num_states, sequences)
    if num_rows == 0:
        return torch.zeros((), dtype=torch.float32, device=tail.device), contexts
    context_index, flat_index = _kernel2_rows(batch_index, seq_index, segment_index)
    loss = kernel2_forward(strategy, flat, num_states, context_index, flat_index, targets, contexts, weights, biases,
                           tail, mean_coef_d, inv_var, precision, _states_bytes(hidden_states), num_valid)
    return loss, contexts


def _kernel2_rows(batch_index, seq_index, segment_index):
    """Kernel 2's names of the regularised rows in the whole-states route: (each row's context, its
    flat position b * S + s), read through ``context.flat_table`` (device gathers, no host read)."""
    return segment_index[batch_index, seq_index], batch_index * segment_index.shape[1] + seq_index


def _states_bytes(hidden_states) -> int:
    return sum(h.numel() * h.element_size() for h in hidden_states)


@_bridge_forward.register_fake
def _(hidden_states, attention_mask, batch_index, seq_index, targets, weights, biases, tail, mean_coef, variance,
      precision, strategy, num_valid, segment_index, segment_start, segment_end, slots):
    hidden = hidden_states[0].shape[2]
    loss = tail.new_empty((), dtype=torch.float32)
    contexts = tail.new_empty((len(hidden_states), segment_start.shape[0], hidden), dtype=torch.float32)
    return loss, contexts


@torch.library.custom_op("sbpet::triton_bridge_backward", mutates_args=())
def _bridge_backward(
    grad_loss: torch.Tensor,
    hidden_states: list[torch.Tensor],
    attention_mask: torch.Tensor,
    batch_index: torch.Tensor,
    seq_index: torch.Tensor,
    targets: torch.Tensor,
    weights: list[torch.Tensor],
    biases: list[torch.Tensor],
    tail: torch.Tensor,
    mean_coef: torch.Tensor,
    variance: torch.Tensor,
    contexts: torch.Tensor,
    train_mapping: bool,
    train_tail: bool,
    precision: str,
    strategy: str,
    num_valid: Optional[torch.Tensor],
    segment_index: torch.Tensor,
    segment_start: torch.Tensor,
    segment_end: torch.Tensor,
    slots: int,
) -> tuple[torch.Tensor, list[torch.Tensor], list[torch.Tensor], torch.Tensor]:
    """Returns (grad of every layer stacked [L+1, B, S, H] in the states' dtype, grads of the
    weights and biases (empty lists unless train_mapping), grad of the tail (an empty tensor
    unless train_tail))."""
    from ..kernels import context as context_kernels

    num_states = len(hidden_states)
    num_rows = batch_index.shape[0]
    batch, seq, hidden = hidden_states[0].shape
    dtype, device = hidden_states[0].dtype, hidden_states[0].device
    if num_rows == 0:
        grad_states = torch.zeros((num_states, batch, seq, hidden), dtype=dtype, device=device)
        return grad_states, *zero_parameter_grads(weights, biases, tail, train_mapping, train_tail)
    segments = (segment_index, segment_start, segment_end, slots)
    _, flat, sequences, mean_coef_d, inv_var, weights, _states = prepare_states(
        hidden_states, attention_mask, weights, mean_coef, variance, segments
    )
    context_index, flat_index = _kernel2_rows(batch_index, seq_index, segment_index)
    args = (grad_loss, flat, context_index, flat_index, targets, weights, biases, tail, mean_coef_d, inv_var,
            contexts, train_mapping, train_tail, precision, strategy)
    if strategy == "gemm":
        grad_states = torch.empty((num_states, batch, seq, hidden), dtype=dtype, device=device)
        _, _, out_ws, out_bs, grad_tail = kernel2_backward(
            *args, _states_bytes(hidden_states),
            lambda layer, start, stop: hidden_states[layer][batch_index[start:stop], seq_index[start:stop]],
            grad_states, (batch * seq * hidden, 0, hidden), (sequences, batch_index, seq_index),
            num_valid=num_valid,
        )
        return grad_states, out_ws, out_bs, grad_tail
    grad_tokens, grad_contexts, out_ws, out_bs, grad_tail = kernel2_backward(*args, num_valid=num_valid)
    grad_states = context_kernels.context_backward(
        grad_contexts, sequences, batch_index, seq_index, grad_tokens, dtype
    )
    return grad_states, out_ws, out_bs, grad_tail


@_bridge_backward.register_fake
def _(grad_loss, hidden_states, attention_mask, batch_index, seq_index, targets, weights, biases, tail,
      mean_coef, variance, contexts, train_mapping, train_tail, precision, strategy, num_valid, segment_index,
      segment_start, segment_end, slots):
    batch, seq, hidden = hidden_states[0].shape
    grad_states = hidden_states[0].new_empty((len(hidden_states), batch, seq, hidden))
    grad_ws = [torch.empty_like(w) for w in weights] if train_mapping else []
    grad_bs = [torch.empty_like(b) for b in biases] if train_mapping else []
    grad_tail = torch.empty_like(tail) if train_tail else tail.new_empty(0)
    return grad_states, grad_ws, grad_bs, grad_tail


def _setup_context(ctx, inputs, output):
    hidden_states, attention_mask, batch_index, seq_index, targets, weights, biases, tail, mean_coef, variance, \
        precision, strategy, num_valid, segment_index, segment_start, segment_end, slots = inputs
    _, contexts = output
    ctx.precision, ctx.strategy, ctx.slots = precision, strategy, slots
    ctx.set_materialize_grads(False)  # the contexts output has no gradient: no zeros [L+1, B, H]
    ctx.mark_non_differentiable(contexts)
    ctx.num_states = len(hidden_states)
    ctx.num_linear = len(weights)
    ctx.states_need_grad = [h.requires_grad for h in hidden_states]
    ctx.train_mapping = any(p.requires_grad for p in (*weights, *biases))
    ctx.train_tail = tail.requires_grad
    ctx.save_for_backward(
        *hidden_states, attention_mask, batch_index, seq_index, targets, *weights, *biases, tail,
        mean_coef, variance, contexts, num_valid, segment_index, segment_start, segment_end,
    )


def _backward(ctx, grad_loss, grad_contexts):
    if grad_loss is None:  # nothing flows back (grads are not materialised)
        return (None,) * 17
    saved = list(ctx.saved_tensors)
    n, k = ctx.num_states, ctx.num_linear
    hidden_states, saved = saved[:n], saved[n:]
    attention_mask, batch_index, seq_index, targets, saved = *saved[:4], saved[4:]
    weights, biases, saved = saved[:k], saved[k : 2 * k], saved[2 * k :]
    tail, mean_coef, variance, contexts, num_valid, segment_index, segment_start, segment_end = saved
    grad_states, grad_ws, grad_bs, grad_tail = torch.ops.sbpet.triton_bridge_backward(
        grad_loss, hidden_states, attention_mask, batch_index, seq_index, targets, weights, biases,
        tail, mean_coef, variance, contexts, ctx.train_mapping, ctx.train_tail, ctx.precision, ctx.strategy,
        num_valid, segment_index, segment_start, segment_end, ctx.slots,
    )
    layer_grads = [g if need else None for g, need in zip(grad_states.unbind(0), ctx.states_need_grad)]
    weight_grads = list(grad_ws) if ctx.train_mapping else [None] * k
    bias_grads = list(grad_bs) if ctx.train_mapping else [None] * k
    return (
        layer_grads, None, None, None, None, weight_grads, bias_grads,
        grad_tail if ctx.train_tail else None, None, None, None, None, None, None, None, None, None,
    )


_bridge_forward.register_autograd(_backward, setup_context=_setup_context)


def triton_bridge_loss(
    hidden_states,
    attention_mask,
    batch_index,
    seq_index,
    targets,
    mapping,
    tail,
    mean_coef,
    variance,
    precision="fp32",
    strategy=None,
    check_finite=False,
    num_valid=None,
    segments=None,
):
    """The bridge regulariser R with the Triton kernels. Same arguments and result as
    :func:`sbpet.backends.reference.reference_bridge_loss` (float32 scalar; 0 with zero gradients when
    N == 0). Inputs are validated by :func:`sbpet.bridge_loss`. ``strategy``: kernel 2's
    ("gemm" or "fused"; None: :func:`.triton_host.triton_strategy`). ``check_finite``: raise
    ValueError when a real token's state is not finite, from the contexts kernel 1 computed in its
    one read of the states (:func:`sbpet.core.validation.check_finite_contexts`: one host sync on
    [L+1, B, H], no second read of the states), as ``bridge_loss`` asks. ``num_valid``: None, or
    (a fixed capacity, :mod:`sbpet.core.positions`) a 0-d int64 device tensor: only the first
    ``num_valid`` rows are regularised; the kernels skip the rest, reading no state there.
    ``segments``: packed rows' sequences (:class:`sbpet.core.positions.Segments`; None: one per
    row), one context each: kernel 1 runs one program per (layer, sequence, H-block).

    Example (CPU, interpreter):
        >>> # TRITON_INTERPRET=1 python -c "import sbpet; ..."; backend="triton" in sbpet.bridge_loss
    """
    weights = [layer.weight for layer in mapping.layers]
    biases = [layer.bias for layer in mapping.layers]
    loss, contexts = torch.ops.sbpet.triton_bridge_forward(
        list(hidden_states), attention_mask, batch_index, seq_index, targets, weights, biases, tail,
        mean_coef, variance, precision, triton_strategy(strategy), num_valid,
        *segment_tensors(segments, attention_mask),
    )
    if check_finite:
        check_finite_contexts(contexts, list(hidden_states), attention_mask != 0)
    return loss
