"""The Triton backend: the fused kernels of :mod:`sbpet.kernels` behind two custom ops.

Same contract as :func:`sbpet.reference.reference_bridge_loss`. ``sbpet::triton_bridge_forward``
and ``sbpet::triton_bridge_backward`` are registered with ``torch.library.custom_op`` (so a
``torch.compile``d function sees two opaque ops with fake implementations, and an autograd formula
joins them); this file only wires tensors: the context half of the first Linear and its small
gradients are plain torch matmuls on [L+1, B, *] tensors.
"""

from __future__ import annotations

import os

import torch

from .precision import matmul

__all__ = [
    "triton_bridge_loss", "triton_capture_layer", "triton_loss_from_parts", "check_triton_available",
    "triton_is_usable",
]


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def check_triton_available(device) -> None:
    """Raise ValueError, with the reason, when the triton backend cannot run on ``device``."""
    device = torch.device(device)
    try:
        import triton  # noqa: F401
    except ImportError as exc:
        raise ValueError(f"backend='triton' needs the triton package, which is not importable: {exc}") from exc
    from .kernels import context

    interpreted = getattr(context, "context_forward_kernel", None)
    interpreted = type(interpreted).__name__ == "InterpretedFunction"
    if device.type == "cpu":
        if not _interpreting():
            raise ValueError(
                "backend='triton' got CPU tensors: the Triton kernels run on CUDA GPUs "
                "(set TRITON_INTERPRET=1 before importing sbpet to run them in the CPU interpreter, "
                "or use backend='torch')"
            )
        if not interpreted:
            raise ValueError(
                "backend='triton' on CPU: TRITON_INTERPRET=1 was set after sbpet.kernels was imported; "
                "set it before the first import"
            )
        return
    if device.type != "cuda":
        raise ValueError(f"backend='triton' runs on CUDA (or CPU under TRITON_INTERPRET=1), got {device}")
    if _interpreting() or interpreted:
        raise ValueError(
            "backend='triton' under TRITON_INTERPRET=1 runs on CPU tensors only; unset it for CUDA tensors"
        )
    if not torch.cuda.is_available():
        raise ValueError("backend='triton' got CUDA tensors but CUDA is not available")


def triton_is_usable(device) -> bool:
    """True when :func:`check_triton_available` accepts ``device`` (for backend='auto')."""
    try:
        check_triton_available(device)
    except ValueError:
        return False
    return True


def _device_vector(values: torch.Tensor, device: torch.device) -> torch.Tensor:
    host = values.detach().to("cpu", torch.float32)
    if device.type == "cuda":
        return host.pin_memory().to(device, non_blocking=True)  # no host synchronisation
    return host.to(device)


def _device_marginals(mean_coef, variance, device):
    """float32 mean coefficients and 1 / variance [L+1] on ``device`` (no host synchronisation)."""
    return _device_vector(mean_coef, device), _device_vector(1.0 / variance.double(), device)


def _zero_parameter_grads(weights, biases, tail, train_mapping: bool, train_tail: bool):
    """The weight, bias and tail gradients of a batch with no regularised position (N == 0)."""
    grad_ws = [torch.zeros_like(w) for w in weights] if train_mapping else []
    grad_bs = [torch.zeros_like(b) for b in biases] if train_mapping else []
    grad_tail = torch.zeros_like(tail) if train_tail else tail.new_empty(0)
    return grad_ws, grad_bs, grad_tail


def _prepare(hidden_states, attention_mask, weights, mean_coef, variance):
    from .kernels import context

    device = hidden_states[0].device
    table = context.layer_table(hidden_states)
    mask, inv_count = context.mask_weights(attention_mask)
    mean_coef_d, inv_var = _device_marginals(mean_coef, variance, device)
    weights = [w.contiguous() for w in weights]
    return table, mask, inv_count, mean_coef_d, inv_var, weights


def _context_half(context: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, precision: str) -> torch.Tensor:
    """SPEC step 3, first Linear's context half, once per (layer, sequence): float32 [L+1, B, d1]."""
    hidden = context.shape[-1]
    return (matmul(context, weight[:, :hidden].T, precision) + bias.float()).contiguous()


