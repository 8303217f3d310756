"""The on-chip pieces of kernel 2 (:mod:`.fused_bridge`): operand precision, GELU, the loads of
token rows, weights and biases, the first two Linear layers, the residual against the bridge mean,
and the gradient steps (latent gradient, weight-gradient accumulation). ``@triton.jit`` device
functions only; the kernels that chain them and their host launchers live in :mod:`.fused_bridge`.
"""

from __future__ import annotations

import torch

from .context import interpreting, layer_origin

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - exercised on machines without triton
    triton = None
    tl = None

__all__ = ["PRECISIONS", "dot_precision"]

# Dot precision (constexpr DOT_PRECISION) comes from the user's ``precision`` (see
# :data:`PRECISIONS`), never silently from the states' dtype:
# - "fp32": float32 operands, "tf32x3" dots (each operand split into a TF32 head and tail, three
#   tensor-core passes: float32-class accuracy, measured ~1e-7 relative on R; "ieee" would leave the
#   tensor cores idle). A 16-bit token tile is read as is and widened on chip (exact).
# - "tf32": float32 operands rounded to TF32 (10-bit mantissa) by the tensor cores, ~1e-3 relative.
# - "bf16": bfloat16 operands (the mapping's weight tiles, the token tile and the on-chip
#   activations / gradients are rounded to bf16, 2^-8 relative), float32 accumulation.
# "fp16" (float16 operands) remains a kernel mode for compile checks of float16 states; the public
# precisions are the three above. Under the interpreter "bf16" / "tf32" become "*_emulated": float32
# operands rounded in-kernel to 8 / 10 mantissa bits (round to nearest even), exact products.
PRECISIONS = ("fp32", "tf32", "bf16")
_DOT_OF_PRECISION = {"fp32": "tf32x3", "tf32": "tf32", "bf16": "bf16", "fp16": "fp16"}
_DOT_PRECISIONS = ("fp16", "bf16", "tf32x3", "tf32", "ieee")


def dot_precision(dtype: torch.dtype = torch.float32, precision: str | None = None) -> str:
    """DOT_PRECISION of kernel 2 for ``precision`` ("fp32", "tf32", "bf16").

    ``precision=None`` keeps the states-dtype rule that compile checks of 16-bit kernels use
    (float16 / bfloat16 states: 16-bit operands of that dtype; float32: "fp32")."""
    if precision is None:
        precision = {torch.float16: "fp16", torch.bfloat16: "bf16"}.get(dtype, "fp32")
    try:
        dot = _DOT_OF_PRECISION[precision]
    except KeyError:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}") from None
    if interpreting() and dot in ("bf16", "tf32"):
        # The interpreter computes bf16 casts wrongly (numpy has no bfloat16) and TF32 dots exactly:
        # round the float32 operands in-kernel instead, so the tests see the real rounding.
        dot += "_emulated"
    return dot


