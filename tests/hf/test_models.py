"""The supported models (sbpet.hf.models.SUPPORTED_MODELS), each as a tiny random model: the layers
are found where the table says, the hooks' R and its LoRA gradients equal those of
output_hidden_states, the LoRA parameters get a gradient; docs/llm.md's table is the list; an
unsupported model and a wrong causal shift are said."""

import os
import warnings

import pytest
import torch

from hf_helpers import VOCAB, tiny_regularizer

pytest.importorskip("peft")
import transformers  # noqa: E402
from peft import LoraConfig, get_peft_model  # noqa: E402

from sbpet.hf import BridgeCapture, causal_lm_bridge_labels, find_backbone_and_layers, packing_arguments  # noqa: E402
from sbpet.hf.models import (  # noqa: E402
    SUPPORTED_MODELS,
    ShiftLabelsWarning,
    UnsupportedModelError,
    check_model,
    check_shift_labels,
    language_model_kind,
    supported_models_table,
)

HIDDEN, HEADS, LAYERS = 32, 4, 2
_IDS = dict(pad_token_id=0, bos_token_id=1, eos_token_id=2)
_DECODER = dict(hidden_size=HIDDEN, num_hidden_layers=LAYERS, num_attention_heads=HEADS, num_key_value_heads=2,
                intermediate_size=40, max_position_embeddings=64, head_dim=HIDDEN // HEADS, **_IDS)
_ENCODER = dict(hidden_size=HIDDEN, num_hidden_layers=LAYERS, num_attention_heads=HEADS, intermediate_size=40,
                max_position_embeddings=64, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, **_IDS)

# Tiny config arguments per model_type (hidden 32, 2 layers, 4 heads); every supported model has one.
TINY_CONFIGS = {
    "llama": _DECODER,
    "qwen2": _DECODER,
    "qwen3": _DECODER,
    "mistral": _DECODER,
    "gemma2": _DECODER,
    "gemma3_text": {**_DECODER, "sliding_window": 4},
    "phi3": {k: v for k, v in _DECODER.items() if k != "head_dim"},
    "phi": {k: v for k, v in _DECODER.items() if k != "head_dim"},
    "olmo2": _DECODER,
    "gpt_neox": {k: v for k, v in _DECODER.items() if k not in ("head_dim", "num_key_value_heads")},
    "gpt2": dict(n_embd=HIDDEN, n_layer=LAYERS, n_head=HEADS, n_positions=64, **_IDS),
    "bert": _ENCODER,
    "roberta": {**_ENCODER, "pad_token_id": 1, "bos_token_id": 0},
    "xlm-roberta": {**_ENCODER, "pad_token_id": 1, "bos_token_id": 0},
    "deberta-v2": _ENCODER,
    "modernbert": dict(hidden_size=HIDDEN, num_hidden_layers=LAYERS, num_attention_heads=HEADS, intermediate_size=40,
                       max_position_embeddings=64, local_attention=4, global_attn_every_n_layers=2, **_IDS),
    "electra": {**_ENCODER, "embedding_size": HIDDEN},
    "distilbert": dict(dim=HIDDEN, n_layers=LAYERS, n_heads=HEADS, hidden_dim=40, max_position_embeddings=64,
                       dropout=0.0, attention_dropout=0.0, pad_token_id=0),
}

IDS = [m.model_type for m in SUPPORTED_MODELS]


def tiny_model(entry, seed=0):
    """A tiny random ``entry.model_class`` in eval mode (float32, sdpa attention where it has it)."""
    torch.manual_seed(seed)
    config = transformers.AutoConfig.for_model(entry.model_type, vocab_size=VOCAB, **TINY_CONFIGS[entry.model_type])
    cls = getattr(transformers, entry.model_class)
    config._attn_implementation = "sdpa" if cls._supports_sdpa else "eager"
    model = cls(config)
    return model.float().eval()


def tiny_lora(entry, seed=0):
    base = tiny_model(entry, seed)
    model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=list(entry.lora_targets)))
    for name, p in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.1)
    return model, base


