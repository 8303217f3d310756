"""pytest-benchmark: the SDE regulariser beside the PDF one, correctness checked in the same run.

Regularisers: ``pdf`` (the torch backend of :func:`sbpet.bridge_loss`, mapping g of the shape),
``sde-euler`` and ``sde-heun`` (:func:`sbpet.modules.sde.sde_bridge_loss`, one sub-step per layer, drift
network width 128, latent size = the shape's D). Shapes: the CPU (MiniLM-like) shapes of
``benchmarks.suite`` plus its tiny shapes on CPU; its GPU shapes on CUDA. Passes: fwd, fwd+bwd
(gradients of the hidden states, and of g / f for fitting shapes).

Timed run:
    SBPET_BENCH_THREADS=1 python -m pytest benchmarks/bench_sde.py --benchmark-json OUT.json
Smoke run: ``python -m pytest benchmarks/bench_sde.py --benchmark-disable -q``.
Environment: SBPET_BENCH_SHAPES (comma list of names in suite.SHAPES), SBPET_BENCH_THREADS.
"""

from __future__ import annotations

import functools
import math

import pytest
import torch

import sbpet
from benchmarks import suite
from sbpet.modules.sde import DriftNetwork, sde_bridge_loss

DEVICE, DTYPE, SHAPE_NAMES = suite.bench_target()
REGULARISERS = ("pdf", "sde-euler", "sde-heun")
SEED = 0

_cases: dict = {}


def _case(shape_name: str):
    if shape_name not in _cases:
        _cases.clear()  # one shape's inputs alive at a time
        case = suite.make_case(suite.SHAPES[shape_name], DEVICE, DTYPE)
        torch.manual_seed(SEED)
        drift = DriftNetwork(case.shape.hidden, case.shape.dims[-1], width=128).to(DEVICE)
        drift.requires_grad_(case.shape.fit)
        _cases[shape_name] = (case, drift)
    return _cases[shape_name]


def _loss_function(case, drift, regulariser: str):
    if regulariser == "pdf":
        return functools.partial(sbpet.bridge_loss, case.states, case.labels, case.mask, case.mapping,
                                 case.tail, backend="torch", shift_labels=case.shape.causal)
    method = regulariser.split("-", 1)[1]
    inputs = sbpet.core.validation.validate_inputs(case.states, case.labels, case.mask, vocab_size=case.tail.shape[0],
                                              shift_labels=case.shape.causal)

    def loss():
        generator = torch.Generator(device=DEVICE).manual_seed(SEED)
        return sde_bridge_loss(inputs.hidden_states, inputs.attention_mask, inputs.batch_index, inputs.seq_index,
                               inputs.targets, drift, case.tail, "brownian", 1, method, generator)

    return loss


def _runner(case, drift, regulariser: str, pass_: str):
    loss_fn = _loss_function(case, drift, regulariser)
    model = case.mapping if regulariser == "pdf" else drift
    targets = list(case.states) + [p for p in model.parameters() if p.requires_grad]
    if pass_ == "fwd":

        def step():
            with torch.no_grad():
                return loss_fn(), ()

    else:

        def step():
            loss = loss_fn()
            return loss, torch.autograd.grad(loss, targets)

    return step


def _check(regulariser, pass_, step, case) -> None:
    """Finite loss and gradients; the SDE loss is the same for the same seed; the PDF loss matches
    the reference backend."""
    loss, grads = step()
    value = loss.item()
    assert math.isfinite(value) and value > 0, f"{regulariser}: loss {value}"
    for i, g in enumerate(grads):
        assert torch.isfinite(g).all(), f"{regulariser}: non-finite gradient {i}"
    if pass_ == "fwd+bwd":
        assert any(g.abs().sum() > 0 for g in grads[: len(case.states)]), f"{regulariser}: no state gradient"
    if regulariser == "pdf":
        with torch.no_grad():
            ref = sbpet.bridge_loss(case.states, case.labels, case.mask, case.mapping, case.tail,
                                    backend="reference", shift_labels=case.shape.causal)
        tol = suite.CHECK_TOLERANCE[DTYPE]
        assert abs(value - ref.item()) <= tol * abs(ref.item()), (value, ref.item())
    else:
        again, _ = step()
        assert torch.equal(loss.detach(), again.detach()), f"{regulariser}: same seed, different loss"


@pytest.fixture(scope="module", autouse=True)
def _threads():
    suite.apply_threads()
    yield
    _cases.clear()


@pytest.mark.parametrize("regulariser", REGULARISERS)
@pytest.mark.parametrize("pass_", suite.PASSES)
@pytest.mark.parametrize("shape_name", SHAPE_NAMES)
def test_regulariser(benchmark, shape_name, pass_, regulariser):
    timed = not getattr(benchmark, "disabled", True)
    if timed and DEVICE.type == "cpu" and shape_name in suite.TINY_SHAPES:
        pytest.skip("tiny shapes only check the regularisers (smoke run); their timings mean nothing")
    case, drift = _case(shape_name)
    step = _runner(case, drift, regulariser, pass_)
    _check(regulariser, pass_, step, case)
    benchmark.group = f"sde-vs-pdf {shape_name} {pass_}"
    benchmark.extra_info.update(shape=suite.shape_record(case.shape), regulariser=regulariser,
                                num_positions=case.num_positions, dtype=str(DTYPE))
    if timed:
        benchmark.extra_info["environment"] = suite.environment(DEVICE)
    benchmark.pedantic(step, rounds=5 if timed else 1, iterations=1, warmup_rounds=1 if timed else 0)
