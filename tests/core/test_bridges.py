import math

import pytest
import torch

import sbpet
from sbpet.core.bridges import BrownianBridge, OUBridge, get_bridge, layer_times


def test_layer_times_spec_step5():
    t = layer_times(25)
    assert t.shape == (25,)
    assert t[0].item() == pytest.approx(1 / 26)
    assert t[-1].item() == pytest.approx(25 / 26)


@pytest.mark.parametrize("name", ["brownian", "ou"])
def test_marginals_match_closed_forms(name):
    coef, var = get_bridge(name).marginals(5)
    for l in range(5):
        t = (l + 1) / 6
        if name == "brownian":
            want = (t, t * (1 - t))
        else:
            want = (math.sinh(t) / math.sinh(1), math.sinh(t) * math.sinh(1 - t) / math.sinh(1))
        assert coef[l].item() == pytest.approx(want[0], rel=1e-12)
        assert var[l].item() == pytest.approx(want[1], rel=1e-12)


@pytest.mark.parametrize("bridge", [BrownianBridge(), OUBridge()])
def test_drift_is_consistent_with_marginal_mean(bridge):
    # The mean m(t) e of the bridge solves dm/dt = drift(t, m, e): check by finite differences.
    e = torch.tensor([0.3, -1.2], dtype=torch.float64)
    t = torch.tensor(0.4, dtype=torch.float64)
    h = 1e-6
    dm = (bridge.mean_coef(t + h) - bridge.mean_coef(t - h)) / (2 * h) * e
    assert torch.allclose(bridge.drift(t, bridge.mean_coef(t) * e, e), dm, atol=1e-6)


def test_get_bridge_rejects_unknown():
    with pytest.raises(ValueError, match="bridge"):
        get_bridge("levy")
    assert isinstance(get_bridge("OU"), OUBridge)
    assert set(sbpet.BRIDGES) == {"brownian", "ou"}


class _ScaledBridge(BrownianBridge):
    """A bridge with an attribute (so part of its cache key) that counts its host computations."""

    calls = 0

    def __init__(self, scale):
        self.scale = scale

    def marginals(self, num_states):
        type(self).calls += 1
        coef, var = super().marginals(num_states)
        return coef, var * self.scale


def test_marginals_on_a_device_are_computed_and_copied_once():
    """bridge_loss and the hooks take the marginals from a per-(bridge, L+1, device) cache: the
    host computes (and copies) them once, not every step; another attribute value, L+1 or
    device is another entry."""
    from sbpet.core.bridges import marginals_on

    _ScaledBridge.calls = 0
    first = marginals_on(_ScaledBridge(0.5), 4, "cpu")
    assert _ScaledBridge.calls == 1
    again = marginals_on(_ScaledBridge(0.5), 4, torch.device("cpu"))  # an equal bridge, another object
    assert _ScaledBridge.calls == 1 and all(a is b for a, b in zip(first, again))
    torch.testing.assert_close(first[1], BrownianBridge().marginals(4)[1] * 0.5, rtol=0, atol=0)
    assert first[0].dtype == torch.float64
    marginals_on(_ScaledBridge(0.25), 4, "cpu"), marginals_on(_ScaledBridge(0.5), 5, "cpu")
    meta = marginals_on(_ScaledBridge(0.5), 4, "meta")
    assert _ScaledBridge.calls == 4 and meta[0].device.type == "meta"

    # Through the public functional route: two calls, one host computation.
    torch.manual_seed(0)
    states = [torch.randn(2, 5, 8) for _ in range(3)]
    labels = torch.full((2, 5), -100)
    labels[:, 1] = torch.tensor([3, 7])
    g, tail = sbpet.BridgeMapping(8, (6, 4)), torch.randn(10, 4)
    bridge = _ScaledBridge(2.0)
    _ScaledBridge.calls = 0
    losses = [sbpet.bridge_loss(states, labels, torch.ones(2, 5), g, tail, bridge, backend="torch") for _ in range(2)]
    assert _ScaledBridge.calls == 1 and torch.equal(losses[0], losses[1])
    plain = sbpet.bridge_loss(states, labels, torch.ones(2, 5), g, tail, "brownian", backend="torch")
    torch.testing.assert_close(losses[0], plain / 2)  # twice the variance: half the loss
