"""Every bad input of docs/METHOD.md "Conventions" is a clear error naming the argument."""

import pytest
import torch

import sbpet
from helpers import make_case


@pytest.fixture
def case():
    return make_case(num_states=3, batch=2, seq=6, hidden=8, dims=(6, 3), vocab=20)


def test_all_zero_mask_row(case):
    states, labels, mask, mapping, tail = case
    mask = mask.clone()
    mask[1] = 0
    labels = labels.clone()
    labels[1] = -100
    with pytest.raises(ValueError, match="attention_mask"):
        sbpet.bridge_loss(states, labels, mask, mapping, tail)


@pytest.mark.parametrize("bad", [20, -2, 1000])
def test_labels_out_of_range(case, bad):
    states, labels, mask, mapping, tail = case
    labels = labels.clone()
    labels[0, 0] = bad
    with pytest.raises(ValueError, match="labels"):
        sbpet.bridge_loss(states, labels, mask, mapping, tail)


def test_custom_ignore_index_is_not_a_bad_label(case):
    states, labels, mask, mapping, tail = case
    labels = labels.masked_fill(labels == -100, -1)
    a = sbpet.bridge_loss(states, labels, mask, mapping, tail, ignore_index=-1)
    b = sbpet.bridge_loss(states, labels.masked_fill(labels == -1, -100), mask, mapping, tail)
    assert torch.equal(a, b)


def test_hidden_states_of_different_shapes(case):
    states, labels, mask, mapping, tail = case
    states = list(states)
    states[1] = states[1][:, :5]
    with pytest.raises(ValueError, match=r"hidden_states\[1\]"):
        sbpet.bridge_loss(states, labels, mask, mapping, tail)


def test_hidden_states_of_different_devices(case):
    states, labels, mask, mapping, tail = case
    states = list(states)
    states[2] = states[2].to("meta")
    with pytest.raises(ValueError, match=r"hidden_states\[2\]"):
        sbpet.bridge_loss(states, labels, mask, mapping, tail)


def test_hidden_states_of_different_dtypes(case):
    states, labels, mask, mapping, tail = case
    states = list(states)
    states[1] = states[1].double()
    with pytest.raises(TypeError, match=r"hidden_states\[1\]"):
        sbpet.bridge_loss(states, labels, mask, mapping, tail)


def test_mismatched_hidden_size(case):
    states, labels, mask, _, tail = case
    with pytest.raises(ValueError, match="hidden_size"):
        sbpet.bridge_loss(states, labels, mask, sbpet.BridgeMapping(10, (6, 3)), tail)


def test_mismatched_num_layers(case):
    states, labels, mask, mapping, tail = case
    reg = sbpet.BridgeRegularizer(8, num_layers=3, dims=(6, 3), tail=tail)
    with pytest.raises(ValueError, match="num_layers"):
        reg(states, labels, mask)


@pytest.mark.parametrize(
    "field, value, exc",
    [
        ("labels", torch.zeros(2, 5, dtype=torch.long), ValueError),
        ("labels", torch.zeros(2, 6), TypeError),
        ("labels", [[0] * 6] * 2, TypeError),
        ("attention_mask", torch.ones(2, 7), ValueError),
        ("attention_mask", torch.ones(1, 6), ValueError),
        ("hidden_states", torch.zeros(2, 6, 8), ValueError),
        ("hidden_states", "states", TypeError),
        ("hidden_states", [], ValueError),
        ("tail", torch.zeros(20, 4), ValueError),
    ],
)
def test_wrong_shapes_and_types_are_not_broadcast(case, field, value, exc):
    states, labels, mask, mapping, tail = case
    args = dict(hidden_states=states, labels=labels, attention_mask=mask, mapping=mapping, tail=tail)
    args[field] = value
    with pytest.raises(exc, match=field):
        sbpet.bridge_loss(**args)


def test_unknown_backend_and_bridge(case):
    with pytest.raises(ValueError, match="backend"):
        sbpet.bridge_loss(*case, backend="cuda")
    with pytest.raises(ValueError, match="bridge"):
        sbpet.bridge_loss(*case, bridge="levy")


def test_triton_backend_refuses_cpu_without_interpreter(case, monkeypatch):
    pytest.importorskip("triton")
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    from sbpet.backends.api import resolve_backend

    with pytest.raises(ValueError, match="triton"):
        resolve_backend("triton", torch.device("cpu"))


def test_auto_backend_is_torch_on_cpu():
    from sbpet.backends.api import resolve_backend

    assert resolve_backend("auto", torch.device("cpu")) == "torch"


def test_finiteness_from_the_contexts():
    """check_finite_contexts: silent on finite contexts (however NaN the padding), validation's
    message for a non-finite real token, the sequence's name when only its mean overflows."""
    from sbpet.core.validation import check_finite_contexts, check_finite_states

    states = [torch.randn(2, 4, 3) for _ in range(3)]
    real = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]]).bool()
    for h in states:
        h[~real] = float("nan")

    def contexts(xs):
        return torch.stack([torch.where(real[..., None], h, 0).sum(1) / real.sum(1, keepdim=True) for h in xs])

    check_finite_contexts(contexts(states), states, real)
    check_finite_states(states, real)
    bad = [h.clone() for h in states]
    bad[1][1, 1, 2] = float("inf")
    with pytest.raises(ValueError, match=r"first at hidden_states\[1\]\[1, 1\]"):
        check_finite_contexts(contexts(bad), bad, real)
    with pytest.raises(ValueError, match=r"first at hidden_states\[1\]\[1, 1\]"):
        check_finite_states(bad, real)
    overflow = contexts(states)
    overflow[2, 0, 0] = float("inf")  # the states themselves are finite
    with pytest.raises(ValueError, match=r"hidden_states\[2\]\[0\]: the mean over the real tokens .* overflows"):
        check_finite_contexts(overflow, states, real)
