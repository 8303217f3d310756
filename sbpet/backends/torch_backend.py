"""The fast pure-PyTorch backend (CPU, and GPUs without Triton).

Same contract as :func:`sbpet.backends.reference.reference_bridge_loss`. What it does differently:
- works on the per-layer tensors where they lie: no stack of all hidden states and no float32
  copy of them (a low-precision layer is upcast a bounded chunk at a time);
- the context is a matmul of each layer with the mask weights, accumulated in float32;
- the first Linear is split (METHOD.md step 3): its context half runs once per (layer, sequence) and is
  added to the token half of each regularised position;
- the rows of all layers go through the mapping in one batched call, with a written-out backward
  whose products run at the user's ``precision`` like the forward's (:mod:`sbpet.core.precision`);
- one custom backward writes each layer's gradient in one pass: the context share broadcast to
  every real token plus the token rows, instead of summing separately built gradients;
- saves little and recomputes g in the backward, one autograd node per layer
  (:mod:`.torch_recompute`, issue 35); ``SBPET_TORCH_RECOMPUTE=0`` restores the save-everything
  path (parts + :class:`_Mapping`), kept as the benchmark's yardstick.
"""

from __future__ import annotations

import torch
from torch.nn import functional as F

from ..core.positions import Segments
from ..core.precision import check_precision, matmul
from .reference import bridge_loss_from_latents, tail_points, zero_padding

__all__ = [
    "torch_bridge_loss", "bridge_loss_from_parts", "capture_layer", "chain_backward", "chain_forward",
    "context_and_tokens", "context_weights", "mapping_from_parts",
]

# Largest float32 temporary, in elements, made when upcasting a low-precision layer for the context.
_UPCAST_CHUNK_ELEMENTS = 1 << 22


def _accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.promote_types(dtype, torch.float32)


