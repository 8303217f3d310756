"""sbpet.core.positions: exact and fixed-capacity positions, and R through both (float64 formula
and the reference)."""

from __future__ import annotations

import pytest
import torch

import sbpet
from helpers import assert_close
from sbpet.backends import dispatch
from sbpet.core.positions import find_positions


def _case(dtype=torch.float64, seed=0):
    gen = torch.Generator().manual_seed(seed)
    batch, seq, hidden, states = 3, 7, 10, 4
    g = sbpet.BridgeMapping(hidden, dims=(9, 5)).to(dtype)
    tail = sbpet.tail_from_embeddings(torch.randn(23, hidden, generator=gen), 5).to(dtype)
    hidden_states = [torch.randn(batch, seq, hidden, generator=gen, dtype=dtype, requires_grad=True)
                     for _ in range(states)]
    mask = torch.ones(batch, seq, dtype=torch.long)
    mask[1, 5:] = 0
    mask[2, 6] = 0
    labels = torch.full((batch, seq), -100)
    labels[0, 2], labels[0, 4], labels[1, 1], labels[2, 0] = 3, 17, 8, 22
    return g, tail, hidden_states, labels, mask


def test_exact_positions_are_the_regularised_ones_in_row_major_order():
    _, _, _, labels, mask = _case()
    found = find_positions(labels, mask != 0, "cpu", vocab_size=23, ignore_index=-100, route="test")
    assert found.num_valid is None and not found.padded
    assert found.batch_index.tolist() == [0, 0, 1, 2]
    assert found.seq_index.tolist() == [2, 4, 1, 0]
    assert found.targets.tolist() == [3, 17, 8, 22]


def test_fixed_capacity_puts_the_regularised_rows_first_then_distinct_free_positions():
    _, _, _, labels, mask = _case()
    found = find_positions(labels, mask != 0, "cpu", vocab_size=23, ignore_index=-100, route="test",
                           max_positions=9)
    assert found.padded and int(found.num_valid) == 4
    assert found.batch_index.shape == (9,)
    assert found.batch_index[:4].tolist() == [0, 0, 1, 2] and found.seq_index[:4].tolist() == [2, 4, 1, 0]
    assert found.targets[:4].tolist() == [3, 17, 8, 22]
    pairs = list(zip(found.batch_index.tolist(), found.seq_index.tolist()))
    assert len(set(pairs)) == 9, "padding rows must not alias a position (their gradient rows are written)"
    assert all(labels[b, s] == -100 for b, s in pairs[4:])
    assert found.targets[4:].tolist() == [0] * 5


def _float64_formula(g, tail, states, labels, mask, bridge):
    """R straight from SPEC: concat(masked-mean context, token) -> g -> bridge residual, in float64."""
    mean_coef, variance = bridge.marginals(len(states))
    total, pairs = 0.0, 0
    for b, s in (labels != -100).nonzero().tolist():
        for layer, h in enumerate(states):
            real = mask[b] != 0
            context = h[b][real].double().mean(0)
            z = torch.cat([context, h[b, s].double()])
            for i, lin in enumerate(g.layers):
                z = lin.double()(torch.nn.functional.gelu(z) if i else z)
            end = tail[labels[b, s]].double()
            total = total + ((z - mean_coef[layer] * end) ** 2).sum() / (2 * variance[layer])
            pairs += 1
    return total / pairs


@pytest.mark.parametrize("backend", ["reference", "torch"])
@pytest.mark.parametrize("capacity", [4, 6, 21])
def test_fixed_capacity_gives_the_exact_loss_and_gradients(backend, capacity):
    g, tail, states, labels, mask = _case()
    tail.requires_grad_(True)
    # A NaN at a padded token that a padding row of the full capacity (21 = B * S) points at:
    # it must reach neither R nor a gradient.
    with torch.no_grad():
        states[2][1, 6] = float("nan")
    params = [*states, tail, *g.parameters()]
    exact = sbpet.bridge_loss(states, labels, mask, g, tail, "ou", backend=backend)
    expected_grads = torch.autograd.grad(exact, params)
    padded = sbpet.bridge_loss(states, labels, mask, g, tail, "ou", backend=backend, max_positions=capacity)
    grads = torch.autograd.grad(padded, params)
    formula = _float64_formula(g, tail, states, labels, mask, sbpet.get_bridge("ou"))
    assert_close(exact, formula.detach(), torch.float64, "exact R vs the float64 formula")
    assert_close(padded, exact, torch.float64, "R at fixed capacity")
    for i, (got, want) in enumerate(zip(grads, expected_grads)):
        assert torch.isfinite(got).all(), f"gradient {i} not finite"
        assert_close(got, want, torch.float64, f"gradient {i} at fixed capacity")


def test_fixed_capacity_with_no_regularised_position_gives_zero():
    g, tail, states, labels, mask = _case()
    loss = sbpet.bridge_loss(states, torch.full_like(labels, -100), mask, g, tail, backend="torch", max_positions=5,
                             full_nll=True)
    assert loss.item() == 0.0


def test_full_nll_adds_its_constant_at_fixed_capacity_too():
    g, tail, states, labels, mask = _case()
    exact = sbpet.bridge_loss(states, labels, mask, g, tail, full_nll=True, backend="torch")
    padded = sbpet.bridge_loss(states, labels, mask, g, tail, full_nll=True, backend="torch", max_positions=8)
    assert_close(padded, exact, torch.float64, "full_nll R at fixed capacity")


def test_a_capacity_below_the_count_is_an_error_naming_max_positions():
    g, tail, states, labels, mask = _case()
    with pytest.raises(ValueError, match=r"4 regularised positions but max_positions=3"):
        sbpet.bridge_loss(states, labels, mask, g, tail, backend="torch", max_positions=3)


def test_every_backend_takes_padded_positions(monkeypatch):
    """A fixed capacity runs the backend asked for (the Triton kernels skip the padding rows on the
    device: tests/kernels/test_fixed_capacity.py); ``auto`` times it under a key of its own."""
    for name in ("torch", "reference", "triton"):
        assert dispatch.select("loss", name, torch.device("cpu"), (), lambda names: {}, padded=True).name == name
    monkeypatch.setattr(dispatch, "resolve_backend", lambda backend, device, atomics=True: "auto")
    chosen = []
    monkeypatch.setattr(dispatch.selector, "choose", lambda key, runners, family=None: chosen.append(key) or "torch")
    dispatch.select("loss", "auto", torch.device("cpu"), (), lambda names: {}, padded=True)
    dispatch.select("loss", "auto", torch.device("cpu"), (), lambda names: {}, padded=False)
    assert chosen[0] != chosen[1] and chosen[0][-1] is True
