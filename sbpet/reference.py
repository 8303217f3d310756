"""The reference backend: the method as the paper's released code computes it.

It stacks the L+1 hidden states, upcasts them, takes the masked-mean context, concatenates
[context ; token] for every regularised position, runs the mapping and scores the bridge. It is
the yardstick for every other backend, in correctness and in speed and memory: keep it readable,
do not optimise it. One function per SPEC.md step.
"""

from __future__ import annotations

import torch

from .mapping import BridgeMapping

__all__ = ["reference_bridge_loss"]


def context(states: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """SPEC step 1: masked mean over the sequence. states [L+1, B, S, H] -> [L+1, B, H]."""
    mask = attention_mask.to(states.dtype)
    return (states * mask[None, :, :, None]).sum(dim=2) / mask.sum(dim=1)[None, :, None]


def mapping_inputs(states, contexts, batch_index, seq_index) -> torch.Tensor:
    """SPEC step 2: u[l, n] = concat(c[l, b], h[l][b, s]) -> [L+1, N, 2H], context first."""
    return torch.cat([contexts[:, batch_index], states[:, batch_index, seq_index]], dim=-1)


def latent_points(mapping: BridgeMapping, inputs: torch.Tensor) -> torch.Tensor:
    """SPEC step 3: z = g(u) -> [L+1, N, D]."""
    return mapping(inputs.to(mapping.layers[0].weight.dtype))


def tail_points(tail: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """SPEC step 4: e[n] = tail[labels[n]] -> [N, D]."""
    return tail[targets]


def bridge_loss_from_latents(latents, ends, mean_coef, variance) -> torch.Tensor:
    """SPEC steps 6-7: mean over (l, n) of sum_d (z - mean_coef_l e)^2 / (2 var_l)."""
    mean_coef = mean_coef.to(latents)
    variance = variance.to(latents)
    residual = latents - mean_coef[:, None, None] * ends[None].to(latents)
    per_pair = residual.pow(2).sum(dim=-1) / (2 * variance[:, None])
    pairs = max(per_pair.numel(), 1)
    return per_pair.sum() / pairs


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
):
    """The bridge regulariser R on validated inputs (the contract every backend honours).

    Args:
        hidden_states: list of L+1 tensors [B, S, H] (float16/bfloat16/float32/float64).
        attention_mask: [B, S], nonzero for real tokens; every row has one.
        batch_index, seq_index, targets: int64 [N]: the regularised positions and label ids.
        mapping: :class:`~sbpet.BridgeMapping` g.
        tail: [V, D] tail points.
        mean_coef, variance: [L+1] bridge marginals at the layer times (SPEC step 6).

    Returns:
        Scalar R (float32, or float64 for float64 inputs): the mean over the (L+1) * N pairs of
        ``sum_d (z - mean_coef_l * e)^2 / (2 variance_l)``; exactly 0 when N == 0.
    """
    compute_dtype = torch.promote_types(hidden_states[0].dtype, torch.float32)
    states = torch.stack(list(hidden_states)).to(compute_dtype)
    contexts = context(states, attention_mask)
    inputs = mapping_inputs(states, contexts, batch_index, seq_index)
    latents = latent_points(mapping, inputs)
    ends = tail_points(tail, targets)
    return bridge_loss_from_latents(latents, ends, mean_coef, variance)
