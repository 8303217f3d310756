"""The natural cubic spline x(t) through a token's hidden states, and the SDE solver's time grid.

The SDE regulariser (:mod:`sbpet.modules.sde`) integrates along x(t), a natural cubic spline
through (0, 0) and (t_l, h[l]) for l = 0..L. The spline is linear in its values, so on a fixed
grid it is one matrix (:func:`natural_cubic_spline_weights`): interpolating every regularised
position at every solver time is then a single matmul. No torchcubicspline.
"""

from __future__ import annotations

import functools

import torch

from .bridges import layer_times

__all__ = ["NaturalCubicSpline", "natural_cubic_spline_weights", "solver_times", "solver_grid"]

def _thomas_solve(sub: torch.Tensor, diag: torch.Tensor, sup: torch.Tensor, rhs: torch.Tensor):
    """Solve the tridiagonal system ``sub[i] x[i-1] + diag[i] x[i] + sup[i] x[i+1] = rhs[i]``.

    The matrix ([m] diagonals, ``sub[0]`` and ``sup[m-1]`` unused) is shared by every column of
    ``rhs`` [m, ...]; the elimination factors are computed once, the sweeps are batched. The
    natural-spline matrix is strictly diagonally dominant, so no pivoting is needed.
    """
    m = diag.shape[0]
    if m == 0:
        return rhs
    shape = (-1,) + (1,) * (rhs.dim() - 1)
    sub, diag, sup = (v.to(rhs.dtype).reshape(shape) for v in (sub, diag, sup))
    sup_scaled = [sup[0] / diag[0]]
    forward = [rhs[0] / diag[0]]
    for i in range(1, m):
        denom = diag[i] - sub[i] * sup_scaled[i - 1]
        sup_scaled.append(sup[i] / denom)
        forward.append((rhs[i] - sub[i] * forward[i - 1]) / denom)
    solution = [forward[m - 1]]
    for i in range(m - 2, -1, -1):
        solution.append(forward[i] - sup_scaled[i] * solution[-1])
    return torch.stack(solution[::-1])


class NaturalCubicSpline:
    """Natural cubic spline through ``(knots[k], values[k])``, batched over trailing dimensions.

    Second derivative zero at both ends; the interior second derivatives come from the usual
    tridiagonal system, solved by the Thomas algorithm in torch (differentiable in ``values``).
    Outside ``[knots[0], knots[-1]]`` the spline continues linearly, which is the natural
    extension (it keeps the second derivative continuous).

    Args:
        knots: [K] strictly increasing times, K >= 2.
        values: [K, ...] values at the knots (any trailing batch shape; dtype float32/float64).

    ``evaluate(t)`` with t of shape [*T] (or a Python float) returns [*T, ...]. At a knot it
    returns the knot's value exactly (no rounding): every knot starts its own segment.

    Example:
        >>> knots = torch.tensor([0.0, 0.25, 0.5, 0.75], dtype=torch.float64)
        >>> spline = NaturalCubicSpline(knots, torch.randn(4, 3, 5, dtype=torch.float64))
        >>> spline.evaluate(torch.tensor([0.1, 0.6], dtype=torch.float64)).shape
        torch.Size([2, 3, 5])
    """

    def __init__(self, knots: torch.Tensor, values: torch.Tensor):
        if not isinstance(knots, torch.Tensor) or knots.dim() != 1 or knots.shape[0] < 2:
            raise ValueError(f"knots must be a 1-D tensor of >= 2 times, got {getattr(knots, 'shape', knots)!r}")
        if not isinstance(values, torch.Tensor) or values.dim() < 1 or values.shape[0] != knots.shape[0]:
            raise ValueError(
                f"values must be [K, ...] with K = {knots.shape[0]} knots, got "
                f"{tuple(getattr(values, 'shape', ()))}"
            )
        if not values.is_floating_point():
            raise TypeError(f"values must be floating point, got {values.dtype}")
        knots = knots.to(device=values.device, dtype=values.dtype)
        widths = knots[1:] - knots[:-1]
        if not bool((widths > 0).all()):
            raise ValueError("knots must be strictly increasing")
        self.knots = knots
        count = knots.shape[0]
        trailing = (1,) * (values.dim() - 1)
        h = widths.reshape(-1, *trailing)  # [K-1, 1...]
        slopes = (values[1:] - values[:-1]) / h  # [K-1, ...]
        # Interior second derivatives M_1..M_{K-2}: h_{i-1} M_{i-1} + 2 (h_{i-1} + h_i) M_i
        # + h_i M_{i+1} = 6 (slope_i - slope_{i-1}), with M_0 = M_{K-1} = 0.
        interior = _thomas_solve(
            widths[:-1], 2 * (widths[:-1] + widths[1:]), widths[1:], 6 * (slopes[1:] - slopes[:-1])
        )
        zero = values.new_zeros((1,) + values.shape[1:])
        second = torch.cat([zero, interior, zero])  # [K, ...]
        # Segment k (k = 0..K-2) on [knots[k], knots[k+1]]: a + b s + c s^2 + d s^3, s = t - knots[k].
        a = values[:-1]
        b = slopes - h * (2 * second[:-1] + second[1:]) / 6
        c = second[:-1] / 2
        d = (second[1:] - second[:-1]) / (6 * h)
        end_slope = slopes[-1] + h[-1] * second[-2] / 6  # derivative at the last knot
        # K+1 pieces: the left extension (origin knots[0]), the K-1 segments, the right extension
        # (origin knots[-1]), so that a time equal to knots[k] lands on a piece whose origin is
        # knots[k] and returns values[k] exactly.
        self._origins = torch.cat([knots[:1], knots])
        self._a = torch.cat([values[:1], a, values[-1:]])
        self._b = torch.cat([b[:1], b, end_slope[None]])
        self._c = torch.cat([zero, c, zero])
        self._d = torch.cat([zero, d, zero])
        self.num_knots = count

    def evaluate(self, t) -> torch.Tensor:
        """x(t): t [*T] (tensor or float) -> [*T, ...] (the values' trailing shape)."""
        t = torch.as_tensor(t, dtype=self.knots.dtype, device=self.knots.device)
        piece = torch.searchsorted(self.knots, t.reshape(-1).contiguous(), right=True)
        s = (t.reshape(-1) - self._origins[piece]).reshape(-1, *(1,) * (self._a.dim() - 1))
        out = self._a[piece] + s * (self._b[piece] + s * (self._c[piece] + s * self._d[piece]))
        return out.reshape(*t.shape, *self._a.shape[1:])

    __call__ = evaluate