def batch_for(entry, seed=3):
    """input_ids / attention_mask [3, 9] (row 1 right-padded by 3) and the bridge labels: every real
    token (causal, shifted by the regulariser) or 3 positions per row (masked)."""
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, VOCAB, (3, 9), generator=gen)
    mask = torch.ones(3, 9, dtype=torch.long)
    mask[1, 6:] = 0
    ids[mask == 0] = 0
    if entry.causal:
        labels = causal_lm_bridge_labels(ids, mask)
    else:
        labels = torch.full_like(ids, -100)
        for row, cols in enumerate(([1, 4, 7], [0, 2, 5], [3, 6, 8])):
            labels[row, cols] = ids[row, cols]
    return ids, mask, labels


def _lora_params(model):
    return [p for name, p in model.named_parameters() if p.requires_grad and "lora_" in name]


def packed_row(ids, mask, labels):
    """The real tokens of each row, one after the other in a single row, with position_ids that
    restart at 0 for each sequence (as TRL's padding-free collator makes them; no attention mask)."""
    rows = [r.bool() for r in mask]
    packed_ids = torch.cat([i[r] for i, r in zip(ids, rows)])[None]
    packed_labels = torch.cat([lab[r] for lab, r in zip(labels, rows)])[None]
    position_ids = torch.cat([torch.arange(int(r.sum())) for r in rows])[None]
    return packed_ids, packed_labels, position_ids


def test_every_supported_model_has_a_tiny_config():
    assert sorted(TINY_CONFIGS) == sorted(IDS)
    assert len(set(IDS)) == len(IDS)


@pytest.mark.parametrize("entry", SUPPORTED_MODELS, ids=IDS)
def test_supported_model(entry):
    model, base = tiny_lora(entry)
    backbone, layers = find_backbone_and_layers(model)
    assert backbone.get_submodule(entry.layers) is layers and len(layers) == LAYERS
    assert type(base).__name__ == entry.model_class
    assert language_model_kind(model) == ("causal" if entry.causal else "masked")
    reg = tiny_regularizer(base, shift_labels=entry.causal)
    ids, mask, labels = batch_for(entry)
    params = _lora_params(model)
    assert params, "LoRA found no target module"

    with warnings.catch_warnings():
        warnings.simplefilter("error", ShiftLabelsWarning)  # the right shift: nothing said
        capture = BridgeCapture(model, reg)
    try:
        with capture.armed(labels, mask):
            model(input_ids=ids, attention_mask=mask)
        hooked = capture.loss()
    finally:
        capture.remove()
    hooked_grads = torch.autograd.grad(hooked, params)

    out = model(input_ids=ids, attention_mask=mask, output_hidden_states=True)
    assert len(out.hidden_states) == LAYERS + 1
    whole = reg(out.hidden_states, labels, mask)
    whole_grads = torch.autograd.grad(whole, params)

    torch.testing.assert_close(hooked, whole, rtol=1e-5, atol=1e-6)
    assert float(whole.detach()) > 0
    for p, a, b in zip(params, hooked_grads, whole_grads):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
    assert sum(float(g.abs().sum()) for g in hooked_grads) > 0, "no gradient reached LoRA"


@pytest.mark.parametrize("entry", [m for m in SUPPORTED_MODELS if m.causal], ids=[m.model_type for m in SUPPORTED_MODELS
                                                                                if m.causal])
