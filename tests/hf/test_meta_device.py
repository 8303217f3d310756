"""Forward and backward with every tensor on the ``meta`` device, where any read of a value on the
host raises: the proof that neither route (whole hidden states, hooks) reads data back, with the
labels on the device (fixed capacity B * S: nothing to count) or handed over from the host."""

from __future__ import annotations

import pytest
import torch

import sbpet
from hf_helpers import classification_batch, tiny_bert_config, tiny_regularizer


def _labels(batch, seq):
    labels = torch.full((batch, seq), -100)
    labels[:, 2] = torch.arange(batch) + 5
    return labels


@pytest.mark.parametrize("labels_on", ["meta", "cpu"])
@pytest.mark.parametrize("full_nll", [False, True])
def test_whole_states_route_reads_nothing_back(labels_on, full_nll):
    g = sbpet.BridgeMapping(16, dims=(8, 4)).to("meta").requires_grad_(True)
    tail = torch.empty(30, 4, device="meta")
    states = [torch.empty(2, 7, 16, device="meta", requires_grad=True) for _ in range(3)]
    labels = _labels(2, 7).to(labels_on)
    mask = torch.ones(2, 7, dtype=torch.long, device=labels_on)
    loss = sbpet.bridge_loss(states, labels, mask, g, tail, "ou", full_nll=full_nll)
    assert loss.device.type == "meta" and loss.shape == ()
    loss.backward()
    assert all(s.grad is not None and s.grad.shape == (2, 7, 16) for s in states)
    assert all(p.grad is not None for p in g.parameters())


@pytest.mark.parametrize("labels_on", ["meta", "cpu"])
def test_hooks_route_reads_nothing_back(labels_on):
    from transformers import BertForMaskedLM

    torch.manual_seed(0)
    model = BertForMaskedLM(tiny_bert_config()).eval()
    regularizer = tiny_regularizer(model)
    model.to("meta")
    regularizer.to("meta")
    capture = sbpet.BridgeCapture(model, regularizer)
    ids, mask, _ = classification_batch()
    labels = _labels(*ids.shape)
    # transformers' own attention-mask helpers read the mask (``.all()``): the model gets none
    # (all tokens real for it), the capture gets the real one.
    with capture.armed(labels.to(labels_on), mask.to(labels_on)):
        out = model(input_ids=ids.to("meta"))
    loss = capture.loss()
    assert loss.device.type == "meta"
    (out.logits.sum() + loss).backward()
    assert model.bert.embeddings.word_embeddings.weight.grad is not None
    capture.remove()
