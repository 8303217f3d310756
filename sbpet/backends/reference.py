"""The reference backend: the method as the paper's released code computes it.

It stacks the L+1 hidden states, upcasts them, takes the masked-mean context, concatenates
[context ; token] for every regularised position, runs the mapping and scores the bridge. It is
the yardstick for every other backend, in correctness and in speed and memory: keep it readable,
do not optimise it. One function per METHOD.md step.
"""

from __future__ import annotations

import torch
from torch.nn import functional as F

from ..core.mapping import BridgeMapping
from ..core.positions import Segments
from ..core.precision import linear

__all__ = ["reference_bridge_loss", "reference_capture_layer", "reference_loss_from_parts"]


def context(states: torch.Tensor, attention_mask: torch.Tensor, segments: Segments | None = None) -> torch.Tensor:
    """METHOD.md step 1: masked mean over each sequence. states [L+1, B, S, H] -> [L+1, G, H], one
    context per sequence of ``segments`` (None: per row, G = B). Padded positions (mask 0) are left
    out, not multiplied by 0: a NaN or inf there never reaches R."""
    num_states, batch, seq, hidden = states.shape
    if segments is None:
        segments = Segments.per_row(batch, seq, states.device)
    real = attention_mask != 0
    kept = torch.where(real[None, :, :, None], states, torch.zeros((), dtype=states.dtype, device=states.device))
    sums = states.new_zeros((num_states, segments.num_contexts, hidden))
    sums.index_add_(1, segments.index.reshape(-1), kept.reshape(num_states, batch * seq, hidden))
    counts = states.new_zeros(segments.num_contexts).index_add_(0, segments.index.reshape(-1),
                                                                real.reshape(-1).to(states.dtype))
    return sums / counts.clamp(min=1)[None, :, None]  # an empty slot (no sequence) stays 0


def mapping_inputs(states, contexts, batch_index, seq_index, context_index=None) -> torch.Tensor:
    """METHOD.md step 2: u[l, n] = concat(c[l, g], h[l][b, s]) -> [L+1, N, 2H], context first;
    ``context_index`` [N]: the sequence g of each position (None: its row b)."""
    context_index = batch_index if context_index is None else context_index
    return torch.cat([contexts[:, context_index], states[:, batch_index, seq_index]], dim=-1)


def latent_points(mapping: BridgeMapping, inputs: torch.Tensor, precision: str = "fp32") -> torch.Tensor:
    """METHOD.md step 3: z = g(u) -> [L+1, N, D], every Linear's product at ``precision``."""
    out = inputs.to(mapping.layers[0].weight.dtype)
    for i, layer in enumerate(mapping.layers):
        out = linear(F.gelu(out) if i else out, layer.weight, layer.bias, precision)
    return out


