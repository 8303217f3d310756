"""What the trainers read from a collated batch besides the model's inputs: the regularised
positions and their count where the collator runs (the host), for R's mean over an accumulated
batch (:func:`regularised_positions`, :class:`CountingCollator`), and the backbone's hidden states
for the ``hidden_states`` route (:func:`backbone_states`).
"""

from __future__ import annotations

import contextlib
from collections.abc import Mapping

import torch

from ..core.positions import find_segments
from ..core.validation import shift_labels_left
from .capture import PACKING_KEYS, align_to_states, packing_arguments
from .models import task_model

__all__ = ["BRIDGE_LABELS_KEY", "HOST_KEY", "POSITIONS_KEY", "CountingCollator", "HostCopies", "backbone_states",
           "regularised_positions"]

#: The batch key of the bridge labels [B, S] (removed before the model's forward).
BRIDGE_LABELS_KEY = "bridge_labels"
#: The key under which the trainers' data collator hands over a batch's regularised positions,
#: counted where the collator runs (the host), as a Python int; removed before the model's forward.
POSITIONS_KEY = "sbpet_regularised_positions"
#: The key under which the trainers' data collator hands over the batch's host tensors that the
#: regulariser reads (:class:`HostCopies`); removed before the model's forward.
HOST_KEY = "sbpet_host_copies"
#: The batch keys the regulariser reads on the host: its labels, mask and packed-sequence boundaries.
HOST_KEYS = (BRIDGE_LABELS_KEY, "labels", "attention_mask", *PACKING_KEYS)


class HostCopies:
    """The collated batch's host tensors that the regulariser reads (:data:`HOST_KEYS`), as the
    collator made them. A plain object, not a mapping or a tensor: the Trainer's dataloader
    (accelerate's device placement, ``pin_memory``) moves the batch's tensors to the device and
    passes it as it is, so the positions and sequence boundaries are found on the host even when
    the model's inputs arrive on the GPU."""

    def __init__(self, tensors: dict):
        self.tensors = tensors

    @classmethod
    def of(cls, batch: Mapping) -> "HostCopies":
        return cls({key: batch[key] for key in HOST_KEYS
                    if isinstance(batch.get(key), torch.Tensor) and batch[key].device.type == "cpu"})


def regularised_positions(labels: torch.Tensor, attention_mask: torch.Tensor | None = None, *,
                          ignore_index: int = -100, shift_labels: bool = False, num_virtual: int = 0,
                          position_ids=None, seq_idx=None, cu_seq_lens=None) -> torch.Tensor:
    """How many positions R averages over for ``labels`` [B, S], found as the capture finds them:
    ``num_virtual`` virtual tokens in front, the causal shift with ``shift_labels`` (stopping at
    the end of every packed sequence that ``position_ids`` / ``seq_idx`` / ``cu_seq_lens`` mark).
    A 0-dim int64 tensor on ``labels``' device (boundaries on a device are read once: give the
    host's).

    Example:
        >>> regularised_positions(torch.tensor([[-100, 5, 6, 7]]), shift_labels=True,
        ...                       position_ids=torch.tensor([[0, 1, 0, 1]]))
        tensor(2)
    """
    labels, mask = align_to_states(labels.long(), attention_mask, num_virtual, ignore_index)
    if shift_labels:
        packing = {k: v for k, v in (("position_ids", position_ids), ("seq_idx", seq_idx),
                                     ("cu_seq_lens", cu_seq_lens)) if v is not None}
        # no mask (padding-free batches): every token real, nothing to read
        real = None if attention_mask is None else mask != 0
        segments = find_segments(real, labels.device, shape=tuple(labels.shape), **packing) if packing else None
        labels = shift_labels_left(labels, ignore_index, segments)
    return (labels != ignore_index).sum()


class CountingCollator:
    """The trainer's data collator, adding to each batch (a mapping) the count of its regularised
    positions (:func:`regularised_positions`) under :data:`POSITIONS_KEY`, taken from the labels
    it made where it runs, on the host (the Trainer's dataloader moves batches to the device
    afterwards; a Python int stays), and the host tensors the regulariser reads
    (:class:`HostCopies` under :data:`HOST_KEY`). Picklable for DataLoader workers."""

    def __init__(self, collator, ignore_index: int, shift_labels: bool, num_virtual: int):
        self.collator = collator
        self.options = dict(ignore_index=ignore_index, shift_labels=shift_labels, num_virtual=num_virtual)

    def __call__(self, features):
        batch = self.collator(features)
        if isinstance(batch, Mapping):
            labels = batch.get(BRIDGE_LABELS_KEY)
            if labels is None and isinstance(batch.get("labels"), torch.Tensor) and batch["labels"].dim() == 2:
                labels = batch["labels"]
            mask = batch.get("attention_mask")
            packing = packing_arguments(batch)
            on_host = [t for t in (labels, mask, *packing.values()) if isinstance(t, torch.Tensor)]
            if labels is not None and all(t.device.type == "cpu" for t in on_host):
                batch[POSITIONS_KEY] = int(regularised_positions(labels, mask, **packing, **self.options))
            batch[HOST_KEY] = HostCopies.of(batch)
        return batch


@contextlib.contextmanager
def backbone_states(model):
    """Record the hidden states the backbone returns (``output_hidden_states=True``) in the list
    yielded; the first forward's come first. Read from the backbone, not the model's output: a head
    may not hand them on (TRL's fused LM head returns log-probabilities only)."""
    states = []

    def hook(module, args, output):
        found = output.get("hidden_states") if isinstance(output, dict) else getattr(output, "hidden_states", None)
        if found is None:
            raise RuntimeError(f"{type(module).__name__} returned no hidden_states with output_hidden_states=True")
        states.append(found)

    handle = task_model(model).base_model.register_forward_hook(hook)
    try:
        yield states
    finally:
        handle.remove()
    if not states:
        raise RuntimeError("the model's backbone did not run: no hidden states for the regulariser")
