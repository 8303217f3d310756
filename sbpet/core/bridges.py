"""Stochastic bridges: where each layer sits in time and the bridge's marginal there.

METHOD.md steps 5 and 6. A bridge starts at the origin at t = 0 and ends at the tail point ``e``
at T = 1. Its marginal at time t is Gaussian with mean ``mean_coef(t) * e`` and isotropic variance
``variance(t)``. A new bridge is one subclass of :class:`Bridge` registered in ``BRIDGES``.

The SDE regulariser (docs/METHOD.md, second variant) also needs the bridge's drift, ``drift(t, z, e)``.
"""

from __future__ import annotations

import math

import torch

__all__ = ["Bridge", "BrownianBridge", "OUBridge", "BRIDGES", "get_bridge", "layer_times", "marginals_on"]


def layer_times(num_states: int, dtype: torch.dtype = torch.float64, device=None) -> torch.Tensor:
    """METHOD.md step 5: ``t_l = (l + 1) / (L + 2)`` for the ``num_states = L + 1`` hidden states.

    Example:
        >>> layer_times(3)
        tensor([0.2500, 0.5000, 0.7500], dtype=torch.float64)
    """
    if num_states < 1:
        raise ValueError(f"num_states must be >= 1, got {num_states}")
    steps = torch.arange(1, num_states + 1, dtype=torch.float64)
    return (steps / (num_states + 1)).to(dtype=dtype, device=device)


class Bridge:
    """A bridge from 0 at t = 0 to ``e`` at T = 1 (METHOD.md step 6).

    Subclasses define :meth:`mean_coef`, :meth:`variance` and :meth:`drift`; all take times as a
    tensor and work elementwise. ``marginals(num_states)`` gives both at the layer times, in
    float64, computed once on the host (they are tiny).
    """

    name: str = ""

    def mean_coef(self, t: torch.Tensor) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def variance(self, t: torch.Tensor) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def drift(self, t: torch.Tensor, z: torch.Tensor, end: torch.Tensor) -> torch.Tensor:
        """Drift of the bridge SDE ``dz = drift dt + dW`` at time t (t < 1), state z, end point e."""
        raise NotImplementedError  # pragma: no cover - abstract

    def marginals(self, num_states: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(mean_coef, variance) at the layer times of ``num_states`` hidden states, float64 [L+1]."""
        t = layer_times(num_states)
        return self.mean_coef(t), self.variance(t)

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


class BrownianBridge(Bridge):
    """Brownian bridge: mean ``t * e``, variance ``t (1 - t)``, drift ``(e - z) / (1 - t)``."""

    name = "brownian"

    def mean_coef(self, t):
        return t

    def variance(self, t):
        return t * (1.0 - t)

    def drift(self, t, z, end):
        return (end - z) / (1.0 - t)


class OUBridge(Bridge):
    """Ornstein-Uhlenbeck bridge (unit rate and noise).

    Mean ``sinh(t) / sinh(1) * e``, variance ``sinh(t) sinh(1 - t) / sinh(1)``,
    drift ``-coth(1 - t) z + e / sinh(1 - t)``.
    """

    name = "ou"

    def mean_coef(self, t):
        return torch.sinh(t) / math.sinh(1.0)

    def variance(self, t):
        return torch.sinh(t) * torch.sinh(1.0 - t) / math.sinh(1.0)

    def drift(self, t, z, end):
        rest = 1.0 - t
        return -z / torch.tanh(rest) + end / torch.sinh(rest)


BRIDGES: dict[str, type[Bridge]] = {"brownian": BrownianBridge, "ou": OUBridge}


def get_bridge(bridge: str | Bridge) -> Bridge:
    """Return a bridge object from its name (``"brownian"``, ``"ou"``) or the object itself."""
    if isinstance(bridge, Bridge):
        return bridge
    if isinstance(bridge, str):
        key = bridge.lower()
        if key in BRIDGES:
            return BRIDGES[key]()
    raise ValueError(f"bridge must be one of {sorted(BRIDGES)} or a Bridge, got {bridge!r}")


_ON_DEVICE: dict = {}  # (bridge type, its attributes, L + 1, device) -> (mean_coef, variance) there


def marginals_on(bridge: Bridge, num_states: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """``bridge.marginals(num_states)`` (float64 [L+1]) on ``device``: computed on the host and
    copied the first time a (bridge, L+1, device) is asked for, the same tensors after that, so a
    training step does no host work and no host-to-device copy for them (a copy from pageable
    memory blocks the host). Bridges are keyed by type and attributes; one whose attributes
    cannot be hashed is recomputed every call. Do not modify the returned tensors in place."""
    device = torch.device(device)
    try:
        key = (type(bridge), tuple(sorted(vars(bridge).items())), int(num_states), device)
        hash(key)
    except TypeError:
        return tuple(m.to(device) for m in bridge.marginals(num_states))
    found = _ON_DEVICE.get(key)
    if found is None:
        found = _ON_DEVICE[key] = tuple(m.to(device) for m in bridge.marginals(num_states))
    return found
