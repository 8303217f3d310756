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
