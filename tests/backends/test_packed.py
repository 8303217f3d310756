"""Packed rows (several sequences in one row, positions restarting at 0, no attention mask: TRL's
``padding_free`` / ``packing``) give the padded batch's R and gradients, on every backend: reference,
torch, triton with both strategies (under TRITON_INTERPRET=1 on the CPU), exact positions and a
fixed capacity, with and without the causal shift, boundaries from ``position_ids``,
``cu_seq_lens`` and ``seq_idx``; and an independent float64 formula of SPEC (one context per
sequence)."""

from __future__ import annotations

import pytest
import torch

import sbpet
from helpers import assert_close

LENGTHS = (5, 1, 7, 3)  # odd sizes, a one-token sequence among them
HIDDEN, VOCAB, NUM_STATES = 12, 31, 3


def _sequences(dtype=torch.float32, seed=0):
    """Per sequence: states [L+1, n, H] and labels [n] (some ignored)."""
    gen = torch.Generator().manual_seed(seed)
    seqs = []
    for n in LENGTHS:
        states = torch.randn(NUM_STATES, n, HIDDEN, generator=gen, dtype=torch.float64).to(dtype)
        labels = torch.randint(0, VOCAB, (n,), generator=gen)
        labels[torch.rand(n, generator=gen) < 0.3] = -100
        seqs.append((states, labels))
    return seqs


def _padded(seqs):
    """The padded batch [B, S]: states [L+1, B, S, H] (NaN at padding: never read), labels, mask."""
    batch, seq = len(seqs), max(LENGTHS)
    states = torch.full((NUM_STATES, batch, seq, HIDDEN), float("nan"), dtype=seqs[0][0].dtype)
    labels = torch.full((batch, seq), -100)
    mask = torch.zeros(batch, seq, dtype=torch.long)
    for b, (x, y) in enumerate(seqs):
        states[:, b, : len(y)] = x
        labels[b, : len(y)] = y
        mask[b, : len(y)] = 1
    return states, labels, mask


def _packed(seqs, rows=1):
    """The same sequences packed into ``rows`` rows (sequences in order, split as evenly as whole
    sequences allow; shorter rows padded at the end): states [L+1, rows, S, H], labels, mask (None
    when no row is padded), and each boundary form: position_ids, seq_idx, cu_seq_lens."""
    groups = [seqs[i::rows] for i in range(rows)]
    width = max(sum(len(y) for _, y in g) for g in groups)
    dtype = seqs[0][0].dtype
    states = torch.full((NUM_STATES, rows, width, HIDDEN), float("nan"), dtype=dtype)
    labels = torch.full((rows, width), -100)
    mask = torch.zeros(rows, width, dtype=torch.long)
    position_ids = torch.zeros(rows, width, dtype=torch.long)
    seq_idx = torch.zeros(rows, width, dtype=torch.long)
    cu = [0]
    count = 0
    for r, group in enumerate(groups):
        at = 0
        for x, y in group:
            n = len(y)
            states[:, r, at : at + n] = x
            labels[r, at : at + n] = y
            mask[r, at : at + n] = 1
            position_ids[r, at : at + n] = torch.arange(n)
            seq_idx[r, at : at + n] = count
            cu.append(r * width + at + n)
            count += 1
            at += n
        if at < width:  # the row's padding: a sequence of its own for cu_seq_lens, as flash-attention pads
            seq_idx[r, at:] = count
            count += 1
            cu.append((r + 1) * width)
    order = [s for g in groups for s in g]
    return states, labels, (None if bool(mask.all()) else mask), dict(
        position_ids=position_ids, seq_idx=seq_idx, cu_seq_lens=torch.tensor(cu)), order, mask


def _close(actual, expected, name):
    """fp32 within 1e-6 relative to the compared tensor's scale (an element that sums contributions
    much larger than itself carries float32 cancellation of that size)."""
    scale = float(expected.detach().abs().max()) if expected.numel() else 0.0
    assert_close(actual, expected, name=name, rtol=1e-6, atol=1e-6 * scale)


