"""Kernel 2: fused projection + bridge log-density (METHOD.md steps 2-7), forward and backward.

A program owns a tile of BLOCK_M regularised positions of one layer (grid: row tiles x layers).
It gathers the token states straight from that layer's tensor (see :mod:`.context` for the layer
table), applies the token half of the first Linear in BLOCK_K x BLOCK_D1 steps, adds the context
half ``ctx @ W1[:, :H]^T + b1`` (precomputed once per (layer, sequence) by the host: [L+1, B, d1]),
applies GELU and chains the remaining Linear layers on chip, forms the residual against
``mean_coef[l] * tail[target]``, scales it by ``1 / (2 var_l)`` and reduces to one partial sum per
program. Nothing of size [rows, 2H] or [rows, d1] reaches global memory.

On-chip layout of the chain (M = BLOCK_M rows):
- layer 1 is computed one BLOCK_D1-column chunk at a time (inner loop over H in BLOCK_K steps);
- layer 2's pre-activation [M, d2] is accumulated in registers over those chunks;
- layer 3 is computed one BLOCK_N3-column chunk at a time from gelu(layer 2); with 3 layers each
  chunk is scored at once (the loss is a sum over latent columns), with 4 layers it feeds layer 4's
  [M, D] accumulator.

The backward recomputes all of this (nothing per row is saved) and walks back down the chain:
gradients of the latent chunk -> layer 3/4 -> layer 2 (in registers) -> a second pass over the
layer-1 chunks that recomputes each chunk and produces the gradient of the context half (summed
inside the tile per sequence and written once per (tile, sequence) pair, then summed over a
sequence's pairs in order by ``pair_sum_kernel``), the token-state rows (float32 [L+1, N, H], owned
by one program, consumed by kernel 1's backward), and, when the mapping is trained, the weights
(float32 atomics). The tail gradient is a float32 atomic scatter by label. So with g and the tail
frozen (PET training) the backward uses no atomics and gives the same bits on every run; training g
or the tail brings the atomics back (the dispatcher knows: ``dispatch.ATOMIC_CANDIDATES``; the GEMM
strategy then runs its trained chain in torch instead).
With ``A1_SAVED`` (the GEMM strategy, :mod:`.layer_gemm`) layer 1's chunks are read from a1 instead of
computed, and the backward writes da1 over a1 instead of the token rows.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .bridge_chain import PRECISIONS, dot_precision  # noqa: F401  (re-exported)
from .chain_config import SAVED_CHAIN_MAX_P2, MAX_LINEAR, BridgeConfig, bridge_config, saved_chain_fits  # noqa: F401
from . import segments
from .context import LayerTable, interpreting

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - exercised on machines without triton
    triton = None
    tl = None

__all__ = [
    "BridgeConfig", "ChainGrads", "bridge_config", "bridge_forward", "bridge_backward", "dot_precision", "MAX_LINEAR",
    "PRECISIONS",
]


if triton is not None:
    from .bridge_chain import (
        accumulate, accumulate_bias, dot_acc, gelu, gelu_grad, latent_grad, layer1_chunk, live_rows, load_bias,
        load_tokens, load_weight, load_weight_t, operand, residual, second_layer, segmented_add, stored, token_rows,
    )
    @triton.jit
    def bridge_forward_kernel(
        states_ptr, layer_offsets_ptr, layer_strides_ptr,
        batch_index_ptr, seq_index_ptr, targets_ptr,
        context_half_ptr,  # float32 [G, B, D1]
        w1_ptr, w1_stride,  # token half W1[:, H:] (row stride 2H)
        a1_ptr,  # [G, N, D1] layer 1's saved pre-activation (A1_SAVED)
        w2_ptr, b2_ptr, w3_ptr, b3_ptr, w4_ptr, b4_ptr,
        tail_ptr, mean_coef_ptr, inv_var_ptr,  # mean_coef, inv_var [G]
        partial_ptr,  # float32 [G, num_tiles] (out)
        num_valid_ptr,  # int64 [] (PADDED): rows from num_valid on are padding
        layer0, N, B, H, D1, D2, D3, D4,
        NUM_LINEAR: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D1: tl.constexpr, BLOCK_N3: tl.constexpr,
        P2: tl.constexpr, P4: tl.constexpr,
        CONTIGUOUS_H: tl.constexpr, ALIGNED: tl.constexpr, DOT_PRECISION: tl.constexpr,
        A1_SAVED: tl.constexpr, PADDED: tl.constexpr,
    ):
        pid = tl.program_id(0)
        layer = tl.program_id(1).to(tl.int64)  # within the launch's group of layers (G of them)
        rows = pid * BLOCK_M + tl.arange(0, BLOCK_M)
        row_ok = live_rows(rows, N, num_valid_ptr, PADDED)
        row_off, stride_h, b = token_rows(layer_offsets_ptr, layer_strides_ptr, layer0 + layer,
                                           batch_index_ptr, seq_index_ptr, rows, row_ok, ALIGNED)
        half_off = (layer * B + b) * D1
        a1_rows = layer * N + rows.to(tl.int64)
        targets = tl.load(targets_ptr + rows, mask=row_ok, other=0).to(tl.int64)
        mean_coef = tl.load(mean_coef_ptr + layer)
        sq = tl.zeros([BLOCK_M], dtype=tl.float32)
        if NUM_LINEAR == 1:
            for c0 in range(0, D1, BLOCK_D1):
                z = layer1_chunk(states_ptr, row_off, stride_h, row_ok, context_half_ptr, half_off,
                                  w1_ptr, w1_stride, a1_ptr, a1_rows, c0, H, D1,
                                  BLOCK_M, BLOCK_K, BLOCK_D1, CONTIGUOUS_H, DOT_PRECISION, A1_SAVED)
                r = residual(z, c0, D1, tail_ptr, targets, mean_coef, row_ok, BLOCK_D1)
                sq += tl.sum(r * r, axis=1)
        else:
            a2 = second_layer(states_ptr, row_off, stride_h, row_ok, context_half_ptr, half_off,
                               w1_ptr, w1_stride, a1_ptr, a1_rows, w2_ptr, b2_ptr, H, D1, D2,
                               BLOCK_M, BLOCK_K, BLOCK_D1, P2, CONTIGUOUS_H, DOT_PRECISION, A1_SAVED)
            if NUM_LINEAR == 2:
                r = residual(a2, 0, D2, tail_ptr, targets, mean_coef, row_ok, P2)
                sq += tl.sum(r * r, axis=1)
            else:
                g2 = gelu(a2)
                if NUM_LINEAR == 3:
                    for c0 in range(0, D3, BLOCK_N3):
                        w3 = load_weight_t(w3_ptr, c0, 0, D3, D2, P2, BLOCK_N3, DOT_PRECISION)
                        z = dot_acc(g2, w3, None, DOT_PRECISION)
                        z += load_bias(b3_ptr, c0, D3, BLOCK_N3)[None, :]
                        r = residual(z, c0, D3, tail_ptr, targets, mean_coef, row_ok, BLOCK_N3)
                        sq += tl.sum(r * r, axis=1)
                else:
                    a4 = tl.zeros([BLOCK_M, P4], dtype=tl.float32)
                    for c0 in range(0, D3, BLOCK_N3):
                        w3 = load_weight_t(w3_ptr, c0, 0, D3, D2, P2, BLOCK_N3, DOT_PRECISION)
                        a3 = dot_acc(g2, w3, None, DOT_PRECISION)
                        a3 += load_bias(b3_ptr, c0, D3, BLOCK_N3)[None, :]
                        w4 = load_weight_t(w4_ptr, 0, c0, D4, D3, BLOCK_N3, P4, DOT_PRECISION)
                        a4 = dot_acc(gelu(a3), w4, a4, DOT_PRECISION)
                    a4 += load_bias(b4_ptr, 0, D4, P4)[None, :]
                    r = residual(a4, 0, D4, tail_ptr, targets, mean_coef, row_ok, P4)
                    sq += tl.sum(r * r, axis=1)
        half_inv_var = 0.5 * tl.load(inv_var_ptr + layer)
        tl.store(partial_ptr + layer * tl.num_programs(0) + pid, tl.sum(sq, axis=0) * half_inv_var)

    @triton.jit
    def bridge_backward_kernel(
        states_ptr, layer_offsets_ptr, layer_strides_ptr,
        batch_index_ptr, seq_index_ptr, targets_ptr,
        context_half_ptr,
        w1_ptr, w1_stride,
        a1_ptr,  # [G, N, D1] layer 1's pre-activation, replaced by its unscaled gradient (A1_SAVED)
        w2_ptr, b2_ptr, w3_ptr, b3_ptr, w4_ptr, b4_ptr,
        tail_ptr, mean_coef_ptr, inv_var_ptr,
        grad_loss_ptr, inv_pairs,
        grad_tokens_ptr,  # float32 [G, N, H], zeroed (out, unless A1_SAVED)
        pair_ids_ptr,  # int32 [N]: the (tile, sequence) pair of each row (tile_sequence_pairs)
        grad_pairs_ptr,  # float32 [G, num_pairs, D1] (out): the context half's gradient per pair
        grad_w1_ptr,  # float32 [D1, H] token half, zeroed (out, TRAIN_MAPPING)
        grad_w2_ptr, grad_b2_ptr, grad_w3_ptr, grad_b3_ptr, grad_w4_ptr, grad_b4_ptr,
        grad_tail_ptr,  # float32 [V, D], zeroed (out, TRAIN_TAIL)
        num_valid_ptr,  # int64 [] (PADDED): rows from num_valid on are padding
        layer0, N, B, H, D1, D2, D3, D4, num_pairs,
        NUM_LINEAR: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D1: tl.constexpr, BLOCK_N3: tl.constexpr,
        P2: tl.constexpr, P4: tl.constexpr,
        CONTIGUOUS_H: tl.constexpr, ALIGNED: tl.constexpr, DOT_PRECISION: tl.constexpr,
        TRAIN_MAPPING: tl.constexpr, TRAIN_TAIL: tl.constexpr, A1_SAVED: tl.constexpr, PADDED: tl.constexpr,
    ):
        pid = tl.program_id(0)
        layer = tl.program_id(1).to(tl.int64)  # within the launch's group of layers (G of them)
        rows = pid * BLOCK_M + tl.arange(0, BLOCK_M)
        row_ok = live_rows(rows, N, num_valid_ptr, PADDED)
        row_off, stride_h, b = token_rows(layer_offsets_ptr, layer_strides_ptr, layer0 + layer,
                                           batch_index_ptr, seq_index_ptr, rows, row_ok, ALIGNED)
        half_off = (layer * B + b) * D1
        a1_rows = layer * N + rows.to(tl.int64)
        targets = tl.load(targets_ptr + rows, mask=row_ok, other=0).to(tl.int64)
        mean_coef = tl.load(mean_coef_ptr + layer)
        # d R / d z = (z - mean) / var_l * grad / pairs. The chain carries the unscaled r / var_l
        # (order 1-100) and every output is multiplied by out_scale = grad / pairs when it is
        # written: with 16-bit dot operands a pre-scaled gradient (pairs ~1e7 for a Llama batch)
        # would underflow float16.
        inv_var = tl.load(inv_var_ptr + layer)
        out_scale = tl.load(grad_loss_ptr).to(tl.float32) * inv_pairs

        # Walk down to the gradient of layer 2's pre-activation (da2, kept on chip).
        if NUM_LINEAR == 2:
            a2 = second_layer(states_ptr, row_off, stride_h, row_ok, context_half_ptr, half_off,
                               w1_ptr, w1_stride, a1_ptr, a1_rows, w2_ptr, b2_ptr, H, D1, D2,
                               BLOCK_M, BLOCK_K, BLOCK_D1, P2, CONTIGUOUS_H, DOT_PRECISION, A1_SAVED)
            da2 = latent_grad(a2, 0, D2, tail_ptr, grad_tail_ptr, targets, mean_coef, inv_var, out_scale, row_ok,
                               P2, TRAIN_TAIL)
        if NUM_LINEAR >= 3:
            a2 = second_layer(states_ptr, row_off, stride_h, row_ok, context_half_ptr, half_off,
                               w1_ptr, w1_stride, a1_ptr, a1_rows, w2_ptr, b2_ptr, H, D1, D2,
                               BLOCK_M, BLOCK_K, BLOCK_D1, P2, CONTIGUOUS_H, DOT_PRECISION, A1_SAVED)
            g2 = gelu(a2)
            dg2 = tl.zeros([BLOCK_M, P2], dtype=tl.float32)
            if NUM_LINEAR == 3:
                for c0 in range(0, D3, BLOCK_N3):
                    w3t = load_weight_t(w3_ptr, c0, 0, D3, D2, P2, BLOCK_N3, DOT_PRECISION)
                    z = dot_acc(g2, w3t, None, DOT_PRECISION)
                    z += load_bias(b3_ptr, c0, D3, BLOCK_N3)[None, :]
                    dz = latent_grad(z, c0, D3, tail_ptr, grad_tail_ptr, targets, mean_coef, inv_var, out_scale,
                                      row_ok, BLOCK_N3, TRAIN_TAIL)
                    if TRAIN_MAPPING:
                        accumulate(grad_w3_ptr, c0, 0, D3, D2,
                                    dot_acc(tl.trans(dz), g2, None, DOT_PRECISION), out_scale, BLOCK_N3, P2)
                        accumulate_bias(grad_b3_ptr, c0, D3, tl.sum(dz, axis=0), out_scale, BLOCK_N3)
                    w3 = load_weight(w3_ptr, c0, 0, D3, D2, BLOCK_N3, P2, DOT_PRECISION)
                    dg2 = dot_acc(dz, w3, dg2, DOT_PRECISION)
            else:
                # Layer 4 needs all of layer 3: one pass for the latent point, one for the grads.
                a4 = tl.zeros([BLOCK_M, P4], dtype=tl.float32)
                for c0 in range(0, D3, BLOCK_N3):
                    w3t = load_weight_t(w3_ptr, c0, 0, D3, D2, P2, BLOCK_N3, DOT_PRECISION)
                    a3 = dot_acc(g2, w3t, None, DOT_PRECISION)
                    a3 += load_bias(b3_ptr, c0, D3, BLOCK_N3)[None, :]
                    w4t = load_weight_t(w4_ptr, 0, c0, D4, D3, BLOCK_N3, P4, DOT_PRECISION)
                    a4 = dot_acc(gelu(a3), w4t, a4, DOT_PRECISION)
                a4 += load_bias(b4_ptr, 0, D4, P4)[None, :]
                dz = latent_grad(a4, 0, D4, tail_ptr, grad_tail_ptr, targets, mean_coef, inv_var, out_scale, row_ok,
                                  P4, TRAIN_TAIL)
                if TRAIN_MAPPING:
                    accumulate_bias(grad_b4_ptr, 0, D4, tl.sum(dz, axis=0), out_scale, P4)
                for c0 in range(0, D3, BLOCK_N3):
                    w3t = load_weight_t(w3_ptr, c0, 0, D3, D2, P2, BLOCK_N3, DOT_PRECISION)
                    a3 = dot_acc(g2, w3t, None, DOT_PRECISION)
                    a3 += load_bias(b3_ptr, c0, D3, BLOCK_N3)[None, :]
                    w4 = load_weight(w4_ptr, 0, c0, D4, D3, P4, BLOCK_N3, DOT_PRECISION)
                    da3 = dot_acc(dz, w4, None, DOT_PRECISION) * gelu_grad(a3)
                    if TRAIN_MAPPING:
                        accumulate(grad_w4_ptr, 0, c0, D4, D3,
                                    dot_acc(tl.trans(dz), gelu(a3), None, DOT_PRECISION), out_scale, P4, BLOCK_N3)
                        accumulate(grad_w3_ptr, c0, 0, D3, D2,
                                    dot_acc(tl.trans(da3), g2, None, DOT_PRECISION), out_scale, BLOCK_N3, P2)
                        accumulate_bias(grad_b3_ptr, c0, D3, tl.sum(da3, axis=0), out_scale, BLOCK_N3)
                    w3 = load_weight(w3_ptr, c0, 0, D3, D2, BLOCK_N3, P2, DOT_PRECISION)
                    dg2 = dot_acc(da3, w3, dg2, DOT_PRECISION)
            da2 = dg2 * gelu_grad(a2)
        if NUM_LINEAR >= 2:
            if TRAIN_MAPPING:
                accumulate_bias(grad_b2_ptr, 0, D2, tl.sum(da2, axis=0), out_scale, P2)

        # The context half's gradient is summed over the rows of each sequence inside this tile
        # (a segmented scan: rows come sorted by sequence) and stored once per (tile, sequence)
        # pair; the pairs are summed in a fixed order afterwards (pair_sum_kernel). No atomics.
        local = tl.arange(0, BLOCK_M)
        pair = tl.load(pair_ids_ptr + rows, mask=row_ok, other=-1)
        pair_start = pair != tl.load(pair_ids_ptr + rows - 1, mask=row_ok & (local > 0), other=-2)
        pair_end = row_ok & (pair != tl.load(pair_ids_ptr + rows + 1, mask=(rows + 1 < N) & (local < BLOCK_M - 1),
                                            other=-3))
        pair = pair.to(tl.int64)

        # Layer 1, chunk by chunk: recompute, take the gradient of the chunk's pre-activation and
        # push it to the context half, the token rows and W1's token half.
        for c0 in range(0, D1, BLOCK_D1):
            a1 = layer1_chunk(states_ptr, row_off, stride_h, row_ok, context_half_ptr, half_off,
                               w1_ptr, w1_stride, a1_ptr, a1_rows, c0, H, D1,
                               BLOCK_M, BLOCK_K, BLOCK_D1, CONTIGUOUS_H, DOT_PRECISION, A1_SAVED)
            if NUM_LINEAR == 1:
                da1 = latent_grad(a1, c0, D1, tail_ptr, grad_tail_ptr, targets, mean_coef, inv_var, out_scale,
                                   row_ok, BLOCK_D1, TRAIN_TAIL)
            else:
                if TRAIN_MAPPING:
                    accumulate(grad_w2_ptr, 0, c0, D2, D1,
                                dot_acc(tl.trans(da2), gelu(a1), None, DOT_PRECISION), out_scale, P2, BLOCK_D1)
                w2 = load_weight(w2_ptr, 0, c0, D2, D1, P2, BLOCK_D1, DOT_PRECISION)
                da1 = dot_acc(da2, w2, None, DOT_PRECISION) * gelu_grad(a1)
            cols = c0 + tl.arange(0, BLOCK_D1)
            ok = row_ok[:, None] & (cols < D1)[None, :]
            da1 = tl.where(ok, da1, 0.0)
            pair_sums, _ = tl.associative_scan(
                (da1 * out_scale, tl.broadcast_to(pair_start[:, None], (BLOCK_M, BLOCK_D1))), 0, segmented_add)
            pair_ptr = grad_pairs_ptr + ((layer * num_pairs + pair) * D1)[:, None] + cols[None, :]
            tl.store(pair_ptr, pair_sums, mask=pair_end[:, None] & ok)
            tl.debug_barrier()
            if A1_SAVED:
                # da1 replaces a1 in place (this program owns these rows; every thread has read the
                # chunk before the barrier). The token rows' and W1's gradients are GEMMs on it.
                tl.store(a1_ptr + a1_rows[:, None] * D1 + cols[None, :], stored(da1, a1_ptr, DOT_PRECISION), mask=ok)
            else:
                _token_rows_grad(states_ptr, row_off, stride_h, row_ok, rows, layer, N, H, D1, da1, cols,
                                 w1_ptr, w1_stride, grad_tokens_ptr, grad_w1_ptr, c0, out_scale,
                                 BLOCK_K, BLOCK_D1, CONTIGUOUS_H, DOT_PRECISION, TRAIN_MAPPING)

    @triton.jit
    def _token_rows_grad(states_ptr, row_off, stride_h, row_ok, rows, layer, N, H, D1, da1, cols,
                         w1_ptr, w1_stride, grad_tokens_ptr, grad_w1_ptr, c0, out_scale,
                         BLOCK_K: tl.constexpr, BLOCK_D1: tl.constexpr, CONTIGUOUS_H: tl.constexpr,
                         DOT_PRECISION: tl.constexpr, TRAIN_MAPPING: tl.constexpr):
        """The fused strategy's token rows (and W1 token half) gradient of one layer-1 chunk. The
        rows belong to this program alone: read-add-write, the caller's barrier making the previous
        chunk's writes visible to whichever thread reads them now."""
        for k0 in range(0, H, BLOCK_K):
            ks = k0 + tl.arange(0, BLOCK_K)
            k_ok = ks < H
            w1 = operand(tl.load(w1_ptr + cols.to(tl.int64)[:, None] * w1_stride + ks[None, :],
                                  mask=(cols < D1)[:, None] & k_ok[None, :], other=0.0), DOT_PRECISION)
            dx = dot_acc(da1, w1, None, DOT_PRECISION)
            token_ptr = grad_tokens_ptr + (layer * N + rows.to(tl.int64))[:, None] * H + ks[None, :]
            tok_ok = row_ok[:, None] & k_ok[None, :]
            tl.store(token_ptr, tl.load(token_ptr, mask=tok_ok, other=0.0) + dx * out_scale, mask=tok_ok)
            if TRAIN_MAPPING:
                x = load_tokens(states_ptr, row_off, stride_h, row_ok, k0, H, BLOCK_K, CONTIGUOUS_H, DOT_PRECISION)
                accumulate(grad_w1_ptr, c0, k0, D1, H,
                            dot_acc(tl.trans(da1), x, None, DOT_PRECISION), out_scale, BLOCK_D1, BLOCK_K)


