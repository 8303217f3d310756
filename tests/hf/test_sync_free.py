"""On CUDA (gpu_check runs these; skipped elsewhere): after its first call, a training step's
regulariser makes no host sync on either route, and every backend at a fixed capacity (torch, both
Triton strategies) replays in a CUDA graph with new labels. ``torch.cuda.set_sync_debug_mode("error")`` raises on any
synchronising CUDA call made while it is on."""

from __future__ import annotations

import contextlib

import pytest
import torch

import sbpet
from helpers import assert_close
from sbpet.core import checks

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
CUDA = torch.device("cuda")
CAPACITY = 8  # max_positions: more than the 4 regularised positions of _labels, so padding rows run too


@pytest.fixture(autouse=True)
def _no_debug_checks(monkeypatch):
    # SBPET_DEBUG=1 checks every value eagerly on every call (host reads by design, and none can run
    # inside a CUDA-graph capture): these tests are about the default policy.
    monkeypatch.delenv(checks.DEBUG_ENV_VAR, raising=False)


@contextlib.contextmanager
def syncs_are_errors():
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        yield
    finally:
        torch.cuda.set_sync_debug_mode(0)


def _backends():
    from sbpet.backends.triton_backend import triton_is_usable

    return ["torch", "auto"] + (["triton"] if triton_is_usable(CUDA) else [])


def _case(seed, batch=4, seq=33, hidden=64, num_states=5):
    gen = torch.Generator().manual_seed(seed)
    g = sbpet.BridgeMapping(hidden, dims=(32, 8)).to(CUDA)
    tail = sbpet.tail_from_embeddings(torch.randn(50, hidden, generator=gen), 8).to(CUDA)
    states = [torch.randn(batch, seq, hidden, generator=gen).to(CUDA).requires_grad_(True)
              for _ in range(num_states)]
    mask = torch.ones(batch, seq, dtype=torch.long)
    mask[1, 20:] = 0
    return g, tail, states, mask


def _labels(seed, batch=4, seq=33):
    gen = torch.Generator().manual_seed(seed)
    labels = torch.full((batch, seq), -100)
    labels[torch.arange(batch), torch.randint(0, 20, (batch,), generator=gen)] = torch.randint(0, 50, (batch,),
                                                                                                generator=gen)
    return labels


@pytest.mark.parametrize("backend", _backends())
def test_whole_states_route_makes_no_sync_after_its_first_call(backend):
    checks.reset_checks()
    g, tail, states, mask = _case(0)
    sbpet.bridge_loss(states, _labels(0), mask, g, tail, backend=backend).backward()  # first call: eager checks
    with syncs_are_errors():
        for seed in range(1, 4):  # new host labels each step: found on the host, one pinned async copy
            sbpet.bridge_loss(states, _labels(seed), mask, g, tail, backend=backend).backward()
    sbpet.check_deferred()


@pytest.mark.parametrize("backend", _backends())
def test_device_labels_at_a_fixed_capacity_make_no_sync(backend):
    checks.reset_checks()
    g, tail, states, mask = _case(0)
    mask = mask.to(CUDA)
    sbpet.bridge_loss(states, _labels(0).to(CUDA), mask, g, tail, backend=backend, max_positions=CAPACITY).backward()
    labels = [_labels(seed).to(CUDA) for seed in range(1, 4)]
    with syncs_are_errors():
        for device_labels in labels:
            sbpet.bridge_loss(states, device_labels, mask, g, tail, backend=backend,
                              max_positions=CAPACITY).backward()
    sbpet.check_deferred()


@pytest.mark.parametrize("backend", _backends())
def test_hooks_route_makes_no_sync_after_its_first_call(backend):
    from transformers import BertConfig, BertForMaskedLM

    checks.reset_checks()
    torch.manual_seed(0)
    config = BertConfig(vocab_size=100, hidden_size=64, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=128, max_position_embeddings=64)
    model = BertForMaskedLM(config).eval().to(CUDA)
    reg = sbpet.BridgeRegularizer(64, 2, dims=(32, 8), word_embeddings=model.get_input_embeddings().weight.detach(),
                                  backend=backend).to(CUDA)
    capture = sbpet.BridgeCapture(model, reg)
    ids = torch.randint(5, 100, (4, 33), device=CUDA)
    mask = torch.ones(4, 33, dtype=torch.long)

    def step(seed):
        with capture.armed(_labels(seed), mask):
            # transformers' own mask helpers read the mask (``.all()``): the model gets none (every
            # token real for it); the capture gets the host mask, as BridgeTrainer hands it over.
            out = model(input_ids=ids)
        (out.logits.float().mean() + capture.loss()).backward()

    step(0)
    with syncs_are_errors():
        for seed in range(1, 4):
            step(seed)
    capture.remove()
    sbpet.check_deferred()


def _graph_backends():
    from sbpet.backends.triton_backend import triton_is_usable

    return [("torch", None)] + ([("triton", "gemm"), ("triton", "fused")] if triton_is_usable(CUDA) else [])


@pytest.mark.parametrize("backend, strategy", _graph_backends() if torch.cuda.is_available() else [])
def test_cuda_graph_replays_with_new_labels(backend, strategy, monkeypatch):
    """A whole forward + backward at a fixed capacity, captured once, replays with new labels: the
    torch backend and both Triton strategies (their kernels skip the padding rows on the device)."""
    from sbpet.backends.triton_host import STRATEGY_ENV

    if strategy is not None:
        monkeypatch.setenv(STRATEGY_ENV, strategy)
    checks.reset_checks()
    g, tail, states, mask = _case(0)
    static_states = [h.detach().clone().requires_grad_(True) for h in states]
    static_labels, static_mask = _labels(0).to(CUDA), mask.to(CUDA)

    def step():
        for h in static_states:
            h.grad = None
        loss = sbpet.bridge_loss(static_states, static_labels, static_mask, g, tail, backend=backend,
                                 max_positions=CAPACITY)
        loss.backward()
        return loss

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):  # warm-up (the first call is the eager one) on a side stream, as the docs ask
            step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    # No value check runs during the capture: checks._compiling() counts stream capture (check mode "skip").
    with torch.cuda.graph(graph):
        static_loss = sbpet.bridge_loss(static_states, static_labels, static_mask, g, tail, backend=backend,
                                        max_positions=CAPACITY)
        static_grads = torch.autograd.grad(static_loss, static_states)
    for seed in (5, 6):
        static_labels.copy_(_labels(seed).to(CUDA))
        graph.replay()
        xs = [h.detach().clone().requires_grad_(True) for h in static_states]
        want = sbpet.bridge_loss(xs, _labels(seed), mask, g, tail, backend="reference")
        want_grads = torch.autograd.grad(want, xs)
        assert_close(static_loss, want, name=f"replayed R, labels {seed}", rtol=1e-5, atol=1e-6)
        for i, (a, b) in enumerate(zip(static_grads, want_grads)):
            assert_close(a, b, name=f"replayed grad {i}", rtol=1e-5, atol=1e-6)
    sbpet.check_deferred()  # the warm-up's and the eager calls' deferred checks found nothing
