"""precision= ("fp32", "tf32", "bf16"): honoured by every backend, measured against float64.

Each backend's R and gradients at each precision are compared with the independent float64
formula. The bounds are the precision's (a few roundings of 2^-24, 2^-11, 2^-8 through g), and the
lower precisions must be measurably less exact than fp32: a backend that ignored ``precision``
(or silently changed it) fails here.
"""

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import sbpet  # noqa: E402
from helpers import float64_bridge_loss, make_case  # noqa: E402
from sbpet.core.precision import round_to_tf32  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
BACKENDS = ["reference", "torch"] + (["triton"] if __import__("importlib").util.find_spec("triton") else [])

# Upper bounds on (relative error of R, max gradient error / max |gradient|) against float64.
BOUNDS = {"fp32": (2e-6, 2e-5), "tf32": (2e-3, 1e-2), "bf16": (1e-2, 5e-2)}


def _loss_and_grads(backend, precision, case, bridge="ou"):
    states, labels, mask, mapping, tail = case
    xs = [h.detach().clone().requires_grad_(True) for h in states]
    mapping.zero_grad(set_to_none=True)
    if backend == "float64":
        loss = float64_bridge_loss([x.cpu() for x in xs], labels.cpu(), mask.cpu(), mapping, tail.cpu(), bridge)
    else:
        loss = sbpet.bridge_loss(xs, labels, mask, mapping, tail, bridge, backend=backend, precision=precision)
    loss.backward()
    grads = [x.grad for x in xs] + [p.grad for p in mapping.parameters()]
    return loss.detach().double().cpu(), [g.double().cpu() for g in grads]


@pytest.fixture(scope="module")
def case_and_expected():
    case = make_case(num_states=3, batch=2, seq=9, hidden=40, dims=(24, 9, 5), seed=5)
    return case, _loss_and_grads("float64", None, case)


@pytest.mark.parametrize("backend", BACKENDS)
def test_precision_error_against_float64(backend, case_and_expected):
    case, (expected_loss, expected_grads) = case_and_expected
    if DEVICE == "cuda":
        case = tuple([h.cuda() for h in x] if isinstance(x, list) else x.cuda() for x in case)
    errors = {}
    for precision in sbpet.PRECISIONS:
        loss, grads = _loss_and_grads(backend, precision, case)
        loss_err = (abs(loss - expected_loss) / abs(expected_loss)).item()
        grad_err = max(((g - e).abs().max() / e.abs().max()).item() for g, e in zip(grads, expected_grads))
        errors[precision] = (loss_err, grad_err)
        assert loss_err <= BOUNDS[precision][0], (backend, precision, errors)
        assert grad_err <= BOUNDS[precision][1], (backend, precision, errors)
    # The choice is honoured: TF32 and bf16 operands are visibly rounded.
    assert errors["tf32"][1] > 20 * errors["fp32"][1], errors
    assert errors["bf16"][1] > 2 * errors["tf32"][1], errors


def test_precision_is_checked_everywhere():
    states, labels, mask, mapping, tail = make_case(dims=(8, 3), seed=1)
    with pytest.raises(ValueError, match="precision must be one of"):
        sbpet.bridge_loss(states, labels, mask, mapping, tail, precision="fp16")
    with pytest.raises(ValueError, match="precision must be one of"):
        sbpet.BridgeRegularizer(40, 2, dims=(8, 3), tail=tail, precision="half")
    reg = sbpet.BridgeRegularizer(40, 2, dims=(8, 3), tail=tail, precision="bf16")
    assert reg.config["precision"] == "bf16" and "precision='bf16'" in repr(reg)


def test_round_to_tf32():
    # In [2, 4) the TF32 step is 2^-9: -3 - 2^-9 - 2^-12 is within half a step of -3 - 2^-9.
    x = torch.tensor([1.0, 1.0 + 2**-10, 1.0 + 2**-11, 1.0 + 2**-12, -3.0 - 2**-9 - 2**-12, float("inf")])
    r = round_to_tf32(x)
    assert r.tolist()[:4] == [1.0, 1.0 + 2**-10, 1.0 + 2**-10, 1.0]  # ties away from zero
    assert r[4].item() == -3.0 - 2**-9 and r[5].item() == float("inf")
    y = torch.randn(1000)
    bits = round_to_tf32(y).view(torch.int32)
    assert torch.all(bits & 0x1FFF == 0)
    assert ((round_to_tf32(y) - y).abs() <= y.abs() * 2**-11).all()


def test_saved_precision_round_trips(tmp_path):
    _, _, _, _, tail = make_case(dims=(8, 3), seed=1)
    sbpet.BridgeRegularizer(40, 2, dims=(8, 3), tail=tail, precision="tf32").save_pretrained(tmp_path)
    assert sbpet.BridgeRegularizer.from_pretrained(tmp_path).precision == "tf32"
    assert sbpet.BridgeRegularizer.from_pretrained(tmp_path, precision="fp32").precision == "fp32"
