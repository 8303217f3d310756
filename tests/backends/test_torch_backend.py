"""The torch backend against the reference: loss and every gradient, odd sizes, edge cases."""

import pytest
import torch
from torch import nn

import sbpet
from helpers import assert_close, float64_bridge_loss, loss_and_grads, make_case


@pytest.mark.parametrize("bridge", ["brownian", "ou"])
@pytest.mark.parametrize("dims", [(24, 7), (16,), (20, 9, 5), (12, 10, 8, 6)])
def test_torch_matches_reference_float32(bridge, dims):
    case = make_case(dims=dims, seed=3)
    ref_loss, ref_grads = loss_and_grads("reference", *case, bridge=bridge)
    loss, grads = loss_and_grads("torch", *case, bridge=bridge)
    assert_close(loss, ref_loss, torch.float32, "loss")
    for name, ref in ref_grads.items():
        assert_close(grads[name], ref, torch.float32, name)
    assert_close(loss, float64_bridge_loss(*case, bridge).float(), torch.float32, "loss vs float64")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_torch_matches_reference_low_precision(dtype):
    case = make_case(num_states=4, batch=3, seq=29, hidden=48, dims=(32, 8), dtype=dtype, seed=5)
    ref_loss, ref_grads = loss_and_grads("reference", *case, bridge="ou")
    loss, grads = loss_and_grads("torch", *case, bridge="ou")
    assert loss.dtype == torch.float32
    assert_close(loss, ref_loss, dtype, "loss")
    for name, ref in ref_grads.items():
        assert grads[name].dtype == ref.dtype, name
        assert_close(grads[name], ref, dtype, name)


def test_torch_low_precision_context_is_accumulated_in_float32(monkeypatch):
    # Force many upcast chunks; the result must not depend on the chunking.
    import sbpet.backends.torch_backend as tb

    case = make_case(num_states=2, batch=2, seq=31, hidden=16, dims=(8, 4), dtype=torch.bfloat16)
    whole = sbpet.bridge_loss(*case, backend="torch")
    monkeypatch.setattr(tb, "_UPCAST_CHUNK_ELEMENTS", 40)
    chunked = sbpet.bridge_loss(*case, backend="torch")
    assert_close(chunked, whole, torch.float32, "chunked loss")
    assert_close(whole, float64_bridge_loss(*case, "brownian").float(), torch.float32, "vs float64")


def test_torch_larger_shape_gradients_match_reference():
    case = make_case(num_states=7, batch=4, seq=64, hidden=96, dims=(128, 32, 16), positions_per_seq=9, seed=7)
    ref_loss, ref_grads = loss_and_grads("reference", *case, bridge="ou")
    loss, grads = loss_and_grads("torch", *case, bridge="ou")
    assert_close(loss, ref_loss, torch.float32, "loss")
    for name, ref in ref_grads.items():
        assert_close(grads[name], ref, torch.float32, name, rtol=1e-4, atol=1e-6)


class _LossOfParams(nn.Module):
    def __init__(self, mapping, backend, bridge):
        super().__init__()
        self.mapping, self.backend, self.bridge = mapping, backend, bridge

    def forward(self, labels, mask, tail, *states):
        return sbpet.bridge_loss(list(states), labels, mask, self.mapping, tail, self.bridge, backend=self.backend)


@pytest.mark.parametrize("backend", ["reference", "torch"])
@pytest.mark.parametrize("bridge", ["brownian", "ou"])
def test_gradcheck_float64(backend, bridge):
    states, labels, mask, mapping, tail = make_case(
        num_states=3, batch=2, seq=5, hidden=4, dims=(6, 3), vocab=9, dtype=torch.float64, param_dtype=torch.float64
    )
    module = _LossOfParams(mapping, backend, bridge)
    names = [n for n, _ in module.named_parameters()]
    params = [p.detach().clone().requires_grad_(True) for p in module.parameters()]
    states = [h.requires_grad_(True) for h in states]
    tail = tail.requires_grad_(True)

    def fn(tail, *rest):
        param_values = dict(zip(names, rest[: len(names)]))
        return torch.func.functional_call(module, param_values, (labels, mask, tail, *rest[len(names):]))

    assert torch.autograd.gradcheck(fn, (tail, *params, *states), eps=1e-6, atol=1e-7)


