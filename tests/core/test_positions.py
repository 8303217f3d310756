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


# ---------------------------------------------------------------------------------------------
# Packed rows: the sequences of a row (sbpet.core.positions.find_segments)

from sbpet.core.positions import find_segments, sequence_starts  # noqa: E402
from sbpet.core.validation import shift_labels_left  # noqa: E402


def _ranges(segments):
    """[(row, start, end)] of the non-empty contexts, in context order."""
    return [(g // segments.slots, int(a), int(b)) for g, (a, b) in enumerate(zip(segments.start, segments.end))
            if a < b]


def test_segments_from_position_ids_restarts():
    """A 0 or a decrease starts a sequence; the index of every position is its context."""
    position_ids = torch.tensor([[0, 1, 2, 0, 1, 0, 0, 1, 2], [0, 1, 2, 3, 4, 5, 6, 7, 8]])
    real = torch.ones(2, 9, dtype=torch.bool)
    seg = find_segments(real, position_ids=position_ids)
    assert seg.slots == 4 and seg.num_contexts == 8
    assert _ranges(seg) == [(0, 0, 3), (0, 3, 5), (0, 5, 6), (0, 6, 9), (1, 0, 9)]
    assert seg.index.tolist() == [[0, 0, 0, 1, 1, 2, 3, 3, 3], [4] * 9]
    decrease = find_segments(torch.ones(1, 5, dtype=torch.bool), position_ids=torch.tensor([[3, 4, 5, 1, 2]]))
    assert _ranges(decrease) == [(0, 0, 3), (0, 3, 5)]


def test_every_boundary_form_gives_the_same_segments():
    lengths = [3, 1, 4]
    position_ids = torch.cat([torch.arange(n) for n in lengths])[None]
    seq_idx = torch.cat([torch.full((n,), i) for i, n in enumerate(lengths)])[None]
    cu = torch.tensor([0, 3, 4, 8])
    real = torch.ones(1, 8, dtype=torch.bool)
    forms = [find_segments(real, **kw) for kw in (dict(position_ids=position_ids), dict(seq_idx=seq_idx),
                                                  dict(cu_seq_lens=cu))]
    for seg in forms:
        assert _ranges(seg) == [(0, 0, 3), (0, 3, 4), (0, 4, 8)]
        assert torch.equal(seg.index, forms[0].index)


def test_cu_seq_lens_over_rows_and_errors():
    """cu_seq_lens runs over the flattened batch; a sequence may not cross rows."""
    real = torch.ones(2, 4, dtype=torch.bool)
    seg = find_segments(real, cu_seq_lens=torch.tensor([0, 2, 4, 5, 8]))
    assert _ranges(seg) == [(0, 0, 2), (0, 2, 4), (1, 0, 1), (1, 1, 4)]
    with pytest.raises(ValueError, match="cu_seq_lens: a sequence crosses from row 0 into row 1"):
        find_segments(real, cu_seq_lens=torch.tensor([0, 3, 8]))
    with pytest.raises(ValueError, match="cu_seq_lens must be the cumulative"):
        find_segments(real, cu_seq_lens=torch.tensor([1, 3, 8]))
    with pytest.raises(ValueError, match=r"position_ids must be \[B, S\]"):
        find_segments(real, position_ids=torch.zeros(3, 4, dtype=torch.long))
    with pytest.raises(TypeError, match="seq_idx must be an integer tensor"):
        find_segments(real, seq_idx=torch.zeros(2, 4))


def test_padding_never_makes_a_sequence():
    """Left padding with transformers' positions (1 at the padding) keeps one sequence per row; a
    padding-only run of seq_idx joins its neighbour."""
    mask = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 0, 0]], dtype=torch.bool)
    left = (mask.long().cumsum(1) - 1).masked_fill(~mask, 1)
    assert find_segments(mask, position_ids=left).slots == 1
    seq_idx = torch.tensor([[0, 0, 1, 1, 1], [0, 0, 0, 1, 1]])
    seg = find_segments(mask, seq_idx=seq_idx)
    assert seg.slots == 1 and _ranges(seg) == [(0, 0, 5), (1, 0, 5)]


def test_causal_shift_stops_at_each_sequence_end():
    labels = torch.tensor([[10, 11, 12, 20, 21, 30]])
    seg = find_segments(torch.ones(1, 6, dtype=torch.bool), position_ids=torch.tensor([[0, 1, 2, 0, 1, 0]]))
    assert shift_labels_left(labels, -100, seg).tolist() == [[11, 12, -100, 21, -100, -100]]
    assert shift_labels_left(labels, -100).tolist() == [[11, 12, 20, 21, 30, -100]]


def test_positions_carry_their_context_index_exact_and_fixed_capacity():
    labels = torch.tensor([[-100, 5, 6, -100, 7, 8], [1, -100, -100, -100, -100, 2]])
    real = torch.ones(2, 6, dtype=torch.bool)
    seg = find_segments(real, position_ids=torch.tensor([[0, 1, 2, 0, 1, 2], [0, 1, 0, 1, 0, 1]]))
    exact = find_positions(labels, real, "cpu", vocab_size=10, ignore_index=-100, route="test", segments=seg)
    assert seg.slots == 3
    assert exact.context_index.tolist() == [0, 0, 1, 1, 3, 5]
    fixed = find_positions(labels, real, "cpu", vocab_size=10, ignore_index=-100, route="test", segments=seg,
                           max_positions=8)
    assert fixed.context_index[:6].tolist() == [0, 0, 1, 1, 3, 5]
    assert torch.equal(fixed.context_index, seg.index[fixed.batch_index, fixed.seq_index])
    plain = find_positions(labels, real, "cpu", vocab_size=10, ignore_index=-100, route="test")
    assert plain.context_index is plain.batch_index
