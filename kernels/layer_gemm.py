"""The GEMM strategy's two large products (METHOD.md step 3, layer 1's token half), for many rows.

The fused strategy (:mod:`.fused_bridge`) keeps everything on chip and so recomputes layer 1 in the
backward with small row tiles (16-64 rows, one CTA per SM). Here layer 1 is a GEMM with large tiles
instead, and the rest of g (layers 2..k, the residual, the loss, and their backward down to layer
1's gradient) is kernel 2 run on the saved pre-activation (``A1_SAVED``):

- :func:`first_layer`: ``a1[g, n] = h[layer0 + g][b_n, s_n] @ W1[:, H:]^T + half[g, b_n]``
  (gathering the regularised rows where they lie, the context half added in the epilogue), stored
  in the dots' operand dtype (bfloat16 at precision "bf16", float32 otherwise);
- :func:`token_grads`: ``dX[g, n] = da1[g, n] @ W1[:, H:] * grad / pairs``, plus the context share
  ``mask[b, s] / count[b] * grad_context[g, b]`` in the epilogue, stored once in the states' dtype
  at the row's place in the states' gradient (or in a [G, N, H] rows tensor for the parts route).
  Each output element is written by one program: no atomics, no float32 [L+1, N, H] buffer.

Both launch a grid of (row tiles x column tiles, layers of the group), the row tiles grouped
(GROUP_M) so that programs running together share their W1 tiles in L2. Block sizes by the rows
per layer and the operand width (:func:`gemm_config`): large spill-free tiles for many rows; for a
few dozen rows (the GLUE shapes) 16-row tiles and narrow columns, so that d1 (and H) split over
enough programs to fill the GPU.
"""

from __future__ import annotations

import torch

from .bridge_chain import dot_precision
from .context import LayerTable, interpreting

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - exercised on machines without triton
    triton = None
    tl = None

__all__ = [
    "FEW_ROWS", "KERNELS", "STRIDED_TILES", "TILES", "GemmConfig", "first_layer", "gemm_candidates", "gemm_config", "operand_dtype",
    "tile_class", "token_grads",
]

# Rows per layer below which the few-rows blocks are used.
FEW_ROWS = 256