def _kernel2_backward(grad_loss, table, batch_index, seq_index, targets, weights, biases, tail, mean_coef_d,
                      inv_var, contexts, train_mapping, train_tail, precision):
    """Kernel 2's backward plus the small torch products of the context half (shared by the
    whole-states and the parts ops). Returns float32 grad_tokens [L+1, N, H], float32
    grad_contexts [L+1, B, H], the weight and bias grads (empty unless train_mapping) and the
    tail grad (an empty tensor unless train_tail)."""
    from .kernels import fused_bridge

    num_states, _, hidden = contexts.shape
    num_rows = batch_index.shape[0]
    half = _context_half(contexts, weights[0], biases[0], precision)
    grad_tokens, grad_half, grad_w1_token, grad_ws, grad_bs, grad_tail = fused_bridge.bridge_backward(
        grad_loss.to(torch.float32).reshape(()).contiguous(), 1.0 / (num_states * num_rows), table, num_states,
        batch_index.contiguous(), seq_index.contiguous(), targets.contiguous(),
        half, weights, [b.contiguous() for b in biases], tail.contiguous(), mean_coef_d, inv_var,
        train_mapping, train_tail, precision,
    )
    # Context half: half = contexts @ W1c^T + b1, so its gradient flows to the contexts (and W1c, b1).
    grad_contexts = matmul(grad_half, weights[0][:, :hidden], precision)
    out_ws, out_bs = [], []
    if train_mapping:
        flat_half = grad_half.reshape(-1, grad_half.shape[-1])
        grad_w1_context = matmul(flat_half.T, contexts.reshape(-1, hidden), precision)
        out_ws.append(torch.cat([grad_w1_context, grad_w1_token], dim=1).to(weights[0].dtype))
        out_bs.append(flat_half.sum(dim=0).to(biases[0].dtype))
        out_ws += [g.to(w.dtype) for g, w in zip(grad_ws, weights[1:])]
        out_bs += [g.to(b.dtype) for g, b in zip(grad_bs, biases[1:])]
    grad_tail = grad_tail.to(tail.dtype) if train_tail else tail.new_empty(0)
    return grad_tokens, grad_contexts, out_ws, out_bs, grad_tail


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
) -> tuple[torch.Tensor, torch.Tensor]:
    """Returns (R as a float32 scalar, the float32 contexts [L+1, B, H] saved for backward)."""
    from .kernels import context as context_kernels
    from .kernels import fused_bridge

    num_states = len(hidden_states)
    num_rows = batch_index.shape[0]
    table, mask, inv_count, mean_coef_d, inv_var, weights = _prepare(
        hidden_states, attention_mask, weights, mean_coef, variance
    )
    contexts = context_kernels.context_forward(table, num_states, mask, inv_count)
    if num_rows == 0:
        return torch.zeros((), dtype=torch.float32, device=tail.device), contexts
    half = _context_half(contexts, weights[0], biases[0], precision)
    total = fused_bridge.bridge_forward(
        table, num_states, batch_index.contiguous(), seq_index.contiguous(), targets.contiguous(),
        half, weights, [b.contiguous() for b in biases], tail.contiguous(), mean_coef_d, inv_var, precision,
    )
    return total / (num_states * num_rows), contexts


@_bridge_forward.register_fake
def _(hidden_states, attention_mask, batch_index, seq_index, targets, weights, biases, tail, mean_coef, variance,
      precision):
    batch, _, hidden = hidden_states[0].shape
    loss = tail.new_empty((), dtype=torch.float32)
    contexts = tail.new_empty((len(hidden_states), batch, hidden), dtype=torch.float32)
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
) -> tuple[torch.Tensor, list[torch.Tensor], list[torch.Tensor], torch.Tensor]:
    """Returns (grad of every layer stacked [L+1, B, S, H] in the states' dtype, grads of the
    weights and biases (empty lists unless train_mapping), grad of the tail (an empty tensor
    unless train_tail))."""
    from .kernels import context as context_kernels

    num_states = len(hidden_states)
    num_rows = batch_index.shape[0]
    batch, seq, hidden = hidden_states[0].shape
    dtype, device = hidden_states[0].dtype, hidden_states[0].device
    if num_rows == 0:
        grad_states = torch.zeros((num_states, batch, seq, hidden), dtype=dtype, device=device)
        return grad_states, *_zero_parameter_grads(weights, biases, tail, train_mapping, train_tail)
    table, mask, inv_count, mean_coef_d, inv_var, weights = _prepare(
        hidden_states, attention_mask, weights, mean_coef, variance
    )
    grad_tokens, grad_contexts, out_ws, out_bs, grad_tail = _kernel2_backward(
        grad_loss, table, batch_index, seq_index, targets, weights, biases, tail, mean_coef_d, inv_var,
        contexts, train_mapping, train_tail, precision,
    )
    grad_states = context_kernels.context_backward(
        grad_contexts, mask, inv_count, batch_index, seq_index, grad_tokens, dtype
    )
    return grad_states, out_ws, out_bs, grad_tail