def layer_context(states: torch.Tensor, mask_weights: torch.Tensor) -> torch.Tensor:
    """METHOD.md step 1 for one layer: [B, S, H] states, [B, K, S] weights (row b's k-th sequence:
    mask/count on its columns, 0 elsewhere; K = 1 unless rows are packed) -> [B * K, H] float32+,
    the contexts of :class:`sbpet.core.positions.Segments`.

    Padded positions (weight 0) never reach the context (0 * NaN would make it NaN): they are
    zeroed in the bounded float32+ copy that widens 16-bit states. States already in the
    accumulation dtype take one product on the CPU, redone with the zeroing only when the result is
    not finite (a host check is free there); on a GPU they take the zeroing copy too (one more pass
    over the layer, but no host synchronisation)."""
    acc = mask_weights.dtype
    batch, slots, seq = mask_weights.shape
    if states.dtype == acc and states.device.type == "cpu" and not torch.compiler.is_compiling():
        total = torch.bmm(mask_weights, states).reshape(batch * slots, -1)
        if bool(torch.isfinite(total).all()):
            return total
    hidden = states.shape[-1]
    # A bounded share of the layer: the hooks run this as the forward ends, beside every activation.
    chunk = max(1, min(_UPCAST_CHUNK_ELEMENTS, states.numel() // 8) // max(1, batch * hidden))
    total = states.new_zeros((batch, slots, hidden), dtype=acc)
    padded = (mask_weights == 0).all(dim=1)
    for start in range(0, seq, chunk):
        part = states[:, start : start + chunk].to(acc, copy=True)
        part.masked_fill_(padded[:, start : start + chunk, None], 0)
        total.baddbmm_(mask_weights[:, :, start : start + chunk], part)
    return total.reshape(batch * slots, hidden)


class _ContextAndTokens(torch.autograd.Function):
    """METHOD.md steps 1-2 without materialising [rows, 2H]: contexts [L+1, G, H] (one per
    sequence) and token rows [L+1, N, H] of the regularised positions, with a one-pass-per-layer
    backward. ``weights`` [B, S]: mask / count of the position's sequence; ``index`` [B, S]: its
    context; ``slot_weights`` [B, K, S]: the same weights by sequence slot (the forward's bmm)."""

    @staticmethod
    def forward(ctx, weights, index, slot_weights, batch_index, seq_index, wide_rows, *hidden_states):
        contexts = torch.stack([layer_context(h, slot_weights) for h in hidden_states])
        tokens = torch.stack([h[batch_index, seq_index] for h in hidden_states])
        if wide_rows:
            tokens = tokens.to(weights.dtype)
        ctx.save_for_backward(weights, index, batch_index, seq_index)
        ctx.states_dtype = hidden_states[0].dtype
        ctx.slots = slot_weights.shape[1]
        return contexts, tokens

    @staticmethod
    def backward(ctx, grad_contexts, grad_tokens):
        # Every element is computed in float32 (float64) and rounded to the states' dtype once, as
        # the reference and the triton kernel do: a product and a sum in 16 bits would round up to
        # four times. The multiply writes the 16-bit gradient directly (no float32 copy of a layer);
        # the regularised rows, distinct positions (``nonzero``), are summed in float32 and written
        # (their gradient arrives in float32 with ``wide_rows``, else already rounded once).
        weights, index, batch_index, seq_index = ctx.saved_tensors
        dtype, acc = ctx.states_dtype, weights.dtype
        row_weights = weights[batch_index, seq_index][:, None]
        row_contexts = index[batch_index, seq_index]
        batch, seq = weights.shape
        grads = []
        for layer, needed in enumerate(ctx.needs_input_grad[6:]):
            if not needed:
                grads.append(None)
                continue
            share = grad_contexts[layer].to(acc)
            hidden = share.shape[-1]
            grad = share.new_empty((batch, seq, hidden), dtype=dtype)
            if ctx.slots == 1:  # one sequence per row: a broadcast, no gather
                torch.mul(weights[:, :, None], share[:, None, :], out=grad)
            else:  # each token's sequence's share, gathered a bounded chunk of columns at a time
                chunk = max(1, _UPCAST_CHUNK_ELEMENTS // max(1, batch * hidden))
                for start in range(0, seq, chunk):
                    cols = slice(start, start + chunk)
                    grad[:, cols] = weights[:, cols, None] * share[index[:, cols]]
            rows = torch.addcmul(grad_tokens[layer].to(acc), row_weights, share[row_contexts])
            grad[batch_index, seq_index] = rows.to(dtype)
            grads.append(grad)
        return (None, None, None, None, None, None, *grads)


def _gelu_grad(x: torch.Tensor) -> torch.Tensor:
    """d gelu(x) / dx for the exact (erf) GELU: Phi(x) + x phi(x), with few temporaries."""
    x_pdf = x.square().mul_(-0.5).exp_().mul_(x).mul_(0.3989422804014327)
    return torch.erf(x * 0.7071067811865476).add_(1.0).mul_(0.5).add_(x_pdf)


def chain_forward(pre1: torch.Tensor, weights, biases, precision: str):
    """Layers 2..k of g from layer 1's pre-activation ``pre1`` [..., d1] (METHOD.md step 3):
    (pre-activations [pre1, a2, ..., ak], GELU outputs [gelu(pre1), ..., gelu(a(k-1))]); ``ak`` is
    the latent. Every dot at ``precision``."""
    pre, acts = [pre1], []
    for w, b in zip(weights[1:], biases[1:]):
        acts.append(F.gelu(pre[-1]))
        pre.append(matmul(acts[-1], w.T, precision) + b)
    return pre, acts


def chain_backward(grad: torch.Tensor, pre, acts, weights, precision: str, train: bool):
    """Backward of :func:`chain_forward` from ``grad`` = d/d latent: (d/d pre1, and with ``train``
    the float32 (weight, bias) gradients of layers 2..k in order, else []). The weight gradients
    sum the rows in cuBLAS's fixed order (no atomics)."""
    layer_grads = []
    for i in range(len(weights) - 1, 0, -1):
        if train:
            rows, act = grad.reshape(-1, grad.shape[-1]), acts[i - 1]
            layer_grads.append((matmul(rows.T, act.reshape(-1, act.shape[-1]), precision), rows.sum(0)))
        grad = matmul(grad, weights[i], precision).mul_(_gelu_grad(pre[i - 1]))
    return grad, layer_grads[::-1]


class _Mapping(torch.autograd.Function):
    """METHOD.md step 3 on the parts, every dot at the user's ``precision`` in both passes.

    The first Linear is split (W1 u = W1[:, :H] c + W1[:, H:] h): its context half runs once per
    (layer, sequence) and is gathered for the rows. Saves the pre-activations of layers 1..k-1 and,
    when g is trained, their GELU outputs (what autograd would save), and writes its own backward
    so that the backward's products run at the same precision as the forward's."""

    @staticmethod
    def forward(ctx, precision, batch_index, contexts, tokens, *params):
        weights, biases = params[0::2], params[1::2]
        hidden = contexts.shape[-1]
        w1 = weights[0]
        half = matmul(contexts, w1[:, :hidden].T, precision) + biases[0]
        pre, acts = chain_forward(matmul(tokens, w1[:, hidden:].T, precision) + half[:, batch_index], weights,
                                  biases, precision)
        ctx.precision = precision
        ctx.num_linear = len(weights)
        # The weight gradients need the activations and the token rows; a frozen g (PET training)
        # keeps neither.
        ctx.saved_acts = any(ctx.needs_input_grad[4:])
        saved_acts = acts if ctx.saved_acts else []
        ctx.tokens_dtype = tokens.dtype
        saved_tokens = tokens if ctx.saved_acts else tokens.new_empty(0)
        ctx.save_for_backward(batch_index, contexts, saved_tokens, *params, *pre[:-1], *saved_acts)
        return pre[-1]

    @staticmethod
    def backward(ctx, grad_latents):
        precision, k = ctx.precision, ctx.num_linear
        batch_index, contexts, tokens, *rest = ctx.saved_tensors
        params, pre, acts = rest[: 2 * k], rest[2 * k : 3 * k - 1], rest[3 * k - 1 :]
        weights = params[0::2]
        needs = ctx.needs_input_grad
        train = ctx.saved_acts
        grads = [None] * (2 * k)
        grad = grad_latents.to(pre[0].dtype) if pre else grad_latents
        grad, layer_grads = chain_backward(grad, pre, acts, weights, precision, train)
        for i, (grad_w, grad_b) in enumerate(layer_grads, start=1):
            grads[2 * i], grads[2 * i + 1] = grad_w.to(weights[i].dtype), grad_b.to(weights[i].dtype)
        # Layer 1: grad is d R / d a1 [L+1, N, d1]; its context half gets the rows' sum per sequence.
        hidden = contexts.shape[-1]
        w1 = weights[0]
        grad_half = grad.new_zeros((grad.shape[0], contexts.shape[1], grad.shape[-1]))
        grad_half.index_add_(1, batch_index, grad)
        grad_contexts = grad_tokens = None
        if needs[2]:
            grad_contexts = matmul(grad_half, w1[:, :hidden], precision).to(contexts.dtype)
        if needs[3]:
            grad_tokens = matmul(grad, w1[:, hidden:], precision).to(ctx.tokens_dtype)
        if train:
            rows = grad.reshape(-1, grad.shape[-1])
            half_rows = grad_half.reshape(-1, grad.shape[-1])
            grad_w1_context = matmul(half_rows.T, contexts.reshape(-1, hidden), precision)
            grad_w1_token = matmul(rows.T, tokens.reshape(-1, hidden), precision)
            grads[0] = torch.cat([grad_w1_context, grad_w1_token], dim=1).to(w1.dtype)
            grads[1] = half_rows.sum(0).to(w1.dtype)
        grads = [g if needed else None for g, needed in zip(grads, needs[4:])]
        return (None, None, grad_contexts, grad_tokens, *grads)


def mapping_from_parts(mapping, contexts, tokens, batch_index, precision: str = "fp32") -> torch.Tensor:
    """METHOD.md step 3 from the parts: latents [L+1, N, D] (float32, float64 for a float64 mapping)."""
    params = [t for layer in mapping.layers for t in (layer.weight, layer.bias)]
    return _Mapping.apply(precision, batch_index, contexts, tokens, *params)


def torch_bridge_loss(
    hidden_states,
    attention_mask,
    batch_index,
    seq_index,
    targets,
    mapping,
    tail,
    mean_coef,
    variance,
    precision: str = "fp32",
    num_valid=None,
    segments=None,
):
    """The bridge regulariser R, fast in PyTorch. Same arguments and result as
    :func:`sbpet.backends.reference.reference_bridge_loss`. Saves g's activations for the backward:
    the backend's ``loss`` is :func:`sbpet.backends.torch_recompute.recompute_bridge_loss`, which
    recomputes them, unless ``SBPET_TORCH_RECOMPUTE=0`` picks this one."""
    # Float32 rows when the states need a gradient: each element of it is then rounded to the
    # states' dtype once (the rows would be widened for g's products anyway).
    wide_rows = any(h.requires_grad for h in hidden_states)
    contexts, tokens = context_and_tokens(hidden_states, attention_mask, batch_index, seq_index, wide_rows, segments)
    context_index = batch_index if segments is None else segments.index[batch_index, seq_index]
    return bridge_loss_from_parts(
        contexts, tokens, context_index, targets, mapping, tail, mean_coef, variance, precision, num_valid
    )


def capture_layer(states, attention_mask, batch_index, seq_index, segments=None):
    """The parts interface's per-layer capture (METHOD.md steps 1-2 for one layer [B, S, H]): the
    contexts [G, H] (float32, float64 for float64 states; G = B unless ``segments`` packs several
    sequences per row) and the regularised rows [N, H] (the states' dtype), differentiable."""
    contexts, tokens = context_and_tokens([states], attention_mask, batch_index, seq_index, segments=segments)
    return contexts[0], tokens[0]


def context_and_tokens(hidden_states, attention_mask, batch_index, seq_index, wide_rows: bool = False,
                       segments=None):
    """METHOD.md steps 1-2 for a list of layers: contexts [len, G, H] (float32 or float64; one per
    sequence of ``segments``, None: per row, G = B) and the token rows [len, N, H] (input dtype;
    float32 or float64 with ``wide_rows``) of the regularised positions, differentiable.

    Called on all L+1 layers at once by :func:`torch_bridge_loss`, or on one layer at a time by
    the forward hooks of :class:`sbpet.hf.BridgeCapture` (so only these small tensors are kept).
    """
    weights, index, slot_weights = context_weights(attention_mask, hidden_states[0].dtype, segments)
    return _ContextAndTokens.apply(weights, index, slot_weights, batch_index, seq_index, wide_rows, *hidden_states)


def context_weights(attention_mask, states_dtype, segments=None):
    """The context step's weights (METHOD.md step 1) for states of ``states_dtype``: ``weights``
    [B, S] (mask / count of the position's sequence, float32 or float64), ``index`` [B, S] (its
    context, of :class:`sbpet.core.positions.Segments`; None: one per row) and ``slot_weights``
    [B, K, S] (the same weights by sequence slot, for :func:`layer_context`)."""
    acc = _accumulation_dtype(states_dtype)
    batch, seq = attention_mask.shape
    if segments is None:
        segments = Segments.per_row(batch, seq, attention_mask.device)
    weights = segments.context_weights(attention_mask != 0, acc)
    slots = segments.slots
    if slots == 1:
        slot_weights = weights[:, None, :]
    else:  # [B, K, S]: row b's k-th sequence's weights on its columns
        slot = segments.index - torch.arange(batch, device=weights.device)[:, None] * slots
        slot_weights = weights[:, None, :] * (slot[:, None, :] == torch.arange(slots, device=weights.device)[:, None])
    return weights, segments.index, slot_weights


def bridge_loss_from_parts(
    contexts, tokens, batch_index, targets, mapping, tail, mean_coef, variance, precision: str = "fp32",
    num_valid=None,
):
    """R from precomputed contexts and token rows (METHOD.md steps 3-7), same result as
    :func:`torch_bridge_loss` on the hidden states they came from.

    Args:
        contexts: [L+1, G, H] masked-mean contexts (float32 or float64; METHOD.md step 1; one per
            sequence, G = B unless rows are packed), or a list of L+1 [G, H] tensors.
        tokens: [L+1, N, H] hidden-state rows of the N regularised positions (any float dtype), or
            a list of L+1 [N, H] tensors.
        batch_index: int64 [N], the sequence (context) of each regularised position.
        targets: int64 [N] label ids in [0, V).
        mapping: :class:`~sbpet.BridgeMapping` g; tail: [V, D] tail points.
        mean_coef, variance: [L+1] bridge marginals (``bridge.marginals(L + 1)``).
        precision: ``"fp32"``, ``"tf32"`` or ``"bf16"``: how g's dots run (:mod:`sbpet.core.precision`).
        num_valid: None, or (fixed capacity) a 0-d int64 tensor: only the first ``num_valid`` rows
            are regularised, the others are zeroed and weigh nothing (:mod:`sbpet.core.positions`).

    Returns:
        Scalar R; exactly 0 (zero gradients) when N == 0. Gradients flow to ``contexts``,
        ``tokens``, g and the tail.

    Example:
        >>> import torch, sbpet
        >>> from sbpet.backends.torch_backend import bridge_loss_from_parts
        >>> g = sbpet.BridgeMapping(16, dims=(8, 4))
        >>> tail = sbpet.tail_from_embeddings(torch.randn(30, 16), 4)
        >>> contexts, tokens = torch.randn(3, 2, 16), torch.randn(3, 5, 16)
        >>> b, t = torch.tensor([0, 0, 1, 1, 1]), torch.tensor([1, 2, 3, 4, 5])
        >>> mean_coef, variance = sbpet.get_bridge("ou").marginals(3)
        >>> bridge_loss_from_parts(contexts, tokens, b, t, g, tail, mean_coef, variance).shape
        torch.Size([])
    """
    check_precision(precision)
    if isinstance(contexts, (list, tuple)):
        contexts = torch.stack(list(contexts))
    if isinstance(tokens, (list, tuple)):
        tokens = torch.stack(list(tokens))
    if contexts.dim() != 3 or tokens.dim() != 3:
        raise ValueError(
            f"contexts must be [L+1, B, H] and tokens [L+1, N, H], got {tuple(contexts.shape)} "
            f"and {tuple(tokens.shape)}"
        )
    if contexts.shape[0] != tokens.shape[0] or contexts.shape[2] != tokens.shape[2]:
        raise ValueError(
            f"contexts {tuple(contexts.shape)} and tokens {tuple(tokens.shape)} disagree on L+1 or H"
        )
    if batch_index.shape != (tokens.shape[1],) or targets.shape != (tokens.shape[1],):
        raise ValueError(
            f"batch_index and targets must be [N] = [{tokens.shape[1]}], got "
            f"{tuple(batch_index.shape)} and {tuple(targets.shape)}"
        )
    latents = mapping_from_parts(mapping, contexts, zero_padding(tokens, num_valid), batch_index, precision)
    return bridge_loss_from_latents(latents, tail_points(tail, targets), mean_coef, variance, num_valid)
