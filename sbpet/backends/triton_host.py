"""Host-side helpers of the Triton backend, shared by the whole-states ops
(:mod:`.triton_backend`) and the parts ops (:mod:`.triton_parts`): whether Triton can run here,
the bridge marginals on the device, kernel 2's backward with the context half's torch products."""

from __future__ import annotations

import os

import torch

from ..core.precision import matmul

__all__ = [
    "STRATEGIES", "STRATEGY_ENV", "check_triton_available", "context_half", "context_half_grads", "device_marginals",
    "device_vector", "flat_states", "interpreting", "kernel2_backward", "kernel2_forward", "kernel_sequences",
    "prepare_states", "row_scale", "segment_tensors",
    "triton_is_usable", "triton_strategy", "zero_parameter_grads",
]


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def check_triton_available(device) -> None:
    """Raise ValueError, with the reason, when the triton backend cannot run on ``device``."""
    device = torch.device(device)
    try:
        import triton  # noqa: F401
    except ImportError as exc:
        raise ValueError(f"backend='triton' needs the triton package, which is not importable: {exc}") from exc
    from ..kernels import context

    interpreted = getattr(context, "context_forward_kernel", None)
    interpreted = type(interpreted).__name__ == "InterpretedFunction"
    if device.type == "cpu":
        if not interpreting():
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
    if interpreting() or interpreted:
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


def device_vector(values: torch.Tensor, device: torch.device) -> torch.Tensor:
    """``values`` as float32 on ``device``: cast there when already there (no host round trip),
    else from pinned memory (no host synchronisation)."""
    if values.device == torch.device(device):
        return values.detach().to(torch.float32)
    host = values.detach().to("cpu", torch.float32)
    if device.type == "cuda":
        return host.pin_memory().to(device, non_blocking=True)  # no host synchronisation
    return host.to(device)


def device_marginals(mean_coef, variance, device):
    """float32 mean coefficients and 1 / variance [L+1] on ``device`` (no host synchronisation)."""
    return device_vector(mean_coef, device), device_vector(1.0 / variance.double(), device)


def zero_parameter_grads(weights, biases, tail, train_mapping: bool, train_tail: bool):
    """The weight, bias and tail gradients of a batch with no regularised position (N == 0)."""
    grad_ws = [torch.zeros_like(w) for w in weights] if train_mapping else []
    grad_bs = [torch.zeros_like(b) for b in biases] if train_mapping else []
    grad_tail = torch.zeros_like(tail) if train_tail else tail.new_empty(0)
    return grad_ws, grad_bs, grad_tail


def kernel_sequences(attention_mask, segment_index, segment_start, segment_end, slots: int):
    """Kernel 1's :class:`sbpet.kernels.context.Sequences` from a batch's segments
    (:class:`sbpet.core.positions.Segments`' tensors), on the device: the float32 mask and 1 / count
    of each sequence (an empty slot's count is taken as 1: no position refers to it)."""
    from ..kernels import context

    from ..core.positions import Segments

    real = attention_mask != 0
    counts = Segments(segment_index, segment_start, segment_end, slots).counts(real)
    return context.Sequences(real.to(torch.float32).contiguous(), 1.0 / counts.clamp(min=1).to(torch.float32),
                             segment_index.contiguous(), segment_start.contiguous(), segment_end.contiguous(), slots)


def segment_tensors(segments, attention_mask):
    """(index [B, S], start [G], end [G], slots) of ``segments`` (None: one sequence per row)."""
    if segments is None:
        from ..core.positions import Segments

        batch, seq = attention_mask.shape
        segments = Segments.per_row(batch, seq, attention_mask.device)
    return segments.index, segments.start, segments.end, segments.slots


def flat_states(hidden_states):
    """The layers as kernel 2 reads them by flat position (``context.flat_table``): each as it is,
    or a contiguous copy of one whose batch stride is not S times its sequence stride (rare)."""
    from ..kernels import context

    return [h if context.flat_rows_ok(h) else h.contiguous() for h in hidden_states]


def prepare_states(hidden_states, attention_mask, weights, mean_coef, variance, segments):
    """(kernel 1's layer table, kernel 2's flat table, kernel 1's sequences, float32 mean_coef and
    1 / variance on the device, contiguous weights, the layers the tables point into: keep them
    alive while the kernels run, a copy of :func:`flat_states` among them); ``segments`` =
    :func:`segment_tensors`."""
    from ..kernels import context

    device = hidden_states[0].device
    table = context.layer_table(hidden_states)  # kernel 1 reads every layer in place, any strides
    states = flat_states(hidden_states)
    flat = context.flat_table(states)
    sequences = kernel_sequences(attention_mask, *segments)
    mean_coef_d, inv_var = device_marginals(mean_coef, variance, device)
    weights = [w.contiguous() for w in weights]
    return table, flat, sequences, mean_coef_d, inv_var, weights, states


def context_half(context: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, precision: str) -> torch.Tensor:
    """METHOD.md step 3, first Linear's context half, once per (layer, sequence): float32 [L+1, B, d1]."""
    hidden = context.shape[-1]
    return (matmul(context, weight[:, :hidden].T, precision) + bias.float()).contiguous()


STRATEGIES = ("gemm", "fused")
STRATEGY_ENV = "SBPET_TRITON_STRATEGY"


def triton_strategy(strategy: str | None = None) -> str:
    """Which kernel-2 strategy runs: ``strategy`` when given, else ``SBPET_TRITON_STRATEGY``, else
    "gemm" (layer 1 as large-tile GEMMs, :mod:`.triton_gemm`; the model in benchmarks/NOTES.md
    predicts it ahead of the fused kernel at every suite shape). "fused": everything on chip
    (:mod:`sbpet.kernels.fused_bridge`), no buffer of size [N, d1]. ``auto`` times both."""
    chosen = strategy or os.environ.get(STRATEGY_ENV, "").strip() or "gemm"
    if chosen not in STRATEGIES:
        source = "strategy" if strategy else f"the environment variable {STRATEGY_ENV}"
        raise ValueError(f"{source} must be one of {STRATEGIES}, got {chosen!r}")
    return chosen


