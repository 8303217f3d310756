"""A whole training step (a BERT forward with the hooks armed, the task loss plus R, backward, the
optimizer step) at a fixed capacity, with the labels in one static tensor: on CUDA captured once in
a CUDA graph and replayed with new labels copied in; on the CPU run eagerly the same way. Either
way it must train as an eager step at exact positions with the reference backend does, for the
torch backend and both Triton strategies (interpreted on the CPU).
"""

from __future__ import annotations

import contextlib
import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import sbpet  # noqa: E402
from helpers import assert_close  # noqa: E402
from sbpet.core import checks  # noqa: E402

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
CAPACITY = 8  # the batch has 4 regularised positions: 4 padding rows run too
BATCH, SEQ, VOCAB, HIDDEN = 4, 17, 100, 32


def _setups():
    from sbpet.backends.triton_backend import triton_is_usable

    triton = [("triton", "gemm"), ("triton", "fused")] if triton_is_usable(DEVICE) else []
    return [("torch", None)] + triton


def _labels(seed):
    gen = torch.Generator().manual_seed(seed)
    labels = torch.full((BATCH, SEQ), -100)
    labels[torch.arange(BATCH), torch.randint(0, SEQ, (BATCH,), generator=gen)] = torch.randint(
        0, VOCAB, (BATCH,), generator=gen)
    return labels


def _trainee(backend, max_positions):
    """The same tiny BERT, g and tail on every call (seeded); dropout off so steps are comparable."""
    from transformers import BertConfig, BertForMaskedLM

    torch.manual_seed(0)
    config = BertConfig(vocab_size=VOCAB, hidden_size=HIDDEN, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=SEQ, hidden_dropout_prob=0.0,
                        attention_probs_dropout_prob=0.0)
    model = BertForMaskedLM(config).to(DEVICE)
    reg = sbpet.BridgeRegularizer(HIDDEN, 2, dims=(16, 6), word_embeddings=model.get_input_embeddings().weight.detach(),
                                  backend=backend).to(DEVICE)
    capture = sbpet.BridgeCapture(model, reg, max_positions=max_positions)
    return model, capture, torch.optim.SGD(model.parameters(), lr=0.5)


def _step(model, capture, optimizer, ids, labels):
    # No attention mask for the model: transformers' mask helpers read it (a host sync); every token is real.
    with capture.armed(labels):
        logits = model(input_ids=ids).logits
    loss = logits.float().logsumexp(-1).mean() + capture.loss()
    loss.backward()
    optimizer.step()
    return loss.detach()


@pytest.mark.parametrize("backend, strategy", _setups())
def test_training_step_replays_with_new_labels(backend, strategy, monkeypatch):
    from sbpet.backends.triton_host import STRATEGY_ENV

    if strategy is not None:
        monkeypatch.setenv(STRATEGY_ENV, strategy)
    monkeypatch.delenv(checks.DEBUG_ENV_VAR, raising=False)  # debug mode reads values: none may run in a capture
    checks.reset_checks()
    ids = torch.randint(5, VOCAB, (BATCH, SEQ), generator=torch.Generator().manual_seed(9)).to(DEVICE)
    model, capture, optimizer = _trainee(backend, CAPACITY)
    static_labels = _labels(0).to(DEVICE)
    side = torch.cuda.Stream() if DEVICE.type == "cuda" else None
    if side is not None:  # warm-up on a side stream, as the CUDA-graph docs ask (the first call is the eager one)
        side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side) if side is not None else contextlib.nullcontext():
        for _ in range(2):
            optimizer.zero_grad(set_to_none=True)
            _step(model, capture, optimizer, ids, static_labels)
    # The eager twin: exact positions, host labels, the reference backend, from the same weights.
    twin, twin_capture, twin_optimizer = _trainee("reference", None)
    twin.load_state_dict(model.state_dict())
    twin_capture.regularizer.load_state_dict(capture.regularizer.state_dict())
    optimizer.zero_grad(set_to_none=True)
    if side is not None:
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            static_loss = _step(model, capture, optimizer, ids, static_labels)
    for seed in (5, 6):
        static_labels.copy_(_labels(seed).to(DEVICE))
        if side is not None:
            graph.replay()
        else:
            optimizer.zero_grad(set_to_none=True)
            static_loss = _step(model, capture, optimizer, ids, static_labels)
        twin_optimizer.zero_grad(set_to_none=True)
        want = _step(twin, twin_capture, twin_optimizer, ids, _labels(seed))
        assert_close(static_loss, want, name=f"step loss, labels {seed}", rtol=1e-5, atol=1e-6)
        for (name, got), wanted in zip(model.named_parameters(), twin.parameters()):
            assert_close(got, wanted, name=f"{name} after the step with labels {seed}", rtol=1e-5, atol=1e-6)
    capture.remove()
    twin_capture.remove()
    sbpet.check_deferred()
