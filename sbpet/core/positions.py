"""The regularised positions (METHOD.md step 2), found without stalling the host.

``labels`` [B, S] name the positions: ``ignore_index`` where a position is not regularised. Every
backend takes them as three int64 [C] tensors (sequence, position, label id) on the states'
device, sorted by sequence, plus ``num_valid``:

- **exact** (``num_valid is None``): C = N, the regularised positions. Found on the host when the
  labels lie there (free: hand the labels over before they are moved, as
  :class:`sbpet.hf.BridgeTrainer` does; the three vectors then travel in one non-blocking copy
  from pinned memory), else with ``nonzero`` on the device, whose size the host must read (one
  sync per call).
- **fixed capacity** (``num_valid`` a 0-d int64 tensor on the device): C = ``max_positions``
  (at most B * S) rows, the N regularised ones first, then distinct positions that are not
  regularised, with weight 0: no host read at all, and one shape for every batch (CUDA graphs,
  ``torch.compile`` without recompiles). It costs the work of C rows instead of N: give
  ``max_positions`` the most a batch can hold (one per sequence for classification labels: B).
  Used with ``max_positions`` (what ``torch.compile(..., fullgraph=True)`` needs: exact positions
  break the graph at ``nonzero``), and with B * S on the ``meta`` device, where nothing can be
  counted. Every backend takes it: the torch and reference backends weigh the padding 0, the Triton
  kernels skip it on the device (rows from ``num_valid`` on are masked like rows past the end).

**Packed rows** (TRL's ``padding_free=True`` / ``packing=True``, transformers'
``DataCollatorWithFlattening``) hold several sequences in one row, with ``position_ids`` restarting
at 0 and no attention mask. SPEC step 1 takes one context per *sequence*, so the boundaries are
positions too: :func:`find_segments` reads them from ``position_ids`` restarts, flash-attention's
``cu_seq_lens_q`` or TRL's ``seq_idx`` (on the host, where the collator made them: free) and returns
:class:`Segments`, G contexts in all (row ``b``'s ``k``-th sequence is context ``b * K + k``). Each
position carries the index of its context (``Positions.context_index``): an unpacked batch is the
special case K = 1 (context ``b``). Sequences never cross rows.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from . import checks

__all__ = ["Positions", "Segments", "find_positions", "find_segments", "sequence_starts", "to_device"]


@dataclass
class Positions:
    """Regularised positions on the states' device (see the module docstring).

    batch_index, seq_index, targets: int64 [C]; num_valid: None (all C rows are regularised) or a
    0-d int64 tensor (rows from ``num_valid`` on are padding of weight 0); context_index: int64 [C],
    the context (:class:`Segments`) of each row (None: its row, ``batch_index``)."""

    batch_index: torch.Tensor
    seq_index: torch.Tensor
    targets: torch.Tensor
    num_valid: torch.Tensor | None = None
    context_index: torch.Tensor | None = None

    def __post_init__(self):
        if self.context_index is None:
            self.context_index = self.batch_index

    @property
    def padded(self) -> bool:
        return self.num_valid is not None


def to_device(tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
    """``tensor`` on ``device`` without a blocking copy: host tensors bound for CUDA go through
    pinned memory (torch's caching host allocator: no allocation per call once warm) and a
    non-blocking copy."""
    device = torch.device(device)
    if tensor.device == device:
        return tensor
    if tensor.device.type == "cpu" and device.type == "cuda":
        return tensor.pin_memory().to(device, non_blocking=True)
    return tensor.to(device)


@dataclass
class Segments:
    """The sequences of a batch, one context each (SPEC step 1), each a contiguous range of one row.

    Row ``b`` holds at most K (``slots``) sequences; its ``k``-th is context ``g = b * K + k`` of
    G = B * K. ``start``, ``end``: int64 [G], the columns ``[start, end)`` of each context (an
    empty range ``S, S`` where a row holds fewer than K sequences: such a context is 0 and no
    position belongs to it); ``row``: int64 [G], ``g // K``; ``index``: int64 [B, S], the context of
    every position (padded positions included: their weight is 0). An unpacked batch is K = 1:
    context ``b`` is row ``b`` (:meth:`per_row`)."""

    index: torch.Tensor
    start: torch.Tensor
    end: torch.Tensor
    slots: int

    @property
    def num_contexts(self) -> int:
        return self.start.shape[0]

    @property
    def row(self) -> torch.Tensor:
        return torch.arange(self.num_contexts, device=self.start.device) // self.slots

    @staticmethod
    def per_row(batch: int, seq: int, device) -> "Segments":
        """One sequence per row (no packing): built on ``device``, no host work."""
        rows = torch.arange(batch, device=device)
        return Segments(rows[:, None].expand(batch, seq).contiguous(), torch.zeros_like(rows),
                        torch.full_like(rows, seq), 1)

    def to(self, device) -> "Segments":
        """On ``device`` (one non-blocking copy from pinned memory for a host table bound for CUDA)."""
        device = torch.device(device)
        if self.index.device == device:
            return self
        flat = to_device(torch.cat([self.index.reshape(-1), self.start, self.end]), device)
        cells = self.index.numel()
        return Segments(flat[:cells].view(self.index.shape), flat[cells: cells + self.num_contexts],
                        flat[cells + self.num_contexts:], self.slots)

    def counts(self, real: torch.Tensor) -> torch.Tensor:
        """int64 [G]: each sequence's count of real tokens (``real`` bool [B, S]; 0 for an empty
        slot), from the rows' running counts: no scatter, no atomics, the same on every run."""
        running = torch.nn.functional.pad(real.long().cumsum(dim=1), (1, 0))  # [B, S + 1]
        row = self.row
        return running[row, self.end] - running[row, self.start]

    def context_weights(self, real: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """``dtype`` [B, S]: ``real`` / (its sequence's count of real tokens), the weights of SPEC
        step 1's mean (every sequence has a real token: validated)."""
        return real.to(dtype) / self.counts(real).clamp(min=1).to(dtype)[self.index]


def _host(tensor: torch.Tensor, name: str) -> torch.Tensor:
    """``tensor`` on the CPU: free where the collator made it (the Trainer keeps that copy); one
    host read when it only exists on a device (the boundaries fix G, a shape)."""
    if not isinstance(tensor, torch.Tensor):
        raise TypeError(f"{name} must be a tensor, got {type(tensor).__name__}")
    if tensor.dtype.is_floating_point or tensor.dtype.is_complex or tensor.dtype == torch.bool:
        raise TypeError(f"{name} must be an integer tensor, got {tensor.dtype}")
    return tensor.detach().to("cpu", torch.int64)


def sequence_starts(real: torch.Tensor, *, position_ids=None, cu_seq_lens=None, seq_idx=None):
    """bool [B, S] on the CPU: True where a packed sequence starts (column 0 always), from
    whichever boundaries are given (``cu_seq_lens``, else ``seq_idx``, else ``position_ids``);
    None when none is. ``real``: bool [B, S], the real tokens.

    - ``position_ids`` [B, S]: a real token starts a sequence where its position id is 0 or lower
      than the previous real token's (the first real token of a row continues column 0's
      sequence, so left padding never makes a sequence of its own);
    - ``cu_seq_lens`` [G + 1]: flash-attention's cumulative lengths over the flattened batch
      (``cu_seq_lens_q``): sequence i is flat positions ``[cu[i], cu[i+1])``;
    - ``seq_idx`` [B, S] (TRL): a sequence starts where the index changes.

    Raises ValueError naming the argument for a wrong shape or a sequence that crosses rows."""
    batch, seq = real.shape
    real = real.detach().to("cpu")
    starts = torch.zeros(batch, seq, dtype=torch.bool)
    if cu_seq_lens is not None:
        cu = _host(cu_seq_lens, "cu_seq_lens")
        if cu.dim() != 1 or cu.numel() < 2 or int(cu[0]) != 0 or bool((cu[1:] < cu[:-1]).any()) \
                or int(cu[-1]) > batch * seq:
            raise ValueError(
                f"cu_seq_lens must be the cumulative sequence lengths [G + 1] over the flattened batch: 0 first, "
                f"non-decreasing, at most B * S = {batch * seq} last; got {cu.tolist()[:8]}")
        flat = starts.view(-1)
        flat[cu[:-1][cu[:-1] < batch * seq]] = True
        row_starts = torch.arange(1, batch) * seq
        crossing = ((row_starts < cu[-1]) & ~flat[row_starts]).nonzero().flatten() + 1  # on the host
        if crossing.numel():
            first = int(crossing[0])
            raise ValueError(f"cu_seq_lens: a sequence crosses from row {first - 1} into row {first}; "
                             "packed sequences must lie within one row")
    elif seq_idx is not None:
        ids = _host(seq_idx, "seq_idx")
        if ids.shape != (batch, seq):
            raise ValueError(f"seq_idx must be [B, S] = {(batch, seq)}, got {tuple(ids.shape)}")
        starts[:, 1:] = ids[:, 1:] != ids[:, :-1]
    elif position_ids is not None:
        ids = _host(position_ids, "position_ids")
        if ids.dim() == 1 and ids.shape[0] == seq:  # one row of positions shared by the batch
            ids = ids.expand(batch, seq)
        if ids.shape != (batch, seq):
            raise ValueError(f"position_ids must be [B, S] = {(batch, seq)}, got {tuple(ids.shape)}")
        columns = torch.arange(seq).expand(batch, seq)
        last_real = torch.where(real, columns, -1).cummax(dim=1).values  # latest real column so far
        previous = torch.full_like(last_real, -1)
        previous[:, 1:] = last_real[:, :-1]
        previous_id = ids.gather(1, previous.clamp(min=0))
        starts = real & (previous >= 0) & ((ids == 0) | (ids < previous_id))
    else:
        return None
    starts[:, 0] = True
    return starts


def _merge_padding(starts: torch.Tensor, real: torch.Tensor) -> torch.Tensor:
    """``starts`` without sequences of padding alone (flash-attention's ``cu_seq_lens`` and
    ``seq_idx`` may give a row's padding a sequence of its own): such a run joins the sequence
    before it (a row's leading one the sequence after it). Padding weighs nothing in a context and
    the causal shift never pairs it (its labels are ignored), so nothing changes but the count."""
    batch, seq = starts.shape
    for _ in range(seq):
        ordinal = starts.long().cumsum(dim=1) - 1
        flat = (torch.arange(batch)[:, None] * seq + ordinal).reshape(-1)
        counts = torch.zeros(batch * seq, dtype=torch.int64).index_add_(0, flat, real.reshape(-1).long())
        empty = (counts.view(batch, seq).gather(1, ordinal) == 0) & starts  # the start of a padding-only run
        drop = empty.clone()
        drop[:, 0] = False
        leading = empty[:, 0] & (starts[:, 1:].sum(dim=1) > 0)  # [pad ... | seq]: drop the next start instead
        if bool(leading.any()):
            nxt = torch.where(starts[:, 1:], torch.arange(1, seq), seq).min(dim=1).values
            rows = leading.nonzero().flatten()
            drop[rows, nxt[rows]] = True
        if not bool(drop.any()):
            return starts
        starts = starts & ~drop
    return starts


def find_segments(real: torch.Tensor | None, device=None, *, position_ids=None, cu_seq_lens=None,
                  seq_idx=None, shape: tuple[int, int] | None = None) -> Segments:
    """The :class:`Segments` of a batch whose real tokens are ``real`` (bool [B, S]; None: every
    token of a ``shape`` [B, S] batch, as padding-free batches come) on ``device`` (default:
    ``real``'s): one per row when no boundary is given (built on the device, no host work), else
    from the boundaries (:func:`sequence_starts`; found on the host and handed over in one
    non-blocking copy). A boundary or mask that lies on a device is read once (one host sync: hand
    the collator's host copies over instead, as :class:`sbpet.hf.BridgeTrainer` does); on the
    ``meta`` device nothing is read and every row is one sequence. Raises ValueError naming the
    argument when a sequence has no real token."""
    if real is None:
        real = torch.ones(shape, dtype=torch.bool)
    batch, seq = real.shape
    device = real.device if device is None else torch.device(device)
    given = [t for t in (position_ids, cu_seq_lens, seq_idx) if t is not None]
    if not given or real.device.type == "meta" or any(getattr(t, "device", None) == torch.device("meta")
                                                      for t in given):
        return Segments.per_row(batch, seq, device)
    if torch.cuda.is_available() and torch.cuda.is_current_stream_capturing():
        raise NotImplementedError(
            "packed rows (position_ids, seq_idx, cu_seq_lens) inside a CUDA-graph capture: their sequences are "
            "found on the host for each batch and fix the number of contexts, so a replay would keep the captured "
            "ones; capture unpacked batches at a fixed capacity (max_positions), or run packed batches eagerly")
    host_real = real.detach().to("cpu")
    starts = _merge_padding(sequence_starts(host_real, position_ids=position_ids, cu_seq_lens=cu_seq_lens,
                                            seq_idx=seq_idx), host_real)
    slot = starts.long().cumsum(dim=1) - 1
    slots = int(slot[:, -1].max()) + 1
    index = torch.arange(batch)[:, None] * slots + slot
    start = torch.full((batch * slots,), seq, dtype=torch.int64)
    rows, columns = starts.nonzero(as_tuple=True)
    start[index[rows, columns]] = columns
    end = torch.full_like(start, seq)
    by_row = start.view(batch, slots)
    end.view(batch, slots)[:, :-1] = by_row[:, 1:]  # a sequence ends where the next one starts (or at S)
    segments = Segments(index, start, end, slots)
    empty = (segments.counts(host_real) == 0) & (start < end)
    if bool(empty.any()):
        name = "cu_seq_lens" if cu_seq_lens is not None else "seq_idx" if seq_idx is not None else "position_ids"
        g = int(empty.nonzero()[0])
        raise ValueError(f"{name} makes {int(empty.sum())} sequence(s) with no real token (attention_mask all zero "
                         f"there), first row {g // slots} columns [{int(start[g])}, {int(end[g])}): their context "
                         "mean is undefined")
    return segments.to(device)


def _modes(route: str, known: dict[str, str], *tensors: torch.Tensor) -> list[str]:
    """The check mode for each tensor's device (asked once per device: the first call is eager;
    ``known``: modes the caller already asked for)."""
    by_device = dict(known)
    modes = []
    for tensor in tensors:
        key = str(tensor.device)
        if key not in by_device:
            by_device[key] = checks.check_mode(route, tensor.device)
        modes.append(by_device[key])
    return modes


def _run_checks(found: list[tuple[str, str, torch.Tensor]]) -> list[int] | None:
    """``found``: (mode, slot, bad count) triples. Deferred ones go to :mod:`.checks`; the eager
    ones are read in one host read per device and returned in order (None where not eager)."""
    values: list[int | None] = [None] * len(found)
    eager: dict[str, list[int]] = {}
    for i, (mode, slot, count) in enumerate(found):
        if mode == "deferred":
            checks.defer(slot, count)
        elif mode == "eager":
            eager.setdefault(str(count.device), []).append(i)
    for indices in eager.values():
        for i, value in zip(indices, torch.stack([found[i][2] for i in indices]).tolist()):
            values[i] = value
    return values


def _check_values(labels, regularised, real, vocab_size, ignore_index, route: str, known: dict[str, str],
                  capacity: int | None) -> str:
    """The value checks of the labels and the mask under the policy of :mod:`.checks`; returns the
    labels' mode."""
    label_mode, mask_mode = _modes(route, known, labels, real)
    outside = regularised & ((labels < 0) | (labels >= vocab_size))
    found = [(mask_mode, "empty_rows", real.sum(dim=1).eq(0).sum()), (label_mode, "labels", outside.sum())]
    if capacity is not None:
        found.append((label_mode, "capacity", (regularised.sum() - capacity).clamp(min=0)))
    empty_rows, bad, *over = _run_checks(found)
    if empty_rows:
        raise ValueError(
            f"attention_mask has {empty_rows} sequence(s) with no real token (all zero): "
            "their context mean is undefined"
        )
    if bad:
        values = labels[outside]
        raise ValueError(
            f"labels must be in [0, {vocab_size}) or ignore_index={ignore_index}; "
            f"found {values.numel()} outside, e.g. {values[:5].tolist()}"
        )
    if over and over[0]:
        raise ValueError(
            f"labels have {over[0] + capacity} regularised positions but max_positions={capacity}: raise "
            "max_positions (the most regularised positions one batch can hold)"
        )
    return label_mode


def find_positions(
    labels: torch.Tensor,
    real: torch.Tensor,
    device: torch.device,
    *,
    vocab_size: int,
    ignore_index: int,
    route: str,
    max_positions: int | None = None,
    state_mode: str | None = None,
    segments: Segments | None = None,
) -> Positions:
    """The regularised positions of ``labels`` [B, S] (long, already shifted and aligned to the
    states) with ``real`` [B, S] (bool, the real tokens) on ``device``, the states' device, and the
    value checks of both under the policy of :mod:`sbpet.core.checks` for ``route``.

    ``max_positions``: fixed capacity (see the module docstring); None: exact (B * S on ``meta``).
    ``state_mode``: the check mode the caller already took for ``device``
    (:func:`sbpet.core.checks.check_mode` marks a route's first call: ask once per call).
    ``segments``: the batch's sequences (:func:`find_segments`; None: one per row): each row's
    ``context_index``."""
    batch, seq = labels.shape
    regularised = labels != ignore_index
    capacity = max_positions
    if capacity is None and labels.device.type == "meta":  # nothing to count
        capacity = batch * seq
    if capacity is not None:
        capacity = min(int(capacity), batch * seq)
    known = {} if state_mode is None else {str(torch.device(device)): state_mode}
    mode = _check_values(labels, regularised, real, vocab_size, ignore_index, route, known,
                         None if capacity is None or capacity == batch * seq else capacity)
    if capacity is None:
        batch_index, seq_index = regularised.nonzero(as_tuple=True)  # on the host: free; on a device: one sync
        targets = labels[batch_index, seq_index]
        if mode != "eager":  # a deferred check reports labels outside the range: no out-of-range read meanwhile
            targets = targets.clamp(0, vocab_size - 1)
        rows = [batch_index, seq_index, targets]
        if segments is not None:
            rows.append(segments.to(labels.device).index[batch_index, seq_index])
        packed = to_device(torch.stack(rows), device)
        return Positions(packed[0], packed[1], packed[2], None, packed[3] if segments is not None else None)
    # Fixed capacity: the regularised positions first (in row-major order, so sorted by sequence),
    # then distinct unregularised ones; a stable sort keeps both orders.
    flat = regularised.reshape(-1)
    order = torch.argsort((~flat).to(torch.int8), stable=True)[:capacity]
    num_valid = flat.sum()
    valid = torch.arange(capacity, device=flat.device) < num_valid
    # Padding rows and labels outside the range (a deferred check reports them) point at row 0 of
    # the tail: never an out-of-range read on the device.
    targets = torch.where(valid, labels.reshape(-1)[order], 0).clamp(0, vocab_size - 1)
    rows = [order // seq, order % seq, targets, num_valid.expand(capacity)]
    if segments is not None:
        rows.append(segments.to(labels.device).index.reshape(-1)[order])
    packed = to_device(torch.stack(rows), device)
    return Positions(packed[0], packed[1], packed[2], packed[3, 0], packed[4] if segments is not None else None)
