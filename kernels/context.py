"""Kernel 1: context pooling (METHOD.md step 1) and its backward, with their host launchers.

The L+1 hidden states are separate tensors (Hugging Face returns a tuple), possibly strided views.
Instead of stacking them (a copy of every layer) a kernel reads each layer where it lies: the host
builds a small :class:`LayerTable` (element offset of every layer from layer 0's pointer and its
three strides, int64) and a program of layer ``l`` loads ``states_ptr + offset[l] + b*sb + s*ss +
k*sh``. The table is copied to the device from pinned memory without a host synchronisation.

One context per sequence: a sequence is a contiguous range ``[start[g], end[g])`` of row
``g // K`` (K sequences at most per row; K = 1 and the range the whole row when rows are not packed).
``index[b, s]`` is the sequence of position (b, s), ``count[g]`` its number of real tokens.

Forward: ``context[l, g] = sum_{s in [start[g], end[g])} mask[b, s] * h[l][b, s] / count[g]`` in float32.
Backward: one pass over every layer's gradient, ``grad_context[l, g] * mask[b, s] / count[g]`` on
every token plus the token gradient rows of the regularised positions (from the fused bridge
kernel's backward), stored once in the states' dtype.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - exercised on machines without triton
    triton = None
    tl = None

__all__ = [
    "LayerTable", "layer_table", "rows_table", "flat_table", "flat_rows_ok", "row_lookup", "context_forward",
    "context_backward", "interpreting", "Sequences",
]

# Element alignment (in elements) that lets the kernels promise vectorisable addresses.
_ALIGN = 8


def interpreting() -> bool:
    """True when TRITON_INTERPRET asks for the CPU interpreter (read once per call)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


@dataclass
class LayerTable:
    """Where every layer's [B, S, H] tensor lies, relative to layer 0 (the base pointer).

    offsets: int64 [L+1] element offsets from ``base``; strides: int64 [L+1, 3] (b, s, h).
    contiguous_h: every layer has unit stride along H; aligned: every offset and the b/s strides
    are multiples of 8 elements (lets the compiler vectorise loads).
    """

    base: torch.Tensor
    offsets: torch.Tensor
    strides: torch.Tensor
    contiguous_h: bool
    aligned: bool


# Layer tables already on a device, by (values, device): in a training loop the caching allocator
# hands the layers the same addresses step after step, so the table is copied once, not per call
# (and a CUDA graph replays with a table that stays where it was captured). Read-only: never write
# into one (rows_table clones before it edits).
_TABLES: dict = {}
_TABLES_KEPT = 256


def _to_device(values, device) -> torch.Tensor:
    key = (str(device), repr(values))
    cached = _TABLES.get(key)
    if cached is not None:
        return cached
    host = torch.tensor(values, dtype=torch.int64)
    if device.type == "cuda":
        # pinned + non_blocking: an asynchronous copy, no host synchronisation.
        table = host.pin_memory().to(device, non_blocking=True)
    else:
        table = host.to(device)
    if len(_TABLES) >= _TABLES_KEPT:
        _TABLES.pop(next(iter(_TABLES)))  # the oldest
    _TABLES[key] = table
    return table


