"""The reference backend against an independent float64 formula (METHOD.md steps 1-8)."""

import pytest
import torch

import sbpet
from helpers import assert_close, float64_bridge_loss, make_case


@pytest.mark.parametrize("bridge", ["brownian", "ou"])
@pytest.mark.parametrize("dims", [(24, 7), (16,), (20, 9, 5)])
def test_reference_matches_float64_formula(bridge, dims):
    states, labels, mask, mapping, tail = make_case(dims=dims, seed=len(dims))
    got = sbpet.bridge_loss(states, labels, mask, mapping, tail, bridge, backend="reference")
    want = float64_bridge_loss(states, labels, mask, mapping, tail, bridge)
    assert got.dtype == torch.float32
    assert_close(got, want.float(), torch.float32, "loss")


def test_reference_stacked_input_equals_tuple():
    states, labels, mask, mapping, tail = make_case()
    a = sbpet.bridge_loss(tuple(states), labels, mask, mapping, tail, backend="reference")
    b = sbpet.bridge_loss(torch.stack(states), labels, mask, mapping, tail, backend="reference")
    assert torch.equal(a, b)


def test_full_nll_adds_gaussian_constants():
    import math

    states, labels, mask, mapping, tail = make_case(dims=(8, 3))
    plain = sbpet.bridge_loss(states, labels, mask, mapping, tail, "ou", backend="reference")
    full = sbpet.bridge_loss(states, labels, mask, mapping, tail, "ou", backend="reference", full_nll=True)
    _, var = sbpet.get_bridge("ou").marginals(len(states))
    const = sum(0.5 * 3 * math.log(2 * math.pi * v) for v in var.tolist()) / len(states)
    assert (full - plain).item() == pytest.approx(const, rel=1e-5)