def test_single_position_odd_sizes():
    case = make_case(num_states=5, batch=3, seq=13, hidden=40, dims=(24, 7), positions_per_seq=0)
    states, labels, mask, mapping, tail = case
    labels[1, 4] = 17  # N = 1
    ref_loss, ref_grads = loss_and_grads("reference", *case)
    loss, grads = loss_and_grads("torch", *case)
    assert_close(loss, ref_loss, torch.float32, "loss")
    for name, ref in ref_grads.items():
        assert_close(grads[name], ref, torch.float32, name)
    # Tokens outside sequence 1 get no gradient; sequence 1's real tokens all do (context).
    g = grads["hidden_states[2]"]
    assert torch.count_nonzero(g[0]) == 0 and torch.count_nonzero(g[2]) == 0
    assert (g[1][mask[1].bool()].abs().sum(-1) > 0).all()
    assert torch.count_nonzero(g[1][~mask[1].bool()]) == 0


@pytest.mark.parametrize("backend", ["reference", "torch"])
def test_no_regularised_position_gives_exact_zero(backend):
    case = make_case(positions_per_seq=0)
    loss, grads = loss_and_grads(backend, *case)
    assert loss.item() == 0.0 and not torch.isnan(loss)
    for name, g in grads.items():
        assert g is not None and torch.count_nonzero(g) == 0, name


@pytest.mark.parametrize("backend", ["reference", "torch"])
def test_shift_labels_pairs_position_with_next_label(backend):
    states, labels, mask, mapping, tail = make_case(padding=False, seed=11)
    shifted = sbpet.bridge_loss(states, labels, mask, mapping, tail, backend=backend, shift_labels=True)
    manual = torch.full_like(labels, -100)
    manual[:, :-1] = labels[:, 1:]
    direct = sbpet.bridge_loss(states, manual, mask, mapping, tail, backend=backend)
    assert torch.equal(shifted, direct)
    assert not torch.equal(shifted, sbpet.bridge_loss(states, labels, mask, mapping, tail, backend=backend))


def test_torch_does_not_write_into_inputs():
    states, labels, mask, mapping, tail = make_case()
    copies = [h.clone() for h in states]
    labels_copy, mask_copy = labels.clone(), mask.clone()
    sbpet.bridge_loss(states, labels, mask, mapping, tail, backend="torch", shift_labels=True)
    assert all(torch.equal(a, b) for a, b in zip(states, copies))
    assert torch.equal(labels, labels_copy) and torch.equal(mask, mask_copy)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("backend", ["reference", "torch", "triton"])
def test_padded_values_never_reach_r(backend, dtype):
    """A NaN / inf at a padded position (attention mask 0) leaves R and every gradient as with
    zeros there, and the mask is boolean: a mask of 1s and 2s weighs every real token alike
    (every backend)."""
    if backend == "triton":
        pytest.importorskip("triton")
        from sbpet.backends.triton_backend import triton_is_usable

        if not triton_is_usable(torch.device("cpu")):
            pytest.skip("triton needs CUDA or TRITON_INTERPRET=1")
    states, labels, mask, mapping, tail = make_case(num_states=3, batch=3, seq=9, hidden=16, dims=(12, 5),
                                                    dtype=dtype)
    assert (mask == 0).any()
    want, want_grads = loss_and_grads(backend, states, labels, mask, mapping, tail)
    poisoned = []
    for i, h in enumerate(states):
        h = h.clone()
        h[mask == 0] = float("nan") if i % 2 == 0 else float("inf")
        poisoned.append(h)
    mixed = mask * (1 + torch.arange(mask.shape[1]) % 2)  # real tokens marked 1 or 2
    loss, grads = loss_and_grads(backend, poisoned, labels, mixed, mapping, tail)
    assert torch.isfinite(loss)
    assert_close(loss, want, name="loss")
    for name, g in grads.items():
        assert torch.isfinite(g).all(), name
        assert_close(g, want_grads[name], name=name)
