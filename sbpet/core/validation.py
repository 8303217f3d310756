"""Input checks at the public boundary (docs/METHOD.md "Conventions").

Backends assume valid input: this module checks shapes, dtypes and devices (always: no data is
read), and label ranges, empty sequences and the finiteness of the real tokens' states under the
sync policy of :mod:`sbpet.core.checks` (eager with messages that name the argument where reading
is free or on a route's first call, else deferred to :func:`sbpet.check_deferred`), and finds the
regularised positions (:mod:`sbpet.core.positions`).

Finiteness costs a read of every state. ``validate_inputs(check_finite=False)`` leaves it out, for
a caller that checks afterwards: :func:`check_finite_states` (that read, one more host sync) or
:func:`check_finite_contexts`, which reads only the per-sequence means of the real tokens that a
backend has computed anyway (a NaN or inf at a real token makes its sequence's mean non-finite;
Triton's kernel 1 computes them in its one read of the states).
"""

from __future__ import annotations

import operator
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from . import checks
from .positions import Segments, find_positions, find_segments, to_device

__all__ = [
    "BridgeInputs", "check_finite_contexts", "check_finite_states", "check_int", "shift_labels_left",
    "validate_inputs",
]

_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


@dataclass
class BridgeInputs:
    """Validated inputs in the form every backend takes.

    hidden_states: list of L+1 tensors [B, S, H]; attention_mask: [B, S] bool on the states'
    device; batch_index, seq_index, targets: int64 [C] (the regularised positions and their label
    ids); num_valid: None when C = N, else the device count of valid rows (fixed capacity:
    :mod:`sbpet.core.positions`); check_mode: this call's value-check mode for the states
    (:func:`sbpet.core.checks.check_mode`); segments: the batch's sequences, one context each
    (:class:`sbpet.core.positions.Segments`; one per row unless packed); context_index: int64 [C],
    the context of each regularised row.
    """

    hidden_states: list[torch.Tensor]
    attention_mask: torch.Tensor
    batch_index: torch.Tensor
    seq_index: torch.Tensor
    targets: torch.Tensor
    num_valid: torch.Tensor | None = None
    check_mode: str = "eager"
    segments: Segments | None = None
    context_index: torch.Tensor | None = None

    @property
    def num_states(self) -> int:
        return len(self.hidden_states)


def check_int(value, name: str, minimum: int | None = None) -> int:
    """``value`` as an int (Python or numpy integers, 0-d integer tensors), else TypeError naming
    ``name``; ValueError when it is below ``minimum``. Floats, strings and bools are refused rather
    than truncated or parsed: ``int(2.5)`` would silently build something else than asked."""
    if isinstance(value, bool):
        raise TypeError(f"{name} must be an int, got {value!r}")
    try:
        number = operator.index(value)
    except TypeError:
        raise TypeError(f"{name} must be an int, got {value!r}") from None
    if minimum is not None and number < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {number}")
    return number


def shift_labels_left(labels: torch.Tensor, ignore_index: int, segments: Segments | None = None) -> torch.Tensor:
    """Causal-LM pairing: position s gets label s+1; the last position is ignored, and with
    ``segments`` (packed rows) the last position of every sequence too: a state never predicts the
    next sequence's first token."""
    shifted = torch.full_like(labels, ignore_index)
    shifted[:, :-1] = labels[:, 1:]
    if segments is not None and segments.slots > 1:
        index = segments.to(labels.device).index
        shifted[:, :-1].masked_fill_(index[:, 1:] != index[:, :-1], ignore_index)
    return shifted


def _as_layer_list(hidden_states) -> list[torch.Tensor]:
    if isinstance(hidden_states, torch.Tensor):
        if hidden_states.dim() != 4:
            raise ValueError(
                "hidden_states as one tensor must be stacked [L+1, B, S, H], "
                f"got shape {tuple(hidden_states.shape)}"
            )
        if hidden_states.shape[0] == 0:
            raise ValueError("hidden_states is empty: expected L+1 >= 1 stacked states [L+1, B, S, H]")
        return list(hidden_states.unbind(0))
    if isinstance(hidden_states, (list, tuple)):
        if not hidden_states:
            raise ValueError("hidden_states is empty: expected L+1 tensors [B, S, H]")
        for i, h in enumerate(hidden_states):
            if not isinstance(h, torch.Tensor):
                raise TypeError(f"hidden_states[{i}] must be a tensor, got {type(h).__name__}")
        return list(hidden_states)
    raise TypeError(
        "hidden_states must be a tuple/list of L+1 tensors [B, S, H] or one tensor "
        f"[L+1, B, S, H], got {type(hidden_states).__name__}"
    )


