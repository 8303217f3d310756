"""The functional API: validate once, pick a backend, compute R (METHOD.md steps 1-8)."""

from __future__ import annotations

import math

import torch

from . import dispatch
from ..core.bridges import Bridge, get_bridge, marginals_on
from .dispatch import BACKENDS, resolve_backend
from ..core.mapping import BridgeMapping
from ..core.precision import autocast_off, check_precision
from ..core import checks
from ..core.validation import check_finite_states, validate_inputs

__all__ = ["bridge_loss", "BACKENDS", "resolve_backend", "select_loss_backend"]


def _grad_flags(mapping: BridgeMapping, tail: torch.Tensor, *tensors: torch.Tensor) -> tuple[bool, ...]:
    return (
        any(t.requires_grad for t in tensors),
        any(p.requires_grad for p in mapping.parameters()),
        bool(tail.requires_grad),
    )


def select_loss_backend(backend, inputs, mapping, tail, mean_coef, variance, precision) -> dispatch.Backend:
    """The backend computing R from validated whole hidden states (``auto`` times candidates once
    per key; see :mod:`sbpet.backends.dispatch`)."""
    states = inputs.hidden_states
    batch, seq, hidden = states[0].shape
    flags = _grad_flags(mapping, tail, *states)
    key = (
        states[0].dtype, precision, len(states), hidden, tuple(mapping.dims),
        *dispatch.shape_key(batch, seq, inputs.targets.numel()), flags, inputs.segments is not None,
    )

    args = (inputs.attention_mask, inputs.batch_index, inputs.seq_index, inputs.targets, mapping, tail,
            mean_coef, variance, precision)
    extra = {} if inputs.segments is None else {"segments": inputs.segments}
    params = [p for p in mapping.parameters() if p.requires_grad] + [tail]
    runners = dispatch.runners_for(lambda b, xs: b.loss(xs, *args, **extra), states, params)
    # training g or the tail makes the fused strategy use atomics (not a deterministic candidate)
    return dispatch.select("loss", backend, states[0].device, key, runners, atomics=flags[1] or flags[2],
                           padded=inputs.num_valid is not None)