if triton is not None:

    @triton.jit
    def gelu(x):
        return 0.5 * x * (1.0 + tl.erf(x * 0.7071067811865476))

    @triton.jit
    def gelu_grad(x):
        cdf = 0.5 * (1.0 + tl.erf(x * 0.7071067811865476))
        return cdf + x * tl.exp(-0.5 * x * x) * 0.3989422804014327

    @triton.jit
    def round_mantissa(x, DROP: tl.constexpr):
        """float32 ``x`` rounded to nearest-even with the low DROP mantissa bits cleared (the
        interpreter's emulation of bf16 (DROP=16) and TF32 (DROP=13) operands)."""
        bits = x.to(tl.float32).to(tl.int32, bitcast=True)
        half = (1 << (DROP - 1)) - 1
        bits = (bits + half + ((bits >> DROP) & 1)) & ~((1 << DROP) - 1)
        return bits.to(tl.float32, bitcast=True)

    @triton.jit
    def operand(x, DOT_PRECISION: tl.constexpr):
        """``x`` in the dtype the dots take: the 16-bit dtype of the states, else float32."""
        if DOT_PRECISION == "bf16":
            return x.to(tl.bfloat16)
        elif DOT_PRECISION == "fp16":
            return x.to(tl.float16)
        elif DOT_PRECISION == "bf16_emulated":
            return round_mantissa(x, 16)
        elif DOT_PRECISION == "tf32_emulated":
            return round_mantissa(x, 13)
        else:
            return x.to(tl.float32)

    @triton.jit
    def dot_acc(a, b, acc, DOT_PRECISION: tl.constexpr):
        """``a @ b (+ acc)`` with float32 accumulation, operands cast by :func:`operand`."""
        a = operand(a, DOT_PRECISION)
        b = operand(b, DOT_PRECISION)
        if DOT_PRECISION == "bf16" or DOT_PRECISION == "fp16":
            return tl.dot(a, b, acc, out_dtype=tl.float32)
        elif DOT_PRECISION == "bf16_emulated" or DOT_PRECISION == "tf32_emulated":
            return tl.dot(a, b, acc, input_precision="ieee", out_dtype=tl.float32)
        else:
            return tl.dot(a, b, acc, input_precision=DOT_PRECISION, out_dtype=tl.float32)

    @triton.jit
    def live_rows(rows, N, num_valid_ptr, PADDED: tl.constexpr):
        """The rows a program works on: below N, and (a fixed capacity, ``PADDED``) below the device
        count ``num_valid``; the rest are padding (sbpet.core.positions) and act as rows past N."""
        ok = rows < N
        if PADDED:
            ok = ok & (rows < tl.load(num_valid_ptr))
        return ok

    @triton.jit
    def token_rows(layer_offsets_ptr, layer_strides_ptr, layer, batch_index_ptr, seq_index_ptr,
                    rows, row_ok, ALIGNED: tl.constexpr):
        """int64 element offset (from the base pointer) of each row's token state, its H stride,
        and its sequence index b."""
        offset, stride_b, stride_s, stride_h = layer_origin(layer_offsets_ptr, layer_strides_ptr, layer, ALIGNED)
        b = tl.load(batch_index_ptr + rows, mask=row_ok, other=0).to(tl.int64)
        s = tl.load(seq_index_ptr + rows, mask=row_ok, other=0).to(tl.int64)
        return offset + b * stride_b + s * stride_s, stride_h, b

    @triton.jit
    def load_tokens(states_ptr, row_off, stride_h, row_ok, k0, H,
                     BLOCK_K: tl.constexpr, CONTIGUOUS_H: tl.constexpr, DOT_PRECISION: tl.constexpr):
        """Token states [M, BLOCK_K] (columns k0..) in the dots' operand dtype."""
        ks = k0 + tl.arange(0, BLOCK_K)
        if CONTIGUOUS_H:
            k_off = ks.to(tl.int64)
        else:
            k_off = ks.to(tl.int64) * stride_h
        ok = row_ok[:, None] & (ks < H)[None, :]
        return operand(tl.load(states_ptr + row_off[:, None] + k_off[None, :], mask=ok, other=0.0), DOT_PRECISION)

    @triton.jit
    def first_layer_chunk(states_ptr, row_off, stride_h, row_ok, context_half_ptr, half_off,
                           w1_ptr, w1_stride, c0, H, D1,
                           BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D1: tl.constexpr,
                           CONTIGUOUS_H: tl.constexpr, DOT_PRECISION: tl.constexpr):
        """Pre-activation of layer 1, columns c0..c0+BLOCK_D1: tokens @ W1[:, H:]^T + context half."""
        cols = c0 + tl.arange(0, BLOCK_D1)
        col_ok = cols < D1
        acc = tl.zeros([BLOCK_M, BLOCK_D1], dtype=tl.float32)
        for k0 in range(0, H, BLOCK_K):
            x = load_tokens(states_ptr, row_off, stride_h, row_ok, k0, H, BLOCK_K, CONTIGUOUS_H, DOT_PRECISION)
            ks = k0 + tl.arange(0, BLOCK_K)
            w_ptr = w1_ptr + cols.to(tl.int64)[None, :] * w1_stride + ks[:, None]
            w = operand(tl.load(w_ptr, mask=(ks < H)[:, None] & col_ok[None, :], other=0.0), DOT_PRECISION)
            acc = dot_acc(x, w, acc, DOT_PRECISION)
        ok = row_ok[:, None] & col_ok[None, :]
        half = tl.load(context_half_ptr + half_off[:, None] + cols[None, :], mask=ok, other=0.0)
        return acc + half

    @triton.jit
    def layer1_chunk(states_ptr, row_off, stride_h, row_ok, context_half_ptr, half_off,
                      w1_ptr, w1_stride, a1_ptr, a1_rows, c0, H, D1,
                      BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D1: tl.constexpr,
                      CONTIGUOUS_H: tl.constexpr, DOT_PRECISION: tl.constexpr, A1_SAVED: tl.constexpr):
        """Layer 1's pre-activation, columns c0..c0+BLOCK_D1, in float32: read from the saved a1
        ([rows, D1] at row ``a1_rows``, written by :mod:`.layer_gemm`) or computed here."""
        if A1_SAVED:
            cols = c0 + tl.arange(0, BLOCK_D1)
            ok = row_ok[:, None] & (cols < D1)[None, :]
            return tl.load(a1_ptr + a1_rows[:, None] * D1 + cols[None, :], mask=ok, other=0.0).to(tl.float32)
        else:
            return first_layer_chunk(states_ptr, row_off, stride_h, row_ok, context_half_ptr, half_off,
                                     w1_ptr, w1_stride, c0, H, D1,
                                     BLOCK_M, BLOCK_K, BLOCK_D1, CONTIGUOUS_H, DOT_PRECISION)

    @triton.jit
    def stored(x, ptr, DOT_PRECISION: tl.constexpr):
        """``x`` as it is stored in a buffer of the dots' operand dtype (a1, da1): cast to 16 bits,
        or rounded to bf16 in a float32 buffer under the interpreter's emulation."""
        if DOT_PRECISION == "bf16_emulated":
            x = round_mantissa(x, 16)
        return x.to(ptr.dtype.element_ty)

    @triton.jit
    def load_weight_t(w_ptr, out0, in0, D_OUT, D_IN,
                       BLOCK_IN: tl.constexpr, BLOCK_OUT: tl.constexpr, DOT_PRECISION: tl.constexpr):
        """W[out0:out0+BLOCK_OUT, in0:in0+BLOCK_IN]^T [BLOCK_IN, BLOCK_OUT], as a dot operand."""
        i = in0 + tl.arange(0, BLOCK_IN)
        o = out0 + tl.arange(0, BLOCK_OUT)
        ok = (i < D_IN)[:, None] & (o < D_OUT)[None, :]
        return operand(tl.load(w_ptr + o[None, :] * D_IN + i[:, None], mask=ok, other=0.0), DOT_PRECISION)

    @triton.jit
    def load_weight(w_ptr, out0, in0, D_OUT, D_IN,
                     BLOCK_OUT: tl.constexpr, BLOCK_IN: tl.constexpr, DOT_PRECISION: tl.constexpr):
        """W[out0:out0+BLOCK_OUT, in0:in0+BLOCK_IN] [BLOCK_OUT, BLOCK_IN], as a dot operand."""
        o = out0 + tl.arange(0, BLOCK_OUT)
        i = in0 + tl.arange(0, BLOCK_IN)
        ok = (o < D_OUT)[:, None] & (i < D_IN)[None, :]
        return operand(tl.load(w_ptr + o[:, None] * D_IN + i[None, :], mask=ok, other=0.0), DOT_PRECISION)

    @triton.jit
    def load_bias(b_ptr, out0, D_OUT, BLOCK_OUT: tl.constexpr):
        o = out0 + tl.arange(0, BLOCK_OUT)
        return tl.load(b_ptr + o, mask=o < D_OUT, other=0.0).to(tl.float32)

    @triton.jit
    def second_layer(states_ptr, row_off, stride_h, row_ok, context_half_ptr, half_off,
                      w1_ptr, w1_stride, a1_ptr, a1_rows, w2_ptr, b2_ptr, H, D1, D2,
                      BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D1: tl.constexpr,
                      P2: tl.constexpr, CONTIGUOUS_H: tl.constexpr, DOT_PRECISION: tl.constexpr,
                      A1_SAVED: tl.constexpr):
        """Pre-activation of layer 2 [M, P2], accumulated over the layer-1 chunks."""
        a2 = tl.zeros([BLOCK_M, P2], dtype=tl.float32)
        for c0 in range(0, D1, BLOCK_D1):
            a1 = layer1_chunk(states_ptr, row_off, stride_h, row_ok, context_half_ptr, half_off,
                               w1_ptr, w1_stride, a1_ptr, a1_rows, c0, H, D1,
                               BLOCK_M, BLOCK_K, BLOCK_D1, CONTIGUOUS_H, DOT_PRECISION, A1_SAVED)
            w2 = load_weight_t(w2_ptr, 0, c0, D2, D1, BLOCK_D1, P2, DOT_PRECISION)
            a2 = dot_acc(gelu(a1), w2, a2, DOT_PRECISION)
        return a2 + load_bias(b2_ptr, 0, D2, P2)[None, :]

    @triton.jit
    def residual(z, c0, D, tail_ptr, targets, mean_coef, row_ok, BLOCK_C: tl.constexpr):
        """METHOD.md step 7 residual z - mean_coef * tail[target] on columns c0..; 0 outside the data."""
        cols = c0 + tl.arange(0, BLOCK_C)
        ok = row_ok[:, None] & (cols < D)[None, :]
        ends = tl.load(tail_ptr + targets[:, None] * D + cols[None, :], mask=ok, other=0.0).to(tl.float32)
        return tl.where(ok, z - mean_coef * ends, 0.0)

    @triton.jit
    def latent_grad(z, c0, D, tail_ptr, grad_tail_ptr, targets, mean_coef, inv_var, out_scale, row_ok,
                     BLOCK_C: tl.constexpr, TRAIN_TAIL: tl.constexpr):
        """Unscaled d loss / d z = r / var_l on columns c0.., and the tail's share (times out_scale)
        scattered by label."""
        dz = residual(z, c0, D, tail_ptr, targets, mean_coef, row_ok, BLOCK_C) * inv_var
        if TRAIN_TAIL:
            cols = c0 + tl.arange(0, BLOCK_C)
            ok = row_ok[:, None] & (cols < D)[None, :]
            tl.atomic_add(grad_tail_ptr + targets[:, None] * D + cols[None, :], (-mean_coef * out_scale) * dz,
                          mask=ok)
        return dz

    @triton.jit
    def accumulate(ptr, out0, in0, D_OUT, D_IN, value, out_scale,
                    BLOCK_OUT: tl.constexpr, BLOCK_IN: tl.constexpr):
        """float32 atomic add of a [BLOCK_OUT, BLOCK_IN] weight-gradient tile times out_scale."""
        o = out0 + tl.arange(0, BLOCK_OUT)
        i = in0 + tl.arange(0, BLOCK_IN)
        ok = (o < D_OUT)[:, None] & (i < D_IN)[None, :]
        tl.atomic_add(ptr + o.to(tl.int64)[:, None] * D_IN + i[None, :], value * out_scale, mask=ok)

    @triton.jit
    def accumulate_bias(ptr, out0, D_OUT, value, out_scale, BLOCK_OUT: tl.constexpr):
        o = out0 + tl.arange(0, BLOCK_OUT)
        tl.atomic_add(ptr + o, value * out_scale, mask=o < D_OUT)

    @triton.jit
    def segmented_add(value_a, start_a, value_b, start_b):
        """Combine step of a segmented inclusive sum (``tl.associative_scan``): a row flagged as
        the start of a segment drops what came before it. Associative, so the scan's fixed tree
        gives the same bits every run."""
        return tl.where(start_b, value_b, value_a + value_b), start_a | start_b
