"""sbpet.backends.dispatch: backend names, SBPET_BACKEND, and the timing choice of ``auto``.

The timing logic is tested on CPU with an injected timer (CUDA events need a GPU): ``auto`` is
made to see several candidates by patching ``resolve_backend``; the candidates still run for real
(forward + backward through ``torch.autograd.grad``) inside the fake timer.
"""

import logging
import os
import warnings

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import sbpet  # noqa: E402
from helpers import make_case  # noqa: E402
from sbpet.backends import dispatch  # noqa: E402


class FakeTimer:
    """Runs each candidate once (so a broken one raises) and reports a fixed time per name."""

    def __init__(self, times, names_in_order):
        self.times, self.order, self.calls = times, list(names_in_order), []

    def __call__(self, run):
        name = self.order[len(self.calls) % len(self.order)]
        self.calls.append(name)
        run()
        if self.times[name] is None:
            raise RuntimeError(f"{name} exploded")
        return self.times[name]


def test_selector_keeps_the_fastest_and_times_once(caplog):
    ran = []
    timer = FakeTimer({"torch": 2.0, "triton": 1.0}, ["torch", "triton"])
    selector = dispatch.Selector(timer=timer)
    runners = lambda: {"torch": lambda: ran.append("torch"), "triton": lambda: ran.append("triton")}  # noqa: E731
    with caplog.at_level(logging.INFO, logger="sbpet.dispatch"):
        assert selector.choose(("k", 1), runners) == "triton"
        assert selector.choose(("k", 1), runners) == "triton"
    assert timer.calls == ["torch", "triton"] and ran == ["torch", "triton"]
    assert selector.timings[("k", 1)] == {"torch": 2.0, "triton": 1.0}
    assert sum("chose triton" in r.getMessage() for r in caplog.records) == 1
    timer.times = {"torch": 1.0, "triton": 3.0}
    assert selector.choose(("k", 2), runners) == "torch"


def test_failing_candidate_is_dropped_with_a_warning():
    timer = FakeTimer({"torch": 2.0, "triton": None}, ["torch", "triton"])
    selector = dispatch.Selector(timer=timer)
    with pytest.warns(RuntimeWarning, match="'triton' failed"):
        choice = selector.choose("key", lambda: {"torch": lambda: None, "triton": lambda: None})
    assert choice == "torch"


def test_graph_capture_never_times(monkeypatch):
    timer = FakeTimer({"torch": 2.0, "triton": 1.0}, ["torch", "triton"])
    selector = dispatch.Selector(timer=timer)
    runners = lambda: {"torch": lambda: None, "triton": lambda: None}  # noqa: E731
    assert selector.choose("recorded", runners) == "triton"
    monkeypatch.setattr(dispatch, "_capturing_graph", lambda: True)
    calls = len(timer.calls)
    assert selector.choose("recorded", runners) == "triton"  # the recorded choice
    assert selector.choose("new", runners) == dispatch.ANALYTIC_CHOICE  # analytic, not timed
    assert len(timer.calls) == calls and "new" not in selector.choices


def test_a_compiled_region_takes_the_choice_timed_for_its_family(monkeypatch):
    """Inside torch.compile the sizes are not read (shape_key is empty there): select() falls back
    on the choice last timed eagerly for the same key less its sizes, never times, and never takes
    another family's choice."""
    timer = FakeTimer({"torch": 2.0, "triton": 1.0}, ["torch", "triton"])
    monkeypatch.setattr(dispatch, "selector", dispatch.Selector(timer=timer))
    monkeypatch.setattr(dispatch, "resolve_backend", lambda backend, device, atomics=True: "auto")
    monkeypatch.setattr(dispatch, "get_backend", lambda name: name)
    runners = lambda names: {n: (lambda: None) for n in names}  # noqa: E731
    cpu = torch.device("cpu")
    eager_key = (torch.float32, "fp32", *dispatch.shape_key(4, 128, 17), True)
    assert dispatch.select("loss", "auto", cpu, eager_key, runners, atomics=False) == "triton:gemm"
    calls = len(timer.calls)
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    compiled_key = (torch.float32, "fp32", *dispatch.shape_key(4, 128, 17), True)
    assert compiled_key == (torch.float32, "fp32", True)
    assert dispatch.select("loss", "auto", cpu, compiled_key, runners, atomics=False) == "triton:gemm"
    other = (torch.bfloat16, "fp32", True)
    assert dispatch.select("loss", "auto", cpu, other, runners, atomics=False) == dispatch.ANALYTIC_CHOICE
    assert len(timer.calls) == calls


