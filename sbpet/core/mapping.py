"""The mapping g into the latent space (METHOD.md step 3) and the tail points (METHOD.md step 4)."""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch
from torch import nn
from torch.nn import functional as F

from .validation import check_int

__all__ = ["BridgeMapping", "resolve_tail", "tail_from_embeddings"]


class BridgeMapping(nn.Module):
    """g: ``Linear(2H, d1) -> GELU -> ... -> Linear(d_{k-1}, D)`` (METHOD.md step 3).

    The first Linear takes ``concat(context, token)`` of size ``2 * hidden_size``, context half
    first, so ``layers[0].weight[:, :H]`` multiplies the context and ``[:, H:]`` the token state.
    Exact (erf) GELU between layers, none after the last. ``latent_size`` is ``dims[-1]``.

    Example:
        >>> g = BridgeMapping(384, dims=(64, 8))
        >>> g(torch.randn(5, 768)).shape
        torch.Size([5, 8])
    """

    def __init__(self, hidden_size: int, dims: Sequence[int] = (1024, 256, 128)):
        super().__init__()
        # Strict ints: int() would truncate 2.5 and read "53" as the widths (5, 3) without a word.
        hidden_size = check_int(hidden_size, "hidden_size", minimum=1)
        if isinstance(dims, (str, bytes)) or not isinstance(dims, Iterable):
            raise TypeError(f"dims must be a non-empty sequence of positive ints, got {dims!r}")
        dims = tuple(check_int(d, f"dims[{i}]", minimum=1) for i, d in enumerate(dims))
        if not dims:
            raise ValueError(f"dims must be a non-empty sequence of positive ints, got {dims!r}")
        self.hidden_size = hidden_size
        self.dims = dims
        sizes = (2 * self.hidden_size, *dims)
        self.layers = nn.ModuleList(nn.Linear(a, b) for a, b in zip(sizes[:-1], sizes[1:]))

    @property
    def latent_size(self) -> int:
        return self.dims[-1]

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        """Map ``[..., 2H]`` inputs to ``[..., D]`` latent points."""
        for i, layer in enumerate(self.layers):
            if i:
                inputs = F.gelu(inputs)
            inputs = layer(inputs)
        return inputs

    def extra_repr(self) -> str:
        return f"hidden_size={self.hidden_size}, dims={self.dims}"


@torch.no_grad()
def tail_from_embeddings(word_embeddings: torch.Tensor, dim: int) -> torch.Tensor:
    """METHOD.md step 4: tail points [V, dim] from a PLM's input word-embedding matrix [V, H].

    Subtract the row mean, project on the first ``dim`` principal components (PCA by SVD in
    float32, each component's sign fixed so its largest-magnitude loading is positive, which makes
    the result deterministic), then scale every row to unit L2 norm.

    Example:
        >>> tail = tail_from_embeddings(torch.randn(100, 32), 8)
        >>> tail.shape, bool(torch.allclose(tail.norm(dim=1), torch.ones(100)))
        (torch.Size([100, 8]), True)
    """
    if not isinstance(word_embeddings, torch.Tensor):
        raise TypeError(f"word_embeddings must be a tensor, got {type(word_embeddings).__name__}")
    if word_embeddings.dim() != 2:
        raise ValueError(f"word_embeddings must be [V, H], got shape {tuple(word_embeddings.shape)}")
    vocab, hidden = word_embeddings.shape
    if not 1 <= int(dim) <= min(vocab, hidden):
        raise ValueError(f"dim must be in [1, min(V, H)] = [1, {min(vocab, hidden)}], got {dim}")
    emb = word_embeddings.detach().float()
    centered = emb - emb.mean(dim=0, keepdim=True)
    _, _, vh = torch.linalg.svd(centered, full_matrices=False)
    components = vh[: int(dim)]
    pivot = components.abs().argmax(dim=1, keepdim=True)
    components = components * torch.sign(components.gather(1, pivot))
    projected = centered @ components.T
    return projected / projected.norm(dim=1, keepdim=True).clamp_min(1e-12)


def resolve_tail(tail, word_embeddings, latent_size: int) -> torch.Tensor:
    """The tail points [V, D] (float32, detached) from exactly one of ``tail`` (given points) or
    ``word_embeddings`` ([V, H] or an ``nn.Embedding``: PCA to ``latent_size``); ValueError otherwise."""
    if (tail is None) == (word_embeddings is None):
        raise ValueError("give exactly one of tail ([V, D] tail points) or word_embeddings ([V, H])")
    if word_embeddings is not None:
        if isinstance(word_embeddings, nn.Embedding):
            word_embeddings = word_embeddings.weight
        return tail_from_embeddings(word_embeddings, latent_size)
    if not isinstance(tail, torch.Tensor) or tail.dim() != 2:
        raise ValueError(f"tail must be a [V, D] tensor, got {getattr(tail, 'shape', tail)!r}")
    if tail.shape[1] != latent_size:
        raise ValueError(f"tail has {tail.shape[1]} columns but dims[-1] is {latent_size}")
    return tail.detach().clone().float()
