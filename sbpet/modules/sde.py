"""The SDE regulariser (docs/METHOD.md, "The SDE regulariser"), in plain PyTorch.

The paper's second variant fits the latent dynamics of each regularised token with a neural SDE

    dz = f(t, z, LayerNorm(x(t))) dt + dW,    z(0) = 0,

where x(t) is a natural cubic spline through (0, 0) and (t_l, h[l][b, s]), l = 0..L, and scores it
by the KL divergence from the bridge SDE ``dz = b(t, z, e) dt + dW`` that ends at the token's tail
point e (Girsanov): ``KL = 1/2 * integral ||f - b||^2 dt`` along a simulated posterior path. The
paper's code needs torchsde and torchcubicspline; this module needs neither.

One story, bottom up:

- :mod:`sbpet.core.spline` (below this layer) -- the spline x(t) and the solver's time grid.
- :class:`DriftNetwork` -- the posterior drift f.
- :func:`sde_bridge_loss` -- gather, interpolate, integrate (Euler-Maruyama or stochastic Heun),
  average: the backend, on validated inputs.
- :class:`SDEBridgeRegularizer` -- the module, a sibling of :class:`~sbpet.BridgeRegularizer`
  with the same constructor style, ``forward`` and save/load.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from ..core.bridges import Bridge, get_bridge
from ..core.mapping import resolve_tail
from ..core.seeding import check_seed, seeded_init
from ..core.spline import solver_grid
from ..core.validation import check_int, validate_inputs
from .regularizer import BridgeRegularizer

__all__ = [
    "DriftNetwork",
    "sde_bridge_loss",
    "SDEBridgeRegularizer",
    "SDE_METHODS",
]

SDE_METHODS = ("euler", "heun")


# ------------------------------------------------------------------------------------------------
# The posterior drift f


def lipswish(x: torch.Tensor) -> torch.Tensor:
    """0.909 * x * sigmoid(x): SiLU scaled to Lipschitz constant ~1 (keeps the drift tame)."""
    return 0.909 * F.silu(x)


class DriftNetwork(nn.Module):
    """Posterior drift ``f(t, z, LayerNorm(x))`` of the SDE regulariser (an MLP).

    ``Linear(1 + D + H, width) -> LipSwish -> [Linear(width, width) -> LipSwish] * (depth - 1)
    -> Linear(width, D)`` on ``[t, z, LayerNorm(x)]`` (LayerNorm without affine: the next Linear
    has one). The state columns of the first Linear are the projection of LayerNorm(x) from H
    (1024-4096 in practice) down to ``width``; because that layer is linear, the loss computes
    them once for all solver times (:meth:`state_features`) and each solver step only does the
    small ``[t, z]`` part (:meth:`drift_from_features`). The last Linear is initialised scaled
    by ``init_scale`` with zero bias, so f starts near 0 (a driftless posterior, Brownian motion)
    and the initial KL is finite and dominated by the prior drift.

    Args:
        hidden_size: H. latent_size: D (the tail's dimension). width: hidden width.
        depth: number of hidden (activated) layers, >= 1. init_scale: scale of the last layer.
        seed: None draws the initial weights from the global RNG; an int from the CPU generator
            seeded with it, the global RNG left as it was (:func:`~sbpet.core.seeding.seeded_init`).

    ``forward(t, z, x)``: t a float, 0-d tensor or [N] / [N, 1]; z [N, D]; x [N, H] -> [N, D].

    Example:
        >>> f = DriftNetwork(hidden_size=16, latent_size=4, width=32)
        >>> f(0.5, torch.zeros(3, 4), torch.randn(3, 16)).shape
        torch.Size([3, 4])
    """

    def __init__(self, hidden_size: int, latent_size: int, width: int = 128, depth: int = 2,
                 init_scale: float = 1e-2, seed: int | None = None):
        super().__init__()
        hidden_size, latent_size, width, depth = (
            check_int(value, name, minimum=1) for name, value in (
                ("hidden_size", hidden_size), ("latent_size", latent_size), ("width", width), ("depth", depth)))
        self.hidden_size, self.latent_size = hidden_size, latent_size
        self.width, self.depth = width, depth
        self.norm = nn.LayerNorm(self.hidden_size, elementwise_affine=False)
        with seeded_init(seed):
            self.input = nn.Linear(1 + self.latent_size + self.hidden_size, self.width)
            self.hidden = nn.ModuleList(nn.Linear(self.width, self.width) for _ in range(self.depth - 1))
            self.output = nn.Linear(self.width, self.latent_size)
        with torch.no_grad():
            self.output.weight.mul_(float(init_scale))
            self.output.bias.zero_()

    def state_features(self, x: torch.Tensor) -> torch.Tensor:
        """The x part of the first Linear, bias included: [..., H] -> [..., width]."""
        weight = self.input.weight
        return F.linear(self.norm(x.to(weight.dtype)), weight[:, 1 + self.latent_size :], self.input.bias)

    def drift_from_features(self, t, z: torch.Tensor, features: torch.Tensor) -> torch.Tensor:
        """f from precomputed :meth:`state_features`: t scalar / [N] / [N, 1], z [N, D] -> [N, D]."""
        weight = self.input.weight
        t = torch.as_tensor(t, dtype=weight.dtype, device=weight.device)
        if t.dim() == 1:
            t = t[:, None]
        out = features + t * weight[:, 0] + F.linear(z.to(weight.dtype), weight[:, 1 : 1 + self.latent_size])
        out = lipswish(out)
        for layer in self.hidden:
            out = lipswish(layer(out))
        return self.output(out)

    def forward(self, t, z: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return self.drift_from_features(t, z, self.state_features(x))

    def extra_repr(self) -> str:
        return f"hidden_size={self.hidden_size}, latent_size={self.latent_size}, width={self.width}, depth={self.depth}"


# ------------------------------------------------------------------------------------------------
# The solver and the loss


def _check_solver_options(steps_per_layer, method) -> None:
    if isinstance(steps_per_layer, bool) or not isinstance(steps_per_layer, int) or steps_per_layer < 1:
        raise ValueError(f"steps_per_layer must be a positive int, got {steps_per_layer!r}")
    if method not in SDE_METHODS:
        raise ValueError(f"method must be one of {SDE_METHODS}, got {method!r}")


def integrate_kl(drift_at, prior_at, times, dt, increments, method: str = "euler") -> torch.Tensor:
    """Simulate the posterior from z(0) = 0 and integrate ``1/2 ||f - prior||^2 dt`` per path.

    Args:
        drift_at(k, z), prior_at(k, z): posterior / prior drift at solver time ``times[k]``, [N, D].
        times [G], dt [G-1]: the grid and its steps. increments [G-1, N, D]: Brownian increments.
        method: ``"euler"`` (Euler-Maruyama; the KL by the left-point rule) or ``"heun"``
            (stochastic Heun, exact-noise predictor-corrector, strong order 1 like Euler for
            this additive noise but second order in the drift; the KL by the trapezoid rule on
            the predictor, as an augmented-state Heun solver computes it).

    Returns the KL per path, [N] (dtype of the increments).
    """
    z = increments.new_zeros(increments.shape[1:])
    kl = increments.new_zeros(increments.shape[1])
    for k in range(increments.shape[0]):
        f0 = drift_at(k, z).to(z.dtype)
        u0 = f0 - prior_at(k, z)
        if method == "euler":
            kl = kl + 0.5 * dt[k] * u0.pow(2).sum(-1)
            z = z + f0 * dt[k] + increments[k]
        else:
            guess = z + f0 * dt[k] + increments[k]
            f1 = drift_at(k + 1, guess).to(z.dtype)
            u1 = f1 - prior_at(k + 1, guess)
            kl = kl + 0.25 * dt[k] * (u0.pow(2).sum(-1) + u1.pow(2).sum(-1))
            z = z + 0.5 * (f0 + f1) * dt[k] + increments[k]
    return kl


def sde_bridge_loss(
    hidden_states,
    attention_mask,
    batch_index,
    seq_index,
    targets,
    drift_net,
    tail,
    bridge: str | Bridge = "brownian",
    steps_per_layer: int = 1,
    method: str = "euler",
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """The SDE regulariser on validated inputs (docs/METHOD.md, "The SDE regulariser").

    For every regularised position n = (b, s): x(t) is the natural cubic spline through (0, 0)
    and (t_l, ``h[l][b, s]``), l = 0..L; the posterior ``dz = f(t, z, x(t)) dt + dW``, z(0) = 0, is
    simulated on :func:`~sbpet.core.spline.solver_times` (``steps_per_layer`` sub-steps between layer times, up to
    t_L < 1) with the prior bridge drift to e = tail[targets[n]]; the loss is the mean over n of
    ``sum_k 1/2 ||f - prior drift||^2 dt_k``.

    Args:
        hidden_states: list of L+1 tensors [B, S, H] (float16/bfloat16/float32/float64).
        attention_mask: [B, S]; accepted for the backends' common signature and not used: the
            SDE variant follows only the token's own path (padding never is a regularised
            position, so it cannot enter).
        batch_index, seq_index, targets: int64 [N], the regularised positions and label ids.
        drift_net: a :class:`DriftNetwork`, or any callable ``f(t, z, x)`` with t a 0-d tensor,
            z [N, D] and x [N, H] (the raw spline value; a DriftNetwork applies its LayerNorm).
        tail: [V, D] tail points. bridge: ``"brownian"``, ``"ou"`` or a Bridge.
        steps_per_layer: solver sub-steps per layer interval (>= 1). With ``"euler"`` and one
            sub-step, f is never evaluated at t_L, so h[L] does not enter; ``"heun"`` or more
            sub-steps use it.
        method: ``"euler"`` or ``"heun"`` (see :func:`integrate_kl`).
        generator: a torch.Generator on the states' device for the Brownian increments (None:
            the global RNG). The same generator state gives the same loss.

    Returns:
        Scalar tensor (float32, or float64 for float64 states); exactly 0, with zero gradients,
        when N == 0.

    Example:
        >>> f = DriftNetwork(16, 4, width=32)
        >>> states = [torch.randn(2, 5, 16, requires_grad=True) for _ in range(3)]
        >>> idx = torch.tensor([0, 1]); pos = torch.tensor([1, 3]); ids = torch.tensor([7, 2])
        >>> loss = sde_bridge_loss(states, None, idx, pos, ids, f, torch.randn(10, 4), "ou",
        ...                        generator=torch.Generator().manual_seed(0))
        >>> loss.backward()
    """
    _check_solver_options(steps_per_layer, method)
    bridge = get_bridge(bridge)
    first = hidden_states[0]
    device = first.device
    compute = torch.promote_types(first.dtype, torch.float32)
    if generator is not None and generator.device.type != device.type:
        raise ValueError(f"generator is on {generator.device} but hidden_states are on {device}")
    num_states = len(hidden_states)
    times, dt, sqrt_dt, weights = solver_grid(num_states, steps_per_layer, device, compute)

    # The knots (0, 0), (t_l, h[l][b, s]): [L+2, N, H].
    token_states = torch.stack([h[batch_index, seq_index] for h in hidden_states]).to(compute)
    knot_values = torch.cat([token_states.new_zeros((1,) + token_states.shape[1:]), token_states])
    path_states = torch.einsum("gk,knh->gnh", weights, knot_values)  # x at every solver time
    ends = tail[targets].to(compute)

    if isinstance(drift_net, DriftNetwork):
        features = drift_net.state_features(path_states)  # one matmul for all solver times

        def drift_at(k, z):
            return drift_net.drift_from_features(times[k], z, features[k])
    else:

        def drift_at(k, z):
            return drift_net(times[k], z, path_states[k])

    def prior_at(k, z):
        return bridge.drift(times[k], z, ends)

    count = batch_index.numel()
    increments = torch.randn(
        (times.shape[0] - 1, count, ends.shape[-1]), generator=generator, device=device, dtype=compute
    ) * sqrt_dt[:, None, None]
    kl = integrate_kl(drift_at, prior_at, times, dt, increments, method)
    return kl.sum() / max(count, 1)


# ------------------------------------------------------------------------------------------------
# The module


class SDEBridgeRegularizer(BridgeRegularizer):
    """The SDE regulariser as an ``nn.Module``: the sibling of :class:`~sbpet.BridgeRegularizer`
    (same constructor style, ``forward(hidden_states, labels, attention_mask=None)``,
    ``save_pretrained`` / ``from_pretrained`` with ``"kind": "sde"`` in the saved config).

    Args:
        hidden_size: H. num_layers: L (L+1 hidden states).
        latent_size: D; None takes it from ``tail`` (or 128 with ``word_embeddings``).
        bridge: ``"brownian"`` or ``"ou"``.
        tail / word_embeddings: [V, D] tail points, or the PLM's input embeddings [V, H] (PCA,
            METHOD.md step 4). Exactly one.
        train_tail: make the tail a trainable parameter.
        ignore_index, shift_labels: as for BridgeRegularizer.
        steps_per_layer, method: the solver (see :func:`sde_bridge_loss`).
        seed: None draws the Brownian increments and f's initial weights from the global RNG;
            an int gives this module its own generator for the increments (one per device, each
            seeded with ``seed`` when first used), so a fresh module with the same seed gives the
            same sequence of losses (:meth:`reseed` restarts it), and draws f's initial weights
            from the CPU generator seeded with it (the global RNG is left as it was).
        width, depth, init_scale: the :class:`DriftNetwork`.
        name_or_path: the PLM's name, recorded in the config.

    ``self.drift_net`` is f; ``self.mapping`` is the same module, so code that trains or
    freezes "the regulariser's mapping" works for both kinds.

    Example:
        >>> reg = SDEBridgeRegularizer(16, num_layers=2, latent_size=4, word_embeddings=torch.randn(50, 16), seed=0)
        >>> states = tuple(torch.randn(2, 7, 16) for _ in range(3))
        >>> labels = torch.full((2, 7), -100); labels[0, 2] = 11
        >>> reg(states, labels, torch.ones(2, 7)).shape
        torch.Size([])
    """

    kind = "sde"

    def __init__(
        self,
        hidden_size: int,
        num_layers: int,
        latent_size: int | None = None,
        bridge: str = "brownian",
        tail: torch.Tensor | None = None,
        word_embeddings: torch.Tensor | None = None,
        train_tail: bool = False,
        ignore_index: int = -100,
        shift_labels: bool = False,
        steps_per_layer: int = 1,
        method: str = "euler",
        seed: int | None = None,
        width: int = 128,
        depth: int = 2,
        init_scale: float = 1e-2,
        name_or_path: str | None = None,
    ):
        # BridgeRegularizer.__init__ builds the PDF mapping g; this sibling only shares its
        # public surface and save/load, so it starts from nn.Module.
        nn.Module.__init__(self)
        num_layers = check_int(num_layers, "num_layers", minimum=0)
        ignore_index = check_int(ignore_index, "ignore_index")
        _check_solver_options(steps_per_layer, method)
        check_seed(seed)
        if latent_size is None:
            latent_size = tail.shape[1] if isinstance(tail, torch.Tensor) and tail.dim() == 2 else 128
        self.bridge = get_bridge(bridge)
        self.drift_net = DriftNetwork(hidden_size, latent_size, width=width, depth=depth, init_scale=init_scale,
                                      seed=seed)
        tail_points = resolve_tail(tail, word_embeddings, int(latent_size))
        if train_tail:
            self.tail = nn.Parameter(tail_points)
        else:
            self.register_buffer("tail", tail_points)
        self.hidden_size = int(hidden_size)
        self.num_layers = int(num_layers)
        self.ignore_index = int(ignore_index)
        self.shift_labels = bool(shift_labels)
        self.steps_per_layer = steps_per_layer
        self.method = method
        self.seed = seed
        self._generators: dict[str, torch.Generator] = {}
        self.config = {
            "kind": self.kind,
            "hidden_size": self.hidden_size,
            "num_layers": self.num_layers,
            "latent_size": int(latent_size),
            "bridge": self.bridge.name,
            "vocab_size": int(tail_points.shape[0]),
            "train_tail": bool(train_tail),
            "ignore_index": self.ignore_index,
            "shift_labels": self.shift_labels,
            "steps_per_layer": steps_per_layer,
            "method": method,
            "seed": seed,
            "width": int(width),
            "depth": int(depth),
            "init_scale": float(init_scale),
            "name_or_path": name_or_path,
        }

    @property
    def mapping(self) -> DriftNetwork:
        return self.drift_net

    def reseed(self, seed: int | None = None) -> None:
        """Restart the noise: drop the generators (and set a new seed if given)."""
        if seed is not None:
            self.seed = seed
            self.config["seed"] = seed
        self._generators.clear()

    def _generator(self, device: torch.device) -> torch.Generator | None:
        if self.seed is None:
            return None
        key = str(device)
        if key not in self._generators:
            self._generators[key] = torch.Generator(device=device).manual_seed(self.seed)
        return self._generators[key]

    def forward(self, hidden_states, labels, attention_mask=None, position_ids=None, *, seq_idx=None,
                cu_seq_lens=None) -> torch.Tensor:
        """R of ``hidden_states`` (L+1 tensors [B, S, H]) for ``labels`` [B, S]. Packed rows
        (``position_ids``, ``seq_idx`` or ``cu_seq_lens``, as :func:`sbpet.bridge_loss` takes them):
        the SDE regulariser reads each token's own path only (no context), so the boundaries only
        stop the causal shift at each sequence's end."""
        inputs = validate_inputs(
            hidden_states,
            labels,
            attention_mask,
            vocab_size=self.tail.shape[0],
            num_layers=self.num_layers,
            hidden_size=self.hidden_size,
            ignore_index=self.ignore_index,
            shift_labels=self.shift_labels,
            position_ids=position_ids,
            cu_seq_lens=cu_seq_lens,
            seq_idx=seq_idx,
        )
        device = inputs.hidden_states[0].device
        for name, tensor in (("tail", self.tail), ("drift_net", self.drift_net.input.weight)):
            if tensor.device != device:
                raise ValueError(f"{name} is on {tensor.device} but hidden_states are on {device}")
        return sde_bridge_loss(
            inputs.hidden_states,
            inputs.attention_mask,
            inputs.batch_index,
            inputs.seq_index,
            inputs.targets,
            self.drift_net,
            self.tail,
            self.bridge,
            steps_per_layer=self.steps_per_layer,
            method=self.method,
            generator=self._generator(device),
        )

    def extra_repr(self) -> str:
        return (
            f"bridge={self.bridge.name!r}, num_layers={self.num_layers}, vocab_size={self.vocab_size}, "
            f"steps_per_layer={self.steps_per_layer}, method={self.method!r}, seed={self.seed}"
        )
