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
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from . import checks

__all__ = ["Positions", "find_positions", "to_device"]


@dataclass
class Positions:
    """Regularised positions on the states' device (see the module docstring).

    batch_index, seq_index, targets: int64 [C]; num_valid: None (all C rows are regularised) or a
    0-d int64 tensor (rows from ``num_valid`` on are padding of weight 0)."""

    batch_index: torch.Tensor
    seq_index: torch.Tensor
    targets: torch.Tensor
    num_valid: torch.Tensor | None = None

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
) -> Positions:
    """The regularised positions of ``labels`` [B, S] (long, already shifted and aligned to the
    states) with ``real`` [B, S] (bool, the real tokens) on ``device``, the states' device, and the
    value checks of both under the policy of :mod:`sbpet.core.checks` for ``route``.

    ``max_positions``: fixed capacity (see the module docstring); None: exact (B * S on ``meta``).
    ``state_mode``: the check mode the caller already took for ``device``
    (:func:`sbpet.core.checks.check_mode` marks a route's first call: ask once per call)."""
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
        packed = torch.stack([batch_index, seq_index, targets])
        packed = to_device(packed, device)
        return Positions(packed[0], packed[1], packed[2])
    # Fixed capacity: the regularised positions first (in row-major order, so sorted by sequence),
    # then distinct unregularised ones; a stable sort keeps both orders.
    flat = regularised.reshape(-1)
    order = torch.argsort((~flat).to(torch.int8), stable=True)[:capacity]
    num_valid = flat.sum()
    valid = torch.arange(capacity, device=flat.device) < num_valid
    # Padding rows and labels outside the range (a deferred check reports them) point at row 0 of
    # the tail: never an out-of-range read on the device.
    targets = torch.where(valid, labels.reshape(-1)[order], 0).clamp(0, vocab_size - 1)
    packed = to_device(torch.stack([order // seq, order % seq, targets, num_valid.expand(capacity)]), device)
    return Positions(packed[0], packed[1], packed[2], packed[3, 0])
