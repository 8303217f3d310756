"""Input checks at the public boundary (docs/METHOD.md "Conventions").

Backends assume valid input: this module checks shapes, dtypes and devices once, with messages
that name the argument, and finds the regularised positions (the one host synchronisation the
loss needs).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

__all__ = ["BridgeInputs", "validate_inputs", "shift_labels_left"]

_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


@dataclass
class BridgeInputs:
    """Validated inputs in the form every backend takes.

    hidden_states: list of L+1 tensors [B, S, H]; attention_mask: [B, S]; batch_index,
    seq_index, targets: int64 [N] (the regularised positions and their label ids).
    """

    hidden_states: list[torch.Tensor]
    attention_mask: torch.Tensor
    batch_index: torch.Tensor
    seq_index: torch.Tensor
    targets: torch.Tensor

    @property
    def num_states(self) -> int:
        return len(self.hidden_states)


def shift_labels_left(labels: torch.Tensor, ignore_index: int) -> torch.Tensor:
    """Causal-LM pairing: position s gets label s+1; the last position is ignored."""
    shifted = torch.full_like(labels, ignore_index)
    shifted[:, :-1] = labels[:, 1:]
    return shifted


def _as_layer_list(hidden_states) -> list[torch.Tensor]:
    if isinstance(hidden_states, torch.Tensor):
        if hidden_states.dim() != 4:
            raise ValueError(
                "hidden_states as one tensor must be stacked [L+1, B, S, H], "
                f"got shape {tuple(hidden_states.shape)}"
            )
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
) -> BridgeInputs:
    """Check the public inputs and find the regularised positions.

    Raises ValueError/TypeError naming the argument for: hidden states of different shapes,
    dtypes or devices, a wrong number of states (``num_layers + 1``) or hidden size, labels or
    attention_mask of the wrong shape, type or device, a sequence whose attention mask is all
    zero, and labels outside ``[0, vocab_size)`` other than ``ignore_index``.
    ``attention_mask=None`` means every token is real.
    """
    states = _as_layer_list(hidden_states)
    first = states[0]
    if first.dim() != 3:
        raise ValueError(f"hidden_states[0] must be [B, S, H], got shape {tuple(first.shape)}")
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
    if labels.device != first.device:
        raise ValueError(f"labels is on {labels.device} but hidden_states are on {first.device}")

    if attention_mask is None:
        attention_mask = torch.ones(batch, seq, dtype=torch.long, device=first.device)
    elif not isinstance(attention_mask, torch.Tensor):
        raise TypeError(f"attention_mask must be a tensor, got {type(attention_mask).__name__}")
    if attention_mask.shape != (batch, seq):
        raise ValueError(
            f"attention_mask must be [B, S] = {(batch, seq)}, got {tuple(attention_mask.shape)}"
        )
    if attention_mask.device != first.device:
        raise ValueError(
            f"attention_mask is on {attention_mask.device} but hidden_states are on {first.device}"
        )

    labels = labels.long()
    if shift_labels:
        labels = shift_labels_left(labels, ignore_index)
    regularised = labels != ignore_index
    real = attention_mask != 0  # boolean from here on: every real token weighs the same
    # One host sync for all three checks.
    empty_rows, below, above = torch.stack(
        [
            real.sum(dim=1).eq(0).sum(),
            (regularised & (labels < 0)).sum(),
            (regularised & (labels >= vocab_size)).sum(),
        ]
    ).tolist()
    if empty_rows:
        raise ValueError(
            f"attention_mask has {empty_rows} sequence(s) with no real token (all zero): "
            "their context mean is undefined"
        )
    if below or above:
        bad = labels[regularised & ((labels < 0) | (labels >= vocab_size))]
        raise ValueError(
            f"labels must be in [0, {vocab_size}) or ignore_index={ignore_index}; "
            f"found {bad.numel()} outside, e.g. {bad[:5].tolist()}"
        )
    batch_index, seq_index = regularised.nonzero(as_tuple=True)
    return BridgeInputs(states, real, batch_index, seq_index, labels[batch_index, seq_index])
