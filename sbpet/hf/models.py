"""Which models sbpet supports, and the checks that tell a user when a model or a regulariser
does not fit.

- :data:`SUPPORTED_MODELS`: the architectures tested end to end (``tests/hf/test_models.py``
  builds a tiny random model of each: the layers are found, the hooks' R equals R of
  ``output_hidden_states``, gradients reach LoRA, and for the decoders a packed row trains like
  the padded batch). ``docs/llm.md``'s table is written from it (:func:`supported_models_table`).
- :class:`UnsupportedModelError`: a model with no layer list sbpet can find, named with what
  sbpet looks for.
- :func:`check_shift_labels`: a causal LM wants a regulariser built with ``shift_labels=True``
  (the state at s predicts token s+1), a masked LM one without; the other way round trains
  silently on the wrong pairs, so it is said (:class:`ShiftLabelsWarning`).
- :func:`check_model`: both, as :class:`~sbpet.hf.BridgeCapture` calls them.
"""

from __future__ import annotations

import dataclasses
import warnings

from torch import nn

__all__ = [
    "SUPPORTED_MODELS",
    "ShiftLabelsWarning",
    "SupportedModel",
    "UnsupportedModelError",
    "check_model",
    "check_shift_labels",
    "language_model_kind",
    "supported_models_table",
    "task_model",
    "unsupported_model_error",
]


@dataclasses.dataclass(frozen=True)
class SupportedModel:
    """One tested architecture.

    Attributes:
        name: the family as users know it ("Llama", "BERT").
        model_type: transformers' ``config.model_type`` ("llama", "bert").
        model_class: the LM class tested (``LlamaForCausalLM``, ``BertForMaskedLM``).
        causal: a decoder LM (regulariser with ``shift_labels=True``); False: a masked LM.
        lora_targets: peft ``LoraConfig(target_modules=...)`` that reaches its attention.
        layers: where sbpet finds the L layers, relative to the backbone (``"layers"``,
            ``"encoder.layer"``).
    """

    name: str
    model_type: str
    model_class: str
    causal: bool
    lora_targets: tuple[str, ...]
    layers: str


# The one list: tests/hf/test_models.py iterates it and docs/llm.md's table is written from it.
SUPPORTED_MODELS: tuple[SupportedModel, ...] = (
    SupportedModel("Llama", "llama", "LlamaForCausalLM", True, ("q_proj", "v_proj"), "layers"),
    SupportedModel("Qwen2", "qwen2", "Qwen2ForCausalLM", True, ("q_proj", "v_proj"), "layers"),
    SupportedModel("Qwen3", "qwen3", "Qwen3ForCausalLM", True, ("q_proj", "v_proj"), "layers"),
    SupportedModel("Mistral", "mistral", "MistralForCausalLM", True, ("q_proj", "v_proj"), "layers"),
    SupportedModel("Gemma 2", "gemma2", "Gemma2ForCausalLM", True, ("q_proj", "v_proj"), "layers"),
    SupportedModel("Gemma 3 (text)", "gemma3_text", "Gemma3ForCausalLM", True, ("q_proj", "v_proj"), "layers"),
    SupportedModel("Phi-3", "phi3", "Phi3ForCausalLM", True, ("qkv_proj",), "layers"),
    SupportedModel("Phi", "phi", "PhiForCausalLM", True, ("q_proj", "v_proj"), "layers"),
    SupportedModel("OLMo 2", "olmo2", "Olmo2ForCausalLM", True, ("q_proj", "v_proj"), "layers"),
    SupportedModel("GPT-NeoX", "gpt_neox", "GPTNeoXForCausalLM", True, ("query_key_value",), "layers"),
    SupportedModel("GPT-2", "gpt2", "GPT2LMHeadModel", True, ("c_attn",), "h"),
    SupportedModel("BERT", "bert", "BertForMaskedLM", False, ("query", "value"), "encoder.layer"),
    SupportedModel("RoBERTa", "roberta", "RobertaForMaskedLM", False, ("query", "value"), "encoder.layer"),
    SupportedModel("XLM-RoBERTa", "xlm-roberta", "XLMRobertaForMaskedLM", False, ("query", "value"),
                   "encoder.layer"),
    SupportedModel("DeBERTa-v2", "deberta-v2", "DebertaV2ForMaskedLM", False, ("query_proj", "value_proj"),
                   "encoder.layer"),
    SupportedModel("ModernBERT", "modernbert", "ModernBertForMaskedLM", False, ("Wqkv",), "layers"),
    SupportedModel("ELECTRA", "electra", "ElectraForMaskedLM", False, ("query", "value"), "encoder.layer"),
    SupportedModel("DistilBERT", "distilbert", "DistilBertForMaskedLM", False, ("q_lin", "v_lin"),
                   "transformer.layer"),
)