def _layer_args(weights, biases):
    """Pointers for W2..W4 / b2..b4 (layer 1's token half is passed apart); absent ones repeat
    layer 1's tensors and are never read (NUM_LINEAR is a constexpr)."""
    args = []
    for i in range(1, MAX_LINEAR):
        if i < len(weights):
            args += [weights[i], biases[i]]
        else:
            args += [weights[0], biases[0]]
    return args


def _dims(weights):
    dims = [w.shape[0] for w in weights] + [1] * (MAX_LINEAR - len(weights))
    return dims


def bridge_forward(
    table: LayerTable,
    num_states: int,
    batch_index: torch.Tensor,
    seq_index: torch.Tensor,
    targets: torch.Tensor,
    context_half: torch.Tensor,
    weights,
    biases,
    tail: torch.Tensor,
    mean_coef: torch.Tensor,
    inv_var: torch.Tensor,
    precision: str = "fp32",
    a1: torch.Tensor | None = None,
    layer0: int = 0,
    num_valid: torch.Tensor | None = None,
) -> torch.Tensor:
    """METHOD.md steps 2-7: the sum over (layer, row) of ``|z - mean_coef_l e|^2 / (2 var_l)``
    (float32 scalar, not yet divided by the number of pairs). N must be > 0.

    weights/biases: the mapping's contiguous Linear parameters; ``context_half`` float32
    [G, B, d1] = ``context @ W1[:, :H]^T + b1``; mean_coef, inv_var float32 [G] on the device, for
    the ``num_states`` = G layers ``layer0 ..`` of ``table``. ``table`` locates row ``n`` of layer
    ``l`` at ``(batch_index[n], seq_index[n])`` of that layer's tensor: the hidden states themselves
    (:func:`.context.layer_table`) or captured token rows (:func:`.context.rows_table`, with
    ``seq_index = arange(N)``). ``precision``: see :func:`dot_precision`. ``a1`` [G, N, d1] (the
    GEMM strategy, :mod:`.layer_gemm`): layer 1's pre-activation, read instead of computed.
    ``num_valid``: None (every row is regularised) or a 0-d int64 device tensor (a fixed capacity,
    :mod:`sbpet.core.positions`): rows from ``num_valid`` on are padding and add nothing.
    """
    batch, hidden = context_half.shape[1], weights[0].shape[1] // 2
    num_rows = batch_index.shape[0]
    dims = _dims(weights)
    dot = dot_precision(precision=precision)
    cfg = bridge_config(hidden, [w.shape[0] for w in weights], precision=precision, a1_saved=a1 is not None)
    launch = dict(cfg)
    num_warps, num_stages = launch.pop("num_warps"), launch.pop("num_stages")
    num_tiles = triton.cdiv(num_rows, cfg["BLOCK_M"])
    partial = torch.empty((num_states, num_tiles), dtype=torch.float32, device=tail.device)
    w1_token = weights[0][:, hidden:]
    bridge_forward_kernel[(num_tiles, num_states)](
        table.base, table.offsets, table.strides,
        batch_index, seq_index, targets, context_half,
        w1_token, w1_token.stride(0), partial if a1 is None else a1, *_layer_args(weights, biases),
        tail, mean_coef, inv_var, partial, partial if num_valid is None else num_valid,
        layer0, num_rows, batch, hidden, *dims,
        CONTIGUOUS_H=table.contiguous_h, ALIGNED=table.aligned, DOT_PRECISION=dot, A1_SAVED=a1 is not None,
        PADDED=num_valid is not None, num_warps=num_warps, num_stages=num_stages, **launch,
    )
    return partial.sum()


