"""Ordered sums over contiguous segments of rows: the atomic-free reduction of the context half's
gradient (METHOD.md step 3: ``W1 u = W1[:, :H] c + W1[:, H:] h``, so every regularised row of a
sequence adds its layer-1 gradient to that sequence's context half).

Kernel 2's backward (both strategies, :mod:`.fused_bridge` and :mod:`.layer_gemm`) sums a tile's
rows per sequence on chip and stores one vector per (tile, sequence) pair; :func:`sum_pairs` then
adds a sequence's pairs in pair order. Every sum has a fixed order, so the result has the same bits
on every run. :func:`tile_sequence_pairs` numbers the pairs on the device (no host sync).
"""

from __future__ import annotations

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - exercised on machines without triton
    triton = None
    tl = None

__all__ = ["tile_sequence_pairs", "sum_pairs"]

if triton is not None:

    @triton.jit
    def pair_sum_kernel(grad_pairs_ptr, pair_starts_ptr, out_ptr, num_pairs, B, D1, BLOCK_D: tl.constexpr):
        """out[l, b] = the sum of sequence b's (tile, sequence) pairs of layer l, in pair order."""
        layer = tl.program_id(0).to(tl.int64)
        b = tl.program_id(1)
        cols = tl.program_id(2) * BLOCK_D + tl.arange(0, BLOCK_D)
        ok = cols < D1
        acc = tl.zeros([BLOCK_D], dtype=tl.float32)
        for pair in range(tl.load(pair_starts_ptr + b), tl.load(pair_starts_ptr + b + 1)):
            acc += tl.load(grad_pairs_ptr + (layer * num_pairs + pair) * D1 + cols, mask=ok, other=0.0)
        tl.store(out_ptr + (layer * B + b) * D1 + cols, acc, mask=ok)


def tile_sequence_pairs(batch_index: torch.Tensor, block_m: int, batch: int, num_valid: torch.Tensor | None = None):
    """The (tile, sequence) pairs of the context half's reduction, without a host sync.

    Rows must come sorted by sequence (``nonzero`` over [B, S] labels gives them so). A pair starts
    at every tile's first row and wherever the sequence changes, so there are at most
    tiles + B - 1. Returns (int32 pair id of every row [N], number of pair slots, int64 [B + 1]
    first pair of each sequence, the last entry the end).

    ``num_valid`` (a fixed capacity, :mod:`sbpet.core.positions`: a 0-d int64 device tensor): only
    rows below it need be sorted; the padding rows after them (kernel 2 masks them out) are counted
    as one more sequence B, whose pairs follow every real sequence's and are left out of the sums
    (the last entry of the starts, where B's pairs begin, ends sequence B - 1). Slots: tiles + B."""
    device = batch_index.device
    num_rows = batch_index.shape[0]
    sequences = batch
    if num_valid is not None:
        padding = torch.arange(num_rows, device=device) >= num_valid
        batch_index = batch_index.masked_fill(padding, batch)
        sequences = batch + 1
    if num_rows > 1:
        torch._assert_async(torch.all(batch_index[1:] >= batch_index[:-1]),
                            "kernel 2's backward needs the regularised rows sorted by sequence")
    starts = torch.ones(num_rows, dtype=torch.bool, device=device)
    starts[1:] = batch_index[1:] != batch_index[:-1]
    starts[::block_m] = True
    pair_ids = torch.cumsum(starts, 0, dtype=torch.int32) - 1
    num_pairs = min(num_rows, triton.cdiv(num_rows, block_m) + sequences - 1)
    pair_sequence = torch.full((num_pairs,), sequences, dtype=torch.int64, device=device)
    pair_sequence[pair_ids.long()] = batch_index  # every row of a pair writes the same value
    pair_starts = torch.searchsorted(pair_sequence, torch.arange(batch + 1, device=device))
    return pair_ids, num_pairs, pair_starts


def sum_pairs(grad_pairs: torch.Tensor, pair_starts: torch.Tensor, batch: int) -> torch.Tensor:
    """float32 [G, B, D] from the per-pair sums ``grad_pairs`` [G, pairs, D] (every pair slot a
    sequence owns written), each sequence's pairs added in order."""
    layers, num_pairs, width = grad_pairs.shape
    out = torch.empty((layers, batch, width), dtype=torch.float32, device=grad_pairs.device)
    block_d = min(128, max(16, triton.next_power_of_2(width)))
    pair_sum_kernel[(layers, batch, triton.cdiv(width, block_d))](
        grad_pairs, pair_starts, out, num_pairs, batch, width, BLOCK_D=block_d, num_warps=4,
    )
    return out