def bridge_loss(
    hidden_states,
    labels: torch.Tensor,
    attention_mask: torch.Tensor | None,
    mapping: BridgeMapping,
    tail: torch.Tensor,
    bridge: str | Bridge = "brownian",
    *,
    ignore_index: int = -100,
    shift_labels: bool = False,
    full_nll: bool = False,
    backend: str = "auto",
    precision: str = "fp32",
    num_layers: int | None = None,
    max_positions: int | None = None,
    position_ids: torch.Tensor | None = None,
    cu_seq_lens: torch.Tensor | None = None,
    seq_idx: torch.Tensor | None = None,
) -> torch.Tensor:
    """The stochastic-bridge regulariser R of docs/METHOD.md as a function.

    Args:
        hidden_states: the Hugging Face tuple/list of L+1 tensors [B, S, H]
            (``outputs.hidden_states``) or one stacked tensor [L+1, B, S, H]; float16, bfloat16,
            float32 or float64.
        labels: [B, S] integer target token ids; ``ignore_index`` marks positions that are not
            regularised.
        attention_mask: [B, S], nonzero for real tokens (None: all real).
        mapping: the mapping g (:class:`BridgeMapping` for hidden size H).
        tail: [V, D] tail points (e.g. from :func:`tail_from_embeddings`), D = g's latent size.
        bridge: ``"brownian"``, ``"ou"`` or a :class:`~sbpet.core.bridges.Bridge`.
        ignore_index: label value of positions that are not regularised (-100).
        shift_labels: causal LMs: pair the state at position s with ``labels[:, s + 1]``.
        full_nll: add the log-variance and 2*pi terms, making R a true negative log-likelihood
            per (layer, position) pair.
        backend: ``"auto"`` (on CUDA the fastest of torch and triton, timed once per shape
            bucket; on CPU torch; see :mod:`sbpet.backends.dispatch`), ``"reference"``, ``"torch"`` or
            ``"triton"``. ``SBPET_BACKEND`` overrides ``"auto"``.
        precision: how g's matrix products run, in every backend: ``"fp32"`` (default),
            ``"tf32"`` or ``"bf16"`` (bf16 operands, float32 accumulation); see
            :mod:`sbpet.core.precision`.
        num_layers: if given, L: hidden_states must hold exactly L+1 tensors.
        max_positions: a fixed capacity for the regularised positions (the most one batch can
            hold): no host read to count them and one shape for every batch (CUDA graphs,
            ``torch.compile``), at the cost of that many rows; every backend (the Triton kernels skip
            the padding rows on the device). None:
            exact positions (free for ``labels`` on the CPU; ``nonzero`` on a device reads one
            number back). See :mod:`sbpet.core.positions`.
        position_ids: [B, S] integer positions of packed rows (TRL's ``padding_free=True`` /
            ``packing=True``, transformers' ``DataCollatorWithFlattening``): a position id of 0, or
            a decrease, starts a new sequence, and each sequence gets its own context (SPEC step
            1); with ``shift_labels`` the last position of each sequence is not paired with the
            next sequence's first token. None: one sequence per row. Plain ``arange`` positions
            change nothing.
        cu_seq_lens: flash-attention's ``cu_seq_lens_q`` [G + 1] (cumulative sequence lengths over
            the flattened batch), the same boundaries another way (used before ``seq_idx`` and
            ``position_ids`` when several are given).
        seq_idx: TRL's [B, S] sequence index of every position, the same boundaries another way
            (used before ``position_ids``).

    Host syncs: none when ``labels`` and ``attention_mask`` lie on the CPU or ``max_positions`` is
    given, after a route's first call on a device (which checks every value eagerly); the value
    checks are then deferred to :func:`sbpet.check_deferred` (:mod:`sbpet.core.checks`). Packed
    boundaries are read on the host: free for the collator's CPU tensors (hand those over), one
    host read per call when they only exist on a device (they fix the number of contexts, a shape).

    Returns:
        Scalar float32 tensor R (float64 for float64 states; under autocast too, which never
        changes g's precision: ``precision`` does), the mean over the (L+1) * N (layer,
        regularised position) pairs of ``sum_d (z - mean_l e)^2 / (2 var_l)``; exactly 0 (with
        zero gradients) when N == 0.

    Example:
        >>> import torch, sbpet
        >>> g = sbpet.BridgeMapping(16, dims=(32, 4))
        >>> tail = sbpet.tail_from_embeddings(torch.randn(50, 16), 4)
        >>> states = [torch.randn(2, 7, 16, requires_grad=True) for _ in range(3)]
        >>> labels = torch.full((2, 7), -100); labels[:, 3] = torch.tensor([5, 9])
        >>> loss = sbpet.bridge_loss(states, labels, torch.ones(2, 7), g, tail, "ou")
        >>> loss.backward()
    """
    if not isinstance(mapping, BridgeMapping):
        raise TypeError(f"mapping must be a BridgeMapping, got {type(mapping).__name__}")
    if not isinstance(tail, torch.Tensor) or tail.dim() != 2:
        raise ValueError(f"tail must be a [V, D] tensor, got {getattr(tail, 'shape', tail)!r}")
    if not tail.dtype.is_floating_point:
        raise TypeError(f"tail must be floating point (points in g's latent space), got {tail.dtype}")
    if tail.shape[1] != mapping.latent_size:
        raise ValueError(
            f"tail has {tail.shape[1]} columns but the mapping's latent size is {mapping.latent_size}"
        )
    bridge = get_bridge(bridge)
    check_precision(precision)
    dispatch.check_backend_name(backend)
    inputs = validate_inputs(
        hidden_states,
        labels,
        attention_mask,
        vocab_size=tail.shape[0],
        num_layers=num_layers,
        hidden_size=mapping.hidden_size,
        ignore_index=ignore_index,
        shift_labels=shift_labels,
        check_finite=False,  # below: by the backend from its contexts where it can (no second read)
        max_positions=max_positions,
        route="loss",
        position_ids=position_ids,
        cu_seq_lens=cu_seq_lens,
        seq_idx=seq_idx,
    )
    device = inputs.hidden_states[0].device
    for name, tensor in (("tail", tail), ("mapping", mapping.layers[0].weight)):
        if tensor.device != device:
            raise ValueError(f"{name} is on {tensor.device} but hidden_states are on {device}")
    mean_coef, variance = marginals_on(bridge, inputs.num_states, device)  # cached there: no copy per call
    # ``precision`` decides how g's products run, not an enclosing autocast region: R is computed
    # (and returned) in float32 (float64 states: float64) whether or not the model runs under autocast.
    eager = inputs.check_mode == "eager"
    extra = {} if inputs.num_valid is None else {"num_valid": inputs.num_valid}
    if inputs.segments is not None:
        extra["segments"] = inputs.segments
    with autocast_off(device):
        chosen = select_loss_backend(backend, inputs, mapping, tail, mean_coef, variance, precision)
        if chosen.checks_finite:
            extra["check_finite"] = eager
        elif eager:
            check_finite_states(inputs.hidden_states, inputs.attention_mask)
        loss = chosen.loss(
            inputs.hidden_states,
            inputs.attention_mask,
            inputs.batch_index,
            inputs.seq_index,
            inputs.targets,
            mapping,
            tail,
            mean_coef,
            variance,
            precision,
            **extra,
        )
    if inputs.check_mode == "deferred":
        checks.defer("nonfinite", (~torch.isfinite(loss)).long())
    if full_nll:
        loss = add_normalising_terms(loss, bridge, inputs.num_states, mapping.latent_size, inputs.targets.numel(),
                                     inputs.num_valid)
    return loss


def add_normalising_terms(loss, bridge: Bridge, num_states: int, latent_size: int, rows: int, num_valid=None):
    """``full_nll``: R plus the log-variance and 2*pi terms (a host number: no device read), where
    there is a regularised row (``num_valid``, when given, counts them on the device)."""
    if rows == 0:
        return loss
    host_variance = bridge.marginals(num_states)[1]
    constant = float(0.5 * latent_size * torch.log(2 * math.pi * host_variance).mean())
    if num_valid is None:
        return loss + constant
    return loss + constant * (num_valid > 0).to(loss.dtype)
