"""sbpet: the stochastic-bridge regulariser for parameter-efficient tuning, as a fast fused loss.

Layers, bottom up: :mod:`sbpet.bridges` (times and marginals), :mod:`sbpet.mapping` (g and the
tail), :mod:`sbpet.reference` / :mod:`sbpet.torch_backend` / :mod:`sbpet.triton_backend`
(backends with one contract), :mod:`sbpet.api` (validation + dispatch), :mod:`sbpet.regularizer`
and :mod:`sbpet.sde` (the modules), :mod:`sbpet.hf`, :mod:`sbpet.trainer`, :mod:`sbpet.fitting`
(Hugging Face integration), :mod:`sbpet.cli` (the ``sbpet`` command).

The Hugging Face layer is imported on first use (``sbpet.BridgeTrainer`` imports
``transformers.Trainer``), so ``import sbpet`` stays light.
"""

import importlib

from .api import bridge_loss
from .bridges import BRIDGES, Bridge, BrownianBridge, OUBridge, get_bridge, layer_times
from .mapping import BridgeMapping, tail_from_embeddings
from .regularizer import BridgeRegularizer
from .sde import DriftNetwork, NaturalCubicSpline, SDEBridgeRegularizer, sde_bridge_loss
from .precision import PRECISIONS
from .torch_backend import bridge_loss_from_parts

# name -> module, imported on first attribute access.
_LAZY = {
    "BridgeTrainer": "trainer",
    "fit_mapping": "fitting",
    "BridgeCapture": "hf",
    "masked_lm_bridge_labels": "hf",
    "classification_bridge_labels": "hf",
    "causal_lm_bridge_labels": "hf",
    "align_to_states": "hf",
    "apply_bitfit": "peft_utils",
}


def __getattr__(name):
    if name in _LAZY:
        value = getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'sbpet' has no attribute {name!r}")


__version__ = "0.1.0"

__all__ = [
    *_LAZY,
    "BRIDGES",
    "PRECISIONS",
    "DriftNetwork",
    "NaturalCubicSpline",
    "SDEBridgeRegularizer",
    "bridge_loss_from_parts",
    "sde_bridge_loss",
    "Bridge",
    "BridgeMapping",
    "BridgeRegularizer",
    "BrownianBridge",
    "OUBridge",
    "bridge_loss",
    "get_bridge",
    "layer_times",
    "tail_from_embeddings",
]