def test_ddp_broadcasts_rank0_choice_and_drops_row_counts(monkeypatch):
    monkeypatch.setattr(dispatch, "_distributed_world", lambda: True)
    broadcasts = []

    def broadcast_object_list(objects, src):
        broadcasts.append((list(objects), src))
        objects[0] = "triton"  # rank 0 measured otherwise

    monkeypatch.setattr(torch.distributed, "broadcast_object_list", broadcast_object_list)
    selector = dispatch.Selector(timer=FakeTimer({"torch": 1.0, "triton": 5.0}, ["torch", "triton"]))
    assert selector.choose("k", lambda: {"torch": lambda: None, "triton": lambda: None}) == "triton"
    assert broadcasts == [(["torch"], 0)]
    assert dispatch.shape_key(3, 100, 17) == ()


def test_shape_key_buckets_sizes():
    assert dispatch.shape_key(3, 100, 17, 1) == (4, 128, 32, 1)


def test_environment_variable_forces_a_backend(monkeypatch):
    cpu = torch.device("cpu")
    monkeypatch.setenv("SBPET_BACKEND", "reference")
    assert dispatch.resolve_backend("auto", cpu) == "reference"
    assert dispatch.resolve_backend("torch", cpu) == "torch"  # an explicit backend= wins
    monkeypatch.setenv("SBPET_BACKEND", "fastest")
    with pytest.raises(ValueError, match="SBPET_BACKEND"):
        dispatch.resolve_backend("auto", cpu)
    monkeypatch.delenv("SBPET_BACKEND")
    assert dispatch.resolve_backend("auto", cpu) == "torch"
    with pytest.raises(ValueError, match="backend must be one of"):
        dispatch.resolve_backend("cuda", cpu)


@pytest.mark.parametrize("atomics", [False, True])
def test_deterministic_mode_drops_only_the_atomic_strategy(atomics, monkeypatch, caplog):
    """Under deterministic algorithms a call that trains g or the tail times torch and the GEMM
    strategy only (the fused strategy's backward sums those gradients with atomics; logged); a
    call that trains neither keeps every candidate. Without the mode, every candidate."""
    pytest.importorskip("triton")
    from sbpet.backends import triton_backend

    monkeypatch.setattr(triton_backend, "triton_is_usable", lambda device: True)
    monkeypatch.setattr(dispatch, "selector", dispatch.Selector(timer=lambda run: 1.0))
    monkeypatch.setattr(dispatch, "_logged", set())
    cuda = torch.device("cuda")
    offered = []

    def runners(names):
        offered.append(list(names))
        return {name: (lambda: None) for name in names}

    every = ["torch", *dispatch.TRITON_CANDIDATES]
    real = dispatch.resolve_backend
    monkeypatch.setattr(dispatch, "resolve_backend", lambda b, d, atomics=True: "auto")  # CPU tensors timed
    cpu = torch.device("cpu")
    dispatch.select("loss", "auto", cpu, ("k",), runners, atomics=atomics)
    torch.use_deterministic_algorithms(True)
    try:
        with caplog.at_level(logging.INFO, logger="sbpet.dispatch"):
            assert real("auto", cuda, atomics=atomics) == "auto"
            dispatch.select("loss", "auto", cpu, ("k",), runners, atomics=atomics)
    finally:
        torch.use_deterministic_algorithms(False)
    # A call that trains g or the tail is timed again (the mode is part of its key) without fused.
    kept = [c for c in every if c not in dispatch.ATOMIC_CANDIDATES]
    assert offered == ([every, kept] if atomics else [every])
    assert ("not a candidate" in caplog.text) == atomics
    assert "triton:gemm" in kept and "triton:fused" in dispatch.ATOMIC_CANDIDATES


def test_explicit_fused_strategy_warns_under_deterministic_mode(monkeypatch):
    pytest.importorskip("triton")
    from sbpet.backends import triton_backend

    monkeypatch.setattr(triton_backend, "check_triton_available", lambda device: None)
    monkeypatch.setenv("SBPET_TRITON_STRATEGY", "fused")
    torch.use_deterministic_algorithms(True)
    try:
        with pytest.warns(RuntimeWarning, match="not deterministic"):
            dispatch.resolve_backend("triton", torch.device("cuda"), atomics=True)
        monkeypatch.setenv("SBPET_TRITON_STRATEGY", "gemm")
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            dispatch.resolve_backend("triton", torch.device("cuda"), atomics=True)
    finally:
        torch.use_deterministic_algorithms(False)


@pytest.fixture
def fake_auto(monkeypatch):
    """``auto`` with torch and triton as candidates on CPU tensors, timed by a FakeTimer."""
    pytest.importorskip("triton")
    real = dispatch.resolve_backend
    monkeypatch.setattr(dispatch, "resolve_backend", lambda b, d, atomics=True: "auto" if b == "auto" else real(b, d))

    def install(times, order=("torch", *dispatch.TRITON_CANDIDATES)):
        timer = FakeTimer(times, order)
        monkeypatch.setattr(dispatch, "selector", dispatch.Selector(timer=timer))
        return timer

    return install