def tail_points(tail: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """METHOD.md step 4: e[n] = tail[labels[n]] -> [N, D]."""
    return tail[targets]


def bridge_loss_from_latents(latents, ends, mean_coef, variance, num_valid=None) -> torch.Tensor:
    """METHOD.md steps 6-7: mean over (l, n) of sum_d (z - mean_coef_l e)^2 / (2 var_l).
    ``num_valid``: only the first ``num_valid`` rows count (fixed capacity, a device count:
    :mod:`sbpet.core.positions`)."""
    mean_coef = mean_coef.to(latents)
    variance = variance.to(latents)
    residual = latents - mean_coef[:, None, None] * ends[None].to(latents)
    per_pair = residual.pow(2).sum(dim=-1) / (2 * variance[:, None])
    if num_valid is None:
        return per_pair.sum() / max(per_pair.numel(), 1)
    valid = valid_rows(per_pair.shape[1], num_valid)
    return (per_pair * valid).sum() / (num_valid.clamp(min=1) * per_pair.shape[0]).to(per_pair.dtype)


def valid_rows(capacity: int, num_valid: torch.Tensor) -> torch.Tensor:
    """bool [capacity]: the rows a fixed capacity fills (the first ``num_valid``)."""
    return torch.arange(capacity, device=num_valid.device) < num_valid


def zero_padding(tokens: torch.Tensor, num_valid) -> torch.Tensor:
    """[L+1, C, H] token rows with the padding rows of a fixed capacity zeroed: whatever they held
    (a padded position may hold a NaN) never reaches g, and they get a zero gradient."""
    if num_valid is None:
        return tokens
    return tokens.masked_fill(~valid_rows(tokens.shape[1], num_valid)[None, :, None], 0)


def reference_bridge_loss(
    hidden_states,
    attention_mask,
    batch_index,
    seq_index,
    targets,
    mapping,
    tail,
    mean_coef,
    variance,
    precision="fp32",
    num_valid=None,
    segments=None,
):
    """The bridge regulariser R on validated inputs (the contract every backend honours).

    Args:
        hidden_states: list of L+1 tensors [B, S, H] (float16/bfloat16/float32/float64).
        attention_mask: [B, S], nonzero for real tokens; every row has one.
        batch_index, seq_index, targets: int64 [N]: the regularised positions and label ids.
        mapping: :class:`~sbpet.BridgeMapping` g.
        tail: [V, D] tail points.
        mean_coef, variance: [L+1] bridge marginals at the layer times (METHOD.md step 6).
        precision: ``"fp32"``, ``"tf32"`` or ``"bf16"``: how g's products run
            (:mod:`sbpet.core.precision`).
        num_valid: None, or (fixed capacity) a 0-d int64 device tensor: only the first
            ``num_valid`` of the rows are regularised (:mod:`sbpet.core.positions`).
        segments: None (one sequence per row), or the packed rows' sequences
            (:class:`sbpet.core.positions.Segments`): one context per sequence.

    Returns:
        Scalar R (float32, or float64 for float64 inputs): the mean over the (L+1) * N pairs of
        ``sum_d (z - mean_coef_l * e)^2 / (2 variance_l)``; exactly 0 when N == 0.
    """
    compute_dtype = torch.promote_types(hidden_states[0].dtype, torch.float32)
    states = torch.stack(list(hidden_states)).to(compute_dtype)
    contexts = context(states, attention_mask, segments)
    context_index = None if segments is None else segments.index[batch_index, seq_index]
    inputs = mapping_inputs(states, contexts, batch_index, seq_index, context_index)
    if num_valid is not None:
        hidden = states.shape[-1]
        inputs = torch.cat([inputs[..., :hidden], zero_padding(inputs[..., hidden:], num_valid)], dim=-1)
    latents = latent_points(mapping, inputs, precision)
    ends = tail_points(tail, targets)
    return bridge_loss_from_latents(latents, ends, mean_coef, variance, num_valid)


def reference_capture_layer(states, attention_mask, batch_index, seq_index, segments=None):
    """The parts interface's per-layer capture, by the reference's steps 1-2: the contexts [G, H]
    (G = B unless ``segments`` packs several sequences per row) and the regularised rows [N, H] of
    one layer [B, S, H], both upcast to float32 (or float64)."""
    compute_dtype = torch.promote_types(states.dtype, torch.float32)
    layer = states.to(compute_dtype)[None]
    return context(layer, attention_mask, segments)[0], layer[0, batch_index, seq_index]


def reference_loss_from_parts(contexts, tokens, batch_index, targets, mapping, tail, mean_coef, variance,
                              precision="fp32", num_valid=None):
    """R from the parts (lists of L+1 contexts [G, H] and token rows [N, H]; ``batch_index``: each
    row's context) by the reference's steps 2-7: concatenate [context ; token] per row, run the
    whole mapping, score the bridge."""
    contexts, tokens = torch.stack(list(contexts)), torch.stack(list(tokens))
    inputs = torch.cat([contexts[:, batch_index], zero_padding(tokens.to(contexts.dtype), num_valid)], dim=-1)
    latents = latent_points(mapping, inputs, precision)
    return bridge_loss_from_latents(latents, tail_points(tail, targets), mean_coef, variance, num_valid)