@_bridge_backward.register_fake
def _(grad_loss, hidden_states, attention_mask, batch_index, seq_index, targets, weights, biases, tail,
      mean_coef, variance, contexts, train_mapping, train_tail, precision):
    batch, seq, hidden = hidden_states[0].shape
    grad_states = hidden_states[0].new_empty((len(hidden_states), batch, seq, hidden))
    grad_ws = [torch.empty_like(w) for w in weights] if train_mapping else []
    grad_bs = [torch.empty_like(b) for b in biases] if train_mapping else []
    grad_tail = torch.empty_like(tail) if train_tail else tail.new_empty(0)
    return grad_states, grad_ws, grad_bs, grad_tail


def _setup_context(ctx, inputs, output):
    hidden_states, attention_mask, batch_index, seq_index, targets, weights, biases, tail, mean_coef, variance, \
        precision = inputs
    _, contexts = output
    ctx.precision = precision
    ctx.mark_non_differentiable(contexts)
    ctx.num_states = len(hidden_states)
    ctx.num_linear = len(weights)
    ctx.states_need_grad = [h.requires_grad for h in hidden_states]
    ctx.train_mapping = any(p.requires_grad for p in (*weights, *biases))
    ctx.train_tail = tail.requires_grad
    ctx.save_for_backward(
        *hidden_states, attention_mask, batch_index, seq_index, targets, *weights, *biases, tail,
        mean_coef, variance, contexts,
    )


def _backward(ctx, grad_loss, grad_contexts):
    saved = list(ctx.saved_tensors)
    n, k = ctx.num_states, ctx.num_linear
    hidden_states, saved = saved[:n], saved[n:]
    attention_mask, batch_index, seq_index, targets, saved = *saved[:4], saved[4:]
    weights, biases, saved = saved[:k], saved[k : 2 * k], saved[2 * k :]
    tail, mean_coef, variance, contexts = saved
    grad_states, grad_ws, grad_bs, grad_tail = torch.ops.sbpet.triton_bridge_backward(
        grad_loss, hidden_states, attention_mask, batch_index, seq_index, targets, weights, biases,
        tail, mean_coef, variance, contexts, ctx.train_mapping, ctx.train_tail, ctx.precision,
    )
    layer_grads = [g if need else None for g, need in zip(grad_states.unbind(0), ctx.states_need_grad)]
    weight_grads = list(grad_ws) if ctx.train_mapping else [None] * k
    bias_grads = list(grad_bs) if ctx.train_mapping else [None] * k
    return (
        layer_grads, None, None, None, None, weight_grads, bias_grads,
        grad_tail if ctx.train_tail else None, None, None, None,
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
):
    """The bridge regulariser R with the fused Triton kernels. Same arguments and result as
    :func:`sbpet.reference.reference_bridge_loss` (float32 scalar; 0 with zero gradients when
    N == 0). Inputs are validated by :func:`sbpet.bridge_loss`.

    Example (CPU, interpreter):
        >>> # TRITON_INTERPRET=1 python -c "import sbpet; ..."; backend="triton" in sbpet.bridge_loss
    """
    weights = [layer.weight for layer in mapping.layers]
    biases = [layer.bias for layer in mapping.layers]
    loss, _ = torch.ops.sbpet.triton_bridge_forward(
        list(hidden_states), attention_mask, batch_index, seq_index, targets, weights, biases, tail,
        mean_coef, variance, precision,
    )
    return loss


# ----------------------------------------------------------------------------------------------
# The parts interface: per-layer capture with kernel 1, the loss from the parts with kernel 2.