@pytest.mark.parametrize("fastest", ["torch", *dispatch.TRITON_CANDIDATES])
def test_bridge_loss_auto_uses_the_timed_choice(fake_auto, fastest, monkeypatch):
    """``auto`` times torch and each of kernel 2's strategies, and runs the fastest: the strategy
    that ran is the one chosen."""
    from sbpet.backends import triton_backend

    timer = fake_auto({name: 1.0 if name == fastest else 9.0 for name in ("torch", *dispatch.TRITON_CANDIDATES)})
    used = []
    original = triton_backend.triton_bridge_loss
    monkeypatch.setattr(triton_backend, "triton_bridge_loss",
                        lambda *a, **k: used.append(k["strategy"]) or original(*a, **k))
    states, labels, mask, mapping, tail = make_case(dims=(12, 5), seed=2)
    states = [h.requires_grad_(True) for h in states]
    loss = sbpet.bridge_loss(states, labels, mask, mapping, tail, backend="auto")
    # Timing took gradients with autograd.grad: nothing accumulated in .grad.
    assert all(p.grad is None for p in mapping.parameters()) and all(h.grad is None for h in states)
    assert timer.calls == ["torch", *dispatch.TRITON_CANDIDATES]
    # Each strategy once timed, the chosen one once more.
    chosen = [fastest.partition(":")[2]] if fastest != "torch" else []
    assert used == ["gemm", "fused", *chosen]
    expected = sbpet.bridge_loss(states, labels, mask, mapping, tail, backend="torch")
    assert torch.allclose(loss, expected, rtol=1e-5)
    sbpet.bridge_loss(states, labels, mask, mapping, tail, backend="auto")
    assert len(timer.calls) == 3  # same key: no new timing


def test_capture_auto_times_capture_and_parts(fake_auto):
    pytest.importorskip("transformers")
    from transformers import BertForSequenceClassification

    from hf_helpers import LABEL_WORDS, MASK_ID, classification_batch, tiny_bert_config, tiny_regularizer
    from sbpet.hf import BridgeCapture, masked_lm_bridge_labels

    timer = fake_auto({"torch": 5.0, "triton": 1.0, "triton:gemm": 1.0, "triton:fused": 2.0},
                      ["torch", "triton", "torch", *dispatch.TRITON_CANDIDATES])
    torch.manual_seed(0)
    model = BertForSequenceClassification(tiny_bert_config())
    reg = tiny_regularizer(model)
    capture = BridgeCapture(model, reg, backend="auto")
    ids, mask, y = classification_batch()
    with capture.armed(masked_lm_bridge_labels(ids, y, MASK_ID, LABEL_WORDS), mask):
        model(input_ids=ids, attention_mask=mask)
    loss = capture.loss()
    loss.backward()
    ops = {key[0] for key in dispatch.selector.choices}
    assert ops == {"capture", "parts"}
    assert sorted(dispatch.selector.choices.values()) == ["triton", "triton:gemm"]
    # Every layer has the same shapes: one timing for the capture, one for the loss.
    assert len(timer.calls) == 5
    capture.remove()


@pytest.mark.parametrize("recompute", ["1", "0"])
@pytest.mark.parametrize("train_g", [False, True])
def test_every_route_says_whether_its_backward_uses_atomics(train_g, recompute, monkeypatch):
    """The hooks (capture and parts) and bridge_loss tell the dispatcher whether the call trains g
    or the tail, which decides Triton's candidacy under deterministic algorithms. With the torch
    backend's recompute the hooks compute each layer's share of R themselves: no parts step."""
    pytest.importorskip("transformers")
    from sbpet.backends.torch_recompute import RECOMPUTE_ENV

    monkeypatch.setenv(RECOMPUTE_ENV, recompute)
    from transformers import BertForSequenceClassification

    from hf_helpers import LABEL_WORDS, MASK_ID, classification_batch, tiny_bert_config, tiny_regularizer
    from sbpet.hf import BridgeCapture, masked_lm_bridge_labels

    seen = []
    real = dispatch.select

    def spy(op, backend, device, key, runners, atomics=True, padded=False):
        seen.append((op, atomics))
        return real(op, backend, device, key, runners, atomics, padded)

    monkeypatch.setattr(dispatch, "select", spy)
    torch.manual_seed(0)
    model = BertForSequenceClassification(tiny_bert_config())
    reg = tiny_regularizer(model)
    reg.mapping.requires_grad_(train_g)
    capture = BridgeCapture(model, reg, backend="torch")
    ids, mask, y = classification_batch()
    labels = masked_lm_bridge_labels(ids, y, MASK_ID, LABEL_WORDS)
    with capture.armed(labels, mask):
        out = model(input_ids=ids, attention_mask=mask, output_hidden_states=True)
    capture.loss()
    reg(out.hidden_states, labels, mask, backend="torch")
    capture.remove()
    assert {op for op, _ in seen} == ({"capture", "loss"} if recompute == "1" else {"capture", "parts", "loss"})
    assert all(atomics is False for op, atomics in seen if op == "capture")
    assert all(atomics is train_g for op, atomics in seen if op != "capture")