@dataclass
class ChainGrads:
    """float32 gradient accumulators of kernel 2's backward, shared by the launches of one call
    (the GEMM strategy launches once per group of layers): W1's token half, W2..Wk, b2..bk (when
    the mapping trains) and the tail (when it trains); ``None`` / empty otherwise."""

    w1_token: torch.Tensor | None
    ws: list
    bs: list
    tail: torch.Tensor | None

    @classmethod
    def zeros(cls, weights, biases, tail, train_mapping: bool, train_tail: bool, w1_token: bool = True):
        f32 = dict(dtype=torch.float32, device=tail.device)
        hidden = weights[0].shape[1] // 2
        return cls(
            torch.zeros((weights[0].shape[0], hidden), **f32) if train_mapping and w1_token else None,
            [torch.zeros(w.shape, **f32) for w in weights[1:]] if train_mapping else [],
            [torch.zeros(b.shape, **f32) for b in biases[1:]] if train_mapping else [],
            torch.zeros(tail.shape, **f32) if train_tail else None,
        )


def bridge_backward(
    grad_loss: torch.Tensor,
    inv_pairs: float,
    table: LayerTable,
    num_states: int,
    batch_index: torch.Tensor,
    seq_index: torch.Tensor,
    targets: torch.Tensor,
    context_half: torch.Tensor,
    weights,
    biases,
    tail: torch.Tensor,
    mean_coef: torch.Tensor,
    inv_var: torch.Tensor,
    train_mapping: bool,
    train_tail: bool,
    precision: str = "fp32",
    a1: torch.Tensor | None = None,
    layer0: int = 0,
    grads: ChainGrads | None = None,
    num_valid: torch.Tensor | None = None,
):
    """Gradients of ``grad_loss * inv_pairs * bridge_forward(...)`` (same layer group arguments).

    Returns (float32 grad_tokens [G, N, H], or None with ``a1``, which is then overwritten with
    layer 1's unscaled gradient ``da1`` (times ``grad_loss * inv_pairs`` it is the gradient);
    float32 grad_context_half [G, B, d1]; the :class:`ChainGrads`, ``grads`` when given (added to),
    whose W1 token half stays untouched with ``a1``). ``num_valid``: as in :func:`bridge_forward`;
    padding rows get zero token gradients and leave ``a1`` as it was.
    """
    batch, hidden = context_half.shape[1], weights[0].shape[1] // 2
    num_rows = batch_index.shape[0]
    device = tail.device
    dims = _dims(weights)
    dot = dot_precision(precision=precision)
    if a1 is not None and (train_mapping or train_tail or not saved_chain_fits([w.shape[0] for w in weights])):
        raise ValueError("the A1_SAVED backward is built for a frozen g and tail and P2 <= "
                         f"{SAVED_CHAIN_MAX_P2} (the GEMM strategy runs the others in torch)")
    cfg = bridge_config(hidden, [w.shape[0] for w in weights], train_mapping=train_mapping,
                        backward=True, precision=precision, a1_saved=a1 is not None)
    launch = dict(cfg)
    num_warps, num_stages = launch.pop("num_warps"), launch.pop("num_stages")
    f32 = dict(dtype=torch.float32, device=device)
    grads = grads or ChainGrads.zeros(weights, biases, tail, train_mapping, train_tail, w1_token=a1 is None)
    grad_tokens = torch.zeros((num_states, num_rows, hidden), **f32) if a1 is None else None
    pair_ids, num_pairs, pair_starts = segments.tile_sequence_pairs(batch_index, cfg["BLOCK_M"], batch, num_valid)
    grad_pairs = torch.empty((num_states, num_pairs, dims[0]), **f32)  # every used slot is written
    unused = grad_pairs  # the pointer of every absent output (never written: constexpr flags)
    grad_layer_args = []
    for i in range(MAX_LINEAR - 1):
        grad_layer_args += [grads.ws[i], grads.bs[i]] if i < len(grads.ws) else [unused, unused]
    w1_token = weights[0][:, hidden:]
    num_tiles = triton.cdiv(num_rows, cfg["BLOCK_M"])
    bridge_backward_kernel[(num_tiles, num_states)](
        table.base, table.offsets, table.strides,
        batch_index, seq_index, targets, context_half,
        w1_token, w1_token.stride(0), unused if a1 is None else a1, *_layer_args(weights, biases),
        tail, mean_coef, inv_var,
        grad_loss, float(inv_pairs),
        unused if a1 is not None else grad_tokens, pair_ids, grad_pairs,
        unused if grads.w1_token is None else grads.w1_token, *grad_layer_args,
        unused if grads.tail is None else grads.tail, pair_ids if num_valid is None else num_valid,
        layer0, num_rows, batch, hidden, *dims, num_pairs,
        CONTIGUOUS_H=table.contiguous_h, ALIGNED=table.aligned, DOT_PRECISION=dot,
        TRAIN_MAPPING=bool(train_mapping), TRAIN_TAIL=bool(train_tail), A1_SAVED=a1 is not None,
        PADDED=num_valid is not None,
        num_warps=num_warps, num_stages=num_stages, **launch,
    )
    return grad_tokens, segments.sum_pairs(grad_pairs, pair_starts, batch), grads