if triton is not None:
    from .bridge_chain import dot_acc, live_rows, operand, stored, token_rows

    @triton.jit
    def grouped_tile(pid, num_m, num_n, GROUP_M: tl.constexpr):
        """(row tile, column tile) of program ``pid``: GROUP_M row tiles walk the columns together."""
        in_group = GROUP_M * num_n
        first_m = (pid // in_group) * GROUP_M
        size_m = tl.minimum(num_m - first_m, GROUP_M)
        return first_m + (pid % in_group) % size_m, (pid % in_group) // size_m

    @triton.jit
    def tile_product(a_ptrs, a_step, row_ok, b_ptrs, b_step, col_ok, ks, K,
                     BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                     DOT_PRECISION: tl.constexpr):
        """float32 [BLOCK_M, BLOCK_N] = A @ B over K in BLOCK_K steps: ``a_ptrs`` [BLOCK_M, BLOCK_K]
        and ``b_ptrs`` [BLOCK_K, BLOCK_N] point at the first step and advance by ``a_step`` /
        ``b_step`` elements per step (pointers advanced through K, as the spill-free tiles need);
        rows / columns outside ``row_ok`` / ``col_ok`` and K read as 0."""
        acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            k_ok = k0 + ks < K
            a = tl.load(a_ptrs, mask=row_ok[:, None] & k_ok[None, :], other=0.0)
            b = tl.load(b_ptrs, mask=k_ok[:, None] & col_ok[None, :], other=0.0)
            acc = dot_acc(operand(a, DOT_PRECISION), operand(b, DOT_PRECISION), acc, DOT_PRECISION)
            a_ptrs += a_step
            b_ptrs += b_step
        return acc

    @triton.jit
    def first_layer_kernel(
        states_ptr, layer_offsets_ptr, layer_strides_ptr,
        batch_index_ptr, seq_index_ptr,
        context_half_ptr,  # float32 [G, B, D1]
        w1_ptr, w1_stride,  # token half W1[:, H:] [D1, H] (row stride w1_stride)
        a1_ptr,  # [G, N, D1] (out), the dots' operand dtype
        num_valid_ptr,  # int64 [] (PADDED): rows from num_valid on are padding, their a1 0
        layer0, N, B, H, D1,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
        CONTIGUOUS_H: tl.constexpr, ALIGNED: tl.constexpr, DOT_PRECISION: tl.constexpr, PADDED: tl.constexpr,
    ):
        layer = tl.program_id(1).to(tl.int64)
        pid_m, pid_n = grouped_tile(tl.program_id(0), tl.cdiv(N, BLOCK_M), tl.cdiv(D1, BLOCK_N), GROUP_M)
        rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        row_ok = live_rows(rows, N, num_valid_ptr, PADDED)  # loads; every row below N is stored
        row_off, stride_h, b = token_rows(layer_offsets_ptr, layer_strides_ptr, layer0 + layer,
                                           batch_index_ptr, seq_index_ptr, rows, row_ok, ALIGNED)
        cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        col_ok = cols < D1
        ks = tl.arange(0, BLOCK_K)
        # Pointers built once and advanced (the pattern Triton's software pipeliner expects).
        if CONTIGUOUS_H:
            x_ptrs = states_ptr + row_off[:, None] + ks[None, :]
            x_step = BLOCK_K
        else:
            x_ptrs = states_ptr + row_off[:, None] + ks.to(tl.int64)[None, :] * stride_h
            x_step = BLOCK_K * stride_h
        w_ptrs = w1_ptr + cols.to(tl.int64)[None, :] * w1_stride + ks[:, None]
        acc = tile_product(x_ptrs, x_step, row_ok, w_ptrs, BLOCK_K, col_ok, ks, H,
                           BLOCK_M, BLOCK_N, BLOCK_K, DOT_PRECISION)
        ok = row_ok[:, None] & col_ok[None, :]
        acc += tl.load(context_half_ptr + ((layer * B + b) * D1)[:, None] + cols[None, :], mask=ok, other=0.0)
        out = a1_ptr + (layer * N + rows.to(tl.int64))[:, None] * D1 + cols[None, :]
        tl.store(out, stored(acc, a1_ptr, DOT_PRECISION), mask=(rows < N)[:, None] & col_ok[None, :])

    @triton.jit
    def token_grad_kernel(
        da1_ptr,  # [G, N, D1] layer 1's unscaled gradient, the dots' operand dtype
        w1_ptr, w1_stride,
        out_ptr, out_layer_stride, out_b_stride, out_s_stride,  # the row's place (b, s) in layer g
        batch_index_ptr, seq_index_ptr,
        grad_context_ptr,  # float32 [G, B, H] (ADD_CONTEXT)
        mask_ptr,  # float32 [B, S] (ADD_CONTEXT)
        inv_count_ptr,  # float32 [B] (ADD_CONTEXT)
        grad_loss_ptr, inv_pairs,
        N, B, S, H, D1,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
        ADD_CONTEXT: tl.constexpr, DOT_PRECISION: tl.constexpr,
    ):
        layer = tl.program_id(1).to(tl.int64)
        pid_m, pid_n = grouped_tile(tl.program_id(0), tl.cdiv(N, BLOCK_M), tl.cdiv(H, BLOCK_N), GROUP_M)
        rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        row_ok = rows < N
        cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        col_ok = cols < H
        ks = tl.arange(0, BLOCK_K)
        a_ptrs = da1_ptr + ((layer * N + rows.to(tl.int64)) * D1)[:, None] + ks[None, :]
        w_ptrs = w1_ptr + ks.to(tl.int64)[:, None] * w1_stride + cols[None, :]
        acc = tile_product(a_ptrs, BLOCK_K, row_ok, w_ptrs, BLOCK_K * w1_stride, col_ok, ks, D1,
                           BLOCK_M, BLOCK_N, BLOCK_K, DOT_PRECISION)
        acc = acc * (tl.load(grad_loss_ptr).to(tl.float32) * inv_pairs)
        b = tl.load(batch_index_ptr + rows, mask=row_ok, other=0).to(tl.int64)
        s = tl.load(seq_index_ptr + rows, mask=row_ok, other=0).to(tl.int64)
        ok = row_ok[:, None] & col_ok[None, :]
        if ADD_CONTEXT:
            weight = tl.load(mask_ptr + b * S + s, mask=row_ok, other=0.0) * tl.load(inv_count_ptr + b)
            share = tl.load(grad_context_ptr + ((layer * B + b) * H)[:, None] + cols[None, :], mask=ok, other=0.0)
            acc += weight[:, None] * share
        out = out_ptr + (layer * out_layer_stride + b * out_b_stride + s * out_s_stride)[:, None] + cols[None, :]
        tl.store(out, acc.to(out_ptr.dtype.element_ty), mask=ok)


class GemmConfig(dict):
    """Launch parameters of the GEMM strategy's kernels (constexprs plus num_warps / num_stages)."""


def _config(block_m, block_n, block_k, group_m, num_warps, num_stages) -> GemmConfig:
    return GemmConfig(BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, GROUP_M=group_m, num_warps=num_warps,
                      num_stages=num_stages)


# (kernel, rows class, operand width) -> tiles (M, N, K, GROUP_M, warps, stages): the fixed choice
# first, then the others that opt-in autotuning (sbpet.backends.gemm_tuning) times. Every tile
# compiles spill-free on sm_80 and sm_90a with Triton 3.6 and 3.9 (compile_check builds each one,
# for every states dtype, and fails a GEMM-strategy tile that spills); the many-rows alternatives
# have M a multiple of 64 (Hopper's wgmma). benchmarks/NOTES.md has the sweep they came from.
TILES = {
    ("first_layer", "many", 16): [(128, 64, 64, 8, 8, 3), (128, 64, 64, 8, 8, 4), (64, 64, 64, 8, 8, 3),
                                  (128, 64, 32, 8, 8, 3), (128, 32, 64, 8, 4, 3), (128, 64, 64, 4, 8, 3)],
    ("token_grad", "many", 16): [(32, 64, 64, 8, 4, 3), (64, 64, 64, 8, 8, 3), (64, 64, 32, 8, 8, 4)],
    ("first_layer", "few", 16): [(16, 64, 64, 1, 4, 3), (16, 32, 64, 1, 2, 3), (32, 64, 64, 1, 4, 3),
                                 (16, 128, 64, 1, 8, 3)],
    ("token_grad", "few", 16): [(16, 64, 64, 1, 4, 3), (16, 32, 64, 1, 2, 3), (16, 128, 64, 1, 4, 3),
                                (32, 64, 64, 1, 4, 3)],
    ("first_layer", "many", 32): [(64, 32, 32, 8, 4, 3), (128, 32, 32, 8, 8, 3), (64, 32, 32, 8, 4, 4)],
    ("token_grad", "many", 32): [(64, 32, 32, 8, 4, 3), (128, 32, 32, 8, 8, 3), (64, 32, 32, 8, 4, 4),
                                 (64, 64, 32, 8, 8, 3)],
    ("first_layer", "few", 32): [(16, 32, 32, 1, 2, 3), (32, 64, 32, 1, 4, 3)],
    ("token_grad", "few", 32): [(16, 64, 32, 1, 4, 3), (16, 32, 32, 1, 2, 3), (16, 128, 32, 1, 4, 3),
                                (32, 64, 32, 1, 4, 3)],
}
# Layer 1 on states with a non-unit H stride (a strided view; rare), by operand width: their int64
# address arithmetic spills at the tiles above (600 bytes at 128 x 64 x 64, 40 at 16 x 32 x 32 with
# 2 warps on sm_90a); these are spill-free for every states dtype on both targets, Triton 3.6 and 3.9.
STRIDED_TILES = {16: (16, 64, 64, 1, 4, 3), 32: (16, 32, 16, 1, 2, 3)}
# Under the interpreter: small blocks, so that odd test sizes run several tiles and K steps.
INTERPRETER_TILES = [(16, 16, 16, 2, 1, 1), (32, 16, 16, 1, 1, 1), (16, 32, 32, 2, 1, 1)]
KERNELS = ("first_layer", "token_grad")


def tile_class(rows: int, precision: str, kernel: str = "first_layer"):
    """The key of :data:`TILES` for a launch: (kernel, "many" / "few", operand bits)."""
    if kernel not in KERNELS:
        raise ValueError(f"kernel must be one of {KERNELS}, got {kernel!r}")
    wide = dot_precision(precision=precision).split("_")[0] not in ("bf16", "fp16")  # "_emulated": the GPU's
    return kernel, "few" if rows < FEW_ROWS else "many", 32 if wide else 16


def gemm_candidates(rows: int, precision: str, interpret: bool | None = None, kernel: str = "first_layer",
                    contiguous_h: bool = True) -> list[GemmConfig]:
    """The tiles :func:`first_layer` (``kernel="first_layer"``) or :func:`token_grads`
    (``"token_grad"``) may run with for ``rows`` rows per layer at ``precision``: the fixed choice
    (:func:`gemm_config`) first. Layer 1 on strided states (``contiguous_h=False``) has one tile,
    :data:`STRIDED_TILES`."""
    interpret = interpreting() if interpret is None else interpret
    if interpret:
        return [_config(*tile) for tile in INTERPRETER_TILES]
    kernel, rows_class, width = tile_class(rows, precision, kernel)
    if kernel == "first_layer" and not contiguous_h:
        return [_config(*STRIDED_TILES[width])]
    return [_config(*tile) for tile in TILES[kernel, rows_class, width]]


def gemm_config(rows: int, precision: str, interpret: bool | None = None, kernel: str = "first_layer",
                contiguous_h: bool = True) -> GemmConfig:
    """The fixed block sizes of :func:`first_layer` (``kernel="first_layer"``) and
    :func:`token_grads` (``"token_grad"``), keyed on the rows per layer and the dots' operand width;
    each is the largest tile compile_check found spill-free on sm_80 and sm_90a (kernels/README.md).

    Many rows, 16-bit operands: layer 1 in 128 x 64 tiles (BLOCK_K 64, 8 warps: M a multiple of 64,
    Hopper's wgmma shape), the token gradient in 32 x 64 tiles (4 warps; 64-row tiles at 4 warps
    spill 36-120 bytes). float32 operands (tf32x3 / tf32 dots take twice the operand registers):
    64 x 32 tiles, BLOCK_K 32, 4 warps. Fewer than :data:`FEW_ROWS` rows per layer: 16-row tiles,
    64 columns wide (layer 1 at float32 operands: 32 wide, 2 warps; 64 spills 32 bytes on sm_90a
    with Triton 3.9), so that the columns give the GPU enough programs (a few dozen rows per layer
    fill 1-2 row tiles). 3 pipeline stages. Strided states: :data:`STRIDED_TILES`. Under the
    interpreter every block is 16 so that odd test sizes run several tiles and K steps."""
    return gemm_candidates(rows, precision, interpret, kernel, contiguous_h)[0]


def operand_dtype(precision: str) -> torch.dtype:
    """The dtype a1 and da1 are stored in: the dots' operand dtype (bfloat16 at "bf16"; float32
    for "fp32" / "tf32", whose dots round on chip). Under the interpreter bfloat16 is emulated in a
    float32 buffer (values rounded to bf16 by the kernels)."""
    dot = dot_precision(precision=precision)
    if dot == "bf16":
        return torch.bfloat16
    if dot == "fp16":
        return torch.float16
    return torch.float32


def _launch(cfg: GemmConfig):
    launch = dict(cfg)
    return launch, launch.pop("num_warps"), launch.pop("num_stages")


def first_layer(table: LayerTable, layer0: int, num_layers: int, batch_index, seq_index, context_half, w1_token,
                precision: str, out: torch.Tensor, cfg: GemmConfig | None = None,
                num_valid: torch.Tensor | None = None) -> torch.Tensor:
    """Layer 1's pre-activation of layers ``layer0 .. layer0 + G - 1`` into ``out`` [G, N, d1]
    (:func:`operand_dtype`). ``context_half`` float32 [G, B, d1]; ``w1_token`` [d1, H], unit stride
    along H, in the dots' operand dtype or float32. ``cfg``: one of :func:`gemm_candidates` (None:
    the fixed choice). Writes every element of ``out`` (so a repeated launch is harmless).
    ``num_valid`` (a 0-d int64 device tensor, a fixed capacity): rows from it on are padding, whose
    a1 is written as 0 without reading their states (a NaN there never reaches g)."""
    num_rows, width = out.shape[1], out.shape[2]
    hidden = w1_token.shape[1]
    cfg = cfg or gemm_config(num_rows, precision, contiguous_h=table.contiguous_h)
    launch, num_warps, num_stages = _launch(cfg)
    grid = (triton.cdiv(num_rows, cfg["BLOCK_M"]) * triton.cdiv(width, cfg["BLOCK_N"]), num_layers)
    first_layer_kernel[grid](
        table.base, table.offsets, table.strides, batch_index, seq_index, context_half,
        w1_token, w1_token.stride(0), out, out if num_valid is None else num_valid,
        layer0, num_rows, context_half.shape[1], hidden, width,
        CONTIGUOUS_H=table.contiguous_h, ALIGNED=table.aligned, DOT_PRECISION=dot_precision(precision=precision),
        PADDED=num_valid is not None, num_warps=num_warps, num_stages=num_stages, **launch,
    )
    return out


def token_grads(da1: torch.Tensor, w1_token: torch.Tensor, grad_loss: torch.Tensor, inv_pairs: float,
                batch_index, seq_index, out: torch.Tensor, out_strides, precision: str,
                context=None, cfg: GemmConfig | None = None) -> torch.Tensor:
    """Write ``da1 @ w1_token * grad_loss * inv_pairs`` of every row to ``out`` at element offset
    ``g * out_strides[0] + b_n * out_strides[1] + s_n * out_strides[2]`` (H contiguous), in
    ``out``'s dtype. ``context`` = (float32 grad_context [G, C, H], float32 mask [B, S], float32
    inv_count [C]) adds each row's context share first (the whole-states route, whose rows are named
    (context c, flat position p = b * S + s): ``context.flat_table``; the kernel runs with S = 0, so
    ``mask[b * S + s]`` reads the flat position's mask and ``inv_count[b]`` its context's); None
    leaves it out (the parts
    route, whose context gradient is returned apart). ``cfg``: one of :func:`gemm_candidates` (None:
    the fixed choice). Each row's elements are written, not added to (a repeated launch is harmless).
    A fixed capacity's padding rows need no mask here: :func:`first_layer` wrote their a1 as 0 and
    kernel 2's backward (or the torch chain, whose gradient there is 0) leaves it so, so ``da1`` is 0
    there and a padding row gets its context share alone."""
    num_layers, num_rows, width = da1.shape
    hidden = w1_token.shape[1]
    cfg = cfg or gemm_config(num_rows, precision, kernel="token_grad")
    launch, num_warps, num_stages = _launch(cfg)
    grad_context, mask, inv_count = context if context is not None else (da1, da1, da1)
    contexts = grad_context.shape[1] if context is not None else 1
    grid = (triton.cdiv(num_rows, cfg["BLOCK_M"]) * triton.cdiv(hidden, cfg["BLOCK_N"]), num_layers)
    token_grad_kernel[grid](
        da1, w1_token, w1_token.stride(0), out, *out_strides, batch_index, seq_index,
        grad_context, mask, inv_count, grad_loss, float(inv_pairs),
        num_rows, contexts, 0, hidden, width,
        ADD_CONTEXT=context is not None, DOT_PRECISION=dot_precision(precision=precision),
        num_warps=num_warps, num_stages=num_stages, **launch,
    )
    return out
