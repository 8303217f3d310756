"""sbpet.core.spline: the natural cubic spline x(t) and the SDE solver's time grid.

Independent float64 check: the spline against a dense solve of the natural-spline system written
here (no Thomas elimination), evaluated with the textbook second-derivative form.
"""

import pytest
import torch

from helpers import assert_close

from sbpet.core.bridges import layer_times
from sbpet.core.spline import NaturalCubicSpline, natural_cubic_spline_weights, solver_times


def dense_natural_spline(knots, values, times):
    """Natural cubic spline in float64 from the full K x K system (no Thomas), evaluated inside
    [knots[0], knots[-1]] with the textbook second-derivative form. values [K, C] -> [T, C]."""
    x = knots.double()
    y = values.double()
    k = x.shape[0]
    h = x[1:] - x[:-1]
    A = torch.zeros(k, k, dtype=torch.float64)
    r = torch.zeros(k, y.shape[1], dtype=torch.float64)
    A[0, 0] = A[-1, -1] = 1.0  # M_0 = M_{K-1} = 0
    for i in range(1, k - 1):
        A[i, i - 1], A[i, i], A[i, i + 1] = h[i - 1], 2 * (h[i - 1] + h[i]), h[i]
        r[i] = 6 * ((y[i + 1] - y[i]) / h[i] - (y[i] - y[i - 1]) / h[i - 1])
    M = torch.linalg.solve(A, r)
    out = []
    for t in times.double().tolist():
        i = min(max(int(torch.searchsorted(x, torch.tensor(t, dtype=torch.float64), right=True)) - 1, 0), k - 2)
        a, b = x[i + 1] - t, t - x[i]
        out.append(
            M[i] * a**3 / (6 * h[i]) + M[i + 1] * b**3 / (6 * h[i])
            + (y[i] / h[i] - M[i] * h[i] / 6) * a + (y[i + 1] / h[i] - M[i + 1] * h[i] / 6) * b
        )
    return torch.stack(out)


# ------------------------------------------------------------------------------------------------
# spline


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_spline_passes_through_knots_exactly(dtype):
    gen = torch.Generator().manual_seed(1)
    knots = torch.cumsum(torch.rand(9, generator=gen, dtype=torch.float64) + 0.05, 0).to(dtype)
    values = torch.randn(9, 3, 7, generator=gen, dtype=torch.float64).to(dtype)
    out = NaturalCubicSpline(knots, values).evaluate(knots)
    assert torch.equal(out, values), (out - values).abs().max()
    # The layer grid of the regulariser, as the loss uses it (weights of the identity).
    num_states = 7
    grid_knots = torch.cat([torch.zeros(1, dtype=torch.float64), layer_times(num_states)])
    weights = natural_cubic_spline_weights(grid_knots, grid_knots)
    assert torch.equal(weights, torch.eye(num_states + 1, dtype=torch.float64))


@pytest.mark.parametrize("num_knots", [2, 3, 8, 14])
def test_spline_matches_dense_float64_solve(num_knots):
    gen = torch.Generator().manual_seed(num_knots)
    knots = torch.cumsum(torch.rand(num_knots, generator=gen, dtype=torch.float64) + 0.1, 0)
    values = torch.randn(num_knots, 6, generator=gen, dtype=torch.float64)
    times = knots[0] + (knots[-1] - knots[0]) * torch.rand(37, generator=gen, dtype=torch.float64)
    expected = dense_natural_spline(knots, values, times)
    spline = NaturalCubicSpline(knots, values)
    assert_close(spline.evaluate(times), expected, torch.float64, "spline float64")
    assert_close(natural_cubic_spline_weights(knots, times) @ values, expected, torch.float64, "weights")
    # float32 values: same answer to float32 rounding
    out32 = NaturalCubicSpline(knots.float(), values.float()).evaluate(times.float())
    assert_close(out32, expected, torch.float32, "spline float32", rtol=1e-5, atol=1e-5)


def test_spline_is_natural_and_extends_linearly():
    gen = torch.Generator().manual_seed(3)
    knots = torch.tensor([0.0, 0.2, 0.5, 0.6, 1.1], dtype=torch.float64)
    values = torch.randn(5, 4, generator=gen, dtype=torch.float64)
    spline = NaturalCubicSpline(knots, values)
    eps = 1e-5

    def second_derivative(t, side):  # one-sided second difference, error O(eps * S''')
        v = spline.evaluate(torch.stack([t, t + side * eps, t + 2 * side * eps]))
        return (v[0] - 2 * v[1] + v[2]) / eps**2

    assert second_derivative(knots[2], 1).abs().max() > 1.0  # not trivially flat inside
    for end, side in ((knots[0], 1), (knots[-1], -1)):  # but zero at the ends
        assert second_derivative(end, side).abs().max() < 0.05
    # beyond the ends: linear with the end slope, continuous
    t = torch.tensor([-0.3, -0.1, 1.3, 1.6], dtype=torch.float64)
    v = spline.evaluate(t)
    assert_close(v[1] - v[0], (spline.evaluate(knots[:1])[0] - v[1]) * 2, torch.float64, "left linear")
    assert_close(v[3] - v[2], (v[2] - spline.evaluate(knots[-1:])[0]) * 1.5, torch.float64, "right linear")
    # a linear function is reproduced exactly by a natural spline
    line = (2.0 * knots - 0.7)[:, None]
    t = torch.linspace(-0.5, 1.5, 23, dtype=torch.float64)
    assert_close(NaturalCubicSpline(knots, line).evaluate(t), (2.0 * t - 0.7)[:, None], torch.float64, "line")


def test_spline_bad_inputs():
    with pytest.raises(ValueError, match="strictly increasing"):
        NaturalCubicSpline(torch.tensor([0.0, 0.5, 0.5]), torch.zeros(3, 2))
    with pytest.raises(ValueError, match="values must be"):
        NaturalCubicSpline(torch.tensor([0.0, 0.5, 0.7]), torch.zeros(4, 2))
    with pytest.raises(ValueError, match="knots"):
        NaturalCubicSpline(torch.tensor([0.0]), torch.zeros(1, 2))


def test_solver_times_end_before_one():
    times = solver_times(4, 3)
    assert times.shape == (13,)
    assert times[0] == 0 and abs(float(times[-1]) - 4 / 5) < 1e-15
    assert_close(times[::3], torch.tensor([0.0, 0.2, 0.4, 0.6, 0.8], dtype=torch.float64), torch.float64)