def _float64_formula(seqs, mapping, tail, bridge, shift):
    """R straight from SPEC, sequence by sequence: mean context of the sequence, g, bridge."""
    mean_coef, variance = bridge.marginals(NUM_STATES)
    total, pairs = 0.0, 0
    g64 = [(layer.weight.double(), layer.bias.double()) for layer in mapping.layers]
    for x, y in seqs:
        x = x.double()
        targets = torch.cat([y[1:], torch.tensor([-100])]) if shift else y
        for s in (targets != -100).nonzero().flatten().tolist():
            for layer in range(NUM_STATES):
                u = torch.cat([x[layer].mean(0), x[layer, s]])
                for i, (w, b) in enumerate(g64):
                    u = (torch.nn.functional.gelu(u) if i else u) @ w.T + b
                e = tail.double()[targets[s]]
                total += float(((u - mean_coef[layer] * e) ** 2).sum() / (2 * variance[layer]))
                pairs += 1
    return total / pairs


def _setup(seed=0):
    torch.manual_seed(seed)
    mapping = sbpet.BridgeMapping(HIDDEN, dims=(10, 5))
    tail = sbpet.tail_from_embeddings(torch.randn(VOCAB, HIDDEN), 5)
    return mapping, tail


def _backends():
    from sbpet.backends.triton_backend import triton_is_usable

    found = [("reference", None), ("torch", None)]
    if triton_is_usable("cpu"):
        found += [("triton", "gemm"), ("triton", "fused")]
    return found


def _unpack(grads, order, mask, seqs):
    """Per-sequence gradient rows [L+1, n, H] of a packed gradient [L+1, R, W, H], in ``seqs`` order."""
    out = {}
    rows = mask.shape[0]
    groups = [list(range(len(seqs)))[i::rows] for i in range(rows)]
    for r, group in enumerate(groups):
        at = 0
        for k in group:
            n = LENGTHS[k]
            out[k] = grads[:, r, at : at + n]
            at += n
    return [out[k] for k in range(len(seqs))]


@pytest.mark.parametrize("backend, strategy", _backends())
@pytest.mark.parametrize("shift", [False, True])
@pytest.mark.parametrize("capacity", [None, 40])
def test_packed_row_equals_padded_batch(backend, strategy, shift, capacity, monkeypatch):
    """One packed row, boundaries from position_ids: R and the gradients w.r.t. every state and g's
    weights equal the padded batch's (the reference on it) and the float64 formula."""
    from sbpet.backends.triton_host import STRATEGY_ENV

    if strategy is not None:
        monkeypatch.setenv(STRATEGY_ENV, strategy)
    mapping, tail = _setup()
    seqs = _sequences()
    pad_states, pad_labels, pad_mask = _padded(seqs)
    states, labels, mask, bounds, order, _ = _packed(seqs)
    params = list(mapping.parameters())

    a = [h.clone().requires_grad_(True) for h in pad_states]
    want = sbpet.bridge_loss(a, pad_labels, pad_mask, mapping, tail, "ou", backend="reference", shift_labels=shift)
    want_grads = torch.autograd.grad(want, a + params)

    b = [h.clone().requires_grad_(True) for h in states]
    got = sbpet.bridge_loss(b, labels, mask, mapping, tail, "ou", backend=backend, shift_labels=shift,
                            position_ids=bounds["position_ids"], max_positions=capacity)
    got_grads = torch.autograd.grad(got, b + params)

    _close(got, want, "R")
    assert abs(got.item() - _float64_formula(seqs, mapping, tail, sbpet.get_bridge("ou"), shift)) < 1e-5 * want.item()
    pad_grads, packed_grads = torch.stack(want_grads[:NUM_STATES]), torch.stack(got_grads[:NUM_STATES])
    for k, rows in enumerate(_unpack(packed_grads, order, torch.ones(1, 1), seqs)):
        _close(rows, pad_grads[:, k, : LENGTHS[k]], f"grad of sequence {k}")
    for i, (x, y) in enumerate(zip(got_grads[NUM_STATES:], want_grads[NUM_STATES:])):
        _close(x, y, f"grad of g's parameter {i}")


