"""The Triton kernels at a fixed capacity (``max_positions``, sbpet.core.positions): C rows, the first
``num_valid`` (a device count) regularised, the rest padding that the kernels skip on the device.

Both strategies, both routes (whole states, and the hooks' parts), g and the tail frozen or
trained, against the reference at exact positions and the float64 formula. A NaN / inf at a
padding position (a masked token the capacity filled a row with) must reach nothing. Without CUDA
the kernels run under TRITON_INTERPRET=1 (tests/conftest.py); small tiles, so the padding spans
several tiles and sequences.
"""

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

pytest.importorskip("triton")

import sbpet  # noqa: E402
from helpers import assert_close, float64_bridge_loss, make_case  # noqa: E402
from sbpet.backends import triton_gemm  # noqa: E402
from sbpet.backends.triton_host import STRATEGIES, STRATEGY_ENV  # noqa: E402
from sbpet.kernels import fused_bridge  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
TOL = dict(rtol=2e-4, atol=1e-5) if DEVICE == "cuda" else dict(rtol=1e-5, atol=1e-6)


@pytest.fixture(autouse=True, params=STRATEGIES)
def strategy(request, monkeypatch):
    monkeypatch.setenv(STRATEGY_ENV, request.param)
    return request.param


@pytest.fixture
def padded_launches(monkeypatch):
    """The num_valid kernel 2 got, per launch (forward and backward, both strategies): proves the
    padded kernels ran, not a fallback."""
    seen = []
    for module, name in ((fused_bridge, "bridge_forward"), (fused_bridge, "bridge_backward")):
        real = getattr(module, name)

        def spy(*args, _real=real, **kwargs):
            seen.append(kwargs.get("num_valid"))
            return _real(*args, **kwargs)

        monkeypatch.setattr(module, name, spy)
    return seen


def _poisoned_case(value=float("nan"), seq=19, positions_per_seq=6):
    """A case whose masked tokens hold ``value``; the unregularised ones come first in the padding,
    so the capacity's padding rows read them (unless the kernels skip them)."""
    states, labels, mask, mapping, tail = make_case(num_states=3, batch=3, seq=seq, hidden=20, dims=(24, 7),
                                                    positions_per_seq=positions_per_seq, seed=4, device=DEVICE)
    labels, mask = labels.clone(), mask.clone()
    mask[0, 0] = 0  # a masked token at the front of the padding rows
    labels[0, 0] = -100
    states = [h.clone() for h in states]
    for h in states:
        h[mask == 0] = value
    return states, labels, mask, mapping, tail


def _run(backend, case, train, max_positions=None, bridge="ou"):
    states, labels, mask, mapping, tail = case
    states = [h.detach().clone().requires_grad_(True) for h in states]
    tail = tail.detach().clone().requires_grad_(train)
    mapping.zero_grad(set_to_none=True)
    mapping.requires_grad_(train)
    loss = sbpet.bridge_loss(states, labels, mask, mapping, tail, bridge, backend=backend,
                             max_positions=max_positions)
    loss.backward()
    grads = [h.grad for h in states] + ([tail.grad] + [p.grad.clone() for p in mapping.parameters()] if train else [])
    mapping.requires_grad_(True)
    return loss.detach(), grads


@pytest.mark.parametrize("train", [False, True])
@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_whole_states_at_fixed_capacity_match_exact_positions(train, value, padded_launches):
    case = _poisoned_case(value)
    count = int((case[1] != -100).sum())
    capacity = count + 23  # padding rows span tiles (16 rows each in the interpreter) and sequences
    want, want_grads = _run("reference", case, train)
    got, got_grads = _run("triton", case, train, max_positions=capacity)
    assert padded_launches and all(n is not None and int(n) == count for n in padded_launches), padded_launches
    assert_close(got, want, name="R at fixed capacity", **TOL)
    for i, (a, b) in enumerate(zip(got_grads, want_grads)):
        assert torch.isfinite(a).all(), f"gradient {i}: the padding's {value} leaked"
        assert_close(a, b, name=f"gradient {i} at fixed capacity", **TOL)
    states, labels, mask, mapping, tail = case
    assert_close(got, float64_bridge_loss(states, labels, mask, mapping, tail, "ou"), torch.float32, "R vs float64")


def test_every_position_regularised_at_full_capacity(padded_launches):
    """Capacity B * S (what the meta device and an unbounded compile use) with every real token
    regularised: many sequences' rows per tile, the padding runs after them."""
    case = make_case(num_states=2, batch=3, seq=21, hidden=20, dims=(24, 7), positions_per_seq=21, seed=7,
                     device=DEVICE)
    want, want_grads = _run("reference", case, True)
    got, got_grads = _run("triton", case, True, max_positions=3 * 21)
    assert padded_launches
    assert_close(got, want, name="R", **TOL)
    for i, (a, b) in enumerate(zip(got_grads, want_grads)):
        assert_close(a, b, name=f"gradient {i}", **TOL)