def test_decoder_packed_row_equals_padded_batch(entry):
    """The three sequences of the padded batch packed into one row (position_ids restarting, no
    attention mask): the model keeps them apart, and so does the capture: the same R and LoRA
    gradients."""
    model, base = tiny_lora(entry)
    reg = tiny_regularizer(base, shift_labels=True)
    ids, mask, labels = batch_for(entry)
    packed_ids, packed_labels, position_ids = packed_row(ids, mask, labels)
    params = _lora_params(model)
    capture = BridgeCapture(model, reg)
    try:
        with capture.armed(labels, mask):
            model(input_ids=ids, attention_mask=mask)
        padded = capture.loss()
        padded_grads = torch.autograd.grad(padded, params)
        # use_cache=False as in training: transformers finds packed rows only without a cache
        batch = {"input_ids": packed_ids, "position_ids": position_ids, "use_cache": False}
        with capture.armed(packed_labels, None, **packing_arguments(batch)):
            model(**batch)
        packed = capture.loss()
        packed_grads = torch.autograd.grad(packed, params)
    finally:
        capture.remove()
    torch.testing.assert_close(packed, padded, rtol=1e-5, atol=0)
    for p, a, b in zip(params, packed_grads, padded_grads):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5 * float(b.abs().max()))


@pytest.mark.parametrize("entry", [m for m in SUPPORTED_MODELS if m.model_type in ("llama", "bert")],
                         ids=["llama", "bert"])
def test_the_wrong_shift_is_said(entry):
    model, base = tiny_lora(entry)
    wrong = tiny_regularizer(base, shift_labels=not entry.causal)
    kind = "causal" if entry.causal else "masked"
    fix = f"shift_labels={entry.causal}"
    with pytest.warns(ShiftLabelsWarning, match=rf"{entry.model_class} is a {kind} LM.*{fix}"):
        BridgeCapture(model, wrong).remove()
    with pytest.warns(ShiftLabelsWarning):
        assert not check_shift_labels(model, wrong)
    with warnings.catch_warnings():
        warnings.simplefilter("error", ShiftLabelsWarning)
        assert check_shift_labels(model, tiny_regularizer(base, shift_labels=entry.causal))


def test_heads_other_than_an_lm_take_either_shift():
    """A sequence classifier or a bare backbone pairs no next token: no opinion, no warning."""
    entry = next(m for m in SUPPORTED_MODELS if m.model_type == "llama")
    config = transformers.AutoConfig.for_model("llama", vocab_size=VOCAB, **TINY_CONFIGS["llama"])
    for model in (transformers.LlamaForSequenceClassification(config), transformers.LlamaModel(config)):
        assert language_model_kind(model) is None
        with warnings.catch_warnings():
            warnings.simplefilter("error", ShiftLabelsWarning)
            for shift in (False, True):
                assert check_shift_labels(model, tiny_regularizer(model, shift_labels=shift))
    assert entry.causal


def test_an_unsupported_model_is_named():
    class Flat(transformers.PreTrainedModel):
        config_class = transformers.LlamaConfig
        base_model_prefix = "flat"

        def __init__(self, config):
            super().__init__(config)
            self.blocks = torch.nn.Sequential(*[torch.nn.Linear(4, 4) for _ in range(config.num_hidden_layers)])

    config = transformers.LlamaConfig(**TINY_CONFIGS["llama"], vocab_size=VOCAB)
    model = Flat(config)
    reg = tiny_regularizer(transformers.LlamaModel(config))
    with pytest.raises(UnsupportedModelError, match=r"layers of Flat.*nn.ModuleList of config.num_hidden_layers"):
        check_model(model, reg, find_backbone_and_layers)
    with pytest.raises(UnsupportedModelError, match="Flat"):
        BridgeCapture(model, reg)


def test_docs_table_is_the_list():
    """docs/llm.md holds supported_models_table() verbatim (regenerate it from the code)."""
    path = os.path.join(os.path.dirname(__file__), "..", "..", "docs", "llm.md")
    with open(path, encoding="utf-8") as f:
        text = f.read()
    assert supported_models_table() in text, "docs/llm.md's table differs from SUPPORTED_MODELS: paste " \
        "python -c 'from sbpet.hf.models import supported_models_table as t; print(t())'"
    for entry in SUPPORTED_MODELS:
        assert f"| {entry.name} |" in text
