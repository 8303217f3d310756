"""Which PLM a g belongs to: a fingerprint of the model's input word-embedding matrix [V, H],
saved with g (``model_fingerprint`` in its config) and compared with the model it is used with.

The tail of g is the PCA of that matrix (SPEC step 4): a g fitted for another model, or for the
same architecture with another vocabulary order (another tokenizer), sends every label to the
wrong end point. The fingerprint holds the matrix's shape, a SHA-256 of up to 4096 of its rows
(evenly spaced, as float32) and a small sketch (16 rows x 8 columns). The rule
(:func:`compare_fingerprints`):

- another shape: an error;
- the same hash: the same model;
- another hash but a sketch close to the saved one (cosine >= 0.9): a model fine-tuned from the
  same base: a warning naming both;
- else (another vocabulary order, another model): an error naming both.

Example:
    >>> import torch
    >>> fp = embedding_fingerprint(torch.randn(50, 16))
    >>> fp["vocab_size"], fp["hidden_size"]
    (50, 16)
    >>> compare_fingerprints(fp, fp, "g", "model")  # the same: nothing happens
"""

from __future__ import annotations

import hashlib
import warnings

import torch

__all__ = ["embedding_fingerprint", "compare_fingerprints", "SAME_BASE_COSINE"]

_HASH_ROWS, _SKETCH_ROWS, _SKETCH_COLS = 4096, 16, 8
SAME_BASE_COSINE = 0.9


def _rows(count: int, vocab: int) -> torch.Tensor:
    return torch.unique(torch.linspace(0, vocab - 1, min(count, vocab)).round().long())


def embedding_fingerprint(weight) -> dict | None:
    """The fingerprint of an input word-embedding matrix (a [V, H] tensor or an ``nn.Embedding``);
    None for a matrix without values (meta device) or not 2-D."""
    weight = getattr(weight, "weight", weight)
    if hasattr(weight, "full_tensor"):  # a DTensor (a sharded PLM): every process calls this alike
        weight = weight.full_tensor()
    if not isinstance(weight, torch.Tensor) or weight.dim() != 2 or weight.is_meta or weight.shape[0] == 0:
        return None
    with torch.no_grad():
        vocab, hidden = weight.shape
        rows = weight.detach()[_rows(_HASH_ROWS, vocab).to(weight.device)].float().cpu().contiguous()
        sketch = weight.detach()[_rows(_SKETCH_ROWS, vocab).to(weight.device), :_SKETCH_COLS].float().cpu()
    h = hashlib.sha256(f"{vocab}x{hidden}".encode())
    h.update(rows.numpy().tobytes())
    return {"vocab_size": int(vocab), "hidden_size": int(hidden), "sha256": h.hexdigest()[:32],
            "sketch": [float(f"{v:.6g}") for v in sketch.flatten().tolist()]}


def compare_fingerprints(saved: dict | None, current: dict | None, saved_name: str, model_name: str) -> None:
    """Check the ``current`` model's fingerprint against the one ``saved`` with g (either None:
    nothing to check). ValueError naming both for another shape or another model / vocabulary
    order; a UserWarning naming both for a model fine-tuned from the same base (see the module)."""
    if not isinstance(saved, dict) or not isinstance(current, dict):
        return
    shape = lambda fp: (fp.get("vocab_size"), fp.get("hidden_size"))  # noqa: E731
    if shape(saved) != shape(current):
        raise ValueError(f"{saved_name} was fitted for a model whose word embeddings are {shape(saved)} (V, H), but "
                         f"{model_name} has {shape(current)}: use the g fitted for this model")
    if saved.get("sha256") == current.get("sha256"):
        return
    a = torch.tensor(saved.get("sketch") or [], dtype=torch.float64)
    b = torch.tensor(current.get("sketch") or [], dtype=torch.float64)
    close = a.shape == b.shape and a.numel() > 0 and float(
        torch.nn.functional.cosine_similarity(a, b, dim=0)) >= SAME_BASE_COSINE
    if close:
        warnings.warn(f"{saved_name} was fitted for another version of {model_name}'s word embeddings (the same "
                      "shape and nearly the same values: a model fine-tuned from the same base?); its tail points "
                      "come from the model it was fitted for", UserWarning, stacklevel=3)
        return
    raise ValueError(f"{saved_name} was fitted for another model: {model_name}'s word embeddings differ (another "
                     "model, or the same architecture with another vocabulary order): its tail points would send "
                     "each label to the wrong end point; fit g for this model")