def supported_models_table() -> str:
    """:data:`SUPPORTED_MODELS` as the Markdown table of ``docs/llm.md`` (a test keeps the two
    equal)."""
    lines = [
        "| model | `model_type` | class tested | `shift_labels` | LoRA `target_modules` | layers |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for m in SUPPORTED_MODELS:
        targets = ", ".join(f"`{t}`" for t in m.lora_targets)
        lines.append(f"| {m.name} | `{m.model_type}` | `{m.model_class}` | {m.causal} | {targets} | `{m.layers}` |")
    return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------------------------
# Finding the layers


class UnsupportedModelError(ValueError):
    """The model holds no layer list that sbpet can hook."""


def unsupported_model_error(model: nn.Module, reason: Exception) -> UnsupportedModelError:
    """The error for a model whose layers sbpet cannot find (``reason``: what the search said),
    naming its class and what sbpet looks for."""
    return UnsupportedModelError(
        f"sbpet cannot find the layers of {type(task_model(model)).__name__}: it looks, in the backbone "
        "(model.base_model), for an nn.ModuleList of config.num_hidden_layers blocks (preferably named "
        "layer, layers, h, block or blocks: sbpet.hf.capture.find_backbone_and_layers) whose blocks take and "
        f"return the hidden states [B, S, H] ({reason}). The tested models are listed in docs/llm.md "
        "(sbpet.hf.models.SUPPORTED_MODELS); with another model, compute R from output_hidden_states "
        "(BridgeTrainer(capture='hidden_states'))"
    )


# ----------------------------------------------------------------------------------------------
# The causal shift


class ShiftLabelsWarning(UserWarning):
    """The regulariser's ``shift_labels`` does not suit the model's language-model head."""


def task_model(model: nn.Module) -> nn.Module:
    """The Hugging Face model with its task head (``LlamaForCausalLM``): DDP/DataParallel and peft
    peeled, a user's module searched for the first PreTrainedModel it holds (else ``model``
    itself). Its ``base_model`` is the backbone."""
    from transformers import PreTrainedModel

    try:
        from peft import PeftModel
    except ImportError:
        PeftModel = ()
    for _ in range(8):  # wrappers nest a few deep at most
        if isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
            model = model.module
        elif PeftModel and isinstance(model, PeftModel):
            model = model.get_base_model()
        elif isinstance(model, PreTrainedModel):
            return model
        else:
            inner = next((m for m in model.modules() if m is not model and isinstance(m, PreTrainedModel)), None)
            if inner is None:
                return model
            model = inner
    return model


def language_model_kind(model: nn.Module) -> str | None:
    """``"causal"`` for a causal-LM head (transformers' causal-LM classes: ``*ForCausalLM``,
    ``GPT2LMHeadModel``, ``BertLMHeadModel``, ...), ``"masked"`` for a masked-LM head
    (``*ForMaskedLM``), None for anything else (a bare backbone, a classification head: those
    take either kind of bridge labels). Peels peft and DDP wrappers.

    Example:
        >>> language_model_kind(GPT2LMHeadModel(GPT2Config()))
        'causal'
    """
    from transformers.models.auto.modeling_auto import (
        MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
        MODEL_FOR_MASKED_LM_MAPPING_NAMES,
    )

    name = type(task_model(model)).__name__
    causal = name in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.values() or name.endswith("ForCausalLM")
    masked = name in MODEL_FOR_MASKED_LM_MAPPING_NAMES.values() or name.endswith("ForMaskedLM")
    if causal == masked:  # neither, or listed as both (XLMWithLMHeadModel): no opinion
        return None
    return "causal" if causal else "masked"


def check_shift_labels(model: nn.Module, regularizer, stacklevel: int = 3) -> bool:
    """Warn (:class:`ShiftLabelsWarning`) when ``regularizer.shift_labels`` does not suit
    ``model``: False on a causal LM (each state would be paired with its own token, not the next
    one it predicts) or True on a masked LM (each state paired with the next position's label).
    Returns True when the pair fits or the model is neither kind (see
    :func:`language_model_kind`)."""
    shift = getattr(regularizer, "shift_labels", None)
    kind = language_model_kind(model)
    if shift is None or kind is None or bool(shift) == (kind == "causal"):
        return True
    name = type(task_model(model)).__name__
    if kind == "causal":
        message = (
            f"{name} is a causal LM but the regulariser has shift_labels=False: each hidden state is "
            "paired with its own token instead of the next one, the token it predicts. Fit g and build "
            "the regulariser with shift_labels=True (BridgeRegularizer(..., shift_labels=True))"
        )
    else:
        message = (
            f"{name} is a masked LM but the regulariser has shift_labels=True: each hidden state is "
            "paired with the next position's label instead of its own. Fit g and build the regulariser "
            "with shift_labels=False (the default)"
        )
    warnings.warn(message, ShiftLabelsWarning, stacklevel=stacklevel)
    return False


def check_model(model: nn.Module, regularizer, find_layers=None) -> None:
    """What :class:`~sbpet.hf.BridgeCapture` and the trainers check of a model and its
    regulariser: ``find_layers(model)`` (the capture's layer search) finds the layers, else
    :class:`UnsupportedModelError`; the causal shift suits the model (:func:`check_shift_labels`)."""
    if find_layers is not None:
        try:
            find_layers(model)
        except ValueError as exc:
            raise unsupported_model_error(model, exc) from exc
    check_shift_labels(model, regularizer, stacklevel=4)