def layer_table(hidden_states) -> LayerTable:
    """Build the :class:`LayerTable` of a list of L+1 same-dtype, same-device [B, S, H] tensors."""
    base = hidden_states[0]
    size = base.element_size()
    offsets, strides = [], []
    for h in hidden_states:
        delta = h.data_ptr() - base.data_ptr()
        if delta % size:  # pragma: no cover - allocations are element aligned
            raise ValueError("hidden state storage is not aligned to its element size")
        offsets.append(delta // size)
        strides.append(list(h.stride()))
    contiguous_h = all(s[2] == 1 for s in strides)
    aligned = (
        base.data_ptr() % (_ALIGN * size) == 0
        and all(o % _ALIGN == 0 for o in offsets)
        and all(s[0] % _ALIGN == 0 and s[1] % _ALIGN == 0 for s in strides)
    )
    return LayerTable(
        base=base,
        offsets=_to_device(offsets, base.device),
        strides=_to_device([x for layer in strides for x in layer], base.device),
        contiguous_h=contiguous_h,
        aligned=aligned,
    )


def rows_table(token_rows) -> LayerTable:
    """A :class:`LayerTable` over captured token rows: a list of L+1 [N, H] tensors (one per
    layer, same dtype and device), seen as [1, N, H] layers. Row ``n`` lies at (b=any, s=n): the b
    stride is 0, so kernel 2 gathers with ``seq_index = arange(N)`` while ``batch_index`` still
    names each row's sequence for the context half."""
    table = layer_table([t.unsqueeze(0) for t in token_rows])
    strides = table.strides.reshape(-1, 3).clone()
    strides[:, 0] = 0
    table.strides = strides.reshape(-1)
    return table


def flat_rows_ok(states: torch.Tensor) -> bool:
    """True when a [B, S, H] tensor's token (b, s) lies at flat position ``b * S + s`` times its S
    stride (the layout :func:`flat_table` needs: any layer Hugging Face returns)."""
    batch, seq, _ = states.shape
    return batch == 1 or states.stride(0) == seq * states.stride(1)


def flat_table(hidden_states) -> LayerTable:
    """A :class:`LayerTable` over L+1 [B, S, H] layers (each :func:`flat_rows_ok`) whose token
    (b, s) lies at (b=any, s=b * S + s): the b stride is 0, so kernel 2 reads a row from its flat
    position while its ``batch_index`` names the row's context (its sequence, for the context
    half), as :func:`rows_table` does for captured rows."""
    table = layer_table(hidden_states)
    strides = table.strides.reshape(-1, 3).clone()
    strides[:, 0] = 0
    table.strides = strides.reshape(-1)
    return table


def row_lookup(batch: int, seq: int, batch_index: torch.Tensor, seq_index: torch.Tensor) -> torch.Tensor:
    """int32 [B, S]: the row in [0, N) of each regularised position (b, s), -1 elsewhere."""
    row_of = torch.full((batch, seq), -1, dtype=torch.int32, device=batch_index.device)
    row_of[batch_index, seq_index] = torch.arange(batch_index.shape[0], dtype=torch.int32, device=batch_index.device)
    return row_of


if triton is not None:

    @triton.jit
    def layer_origin(layer_offsets_ptr, layer_strides_ptr, layer, ALIGNED: tl.constexpr):
        """int64 element offset of layer ``layer`` from the base pointer and its three strides."""
        offset = tl.load(layer_offsets_ptr + layer)
        stride_b = tl.load(layer_strides_ptr + 3 * layer)
        stride_s = tl.load(layer_strides_ptr + 3 * layer + 1)
        stride_h = tl.load(layer_strides_ptr + 3 * layer + 2)
        if ALIGNED:
            offset = tl.multiple_of(offset, 8)
            stride_b = tl.multiple_of(stride_b, 8)
            stride_s = tl.multiple_of(stride_s, 8)
        return offset, stride_b, stride_s, stride_h

    @triton.jit
    def context_forward_kernel(
        states_ptr, layer_offsets_ptr, layer_strides_ptr,
        mask_ptr,  # float32 [B, S]
        inv_count_ptr,  # float32 [G]: 1 / each sequence's count of real tokens
        segment_start_ptr, segment_end_ptr,  # int64 [G]: each sequence's columns in its row g // K
        context_ptr,  # float32 [L+1, G, H] (out)
        row_of_ptr,  # int32 [B, S]: row in [0, N) of a regularised position, or -1 (GATHER_ROWS)
        tokens_ptr,  # [L+1, N, H] in the states' dtype (out, GATHER_ROWS)
        G, K, S, H, N,
        BLOCK_S: tl.constexpr, BLOCK_H: tl.constexpr,
        CONTIGUOUS_H: tl.constexpr, ALIGNED: tl.constexpr, GATHER_ROWS: tl.constexpr,
    ):
        """One program: one (layer, sequence, H-block); loops over the sequence's columns in BLOCK_S
        chunks. With GATHER_ROWS it also copies the regularised rows out of the same read (METHOD.md
        step 2; a row's sequences cover it, so every regularised row is copied once)."""
        pid_h = tl.program_id(0)
        g = tl.program_id(1).to(tl.int64)
        layer = tl.program_id(2).to(tl.int64)
        b = g // K
        start = tl.load(segment_start_ptr + g)
        end = tl.load(segment_end_ptr + g)
        offset, stride_b, stride_s, stride_h = layer_origin(
            layer_offsets_ptr, layer_strides_ptr, layer, ALIGNED
        )
        cols = pid_h * BLOCK_H + tl.arange(0, BLOCK_H)
        col_ok = cols < H
        if CONTIGUOUS_H:
            col_off = cols.to(tl.int64)
        else:
            col_off = cols.to(tl.int64) * stride_h
        row_base = states_ptr + offset + b * stride_b
        acc = tl.zeros([BLOCK_H], dtype=tl.float32)
        for s0 in range(start, end, BLOCK_S):
            seq = s0 + tl.arange(0, BLOCK_S)
            weight = tl.load(mask_ptr + b * S + seq, mask=seq < end, other=0.0)
            # Padding tokens are never read (saves bandwidth on padded batches), unless regularised.
            take = weight != 0.0
            if GATHER_ROWS:
                row = tl.load(row_of_ptr + b * S + seq, mask=seq < end, other=-1).to(tl.int64)
                take = take | (row >= 0)
            take = take[:, None] & col_ok[None, :]
            x = tl.load(row_base + seq.to(tl.int64)[:, None] * stride_s + col_off[None, :], mask=take, other=0.0)
            acc += tl.sum(x.to(tl.float32) * weight[:, None], axis=0)
            if GATHER_ROWS:
                out = tokens_ptr + (layer * N + row)[:, None] * H + cols[None, :]
                tl.store(out, x, mask=(row >= 0)[:, None] & col_ok[None, :])
        acc = acc * tl.load(inv_count_ptr + g)
        tl.store(context_ptr + (layer * G + g) * H + cols, acc, mask=col_ok)

    @triton.jit
    def context_backward_kernel(
        grad_states_ptr,  # [L+1, B, S, H] contiguous, the states' dtype (out)
        grad_context_ptr,  # float32 [L+1, G, H]
        mask_ptr,  # float32 [B, S]
        inv_count_ptr,  # float32 [G]
        context_index_ptr,  # int64 [B, S]: the position's sequence
        row_of_ptr,  # int32 [B, S]: row of the regularised position (b, s) in [0, N), or -1
        grad_tokens_ptr,  # float32 [L+1, N, H] (HAS_TOKENS)
        B, G, S, H, N,
        BLOCK_S: tl.constexpr, BLOCK_H: tl.constexpr, HAS_TOKENS: tl.constexpr,
    ):
        """One program: a [BLOCK_S, BLOCK_H] tile of one (layer, sequence); writes it once."""
        pid = tl.program_id(0)
        b = tl.program_id(1).to(tl.int64)
        layer = tl.program_id(2).to(tl.int64)
        num_h = tl.cdiv(H, BLOCK_H)
        seq = (pid // num_h) * BLOCK_S + tl.arange(0, BLOCK_S)
        cols = (pid % num_h) * BLOCK_H + tl.arange(0, BLOCK_H)
        seq_ok = seq < S
        col_ok = cols < H
        ok = seq_ok[:, None] & col_ok[None, :]
        context = tl.load(context_index_ptr + b * S + seq, mask=seq_ok, other=0)
        weight = tl.load(mask_ptr + b * S + seq, mask=seq_ok, other=0.0) * tl.load(inv_count_ptr + context,
                                                                                   mask=seq_ok, other=0.0)
        grad_context = tl.load(grad_context_ptr + ((layer * G + context) * H)[:, None] + cols[None, :], mask=ok,
                               other=0.0)
        grad = weight[:, None] * grad_context
        if HAS_TOKENS:
            row = tl.load(row_of_ptr + b * S + seq, mask=seq_ok, other=-1).to(tl.int64)
            token_ptr = grad_tokens_ptr + (layer * N + row)[:, None] * H + cols[None, :]
            grad += tl.load(token_ptr, mask=ok & (row >= 0)[:, None], other=0.0)
        out_ptr = grad_states_ptr + ((layer * B + b) * S + seq.to(tl.int64))[:, None] * H + cols[None, :]
        tl.store(out_ptr, grad.to(grad_states_ptr.dtype.element_ty), mask=ok)


def context_config(hidden: int, interpret: bool | None = None) -> dict:
    """Block sizes of kernel 1: BLOCK_H columns (128 on GPU: 16-byte loads across a warp) and
    BLOCK_S tokens per step (32: 4K elements a step, enough loads in flight per program)."""
    interpret = interpreting() if interpret is None else interpret
    if interpret:
        return dict(BLOCK_S=8, BLOCK_H=16, num_warps=1, bwd_num_warps=1)
    block_h = min(128, triton.next_power_of_2(max(hidden, 16)))
    # The backward holds int64 addresses of two [BLOCK_S, BLOCK_H] tiles: 8 warps keep it spill-free.
    return dict(BLOCK_S=32, BLOCK_H=block_h, num_warps=4, bwd_num_warps=8)


@dataclass
class Sequences:
    """The sequences of a batch as kernel 1 takes them (see the module docstring): ``mask``
    float32 [B, S], ``inv_count`` float32 [G] (1 / each sequence's count of real tokens), ``index``
    int64 [B, S] (the position's sequence), ``start``, ``end`` int64 [G] (its columns in row
    ``g // slots``)."""

    mask: torch.Tensor
    inv_count: torch.Tensor
    index: torch.Tensor
    start: torch.Tensor
    end: torch.Tensor
    slots: int

    @property
    def num_contexts(self) -> int:
        return self.start.shape[0]

    @staticmethod
    def per_row(attention_mask: torch.Tensor) -> "Sequences":
        """One sequence per row (no packing; every row has a real token: validated upstream)."""
        batch, seq = attention_mask.shape
        mask = (attention_mask != 0).to(torch.float32).contiguous()  # any nonzero value: a real token
        rows = torch.arange(batch, device=attention_mask.device)
        return Sequences(mask, 1.0 / mask.sum(dim=1), rows[:, None].expand(batch, seq).contiguous(),
                         torch.zeros_like(rows), torch.full_like(rows, seq), 1)



def context_forward(
    table: LayerTable, num_states: int, sequences: Sequences, out: torch.Tensor | None = None,
    row_of: torch.Tensor | None = None, tokens_out: torch.Tensor | None = None,
) -> torch.Tensor:
    """METHOD.md step 1 for all layers: float32 contexts [L+1, G, H], one per sequence of
    ``sequences`` (into ``out`` when given: tests pass a NaN-filled one to catch unwritten elements).

    With ``row_of`` (:func:`row_lookup`) and ``tokens_out`` ([L+1, N, H], the states' dtype) the
    same read also copies the regularised rows into ``tokens_out`` (METHOD.md step 2)."""
    batch, seq, hidden = table.base.shape
    num_contexts = sequences.num_contexts
    context = out
    if context is None:
        context = torch.empty((num_states, num_contexts, hidden), dtype=torch.float32, device=table.base.device)
    gather = row_of is not None
    num_rows = tokens_out.shape[1] if gather else 0
    cfg = context_config(hidden)
    grid = (triton.cdiv(hidden, cfg["BLOCK_H"]), num_contexts, num_states)
    mask = sequences.mask
    context_forward_kernel[grid](
        table.base, table.offsets, table.strides, mask, sequences.inv_count, sequences.start, sequences.end, context,
        row_of if gather else mask, tokens_out if gather else context,
        num_contexts, sequences.slots, seq, hidden, num_rows,
        BLOCK_S=cfg["BLOCK_S"], BLOCK_H=cfg["BLOCK_H"],
        CONTIGUOUS_H=table.contiguous_h, ALIGNED=table.aligned, GATHER_ROWS=gather,
        num_warps=cfg["num_warps"],
    )
    return context


def context_backward(
    grad_context: torch.Tensor,
    sequences: Sequences,
    batch_index: torch.Tensor,
    seq_index: torch.Tensor,
    grad_tokens: torch.Tensor | None,
    dtype: torch.dtype,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Every layer's gradient [L+1, B, S, H] in ``dtype``: its sequence's context share (of
    ``grad_context`` [L+1, G, H]) on every token plus ``grad_tokens`` [L+1, N, H] at the regularised
    positions (assumed distinct, as labels give); ``grad_tokens=None``: the context share alone (the
    GEMM strategy writes the rows after)."""
    num_states, num_contexts, hidden = grad_context.shape
    mask = sequences.mask
    batch, seq = mask.shape
    num_rows = batch_index.shape[0]
    device = grad_context.device
    has_tokens = grad_tokens is not None
    row_of = row_lookup(batch, seq, batch_index, seq_index) if has_tokens else mask
    grad_states = out
    if grad_states is None:
        grad_states = torch.empty((num_states, batch, seq, hidden), dtype=dtype, device=device)
    cfg = context_config(hidden)
    grid = (triton.cdiv(seq, cfg["BLOCK_S"]) * triton.cdiv(hidden, cfg["BLOCK_H"]), batch, num_states)
    context_backward_kernel[grid](
        grad_states, grad_context.contiguous(), mask, sequences.inv_count, sequences.index, row_of,
        grad_tokens if has_tokens else mask,
        batch, num_contexts, seq, hidden, num_rows,
        BLOCK_S=cfg["BLOCK_S"], BLOCK_H=cfg["BLOCK_H"], HAS_TOKENS=has_tokens,
        num_warps=cfg["bwd_num_warps"],
    )
    return grad_states
