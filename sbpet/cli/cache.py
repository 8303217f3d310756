"""What the caches of ``sbpet`` are keyed by (content, not paths) and what a cached g's folder
holds besides the g: a moved copy of the same model or corpus hits the cache; a file added to the
corpus, or changed weights, miss it (docs/safety.md)."""

from __future__ import annotations

import json
import os

from ..core.files import digest, file_digest

__all__ = ["FIT_CURVE", "model_key", "content_key", "read_fit_curve"]

FIT_CURVE = "fit_curve.json"  # in a cached g's folder: R per fitting step
# Files of a model folder that hold weights (their content is part of the key).
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".h5", ".msgpack", ".gguf")


def model_key(model_dir: str, tokenizer) -> str:
    """A digest of a model folder's content: ``config.json``, every weights file
    (:func:`~sbpet.core.files.file_digest`) and the tokenizer's vocabulary. The same model copied
    elsewhere has the same key; changed weights or vocabulary, another."""
    files = {}
    for name in sorted(os.listdir(model_dir)):
        path = os.path.join(model_dir, name)
        if os.path.isfile(path) and (name == "config.json" or name.endswith(WEIGHT_SUFFIXES)):
            files[name] = file_digest(path)
    vocab = sorted(tokenizer.get_vocab().items())
    return digest({"files": files, "vocab": digest(vocab, 64)}, 24)


def content_key(value) -> str:
    """A digest of JSON-serialisable content (a corpus's examples, the fitting texts)."""
    return digest(value, 24)


def read_fit_curve(g_dir: str) -> list | None:
    """R per fitting step of the cached g in ``g_dir``: from its ``fit_curve.json``, else from its
    fitting checkpoint's history (a g fitted before the curve was saved; JSON, or a legacy
    ``fit_state.pt`` read with ``weights_only=True``, never unpickled); None when neither is there.
    ValueError naming the file and the repair when the checkpoint's state is damaged."""
    try:
        with open(os.path.join(g_dir, FIT_CURVE), encoding="utf-8") as f:
            return [float(v) for v in json.load(f)["loss"]]
    except (OSError, ValueError, KeyError, TypeError):
        pass
    from ..hf.fitting import CHECKPOINT_NAME, FIT_STATE_NAME, LEGACY_FIT_STATE_NAME, read_fit_state

    checkpoint = os.path.join(g_dir, "fit", CHECKPOINT_NAME)
    if not any(os.path.isfile(os.path.join(checkpoint, n)) for n in (FIT_STATE_NAME, LEGACY_FIT_STATE_NAME)):
        return None
    try:
        return [float(v) for v in read_fit_state(checkpoint)["history"]]
    except (ValueError, TypeError) as exc:
        raise ValueError(f"the fitting curve of the g in {g_dir} cannot be read: {exc}; or refit it: sbpet fit "
                         "--force with the same options") from None
