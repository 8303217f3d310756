"""The precision of g's matrix products: the user's choice, honoured by every backend.

``precision`` names how the mapping's dots are computed, whatever the hidden states' dtype:

- ``"fp32"``: float32 operands and accumulation (float64 when the mapping is float64). The
  torch path runs exact float32 GEMMs (TF32 off for the call, on CUDA); the triton path runs
  "tf32x3" tensor-core dots (float32-class accuracy).
- ``"tf32"``: operands rounded to TF32 (10-bit mantissa), float32 accumulation. On CUDA the
  tensor cores do the rounding; on CPU it is emulated (round to nearest) so that the result and
  its error can be checked anywhere.
- ``"bf16"``: bfloat16 operands (8-bit mantissa), float32 accumulation.

The contexts, the bridge residual and the reduction stay float32 in every mode: only the dots
change. Measured errors against float64 are in docs/precision.md.
"""

from __future__ import annotations

import contextlib

import torch

__all__ = ["PRECISIONS", "autocast_off", "check_precision", "matmul", "linear", "round_to_tf32", "matmul_scope"]

PRECISIONS = ("fp32", "tf32", "bf16")


def check_precision(precision: str) -> str:
    """Return ``precision`` if it is one of :data:`PRECISIONS`, else raise ValueError naming it."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    return precision


def round_to_tf32(x: torch.Tensor) -> torch.Tensor:
    """Round a float32 tensor to the nearest TF32 value (10 explicit mantissa bits; ties away from
    zero), kept in float32. Non-float32 tensors are returned as they are."""
    if x.dtype != torch.float32:
        return x
    bits = x.contiguous().view(torch.int32)
    rounded = (bits + 0x1000) & ~0x1FFF
    # Inf/NaN keep their bits (rounding could turn a large finite value into inf, as TF32 does).
    special = (bits & 0x7F800000) == 0x7F800000
    return torch.where(special, bits, rounded).view(torch.float32)


@contextlib.contextmanager
def matmul_scope(device: torch.device, precision: str):
    """On CUDA, let float32 GEMMs use TF32 exactly when ``precision == "tf32"`` for the block
    (restored after). Elsewhere nothing to set."""
    if device.type != "cuda":
        yield
        return
    flags = torch.backends.cuda.matmul
    saved = flags.allow_tf32
    flags.allow_tf32 = precision == "tf32"
    try:
        yield
    finally:
        flags.allow_tf32 = saved


def _compute_dtype(*tensors: torch.Tensor) -> torch.dtype:
    dtype = torch.float32
    for t in tensors:
        dtype = torch.promote_types(dtype, t.dtype)
    return dtype


def matmul(a: torch.Tensor, b: torch.Tensor, precision: str) -> torch.Tensor:
    """``a @ b`` at ``precision``; the result is float32 (float64 when an operand is float64).

    Used inside the torch backend's own forward and backward (no autograd through it)."""
    dtype = _compute_dtype(a, b)
    if precision == "bf16":
        return torch.matmul(a.to(torch.bfloat16), b.to(torch.bfloat16)).to(dtype)
    a, b = a.to(dtype), b.to(dtype)
    if precision == "tf32" and a.device.type != "cuda":
        a, b = round_to_tf32(a), round_to_tf32(b)
    with matmul_scope(a.device, precision):
        return torch.matmul(a, b)


class _RoundTF32(torch.autograd.Function):
    """TF32 rounding with a straight-through gradient (the emulated operand rounding)."""

    @staticmethod
    def forward(ctx, x):
        return round_to_tf32(x)

    @staticmethod
    def backward(ctx, grad):
        return grad


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, precision: str) -> torch.Tensor:
    """``F.linear`` at ``precision``, differentiable (the reference backend's form): bf16 casts
    the operands (autograd's products are then bf16 too); tf32 rounds them (on CPU) or lets the
    GEMM use TF32 (on CUDA, forward only); the result is float32 (float64 for a float64 mapping)."""
    dtype = _compute_dtype(x, weight)
    if precision == "bf16":
        out = torch.nn.functional.linear(x.to(torch.bfloat16), weight.to(torch.bfloat16)).to(dtype)
    else:
        x, weight = x.to(dtype), weight.to(dtype)
        if precision == "tf32" and x.device.type != "cuda":
            x, weight = _RoundTF32.apply(x), _RoundTF32.apply(weight)
        with matmul_scope(x.device, precision):
            out = torch.nn.functional.linear(x, weight)
    return out if bias is None else out + bias.to(dtype)


def autocast_off(device: torch.device):
    """A region where autocast is off on ``device``'s type, so that ``precision`` alone decides how
    g's products run (a no-op for device types without autocast, such as ``meta``)."""
    device_type = torch.device(device).type
    if device_type == "meta":
        return contextlib.nullcontext()
    return torch.autocast(device_type, enabled=False)
