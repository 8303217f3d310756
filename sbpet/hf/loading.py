"""Loading a pretrained model without reaching for a hub at run time.

From transformers 5.25 on, ``from_pretrained`` turns Hugging Face's hub kernels on by default
(``use_kernels`` None becomes True unless ``USE_HUB_KERNELS`` disables it): it then raises when the
``kernels`` package is missing, and with it installed it fetches kernels from the hub, which an
offline machine cannot do. sbpet's own loads (the CLI, the demo, the benchmarks) go through
:func:`load_pretrained_model`, which asks for no hub kernels, whatever the environment says.
"""

from __future__ import annotations

import functools
import inspect

__all__ = ["load_pretrained_model", "knows_hub_kernels"]


@functools.cache
def knows_hub_kernels() -> bool:
    """Whether the installed transformers' ``from_pretrained`` takes ``use_kernels`` (older
    releases would hand the unknown keyword to the model's constructor and fail)."""
    from transformers import PreTrainedModel

    return "use_kernels" in inspect.getsource(PreTrainedModel.from_pretrained)


def load_pretrained_model(model_class, name_or_path, **kwargs):
    """``model_class.from_pretrained(name_or_path, **kwargs)`` with hub kernels off.

    ``model_class`` is a transformers model class or auto class (``AutoModel``,
    ``BertForSequenceClassification``, ...). ``use_kernels=False`` is passed unless the caller
    passes ``use_kernels`` (and only to a transformers that knows the keyword), so the load neither
    needs the ``kernels`` package nor fetches anything for it, whatever ``USE_HUB_KERNELS`` says.

    Example:
        >>> model = load_pretrained_model(AutoModel, minilm_dir())
    """
    if "use_kernels" not in kwargs and knows_hub_kernels():
        kwargs["use_kernels"] = False
    return model_class.from_pretrained(name_or_path, **kwargs)