@torch.library.custom_op("sbpet::triton_capture", mutates_args=())
def _capture(
    states: torch.Tensor, attention_mask: torch.Tensor, batch_index: torch.Tensor, seq_index: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """One layer [B, S, H] -> (float32 context [B, H], regularised rows [N, H] in the states' dtype),
    both from kernel 1's one read of the layer."""
    from .kernels import context as context_kernels

    batch, seq, hidden = states.shape
    table = context_kernels.layer_table([states])
    mask, inv_count = context_kernels.mask_weights(attention_mask)
    row_of = context_kernels.row_lookup(batch, seq, batch_index, seq_index)
    tokens = states.new_empty((1, batch_index.shape[0], hidden))
    context = context_kernels.context_forward(table, 1, mask, inv_count, row_of=row_of, tokens_out=tokens)
    return context[0], tokens[0]


@_capture.register_fake
def _(states, attention_mask, batch_index, seq_index):
    batch, _, hidden = states.shape
    return states.new_empty((batch, hidden), dtype=torch.float32), states.new_empty((batch_index.shape[0], hidden))


@torch.library.custom_op("sbpet::triton_capture_backward", mutates_args=())
def _capture_backward(
    grad_context: torch.Tensor, grad_tokens: torch.Tensor, attention_mask: torch.Tensor, batch_index: torch.Tensor,
    seq_index: torch.Tensor, dtype: torch.dtype,
) -> torch.Tensor:
    """The layer's gradient [B, S, H] in ``dtype``, written once by kernel 1's backward."""
    from .kernels import context as context_kernels

    mask, inv_count = context_kernels.mask_weights(attention_mask)
    grad = context_kernels.context_backward(
        grad_context.float()[None].contiguous(), mask, inv_count, batch_index, seq_index,
        grad_tokens[None].contiguous(), dtype,
    )
    return grad[0]


@_capture_backward.register_fake
def _(grad_context, grad_tokens, attention_mask, batch_index, seq_index, dtype):
    batch, seq = attention_mask.shape
    return grad_context.new_empty((batch, seq, grad_context.shape[-1]), dtype=dtype)


def _capture_setup(ctx, inputs, output):
    states, attention_mask, batch_index, seq_index = inputs
    ctx.dtype = states.dtype
    ctx.save_for_backward(attention_mask, batch_index, seq_index)


def _capture_autograd(ctx, grad_context, grad_tokens):
    attention_mask, batch_index, seq_index = ctx.saved_tensors
    grad = torch.ops.sbpet.triton_capture_backward(
        grad_context, grad_tokens, attention_mask, batch_index, seq_index, ctx.dtype
    )
    return grad, None, None, None


_capture.register_autograd(_capture_autograd, setup_context=_capture_setup)


def triton_capture_layer(states, attention_mask, batch_index, seq_index):
    """The parts interface's per-layer capture with kernel 1: (float32 context [B, H], rows [N, H])
    of one layer [B, S, H] (any strides), differentiable."""
    return torch.ops.sbpet.triton_capture(states, attention_mask, batch_index, seq_index)


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
) -> torch.Tensor:
    """R (float32 scalar) from float32 contexts [L+1, B, H] and L+1 token-row tensors [N, H]."""
    from .kernels import context as context_kernels
    from .kernels import fused_bridge

    num_states, num_rows = contexts.shape[0], batch_index.shape[0]
    if num_rows == 0:
        return torch.zeros((), dtype=torch.float32, device=tail.device)
    mean_coef_d, inv_var = _device_marginals(mean_coef, variance, tail.device)
    weights = [w.contiguous() for w in weights]
    half = _context_half(contexts, weights[0], biases[0], precision)
    seq_index = torch.arange(num_rows, device=batch_index.device)
    total = fused_bridge.bridge_forward(
        context_kernels.rows_table(tokens), num_states, batch_index.contiguous(), seq_index, targets.contiguous(),
        half, weights, [b.contiguous() for b in biases], tail.contiguous(), mean_coef_d, inv_var, precision,
    )
    return total / (num_states * num_rows)