@pytest.mark.parametrize("boundary", ["position_ids", "seq_idx", "cu_seq_lens"])
@pytest.mark.parametrize("backend, strategy", _backends())
def test_two_packed_rows_every_boundary_form(boundary, backend, strategy, monkeypatch):
    """Two packed rows of unequal length (the shorter padded at its end: an attention mask), causal
    shift: each boundary form gives the padded batch's R and state gradients."""
    from sbpet.backends.triton_host import STRATEGY_ENV

    if strategy is not None:
        monkeypatch.setenv(STRATEGY_ENV, strategy)
    mapping, tail = _setup(1)
    mapping.requires_grad_(False)
    seqs = _sequences(seed=3)
    pad_states, pad_labels, pad_mask = _padded(seqs)
    states, labels, mask, bounds, order, full_mask = _packed(seqs, rows=2)
    a = [h.clone().requires_grad_(True) for h in pad_states]
    want = sbpet.bridge_loss(a, pad_labels, pad_mask, mapping, tail, backend="reference", shift_labels=True)
    want_grads = torch.stack(torch.autograd.grad(want, a))
    b = [h.clone().requires_grad_(True) for h in states]
    got = sbpet.bridge_loss(b, labels, full_mask, mapping, tail, backend=backend, shift_labels=True,
                            **{boundary: bounds[boundary]})
    got_grads = torch.stack(torch.autograd.grad(got, b))
    _close(got, want, "R")
    for k, rows in enumerate(_unpack(got_grads, order, full_mask, seqs)):
        _close(rows, want_grads[:, k, : LENGTHS[k]], f"grad of sequence {k}")
    # the padding at a row's end gets a zero gradient
    assert torch.all(got_grads[:, full_mask == 0] == 0)


@pytest.mark.parametrize("backend, strategy", _backends())
def test_packed_capture_parts_equal_padded(backend, strategy, monkeypatch):
    """The parts interface (the hooks' route): capture_layer per layer with the segments, then
    loss_from_parts with each row's context index, equals the padded batch's R and gradients."""
    from sbpet.backends import dispatch
    from sbpet.backends.triton_host import STRATEGY_ENV
    from sbpet.core.bridges import get_bridge
    from sbpet.core.positions import find_positions, find_segments

    if strategy is not None:
        monkeypatch.setenv(STRATEGY_ENV, strategy)
    mapping, tail = _setup(2)
    seqs = _sequences(seed=5)
    pad_states, pad_labels, pad_mask = _padded(seqs)
    states, labels, _, bounds, order, full_mask = _packed(seqs)
    a = [h.clone().requires_grad_(True) for h in pad_states]
    want = sbpet.bridge_loss(a, pad_labels, pad_mask, mapping, tail, backend="reference")
    want_grads = torch.stack(torch.autograd.grad(want, a))

    chosen = dispatch.get_backend(backend if strategy is None else f"triton:{strategy}")
    real = full_mask != 0
    segments = find_segments(real, position_ids=bounds["position_ids"])
    positions = find_positions(labels, real, "cpu", vocab_size=VOCAB, ignore_index=-100, route="test",
                               segments=segments)
    b = [h.clone().requires_grad_(True) for h in states]
    parts = [chosen.capture_layer(h, full_mask, positions.batch_index, positions.seq_index, segments=segments)
             for h in b]
    assert parts[0][0].shape == (segments.num_contexts, HIDDEN)
    mean_coef, variance = get_bridge("brownian").marginals(NUM_STATES)
    got = chosen.loss_from_parts([p[0] for p in parts], [p[1] for p in parts], positions.context_index,
                                 positions.targets, mapping, tail, mean_coef, variance)
    got_grads = torch.stack(torch.autograd.grad(got, b))
    _close(got, want, "R")
    for k, rows in enumerate(_unpack(got_grads, order, full_mask, seqs)):
        _close(rows, want_grads[:, k, : LENGTHS[k]], f"grad of sequence {k}")


def test_plain_positions_change_nothing():
    """``position_ids`` of an ordinary padded batch (arange, or transformers' left-padding form with
    1 at the padding) keep one sequence per row: the same R as without them."""
    mapping, tail = _setup()
    states, labels, mask = _padded(_sequences())
    states = [h.nan_to_num(0.0) for h in states]
    plain = sbpet.bridge_loss(states, labels, mask, mapping, tail)
    arange = torch.arange(labels.shape[1]).expand_as(labels)
    assert float(sbpet.bridge_loss(states, labels, mask, mapping, tail, position_ids=arange)) == float(plain)
    left = (mask.cumsum(1) - 1).masked_fill(mask == 0, 1)
    assert float(sbpet.bridge_loss(states, labels, mask, mapping, tail, position_ids=left)) == float(plain)
