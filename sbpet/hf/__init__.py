"""Layer 5, the Hugging Face integration: hooks that capture hidden states and build bridge labels
(:mod:`.capture`), :class:`BridgeTrainer` (:mod:`.trainer`; TRL's: :mod:`.sft`), the supported models
(:mod:`.models`), fitting g on a corpus
(:mod:`.fitting`; lists, streams, datasets and text files: :mod:`.corpus`), PET helpers
(:mod:`.peft_utils`) and peft's prefix tuning on current transformers (:mod:`.prefix`);
:mod:`.loading` loads a model with no hub kernels.

The capture helpers are imported here (they need only torch); the trainer and the fitting import
``transformers`` and are loaded on first use.
"""

import importlib

from .capture import (
    BridgeCapture,
    align_to_states,
    causal_lm_bridge_labels,
    classification_bridge_labels,
    find_backbone_and_layers,
    masked_lm_bridge_labels,
    num_virtual_tokens,
    packing_arguments,
)

# name -> submodule, imported on first attribute access.
_LAZY = {
    "BridgeTrainer": "trainer",
    "BridgeTrainerMixin": "trainer",
    "BridgeSFTTrainer": "sft",
    "SUPPORTED_MODELS": "models",
    "fit_mapping": "fitting",
    "TextFiles": "corpus",
    "apply_bitfit": "peft_utils",
    "task_head_parameter_names": "peft_utils",
    "trainable_parameter_names": "peft_utils",
    "check_only_pet_trainable": "peft_utils",
    "enable_prefix_tuning": "prefix",
    "PrefixTuningUnsupported": "prefix",
    "load_pretrained_model": "loading",
    "every_token_bridge_labels": "labels",
}


def __getattr__(name):
    if name in _LAZY:
        value = getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "BridgeCapture",
    "align_to_states",
    "causal_lm_bridge_labels",
    "classification_bridge_labels",
    "find_backbone_and_layers",
    "masked_lm_bridge_labels",
    "num_virtual_tokens",
    "packing_arguments",
    *(name for name in _LAZY if name != "BridgeSFTTrainer"),  # needs trl: not in a star import
]
