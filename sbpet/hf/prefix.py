"""Prefix tuning across transformers versions.

peft's prefix tuning hands the virtual tokens to the model as a key/value cache under the keyword
``past_key_values``, and for the classification, token-classification and question-answering task
types it first checks that keyword by name in the model's (or its backbone's) ``forward``
signature. transformers 5.24 renamed the keyword to ``cache`` (``past_key_values`` is still
accepted through a deprecation shim until 5.40, but no longer named in the signature), so peft 0.21
refuses every such model with "Model does not support past key values which are required for prefix
tuning". The attention modules still take the cache exactly as before.

:func:`enable_prefix_tuning` gives the model and its backbone, where they take ``cache``, a
``forward`` that also names ``past_key_values`` and passes it on as ``cache``: peft's check passes
and the prefix reaches the attention unchanged. Where the transformers in use still names
``past_key_values`` it changes nothing. A model whose attention takes no cache at all (DeBERTa-v2,
DistilBERT, ALBERT) cannot hold a prefix; it is refused with :class:`PrefixTuningUnsupported`.
"""

from __future__ import annotations

import inspect

from torch import nn

__all__ = ["PrefixTuningUnsupported", "enable_prefix_tuning", "is_prefix_tuned", "prefix_tuning_support"]

_OLD, _NEW = "past_key_values", "cache"


class PrefixTuningUnsupported(ValueError):
    """The model's attention takes no key/value cache, so prefix tuning cannot reach it."""


def _versions() -> str:
    import peft
    import transformers

    return f"transformers {transformers.__version__}, peft {peft.__version__}"


def _transformers_model(model: nn.Module) -> nn.Module:
    """The outermost transformers ``PreTrainedModel`` in ``model`` (``model`` itself, or the one a
    peft ``PeftModel`` or a DDP wrapper holds)."""
    from transformers import PreTrainedModel

    found = next((m for m in model.modules() if isinstance(m, PreTrainedModel)), None)
    if found is None:
        raise TypeError(f"{type(model).__name__} holds no Hugging Face PreTrainedModel")
    return found


def _parameters(module: nn.Module | type) -> dict:
    return inspect.signature(module.forward).parameters


def _takes_past_key_values(module: nn.Module | type) -> bool:
    return _OLD in _parameters(module)


def _takes_cache(module: nn.Module | type) -> bool:
    return _NEW in _parameters(module)


def is_prefix_tuned(model: nn.Module) -> bool:
    """Whether ``model`` is (or holds) a peft model whose active adapter is prefix tuning."""
    for module in model.modules():
        config = getattr(module, "active_peft_config", None)
        if config is not None:
            return str(getattr(config.peft_type, "value", config.peft_type)) == "PREFIX_TUNING"
    return False


def prefix_tuning_support(model: nn.Module | type) -> str | None:
    """None when prefix tuning can reach ``model``'s attention (after :func:`enable_prefix_tuning`
    where needed), else the reason why not, naming the model type and the versions in use.

    ``model`` is a model (a peft model, a transformers model with or without a head) or a
    transformers model class, so that a command can refuse before it loads any weights."""
    if isinstance(model, type):
        top = backbone = model
        model_type = getattr(model.config_class, "model_type", "?")
    else:
        top = _transformers_model(model)
        backbone = top.base_model
        model_type = getattr(top.config, "model_type", "?")
    if any(_takes_past_key_values(m) or _takes_cache(m) for m in (top, backbone)):
        return None
    name = backbone.__name__ if isinstance(backbone, type) else type(backbone).__name__
    return (
        f"prefix tuning needs a model whose attention takes a key/value cache; {name} (model type "
        f"{model_type!r}) takes none on {_versions()}: its forward names neither {_OLD!r} nor "
        f"{_NEW!r}. Use prompt tuning, LoRA, IA3 or BitFit instead"
    )


class _ForwardNamingPastKeyValues:
    """A module's forward that also names ``past_key_values`` and passes it on as ``cache``.

    An instance attribute of the module, holding the module: ``copy.deepcopy`` and pickle carry it
    to the copy (a closure over the bound forward would keep calling the original)."""

    def __init__(self, module: nn.Module):
        signature = inspect.signature(module.forward)
        params = list(signature.parameters.values())
        extra = inspect.Parameter(_OLD, inspect.Parameter.KEYWORD_ONLY, default=None)
        at = next((i for i, p in enumerate(params) if p.kind is inspect.Parameter.VAR_KEYWORD), len(params))
        self.module = module
        self.__signature__ = signature.replace(parameters=params[:at] + [extra] + params[at:])

    def __call__(self, *args, past_key_values=None, **kwargs):
        if past_key_values is not None:
            if kwargs.get(_NEW) is not None:
                raise ValueError(f"pass either {_OLD} or {_NEW} to {type(self.module).__name__}, not both")
            kwargs[_NEW] = past_key_values
        return type(self.module).forward(self.module, *args, **kwargs)


def enable_prefix_tuning(model: nn.Module) -> nn.Module:
    """Let peft's prefix tuning run on ``model`` with the installed transformers; returns ``model``.

    ``model`` is a peft ``PeftModel`` with a prefix-tuning adapter, or the transformers model
    before ``get_peft_model`` (either order works). On transformers < 5.24 this changes nothing;
    from 5.24 on it makes the model and its backbone accept ``past_key_values`` again (passed on as
    ``cache``; see the module docstring). Idempotent. :class:`BridgeCapture` and
    :class:`BridgeTrainer` call it for a prefix-tuned model, so only a model run outside them needs
    it by hand.

    Raises:
        PrefixTuningUnsupported: the model's attention takes no key/value cache (the message names
            the model type and the transformers / peft versions).

    Example:
        >>> model = get_peft_model(bert_classifier, PrefixTuningConfig(task_type="SEQ_CLS", num_virtual_tokens=8))
        >>> enable_prefix_tuning(model)(input_ids=ids, attention_mask=mask).logits.shape
        torch.Size([2, 2])
    """
    reason = prefix_tuning_support(model)
    if reason is not None:
        raise PrefixTuningUnsupported(reason)
    top = _transformers_model(model)
    for module in {id(m): m for m in (top, top.base_model)}.values():
        if _takes_cache(module) and not _takes_past_key_values(module):
            module.forward = _ForwardNamingPastKeyValues(module)
    return model
