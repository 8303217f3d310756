"""sbpet: the stochastic-bridge regulariser for parameter-efficient tuning, as a fast fused loss.

The package is layered; each layer imports only the ones below it:

1. :mod:`sbpet.core` -- the math: bridges, the mapping g and its tail, spline, precision,
   validation.
2. :mod:`sbpet.kernels` -- the Triton kernels and their launchers.
3. :mod:`sbpet.backends` -- ``reference`` / ``torch`` / ``triton``, the dispatcher and the
   functional :func:`bridge_loss`.
4. :mod:`sbpet.modules` -- :class:`BridgeRegularizer` and :class:`SDEBridgeRegularizer`.
5. :mod:`sbpet.hf` -- Hugging Face integration: capture hooks, labels, :class:`BridgeTrainer`,
   fitting g.
6. :mod:`sbpet.cli` -- the offline demo, the study and the ``sbpet`` command.

The Hugging Face trainer and fitting are imported on first use (``sbpet.BridgeTrainer`` imports
``transformers.Trainer``; ``sbpet.BridgeSFTTrainer`` imports TRL, an optional extra), so ``import
sbpet`` stays light. The module paths of sbpet 0.1.0's flat
layout (``sbpet.regularizer``, ``sbpet.dispatch``, ...) still import, with a DeprecationWarning.
"""

import importlib
import importlib.abc
import importlib.util
import sys
import warnings

from .backends.api import bridge_loss
from .backends.torch_backend import bridge_loss_from_parts
from .core.checks import check_deferred
from .core.bridges import BRIDGES, Bridge, BrownianBridge, OUBridge, get_bridge, layer_times
from .core.mapping import BridgeMapping, tail_from_embeddings
from .core.precision import PRECISIONS
from .core.spline import NaturalCubicSpline
from .core.version import __version__
from .modules.regularizer import BridgeRegularizer
from .modules.sde import DriftNetwork, SDEBridgeRegularizer, sde_bridge_loss

# name -> module, imported on first attribute access.
_LAZY = {
    "BridgeTrainer": "hf.trainer",
    "BridgeTrainerMixin": "hf.trainer",
    "BridgeSFTTrainer": "hf.sft",  # needs trl: pip install "sbpet[trl]"
    "fit_mapping": "hf.fitting",
    "BridgeCapture": "hf.capture",
    "masked_lm_bridge_labels": "hf.labels",
    "classification_bridge_labels": "hf.labels",
    "causal_lm_bridge_labels": "hf.labels",
    "align_to_states": "hf.capture",
    "apply_bitfit": "hf.peft_utils",
    "enable_prefix_tuning": "hf.prefix",
}

# Names that need an optional extra: kept out of __all__ so that `from sbpet import *` works without it.
_OPTIONAL = {"BridgeSFTTrainer"}


def __getattr__(name):
    if name in _LAZY:
        value = getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'sbpet' has no attribute {name!r}")


# sbpet 0.1.0's flat module paths -> where the module lives now.
_MOVED = {
    "api": "backends.api",
    "bridges": "core.bridges",
    "demo": "cli.demo",
    "dispatch": "backends.dispatch",
    "experiment": "cli.experiment",
    "fitting": "hf.fitting",
    "mapping": "core.mapping",
    "peft_utils": "hf.peft_utils",
    "plot": "cli.plot",
    "precision": "core.precision",
    "reference": "backends.reference",
    "regularizer": "modules.regularizer",
    "sde": "modules.sde",
    "study": "cli.study",
    "torch_backend": "backends.torch_backend",
    "trainer": "hf.trainer",
    "triton_backend": "backends.triton_backend",
    "validation": "core.validation",
}


class _MovedModuleFinder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Makes ``import sbpet.<old name>`` give the module at its new path (the same module object,
    so monkeypatching either name patches both), with a DeprecationWarning."""

    def find_spec(self, fullname, path=None, target=None):
        prefix, _, name = fullname.partition(".")
        if prefix != __name__ or name not in _MOVED:
            return None
        return importlib.util.spec_from_loader(fullname, self)

    def create_module(self, spec):
        new = f"{__name__}.{_MOVED[spec.name.partition('.')[2]]}"
        warnings.warn(f"{spec.name} moved to {new}; import it from there", DeprecationWarning,
                      stacklevel=2)
        module = importlib.import_module(new)
        spec.loader_state = module.__spec__
        return module

    def exec_module(self, module):
        # the import system has set the old name's spec on the module: give it its own back.
        module.__spec__ = module.__spec__.loader_state


if not any(isinstance(f, _MovedModuleFinder) for f in sys.meta_path):
    sys.meta_path.append(_MovedModuleFinder())

__all__ = [
    *(name for name in _LAZY if name not in _OPTIONAL),
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
    "check_deferred",
    "get_bridge",
    "layer_times",
    "tail_from_embeddings",
]
