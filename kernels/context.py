"""Kernel 1: context pooling (METHOD.md step 1) and its backward, with their host launchers.

The L+1 hidden states are separate tensors (Hugging Face returns a tuple), possibly strided views.
Instead of stacking them (a copy of every layer) a kernel reads each layer where it lies: the host
builds a small :class:`LayerTable` (element offset of every layer from layer 0's pointer and its
three strides, int64) and a program of layer ``l`` loads ``states_ptr + offset[l] + b*sb + s*ss +
k*sh``. The table is copied to the device from pinned memory without a host synchronisation.

Forward: ``context[l, b] = sum_s mask[b, s] * h[l][b, s] / sum_s mask[b, s]`` in float32.
Backward: one pass over every layer's gradient, ``grad_context[l, b] * mask[b, s] / count[b]`` on
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
    "LayerTable", "layer_table", "rows_table", "row_lookup", "context_forward", "context_backward", "interpreting",
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
        inv_count_ptr,  # float32 [B]
        context_ptr,  # float32 [L+1, B, H] (out)
        row_of_ptr,  # int32 [B, S]: row in [0, N) of a regularised position, or -1 (GATHER_ROWS)
        tokens_ptr,  # [L+1, N, H] in the states' dtype (out, GATHER_ROWS)
        B, S, H, N,
        BLOCK_S: tl.constexpr, BLOCK_H: tl.constexpr,
        CONTIGUOUS_H: tl.constexpr, ALIGNED: tl.constexpr, GATHER_ROWS: tl.constexpr,
    ):
        """One program: one (layer, sequence, H-block); loops over S in BLOCK_S chunks. With
        GATHER_ROWS it also copies the regularised rows out of the same read (METHOD.md step 2)."""
        pid_h = tl.program_id(0)
        b = tl.program_id(1).to(tl.int64)
        layer = tl.program_id(2).to(tl.int64)
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
        for s0 in range(0, S, BLOCK_S):
            seq = s0 + tl.arange(0, BLOCK_S)
            weight = tl.load(mask_ptr + b * S + seq, mask=seq < S, other=0.0)
            # Padding tokens are never read (saves bandwidth on padded batches), unless regularised.
            take = weight != 0.0
            if GATHER_ROWS:
                row = tl.load(row_of_ptr + b * S + seq, mask=seq < S, other=-1).to(tl.int64)
                take = take | (row >= 0)
            take = take[:, None] & col_ok[None, :]
            x = tl.load(row_base + seq.to(tl.int64)[:, None] * stride_s + col_off[None, :], mask=take, other=0.0)
            acc += tl.sum(x.to(tl.float32) * weight[:, None], axis=0)
            if GATHER_ROWS:
                out = tokens_ptr + (layer * N + row)[:, None] * H + cols[None, :]
                tl.store(out, x, mask=(row >= 0)[:, None] & col_ok[None, :])
        acc = acc * tl.load(inv_count_ptr + b)
        tl.store(context_ptr + (layer * B + b) * H + cols, acc, mask=col_ok)

    @triton.jit
    def context_backward_kernel(
        grad_states_ptr,  # [L+1, B, S, H] contiguous, the states' dtype (out)
        grad_context_ptr,  # float32 [L+1, B, H]
        mask_ptr,  # float32 [B, S]
        inv_count_ptr,  # float32 [B]
        row_of_ptr,  # int32 [B, S]: row of the regularised position (b, s) in [0, N), or -1
        grad_tokens_ptr,  # float32 [L+1, N, H] (HAS_TOKENS)
        B, S, H, N,
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
        weight = tl.load(mask_ptr + b * S + seq, mask=seq_ok, other=0.0) * tl.load(inv_count_ptr + b)
        grad_context = tl.load(grad_context_ptr + (layer * B + b) * H + cols, mask=col_ok, other=0.0)
        grad = weight[:, None] * grad_context[None, :]
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


def mask_weights(attention_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """float32 mask [B, S] and 1 / count [B] (every row has a real token: validated upstream)."""
    mask = (attention_mask != 0).to(torch.float32).contiguous()  # any nonzero value: a real token
    return mask, 1.0 / mask.sum(dim=1)


def context_forward(
    table: LayerTable, num_states: int, mask: torch.Tensor, inv_count: torch.Tensor, out: torch.Tensor | None = None,
    row_of: torch.Tensor | None = None, tokens_out: torch.Tensor | None = None,
) -> torch.Tensor:
    """METHOD.md step 1 for all layers: float32 contexts [L+1, B, H] (into ``out`` when given: tests
    pass a NaN-filled one to catch unwritten elements).

    With ``row_of`` (:func:`row_lookup`) and ``tokens_out`` ([L+1, N, H], the states' dtype) the
    same read also copies the regularised rows into ``tokens_out`` (METHOD.md step 2)."""
    batch, seq, hidden = table.base.shape
    context = out
    if context is None:
        context = torch.empty((num_states, batch, hidden), dtype=torch.float32, device=table.base.device)
    gather = row_of is not None
    num_rows = tokens_out.shape[1] if gather else 0
    cfg = context_config(hidden)
    grid = (triton.cdiv(hidden, cfg["BLOCK_H"]), batch, num_states)
    context_forward_kernel[grid](
        table.base, table.offsets, table.strides, mask, inv_count, context,
        row_of if gather else mask, tokens_out if gather else context,
        batch, seq, hidden, num_rows,
        BLOCK_S=cfg["BLOCK_S"], BLOCK_H=cfg["BLOCK_H"],
        CONTIGUOUS_H=table.contiguous_h, ALIGNED=table.aligned, GATHER_ROWS=gather,
        num_warps=cfg["num_warps"],
    )
    return context


def context_backward(
    grad_context: torch.Tensor,
    mask: torch.Tensor,
    inv_count: torch.Tensor,
    batch_index: torch.Tensor,
    seq_index: torch.Tensor,
    grad_tokens: torch.Tensor | None,
    dtype: torch.dtype,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Every layer's gradient [L+1, B, S, H] in ``dtype``: the context share on every token plus
    ``grad_tokens`` [L+1, N, H] at the regularised positions (assumed distinct, as labels give);
    ``grad_tokens=None``: the context share alone (the GEMM strategy writes the rows after)."""
    num_states, batch, hidden = grad_context.shape
    seq = mask.shape[1]
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
        grad_states, grad_context.contiguous(), mask, inv_count, row_of, grad_tokens if has_tokens else mask,
        batch, seq, hidden, num_rows,
        BLOCK_S=cfg["BLOCK_S"], BLOCK_H=cfg["BLOCK_H"], HAS_TOKENS=has_tokens,
        num_warps=cfg["bwd_num_warps"],
    )
    return grad_states