def test_no_regularised_position_gives_zero_at_any_capacity():
    states, labels, mask, mapping, tail = make_case(num_states=2, dims=(12, 5), seed=8, device=DEVICE)
    labels = torch.full_like(labels, -100)
    got, grads = _run("triton", (states, labels, mask, mapping, tail), True, max_positions=9)
    assert got.item() == 0.0
    for i, grad in enumerate(grads):
        assert grad is None or torch.count_nonzero(grad) == 0, f"gradient {i} of an empty batch"


def test_full_nll_at_fixed_capacity():
    case = _poisoned_case()
    states, labels, mask, mapping, tail = case
    want = sbpet.bridge_loss(states, labels, mask, mapping, tail, full_nll=True, backend="reference")
    got = sbpet.bridge_loss(states, labels, mask, mapping, tail, full_nll=True, backend="triton", max_positions=40)
    assert_close(got, want, name="full_nll R", **TOL)


@pytest.mark.parametrize("train", [False, True])
def test_hooks_route_at_fixed_capacity(train, padded_launches):
    """BridgeCapture with max_positions: kernel 1 gathers C rows (padding too), kernel 2 skips the
    padding. R and every gradient (the model's, g's, the tail's) as the reference's at exact positions."""
    from transformers import BertForMaskedLM

    from hf_helpers import classification_batch, tiny_bert_config, tiny_regularizer

    torch.manual_seed(0)
    model = BertForMaskedLM(tiny_bert_config()).to(DEVICE)
    ids, mask, _ = classification_batch(batch=4, seq=11)
    labels = torch.full(ids.shape, -100)
    labels[0, 3], labels[0, 7], labels[1, 2], labels[3, 4] = 5, 17, 30, 9  # sequence 2 has none
    reg = tiny_regularizer(model).to(DEVICE)
    reg.requires_grad_(train)
    results = []
    for backend, capacity in (("reference", None), ("triton", 20)):
        reg.zero_grad(set_to_none=True)
        capture = sbpet.BridgeCapture(model, reg, backend=backend, max_positions=capacity)
        model.zero_grad(set_to_none=True)
        with capture.armed(labels, mask):
            model(input_ids=ids.to(DEVICE), attention_mask=mask.to(DEVICE))
        loss = capture.loss()
        loss.backward()
        capture.remove()
        grads = [p.grad for p in model.parameters() if p.grad is not None]
        grads += [p.grad for p in reg.parameters() if p.grad is not None]
        results.append((loss.detach(), grads))
    assert padded_launches, "the hooks' loss did not reach the padded kernels"
    (want, want_grads), (got, got_grads) = results
    assert_close(got, want, name="hooks' R at fixed capacity", **TOL)
    assert len(got_grads) == len(want_grads) and got_grads
    for i, (a, b) in enumerate(zip(got_grads, want_grads)):
        assert_close(a, b, name=f"hooks' gradient {i}", rtol=1e-4, atol=1e-6)


def test_padding_rows_never_read_by_the_gemm_strategy(monkeypatch, strategy):
    """The GEMM strategy's a1 of a padding row is written as 0 (not its state), so the torch chain
    that runs when g trains sees zeros there; W1's token gradient gathers the rows with the padding
    zeroed."""
    if strategy != "gemm":
        pytest.skip("the GEMM strategy's buffers")
    buffers = []
    real = triton_gemm._first_layer

    def spy(*args, **kwargs):
        out = real(*args, **kwargs)
        buffers.append(out.clone())
        return out

    monkeypatch.setattr(triton_gemm, "_first_layer", spy)
    case = _poisoned_case()
    count = int((case[1] != -100).sum())
    _run("triton", case, True, max_positions=count + 9)
    assert buffers
    for a1 in buffers:
        assert torch.count_nonzero(a1[:, count:]) == 0 and torch.isfinite(a1).all()


def test_tile_sequence_pairs_with_a_padding_run():
    """Padding rows after the regularised ones (a second sorted run) form pairs of their own after
    every sequence's; the starts end the last sequence where the padding begins."""
    from sbpet.kernels.segments import tile_sequence_pairs

    batch_index = torch.tensor([0, 0, 1, 2, 2, 0, 0, 1, 1])  # 5 regularised rows, then 4 of padding
    pair_ids, num_pairs, starts = tile_sequence_pairs(batch_index, 4, batch=3, num_valid=torch.tensor(5))
    # tiles [0..3], [4..7], [8]; sequences 0 | 1 | 2 2 | 2 then the padding (one pair per tile)
    assert pair_ids.tolist() == [0, 0, 1, 2, 3, 4, 4, 4, 5]
    assert num_pairs >= 6
    assert starts.tolist() == [0, 1, 2, 4]
    with pytest.raises(RuntimeError, match="sorted by sequence"):
        tile_sequence_pairs(batch_index, 4, batch=3, num_valid=torch.tensor(6))