def validate_inputs(
    hidden_states: Sequence[torch.Tensor] | torch.Tensor,
    labels: torch.Tensor,
    attention_mask: torch.Tensor | None,
    *,
    vocab_size: int,
    num_layers: int | None = None,
    hidden_size: int | None = None,
    ignore_index: int = -100,
    shift_labels: bool = False,
    check_finite: bool = True,
    max_positions: int | None = None,
    route: str = "loss",
    position_ids: torch.Tensor | None = None,
    cu_seq_lens: torch.Tensor | None = None,
    seq_idx: torch.Tensor | None = None,
) -> BridgeInputs:
    """Check the public inputs and find the regularised positions.

    Raises ValueError/TypeError naming the argument for: hidden states of different shapes,
    dtypes or devices, a wrong number of states (``num_layers + 1``) or hidden size, labels or
    attention_mask of the wrong shape, type or device, a sequence whose attention mask is all
    zero, labels outside ``[0, vocab_size)`` other than ``ignore_index``, a non-int
    ``ignore_index`` or ``num_layers``, and a NaN or infinity in the states of a real token (mask
    nonzero; padded positions may hold anything; ``check_finite=False`` leaves this check to the
    caller, see the module docstring). ``attention_mask=None`` means every token is real. The
    value checks follow :mod:`sbpet.core.checks` for ``route``. ``labels`` and ``attention_mask``
    may lie on the CPU while the states are on an accelerator (positions found on the host, no
    sync); ``max_positions``: fixed capacity (:mod:`sbpet.core.positions`). ``position_ids``,
    ``cu_seq_lens``, ``seq_idx``: packed rows' boundaries, one context per sequence
    (:func:`sbpet.core.positions.find_segments`; the causal shift stops at every sequence's end).
    """
    ignore_index = check_int(ignore_index, "ignore_index")
    if num_layers is not None:
        num_layers = check_int(num_layers, "num_layers", minimum=0)
    states = _as_layer_list(hidden_states)
    first = states[0]
    if first.dim() != 3 or first.shape[2] == 0:
        raise ValueError(f"hidden_states[0] must be [B, S, H], H >= 1, got shape {tuple(first.shape)}")
    if first.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"hidden_states must be floating point, got {first.dtype}")
    for i, h in enumerate(states[1:], start=1):
        if h.shape != first.shape:
            raise ValueError(
                f"hidden_states[{i}] has shape {tuple(h.shape)} but hidden_states[0] has "
                f"{tuple(first.shape)}: every layer must be [B, S, H] alike"
            )
        if h.device != first.device:
            raise ValueError(
                f"hidden_states[{i}] is on {h.device} but hidden_states[0] is on {first.device}"
            )
        if h.dtype != first.dtype:
            raise TypeError(
                f"hidden_states[{i}] is {h.dtype} but hidden_states[0] is {first.dtype}"
            )
    batch, seq, hidden = first.shape
    if num_layers is not None and len(states) != num_layers + 1:
        raise ValueError(
            f"hidden_states has {len(states)} entries but num_layers={num_layers} needs "
            f"{num_layers + 1} (the embedding output plus one per layer)"
        )
    if hidden_size is not None and hidden != hidden_size:
        raise ValueError(f"hidden_states have hidden size {hidden} but hidden_size={hidden_size}")

    if not isinstance(labels, torch.Tensor):
        raise TypeError(f"labels must be a tensor, got {type(labels).__name__}")
    if labels.shape != (batch, seq):
        raise ValueError(f"labels must be [B, S] = {(batch, seq)}, got {tuple(labels.shape)}")
    if labels.dtype.is_floating_point or labels.dtype.is_complex or labels.dtype == torch.bool:
        raise TypeError(f"labels must be an integer tensor, got {labels.dtype}")
    device = first.device
    if labels.device not in (device, torch.device("cpu")):
        raise ValueError(f"labels is on {labels.device} but hidden_states are on {device} (the CPU also works)")

    given_mask = attention_mask is not None
    if attention_mask is None:
        attention_mask = torch.ones(batch, seq, dtype=torch.long, device=labels.device)
    elif not isinstance(attention_mask, torch.Tensor):
        raise TypeError(f"attention_mask must be a tensor, got {type(attention_mask).__name__}")
    if attention_mask.shape != (batch, seq):
        raise ValueError(
            f"attention_mask must be [B, S] = {(batch, seq)}, got {tuple(attention_mask.shape)}"
        )
    if attention_mask.device not in (device, torch.device("cpu")):
        raise ValueError(
            f"attention_mask is on {attention_mask.device} but hidden_states are on {device} (the CPU also works)"
        )

    labels = labels.long()
    real = attention_mask != 0  # boolean from here on: every real token weighs the same
    packed = any(t is not None for t in (position_ids, cu_seq_lens, seq_idx))
    # no mask (padding-free batches): nothing to read back for the sequences
    segments = find_segments(real if given_mask else None, real.device, position_ids=position_ids,
                             cu_seq_lens=cu_seq_lens, seq_idx=seq_idx, shape=(batch, seq)) if packed else None
    if shift_labels:
        labels = shift_labels_left(labels, ignore_index, segments)
    state_mode = checks.check_mode(route, device)
    positions = find_positions(labels, real, device, vocab_size=vocab_size, ignore_index=ignore_index, route=route,
                               max_positions=max_positions, state_mode=state_mode, segments=segments)
    real = to_device(real, device)
    segments = segments.to(device) if segments is not None else None
    if check_finite and state_mode == "eager":
        check_finite_states(states, real)
    elif check_finite and state_mode == "deferred":
        checks.defer("nonfinite", _nonfinite_positions(states, real).any().long())
    return BridgeInputs(states, real, positions.batch_index, positions.seq_index, positions.targets,
                        positions.num_valid, state_mode, segments, positions.context_index)