@_parts_forward.register_fake
def _(contexts, tokens, batch_index, targets, weights, biases, tail, mean_coef, variance, precision):
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
) -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor], list[torch.Tensor], torch.Tensor]:
    """(float32 grad of the contexts [L+1, B, H], grad of the token rows stacked [L+1, N, H] in
    their dtype, weight and bias grads (empty unless train_mapping), tail grad (empty unless
    train_tail))."""
    from .kernels import context as context_kernels

    num_states, num_rows = contexts.shape[0], batch_index.shape[0]
    hidden = contexts.shape[-1]
    dtype = tokens[0].dtype
    if num_rows == 0:
        grad_tokens = contexts.new_zeros((num_states, 0, hidden), dtype=dtype)
        zeros = _zero_parameter_grads(weights, biases, tail, train_mapping, train_tail)
        return torch.zeros_like(contexts), grad_tokens, *zeros
    mean_coef_d, inv_var = _device_marginals(mean_coef, variance, tail.device)
    weights = [w.contiguous() for w in weights]
    seq_index = torch.arange(num_rows, device=batch_index.device)
    grad_tokens, grad_contexts, out_ws, out_bs, grad_tail = _kernel2_backward(
        grad_loss, context_kernels.rows_table(tokens), batch_index, seq_index, targets, weights, biases, tail,
        mean_coef_d, inv_var, contexts, train_mapping, train_tail, precision,
    )
    return grad_contexts, grad_tokens.to(dtype), out_ws, out_bs, grad_tail


@_parts_backward.register_fake
def _(grad_loss, contexts, tokens, batch_index, targets, weights, biases, tail, mean_coef, variance,
      train_mapping, train_tail, precision):
    num_states, _, hidden = contexts.shape
    grad_tokens = tokens[0].new_empty((num_states, batch_index.shape[0], hidden))
    grad_ws = [torch.empty_like(w) for w in weights] if train_mapping else []
    grad_bs = [torch.empty_like(b) for b in biases] if train_mapping else []
    grad_tail = torch.empty_like(tail) if train_tail else tail.new_empty(0)
    return torch.empty_like(contexts), grad_tokens, grad_ws, grad_bs, grad_tail


def _parts_setup(ctx, inputs, output):
    contexts, tokens, batch_index, targets, weights, biases, tail, mean_coef, variance, precision = inputs
    ctx.precision = precision
    ctx.num_states, ctx.num_linear = len(tokens), len(weights)
    ctx.train_mapping = any(p.requires_grad for p in (*weights, *biases))
    ctx.train_tail = tail.requires_grad
    ctx.save_for_backward(contexts, *tokens, batch_index, targets, *weights, *biases, tail, mean_coef, variance)


def _parts_autograd(ctx, grad_loss):
    n, k = ctx.num_states, ctx.num_linear
    contexts, *saved = ctx.saved_tensors
    tokens, (batch_index, targets), saved = saved[:n], saved[n : n + 2], saved[n + 2 :]
    weights, biases, (tail, mean_coef, variance) = saved[:k], saved[k : 2 * k], saved[2 * k :]
    grad_contexts, grad_tokens, grad_ws, grad_bs, grad_tail = torch.ops.sbpet.triton_parts_backward(
        grad_loss, contexts, list(tokens), batch_index, targets, list(weights), list(biases), tail, mean_coef,
        variance, ctx.train_mapping, ctx.train_tail, ctx.precision,
    )
    return (
        grad_contexts, list(grad_tokens.unbind(0)), None, None,
        list(grad_ws) if ctx.train_mapping else [None] * k,
        list(grad_bs) if ctx.train_mapping else [None] * k,
        grad_tail if ctx.train_tail else None, None, None, None,
    )


_parts_forward.register_autograd(_parts_autograd, setup_context=_parts_setup)


def triton_loss_from_parts(contexts, tokens, batch_index, targets, mapping, tail, mean_coef, variance,
                           precision="fp32"):
    """R with kernel 2 from the parts: contexts (L+1 float32 [B, H], or [L+1, B, H]) and L+1
    token-row tensors [N, H] (read where they lie: no stacked copy). Same result as
    :func:`sbpet.torch_backend.bridge_loss_from_parts`."""
    if isinstance(contexts, (list, tuple)):
        contexts = torch.stack(list(contexts))
    weights = [layer.weight for layer in mapping.layers]
    biases = [layer.bias for layer in mapping.layers]
    return torch.ops.sbpet.triton_parts_forward(
        contexts.float(), list(tokens), batch_index, targets, weights, biases, tail, mean_coef, variance, precision,
    )