def solver_times(num_states: int, steps_per_layer: int = 1) -> torch.Tensor:
    """The solver's time grid, float64 on the host: 0, then ``steps_per_layer`` equal sub-steps
    between consecutive layer times, ending at ``t_L = (L + 1) / (L + 2)`` (< 1, so the bridge
    drifts stay finite). [(L+1) * steps_per_layer + 1].

    Example:
        >>> solver_times(2, 2)
        tensor([0.0000, 0.1667, 0.3333, 0.5000, 0.6667], dtype=torch.float64)
    """
    knots = torch.cat([torch.zeros(1, dtype=torch.float64), layer_times(num_states)])
    fractions = torch.arange(steps_per_layer, dtype=torch.float64) / steps_per_layer
    inner = knots[:-1, None] + (knots[1:] - knots[:-1])[:, None] * fractions[None, :]
    return torch.cat([inner.reshape(-1), knots[-1:]])


@functools.lru_cache(maxsize=64)
def _host_weights(num_states: int, steps_per_layer: int) -> tuple[torch.Tensor, torch.Tensor]:
    knots = torch.cat([torch.zeros(1, dtype=torch.float64), layer_times(num_states)])
    times = solver_times(num_states, steps_per_layer)
    return times, natural_cubic_spline_weights(knots, times)


@functools.lru_cache(maxsize=64)
def solver_grid(num_states: int, steps_per_layer: int, device: torch.device, dtype: torch.dtype):
    """(times [G], steps dt [G-1], sqrt(dt) [G-1], spline weights [G, L+2]) on ``device``; cached
    so that a training step copies nothing from the host."""
    times, weights = _host_weights(num_states, steps_per_layer)
    if not float(times[-1]) < 1.0:  # guard: the bridge drifts blow up at t = 1
        raise ValueError(f"the solver grid must end before t = 1, got {float(times[-1])}")
    dt = times[1:] - times[:-1]
    return tuple(v.to(device=device, dtype=dtype) for v in (times, dt, dt.sqrt(), weights))


def natural_cubic_spline_weights(knots: torch.Tensor, times: torch.Tensor) -> torch.Tensor:
    """The spline as a linear map: W [T, K] with ``spline(knots, values)(times) = W @ values``.

    The spline is linear in its values, so W is the spline of the identity; with the knots
    shared across a batch this turns interpolating every regularised position at every solver
    time into one matmul.
    """
    count = knots.shape[0]
    eye = torch.eye(count, dtype=knots.dtype, device=knots.device)
    return NaturalCubicSpline(knots, eye).evaluate(times)