def _nonfinite_positions(states: list[torch.Tensor], real: torch.Tensor) -> torch.Tensor:
    """bool [L+1, B, S]: real tokens whose state is not finite. A NaN / inf at a real token would
    make R (and every gradient) NaN without a word. The sum of each position's state is not finite
    then (or when finite values overflow float32, where R would too): one read of each layer, no
    temporary of its size, the cheapest reduction there is. Padded positions are left out: they
    may hold anything."""
    with torch.no_grad():
        acc = torch.promote_types(states[0].dtype, torch.float32)
        row_sums = torch.stack([h.sum(dim=-1, dtype=acc) for h in states])
        return real & ~torch.isfinite(row_sums)


def _nonfinite_error(states: list[torch.Tensor], real: torch.Tensor) -> ValueError | None:
    """The error naming the first non-finite real token (None when there is none)."""
    bad = _nonfinite_positions(states, real)
    found = bad.nonzero()
    if found.shape[0] == 0:
        return None
    layer, row, pos = found[0].tolist()
    return ValueError(
        f"hidden_states are not finite (NaN, inf or too large to sum) at {found.shape[0]} real "
        f"token(s) (attention_mask nonzero), first at hidden_states[{layer}][{row}, {pos}]: "
        "R would be NaN or inf"
    )


def check_finite_states(states: list[torch.Tensor], real: torch.Tensor) -> None:
    """Raise :func:`validate_inputs`' ValueError when a real token's state (``real`` [B, S] bool)
    is not finite: one read of every state and one host sync."""
    if bool(_nonfinite_positions(states, real).any()):
        raise _nonfinite_error(states, real)


def check_finite_contexts(contexts: torch.Tensor, states: list[torch.Tensor], real: torch.Tensor) -> None:
    """The finiteness check from ``contexts`` [L+1, B, H], each sequence's mean state over its real
    tokens (``real`` [B, S] bool), which a backend computed anyway: one host sync on that small
    tensor, and the states are read again only to name the culprit. Raises the ValueError of
    :func:`validate_inputs` (a NaN or inf at a real token makes its sequence's mean non-finite), or
    one naming the sequence whose mean overflows float32."""
    bad = ~torch.isfinite(contexts)
    if not bool(bad.any()):
        return
    error = _nonfinite_error(states, real)
    if error is None:
        layer, row = bad.any(dim=-1).nonzero()[0].tolist()
        error = ValueError(
            f"hidden_states[{layer}][{row}]: the mean over the real tokens (attention_mask nonzero) overflows "
            "float32: R would be NaN or inf"
        )
    raise error
