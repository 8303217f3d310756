"""torch.compile: the whole-states loss compiles as one graph (fullgraph), and a compiled model with
the hooks armed compiles at most twice (static, then dynamic) across the number N of regularised
positions. ``aot_eager`` traces exactly as inductor does (dynamo + AOTAutograd) without a C++ build."""

from __future__ import annotations

import pytest
import torch
import torch._dynamo
from torch._dynamo.utils import counters

import sbpet
from helpers import assert_close
from hf_helpers import tiny_bert_config, tiny_regularizer


def _case():
    gen = torch.Generator().manual_seed(0)
    g = sbpet.BridgeMapping(12, dims=(10, 4))
    tail = sbpet.tail_from_embeddings(torch.randn(19, 12, generator=gen), 4)
    states = [torch.randn(3, 6, 12, generator=gen, requires_grad=True) for _ in range(4)]
    labels = torch.full((3, 6), -100)
    labels[0, 2], labels[1, 4], labels[2, 0], labels[2, 5] = 3, 18, 7, 1
    mask = torch.ones(3, 6)
    mask[1, 5] = 0
    return g, tail, states, labels, mask


@pytest.mark.parametrize("backend, max_positions", [
    ("torch", None), ("torch", 4), ("torch", 18), ("auto", None), ("auto", 4),
    ("triton", None), ("triton", 4), ("triton", 18),  # the custom ops (interpreted on the CPU)
])
def test_bridge_loss_compiles_fullgraph(backend, max_positions):
    g, tail, states, labels, mask = _case()
    g.requires_grad_(True)

    def loss_of(states, labels, mask):
        return sbpet.bridge_loss(states, labels, mask, g, tail, "ou", backend=backend, max_positions=max_positions)

    torch._dynamo.reset()
    compiled = torch.compile(loss_of, fullgraph=True, backend="aot_eager")  # raises on any graph break
    params = [*states, *g.parameters()]
    got = compiled(states, labels, mask)
    got_grads = torch.autograd.grad(got, params)
    want = loss_of(states, labels, mask)
    want_grads = torch.autograd.grad(want, params)
    assert_close(got, want, name="compiled R")
    for i, (a, b) in enumerate(zip(got_grads, want_grads)):
        assert_close(a, b, name=f"compiled gradient {i}")


def test_compiled_model_with_hooks_compiles_at_most_twice_across_n():
    from transformers import BertForMaskedLM

    torch.manual_seed(0)
    model = BertForMaskedLM(tiny_bert_config()).eval()
    capture = sbpet.BridgeCapture(model, tiny_regularizer(model))
    compiled = torch.compile(model, backend="aot_eager")
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(5, 97, (4, 9), generator=gen)
    mask = torch.ones(4, 9, dtype=torch.long)
    torch._dynamo.reset()
    counters.clear()
    for n in range(1, 9):
        labels = torch.full((4, 9), -100)
        labels.view(-1)[torch.randperm(36, generator=gen)[:n]] = torch.randint(0, 97, (n,), generator=gen)
        with capture.armed(labels, mask):
            compiled(input_ids=ids, attention_mask=mask)
        loss = capture.loss()
        with capture.armed(labels, mask):
            model(input_ids=ids, attention_mask=mask)
        assert_close(loss, capture.loss(), name=f"compiled hooks' R at N={n}")
    graphs = counters["stats"]["unique_graphs"]
    assert 1 <= graphs <= 2, f"{graphs} graphs for 8 values of N: the dispatcher specialised on N"
    capture.remove()
