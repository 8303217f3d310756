"""The ``paper`` baseline: the data path of the paper's released implementation, transcribed.

This is what a user of the method runs without sbpet, so the benchmarks time it beside sbpet's
backends (``suite.BACKENDS``) and check it against the eager reference in the same run. It is a
baseline, not a backend of ``sbpet.bridge_loss``: no validation, no dispatch, float32 throughout.

The data path (METHOD.md steps, in the paper code's order and with its tensor operations):

1. stack all L+1 hidden states into one [L+1, B, S, H] tensor and ``.float()`` it (a float32 copy
   of every layer, whatever the model's dtype);
2. masked-mean context [L+1, B, H] over the attention mask (METHOD.md step 1);
3. ``masked_select`` with the boolean mask of regularised positions picks the token states
   [L+1, N, H]; the context is expanded to every position and ``masked_select``-ed with the same
   mask, so each regularised token gets its own copy of its sequence's context [L+1, N, H];
4. ``torch.cat([context, token])`` -> [L+1, N, 2H] (METHOD.md step 2, context first) and the whole MLP
   g on it: the full 2H-wide first Linear (the context half is recomputed for every token: no
   split of METHOD.md step 3), exact GELU between layers (``mapping.layers``);
5. the bridge residual ``(z - mean_coef_l * tail[target])^2 / (2 var_l)`` summed over D and
   averaged over the (L+1) * N pairs (METHOD.md steps 4-7), with ``sbpet.get_bridge(bridge)``'s
   marginals at the layer times.

Same loss and gradients as ``sbpet.bridge_loss(..., backend="reference")`` on valid inputs; the
bench checks it. Causal LMs (``shift_labels``) pair the state at s with ``labels[:, s + 1]``,
as in METHOD.md's conventions.
"""

from __future__ import annotations

import torch
from torch.nn import functional as F

import sbpet
from sbpet.core.validation import shift_labels_left

__all__ = ["paper_bridge_loss"]


def paper_bridge_loss(hidden_states, labels, attention_mask, mapping, tail, bridge="brownian", *,
                      ignore_index: int = -100, shift_labels: bool = False) -> torch.Tensor:
    """R as the paper's released code computes it (module docstring), same signature as
    ``sbpet.bridge_loss`` for the arguments the benchmarks pass.

    Args:
        hidden_states: L+1 tensors [B, S, H] (any float dtype; the Hugging Face tuple).
        labels: [B, S] target ids, ``ignore_index`` where not regularised.
        attention_mask: [B, S], nonzero for real tokens (None: all real).
        mapping: :class:`sbpet.BridgeMapping` g; tail: [V, D] tail points.
        bridge: ``"brownian"``, ``"ou"`` or a :class:`sbpet.Bridge`.

    Returns:
        Scalar float32 R; 0 when no position is regularised.

    Example:
        >>> g = sbpet.BridgeMapping(16, dims=(32, 4))
        >>> tail = sbpet.tail_from_embeddings(torch.randn(50, 16), 4)
        >>> states = [torch.randn(2, 7, 16) for _ in range(3)]
        >>> labels = torch.full((2, 7), -100); labels[:, 3] = torch.tensor([5, 9])
        >>> paper_bridge_loss(states, labels, torch.ones(2, 7), g, tail).shape
        torch.Size([])
    """
    states = torch.stack(list(hidden_states)).float()  # [L+1, B, S, H]
    num_states, batch, seq, hidden = states.shape
    if attention_mask is None:
        attention_mask = torch.ones(batch, seq, device=states.device)
    mask = attention_mask.float()
    context = (states * mask[None, :, :, None]).sum(dim=2) / mask.sum(dim=1)[None, :, None]

    if shift_labels:
        labels = shift_labels_left(labels, ignore_index)
    selected = labels != ignore_index  # [B, S]
    targets = labels.masked_select(selected)  # [N], (b, s) row-major
    token_mask = selected[None, :, :, None]
    token_states = states.masked_select(token_mask).view(num_states, -1, hidden)
    token_context = context[:, :, None, :].expand(num_states, batch, seq, hidden)
    token_context = token_context.masked_select(token_mask).view(num_states, -1, hidden)

    z = torch.cat([token_context, token_states], dim=-1)  # [L+1, N, 2H]
    for i, layer in enumerate(mapping.layers):
        z = layer(F.gelu(z) if i else z)

    mean_coef, variance = sbpet.get_bridge(bridge).marginals(num_states)
    mean_coef = mean_coef.to(device=z.device, dtype=z.dtype)
    variance = variance.to(device=z.device, dtype=z.dtype)
    ends = tail[targets].to(z.dtype)  # [N, D]
    residual = z - mean_coef[:, None, None] * ends[None]
    per_pair = residual.pow(2).sum(dim=-1) / (2 * variance[:, None])
    return per_pair.sum() / max(per_pair.numel(), 1)
