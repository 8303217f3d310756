"""PET helpers: BitFit (train only the biases, and a new task head) and checks on which
parameters train.

peft covers LoRA, prompt tuning, prefix tuning, p-tuning, IA3, ...; BitFit is not a peft method,
so :func:`apply_bitfit` does it on any module.
"""

from __future__ import annotations

from collections.abc import Iterable

from torch import nn

__all__ = ["apply_bitfit", "task_head_parameter_names", "trainable_parameter_names", "check_only_pet_trainable"]


def task_head_parameter_names(model: nn.Module) -> list[str]:
    """Names of the parameters of ``model``'s new task head: those outside its backbone
    (``model.base_model``) when ``model`` is a transformers model with a task head that is not a
    language-model head (``model.get_output_embeddings()`` is None).

    That is the classifier ``from_pretrained`` initialises anew on top of a base checkpoint:
    ``classifier`` of ``*ForSequenceClassification`` / ``*ForTokenClassification`` /
    ``*ForMultipleChoice``, ``score`` of the decoder classifiers, ``qa_outputs`` of
    ``*ForQuestionAnswering`` (peft trains the same modules in full, as ``modules_to_save``, for
    its sequence-classification task type). A masked- or causal-LM head is pretrained and is not a
    task head here; a backbone alone (``BertModel``) or a module that is not a transformers model
    has none. The structure decides, not the weights' origin, so a classifier loaded from a
    fine-tuned checkpoint is a task head too.

    Example:
        >>> task_head_parameter_names(BertForSequenceClassification(config))
        ['classifier.weight', 'classifier.bias']
    """
    from transformers import PreTrainedModel

    if not isinstance(model, PreTrainedModel):
        return []
    backbone = model.base_model
    if backbone is model or model.get_output_embeddings() is not None:
        return []
    inside = {id(p) for p in backbone.parameters()}
    return [name for name, param in model.named_parameters() if id(param) not in inside]


def apply_bitfit(model: nn.Module, extra_trainable: Iterable[str] = (), train_head: bool = True) -> list[str]:
    """BitFit: freeze every parameter except the biases, the new task head's parameters
    (:func:`task_head_parameter_names`, e.g. a sequence classifier's ``classifier``; with
    ``train_head``) and those whose name contains one of ``extra_trainable``. Returns the
    trainable parameter names.

    Example:
        >>> layer = nn.Sequential(nn.Linear(4, 3), nn.LayerNorm(3))
        >>> apply_bitfit(layer)
        ['0.bias', '1.bias']
    """
    extra = tuple(extra_trainable)
    head = set(task_head_parameter_names(model)) if train_head else set()
    names = []
    for name, param in model.named_parameters():
        train = name.endswith("bias") or name in head or any(key in name for key in extra)
        param.requires_grad_(train)
        if train:
            names.append(name)
    if not names:
        raise ValueError(f"{type(model).__name__} has no bias parameters: BitFit has nothing to train")
    return names


def trainable_parameter_names(model: nn.Module) -> list[str]:
    """Names of the parameters with ``requires_grad`` (the PET parameters after peft/BitFit)."""
    return [name for name, param in model.named_parameters() if param.requires_grad]


def check_only_pet_trainable(model: nn.Module, max_fraction: float = 0.2) -> list[str]:
    """Raise ValueError unless some but at most ``max_fraction`` of the parameters (by count of
    elements) train: a PLM that is not frozen is a full fine-tune, not PET. Returns the names."""
    total = trainable = 0
    for param in model.parameters():
        total += param.numel()
        trainable += param.numel() if param.requires_grad else 0
    if trainable == 0:
        raise ValueError("no parameter requires grad: apply a PET method (peft, apply_bitfit) first")
    if trainable > max_fraction * total:
        raise ValueError(
            f"{trainable} of {total} parameter elements train ({trainable / total:.0%}): the PLM is "
            "not frozen. Wrap it with peft or apply_bitfit."
        )
    return trainable_parameter_names(model)
