"""kernels/context.py's layer tables are copied to the device once per layout, not once per call."""

from __future__ import annotations

import torch

from sbpet.kernels import context


def test_the_same_layout_reuses_its_table_and_rows_table_never_edits_it():
    storage = torch.zeros(4, 2, 5, 8)
    layers = list(storage.unbind(0))
    first = context.layer_table(layers)
    again = context.layer_table(layers)
    assert again.offsets is first.offsets and again.strides is first.strides
    before = first.strides.clone()
    rows = context.rows_table([t[0] for t in layers])  # zeroes the b strides of its own copy
    assert torch.equal(first.strides, before)
    assert rows.strides.reshape(-1, 3)[:, 0].eq(0).all()
    other = context.layer_table(list(torch.zeros(3, 2, 5, 8).unbind(0)))
    assert other.offsets is not first.offsets
    assert other.offsets.tolist() == [0, 80, 160]