def kernel2_forward(strategy, table, num_states, batch_index, seq_index, targets, contexts, weights, biases, tail,
                    mean_coef_d, inv_var, precision, states_bytes, num_valid=None):
    """R (float32 scalar) by kernel 2 with ``strategy``; N > 0. ``num_valid``: None, or a 0-d int64
    device tensor (a fixed capacity, :mod:`sbpet.core.positions`): only the rows below it count, and
    R is their mean, divided on the device."""
    from ..kernels import fused_bridge
    from . import triton_gemm

    num_rows = batch_index.shape[0]
    half = context_half(contexts, weights[0], biases[0], precision)
    args = (table, num_states, batch_index.contiguous(), seq_index.contiguous(), targets.contiguous(), half,
            weights, [b.contiguous() for b in biases], tail.contiguous(), mean_coef_d, inv_var, precision)
    if strategy == "gemm":
        total = triton_gemm.gemm_forward(*args, states_bytes, num_valid=num_valid)
    else:
        total = fused_bridge.bridge_forward(*args, num_valid=num_valid)
    if num_valid is None:
        return total / (num_states * num_rows)
    return total / (num_states * num_valid.clamp(min=1)).to(total.dtype)


def row_scale(grad_loss, num_states: int, num_rows: int, num_valid=None):
    """(float32 0-d grad_loss, float inv_pairs) whose product scales every row's gradient: 1 / pairs.
    A fixed capacity's count is folded into ``grad_loss`` on the device (no host read)."""
    grad_loss = grad_loss.to(torch.float32).reshape(())
    if num_valid is None:
        return grad_loss.contiguous(), 1.0 / (num_states * num_rows)
    return (grad_loss / num_valid.clamp(min=1).to(torch.float32)).contiguous(), 1.0 / num_states


def kernel2_backward(grad_loss, table, batch_index, seq_index, targets, weights, biases, tail, mean_coef_d,
                      inv_var, contexts, train_mapping, train_tail, precision, strategy="fused", states_bytes=0,
                      rows_of=None, out=None, out_strides=None, states_context=None, num_valid=None):
    """Kernel 2's backward plus the small torch products of the context half (shared by the
    whole-states and the parts ops). Returns float32 grad_tokens [L+1, N, H] (None with the "gemm"
    strategy, which writes the rows' gradients into ``out`` itself: see
    :func:`.triton_gemm.gemm_backward` for ``rows_of``, ``out``, ``out_strides`` and
    ``states_context``), float32 grad_contexts [L+1, B, H], the weight and bias grads (empty unless
    train_mapping) and the tail grad (an empty tensor unless train_tail). ``num_valid``: see
    :func:`kernel2_forward`; padding rows get zero gradients."""
    from ..kernels import fused_bridge
    from . import triton_gemm

    num_states, _, hidden = contexts.shape
    num_rows = batch_index.shape[0]
    half = context_half(contexts, weights[0], biases[0], precision)
    grad_loss, inv_pairs = row_scale(grad_loss, num_states, num_rows, num_valid)
    args = (batch_index.contiguous(), seq_index.contiguous(), targets.contiguous(), half)
    params = (weights, [b.contiguous() for b in biases], tail.contiguous(), mean_coef_d, inv_var)
    if strategy == "gemm":
        grad_tokens = None
        grad_half, grad_contexts, grads = triton_gemm.gemm_backward(
            grad_loss, inv_pairs, table, *args, contexts, *params, train_mapping, train_tail, precision, states_bytes,
            rows_of, out, out_strides, states_context, num_valid,
        )
    else:
        grad_tokens, grad_half, grads = fused_bridge.bridge_backward(
            grad_loss, inv_pairs, table, num_states, *args, *params, train_mapping, train_tail, precision,
            num_valid=num_valid,
        )
        grad_contexts = matmul(grad_half, weights[0][:, :hidden], precision)
    out_ws, out_bs, grad_tail = context_half_grads(
        grad_half, contexts, weights, biases, tail, grads, train_mapping, train_tail, precision)
    return grad_tokens, grad_contexts, out_ws, out_bs, grad_tail


def context_half_grads(grad_half, contexts, weights, biases, tail, grads, train_mapping, train_tail, precision):
    """The context half's share of the parameter gradients (half = contexts @ W1c^T + b1, so its
    gradient flows to W1c and b1) joined with kernel 2's ``ChainGrads``: the weight and bias grads
    in the parameters' dtypes (empty unless train_mapping), the tail grad (an empty tensor unless
    train_tail)."""
    hidden = contexts.shape[-1]
    out_ws, out_bs = [], []
    if train_mapping:
        flat_half = grad_half.reshape(-1, grad_half.shape[-1])
        grad_w1_context = matmul(flat_half.T, contexts.reshape(-1, hidden), precision)
        out_ws.append(torch.cat([grad_w1_context, grads.w1_token], dim=1).to(weights[0].dtype))
        out_bs.append(flat_half.sum(dim=0).to(biases[0].dtype))
        out_ws += [g.to(w.dtype) for g, w in zip(grads.ws, weights[1:])]
        out_bs += [g.to(b.dtype) for g, b in zip(grads.bs, biases[1:])]
    grad_tail = grads.tail.to(tail.dtype) if train_tail else tail.new_empty(0)
    return out_ws, out_bs, grad_tail
