"""sbpet.core.checks: the value checks' policy. On the CPU reading is free, so every check is
eager; the deferred path (what CUDA takes after a route's first call) is exercised here by telling
the policy that reads cost a sync."""

from __future__ import annotations

import pytest
import torch

import sbpet
from hf_helpers import classification_batch, tiny_bert_config, tiny_regularizer
from sbpet.core import checks


@pytest.fixture
def reads_cost_a_sync(monkeypatch):
    checks.reset_checks()
    monkeypatch.setattr(checks, "reads_are_free", lambda device: False)
    monkeypatch.delenv(checks.DEBUG_ENV_VAR, raising=False)
    yield
    checks.reset_checks()


def _case():
    gen = torch.Generator().manual_seed(0)
    g = sbpet.BridgeMapping(8, dims=(6, 3))
    tail = sbpet.tail_from_embeddings(torch.randn(11, 8, generator=gen), 3)
    states = [torch.randn(2, 5, 8, generator=gen, requires_grad=True) for _ in range(3)]
    labels = torch.full((2, 5), -100)
    labels[0, 1], labels[1, 3] = 4, 7
    return g, tail, states, labels, torch.ones(2, 5)


def test_the_first_call_is_eager_and_names_the_argument(reads_cost_a_sync):
    g, tail, states, labels, mask = _case()
    labels[1, 3] = 11
    expected = r"labels must be in \[0, 11\) or ignore_index=-100; found 1 outside, e\.g\. \[11\]"
    with pytest.raises(ValueError, match=expected):
        sbpet.bridge_loss(states, labels, mask, g, tail)


def test_later_calls_defer_and_check_deferred_names_each_problem_once(reads_cost_a_sync):
    g, tail, states, labels, mask = _case()
    sbpet.bridge_loss(states, labels, mask, g, tail)  # the eager first call
    sbpet.check_deferred()  # nothing pending: no error
    bad = labels.clone()
    bad[1, 3] = 50  # out of range: read at row 0 of the tail meanwhile, never out of bounds
    empty = mask.clone()
    empty[0] = 0
    loss = sbpet.bridge_loss(states, bad, mask, g, tail)
    assert torch.isfinite(loss)
    sbpet.bridge_loss(states, labels, empty, g, tail)
    with torch.no_grad():
        states[1][0, 2] = float("nan")
    sbpet.bridge_loss(states, labels, mask, g, tail)
    with pytest.raises(ValueError) as error:
        sbpet.check_deferred()
    message = str(error.value)
    assert "1 regularised position(s) outside [0, vocab_size)" in message
    assert "1 sequence(s) with no real token" in message
    assert "R was not finite in" in message and checks.DEBUG_ENV_VAR in message
    sbpet.check_deferred()  # cleared: no second error


def test_debug_switch_keeps_every_call_eager(reads_cost_a_sync, monkeypatch):
    monkeypatch.setenv(checks.DEBUG_ENV_VAR, "1")
    g, tail, states, labels, mask = _case()
    sbpet.bridge_loss(states, labels, mask, g, tail)
    with torch.no_grad():
        states[2][1, 4] = float("inf")
    with pytest.raises(ValueError, match=r"not finite .* first at hidden_states\[2\]\[1, 4\]"):
        sbpet.bridge_loss(states, labels, mask, g, tail)


def test_the_hooks_route_follows_the_same_policy(reads_cost_a_sync):
    from transformers import BertForMaskedLM

    torch.manual_seed(0)
    model = BertForMaskedLM(tiny_bert_config()).eval()
    capture = sbpet.BridgeCapture(model, tiny_regularizer(model))
    ids, mask, _ = classification_batch()
    labels = torch.full_like(ids, -100)
    labels[:, 1] = 5
    bad = labels.clone()
    bad[0, 1] = 1000
    with pytest.raises(ValueError, match=r"labels must be in \[0, 97\)"):  # first call: eager
        with capture.armed(bad, mask):
            model(input_ids=ids, attention_mask=mask)
    with capture.armed(bad, mask):
        model(input_ids=ids, attention_mask=mask)
    assert torch.isfinite(capture.loss())
    with pytest.raises(ValueError, match="outside"):
        sbpet.check_deferred()
    capture.remove()


def test_meta_tensors_skip_the_value_checks():
    assert checks.check_mode("loss", torch.device("meta")) == "skip"
    assert checks.check_mode("loss", torch.device("cpu")) == "eager"
