"""The Triton backend's parts interface (:class:`sbpet.backends.dispatch.Backend`): per-layer capture
with kernel 1 and the loss from the parts with kernel 2, as ``torch.library`` custom ops with
autograd formulas. Re-exported by :mod:`.triton_backend`, the backend's face."""

from __future__ import annotations

from typing import Optional

import torch

from .triton_host import (
    device_marginals, kernel2_backward, kernel2_forward, kernel_sequences, segment_tensors, triton_strategy,
    zero_parameter_grads,
)

__all__ = ["triton_capture_layer", "triton_loss_from_parts"]


@torch.library.custom_op("sbpet::triton_capture", mutates_args=())
def _capture(
    states: torch.Tensor, attention_mask: torch.Tensor, batch_index: torch.Tensor, seq_index: torch.Tensor,
    segment_index: torch.Tensor, segment_start: torch.Tensor, segment_end: torch.Tensor, slots: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One layer [B, S, H] -> (float32 contexts [G, H], one per sequence of the segments, and the
    regularised rows [N, H] in the states' dtype), both from kernel 1's one read of the layer."""
    from ..kernels import context as context_kernels

    batch, seq, hidden = states.shape
    table = context_kernels.layer_table([states])
    sequences = kernel_sequences(attention_mask, segment_index, segment_start, segment_end, slots)
    row_of = context_kernels.row_lookup(batch, seq, batch_index, seq_index)
    tokens = states.new_empty((1, batch_index.shape[0], hidden))
    context = context_kernels.context_forward(table, 1, sequences, row_of=row_of, tokens_out=tokens)
    return context[0], tokens[0]


@_capture.register_fake
def _(states, attention_mask, batch_index, seq_index, segment_index, segment_start, segment_end, slots):
    hidden = states.shape[2]
    return (states.new_empty((segment_start.shape[0], hidden), dtype=torch.float32),
            states.new_empty((batch_index.shape[0], hidden)))


@torch.library.custom_op("sbpet::triton_capture_backward", mutates_args=())
def _capture_backward(
    grad_context: torch.Tensor, grad_tokens: torch.Tensor, attention_mask: torch.Tensor, batch_index: torch.Tensor,
    seq_index: torch.Tensor, dtype: torch.dtype, segment_index: torch.Tensor, segment_start: torch.Tensor,
    segment_end: torch.Tensor, slots: int,
) -> torch.Tensor:
    """The layer's gradient [B, S, H] in ``dtype``, written once by kernel 1's backward."""
    from ..kernels import context as context_kernels

    sequences = kernel_sequences(attention_mask, segment_index, segment_start, segment_end, slots)
    grad = context_kernels.context_backward(
        grad_context.float()[None].contiguous(), sequences, batch_index, seq_index,
        grad_tokens[None].contiguous(), dtype,
    )
    return grad[0]


@_capture_backward.register_fake
def _(grad_context, grad_tokens, attention_mask, batch_index, seq_index, dtype, segment_index, segment_start,
      segment_end, slots):
    batch, seq = attention_mask.shape
    return grad_context.new_empty((batch, seq, grad_context.shape[-1]), dtype=dtype)


def _capture_setup(ctx, inputs, output):
    states, attention_mask, batch_index, seq_index, segment_index, segment_start, segment_end, slots = inputs
    ctx.dtype, ctx.slots = states.dtype, slots
    ctx.save_for_backward(attention_mask, batch_index, seq_index, segment_index, segment_start, segment_end)


def _capture_autograd(ctx, grad_context, grad_tokens):
    attention_mask, batch_index, seq_index, segment_index, segment_start, segment_end = ctx.saved_tensors
    grad = torch.ops.sbpet.triton_capture_backward(
        grad_context, grad_tokens, attention_mask, batch_index, seq_index, ctx.dtype, segment_index, segment_start,
        segment_end, ctx.slots,
    )
    return grad, None, None, None, None, None, None, None


_capture.register_autograd(_capture_autograd, setup_context=_capture_setup)


def triton_capture_layer(states, attention_mask, batch_index, seq_index, segments=None):
    """The parts interface's per-layer capture with kernel 1: (float32 contexts [G, H], rows [N, H])
    of one layer [B, S, H] (any strides), differentiable; G = B unless ``segments``
    (:class:`sbpet.core.positions.Segments`) packs several sequences per row."""
    return torch.ops.sbpet.triton_capture(states, attention_mask, batch_index, seq_index,
                                          *segment_tensors(segments, attention_mask))


@torch.library.custom_op("sbpet::triton_parts_forward", mutates_args=())
def _parts_forward(
    contexts: torch.Tensor,
    tokens: list[torch.Tensor],
    batch_index: torch.Tensor,
    targets: torch.Tensor,
    weights: list[torch.Tensor],
    biases: list[torch.Tensor],
    tail: torch.Tensor,
    mean_coef: torch.Tensor,
    variance: torch.Tensor,
    precision: str,
    strategy: str,
    num_valid: Optional[torch.Tensor],
) -> torch.Tensor:
    """R (float32 scalar) from float32 contexts [L+1, B, H] and L+1 token-row tensors [N, H]
    (``num_valid``: a fixed capacity's device count, or None)."""
    from ..kernels import context as context_kernels

    num_states, num_rows = contexts.shape[0], batch_index.shape[0]
    if num_rows == 0:
        return torch.zeros((), dtype=torch.float32, device=tail.device)
    mean_coef_d, inv_var = device_marginals(mean_coef, variance, tail.device)
    weights = [w.contiguous() for w in weights]
    seq_index = torch.arange(num_rows, device=batch_index.device)
    return kernel2_forward(strategy, context_kernels.rows_table(tokens), num_states, batch_index, seq_index, targets,
                           contexts, weights, biases, tail, mean_coef_d, inv_var, precision, _tokens_bytes(tokens),
                           num_valid)


def _tokens_bytes(tokens) -> int:
    return sum(t.numel() * t.element_size() for t in tokens)


@_parts_forward.register_fake
def _(contexts, tokens, batch_index, targets, weights, biases, tail, mean_coef, variance, precision, strategy,
      num_valid):
    return tail.new_empty((), dtype=torch.float32)


@torch.library.custom_op("sbpet::triton_parts_backward", mutates_args=())
def _parts_backward(
    grad_loss: torch.Tensor,
    contexts: torch.Tensor,
    tokens: list[torch.Tensor],
    batch_index: torch.Tensor,
    targets: torch.Tensor,
    weights: list[torch.Tensor],
    biases: list[torch.Tensor],
    tail: torch.Tensor,
    mean_coef: torch.Tensor,
    variance: torch.Tensor,
    train_mapping: bool,
    train_tail: bool,
    precision: str,
    strategy: str,
    num_valid: Optional[torch.Tensor],
) -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor], list[torch.Tensor], torch.Tensor]:
    """(float32 grad of the contexts [L+1, B, H], grad of the token rows stacked [L+1, N, H] in
    their dtype, weight and bias grads (empty unless train_mapping), tail grad (empty unless
    train_tail))."""
    from ..kernels import context as context_kernels

    num_states, num_rows = contexts.shape[0], batch_index.shape[0]
    hidden = contexts.shape[-1]
    dtype = tokens[0].dtype
    if num_rows == 0:
        grad_tokens = contexts.new_zeros((num_states, 0, hidden), dtype=dtype)
        zeros = zero_parameter_grads(weights, biases, tail, train_mapping, train_tail)
        return torch.zeros_like(contexts), grad_tokens, *zeros
    mean_coef_d, inv_var = device_marginals(mean_coef, variance, tail.device)
    weights = [w.contiguous() for w in weights]
    seq_index = torch.arange(num_rows, device=batch_index.device)
    args = (grad_loss, context_kernels.rows_table(tokens), batch_index, seq_index, targets, weights, biases, tail,
            mean_coef_d, inv_var, contexts, train_mapping, train_tail, precision, strategy)
    if strategy == "gemm":
        grad_tokens = torch.empty((num_states, num_rows, hidden), dtype=dtype, device=contexts.device)
        _, grad_contexts, out_ws, out_bs, grad_tail = kernel2_backward(
            *args, _tokens_bytes(tokens), lambda layer, start, stop: tokens[layer][start:stop], grad_tokens,
            (num_rows * hidden, 0, hidden), num_valid=num_valid,
        )
        return grad_contexts, grad_tokens, out_ws, out_bs, grad_tail
    grad_tokens, grad_contexts, out_ws, out_bs, grad_tail = kernel2_backward(*args, num_valid=num_valid)
    return grad_contexts, grad_tokens.to(dtype), out_ws, out_bs, grad_tail


@_parts_backward.register_fake
def _(grad_loss, contexts, tokens, batch_index, targets, weights, biases, tail, mean_coef, variance,
      train_mapping, train_tail, precision, strategy, num_valid):
    num_states, _, hidden = contexts.shape
    grad_tokens = tokens[0].new_empty((num_states, batch_index.shape[0], hidden))
    grad_ws = [torch.empty_like(w) for w in weights] if train_mapping else []
    grad_bs = [torch.empty_like(b) for b in biases] if train_mapping else []
    grad_tail = torch.empty_like(tail) if train_tail else tail.new_empty(0)
    return torch.empty_like(contexts), grad_tokens, grad_ws, grad_bs, grad_tail


def _parts_setup(ctx, inputs, output):
    contexts, tokens, batch_index, targets, weights, biases, tail, mean_coef, variance, precision, strategy, \
        num_valid = inputs
    ctx.precision, ctx.strategy = precision, strategy
    ctx.num_states, ctx.num_linear = len(tokens), len(weights)
    ctx.train_mapping = any(p.requires_grad for p in (*weights, *biases))
    ctx.train_tail = tail.requires_grad
    ctx.save_for_backward(contexts, *tokens, batch_index, targets, *weights, *biases, tail, mean_coef, variance,
                          num_valid)


def _parts_autograd(ctx, grad_loss):
    n, k = ctx.num_states, ctx.num_linear
    contexts, *saved = ctx.saved_tensors
    tokens, (batch_index, targets), saved = saved[:n], saved[n : n + 2], saved[n + 2 :]
    weights, biases, (tail, mean_coef, variance, num_valid) = saved[:k], saved[k : 2 * k], saved[2 * k :]
    grad_contexts, grad_tokens, grad_ws, grad_bs, grad_tail = torch.ops.sbpet.triton_parts_backward(
        grad_loss, contexts, list(tokens), batch_index, targets, list(weights), list(biases), tail, mean_coef,
        variance, ctx.train_mapping, ctx.train_tail, ctx.precision, ctx.strategy, num_valid,
    )
    return (
        grad_contexts, list(grad_tokens.unbind(0)), None, None,
        list(grad_ws) if ctx.train_mapping else [None] * k,
        list(grad_bs) if ctx.train_mapping else [None] * k,
        grad_tail if ctx.train_tail else None, None, None, None, None, None,
    )


_parts_forward.register_autograd(_parts_autograd, setup_context=_parts_setup)


def triton_loss_from_parts(contexts, tokens, batch_index, targets, mapping, tail, mean_coef, variance,
                           precision="fp32", strategy=None, num_valid=None):
    """R with kernel 2 from the parts: contexts (L+1 float32 [B, H], or [L+1, B, H]) and L+1
    token-row tensors [N, H] (read where they lie: no stacked copy). Same result as
    :func:`sbpet.backends.torch_backend.bridge_loss_from_parts`. ``strategy``: kernel 2's ("gemm" or
    "fused"; None: :func:`.triton_host.triton_strategy`). ``num_valid``: None, or a fixed capacity's
    0-d int64 device count (:mod:`sbpet.core.positions`): rows from it on are padding."""
    if isinstance(contexts, (list, tuple)):
        contexts = torch.stack(list(contexts))
    weights = [layer.weight for layer in mapping.layers]
    biases = [layer.bias for layer in mapping.layers]
    return torch.ops.sbpet.triton_parts_forward(
        contexts.float(), list(tokens), batch_index, targets, weights, biases, tail, mean_coef, variance, precision,
        triton_strategy(strategy), num_valid,
    )
