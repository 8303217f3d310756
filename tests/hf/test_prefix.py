"""sbpet.hf.prefix: peft's prefix tuning on the installed transformers (5.24 renamed the cache
keyword that peft looks for), and a clear refusal for models whose attention takes no cache."""

import copy
import inspect
import io
import os

import pytest
import torch

from hf_helpers import LABEL_WORDS, MASK_ID, classification_batch, tiny_bert_config, tiny_model_and_corpus, tiny_regularizer
from helpers import assert_close

peft = pytest.importorskip("peft")
from peft import PrefixTuningConfig, TaskType, get_peft_model  # noqa: E402
from transformers import (  # noqa: E402
    BertForSequenceClassification,
    BertModel,
    DistilBertConfig,
    DistilBertForSequenceClassification,
    DistilBertModel,
)

from sbpet.hf import BridgeCapture, masked_lm_bridge_labels  # noqa: E402
from sbpet.hf.prefix import (  # noqa: E402
    PrefixTuningUnsupported,
    enable_prefix_tuning,
    is_prefix_tuned,
    prefix_tuning_support,
)


def _prefix_classifier(seed=0, prefix=4):
    torch.manual_seed(seed)
    base = BertForSequenceClassification(tiny_bert_config()).eval()
    model = get_peft_model(base, PrefixTuningConfig(task_type=TaskType.SEQ_CLS, num_virtual_tokens=prefix))
    return model, base


def _tiny_distilbert():
    return DistilBertForSequenceClassification(
        DistilBertConfig(vocab_size=97, dim=32, n_layers=2, n_heads=4, hidden_dim=37, max_position_embeddings=64))


def _attention_with_prefix(model, ids, mask):
    """Logits computed by hand from the frozen BERT with the prefix as extra keys and values of
    every layer: an independent float64 formula of what prefix tuning means."""
    base = model.base_model.double()
    bert = base.bert
    prompt = model.get_prompt(ids.shape[0])
    length, emb = prompt.get_seq_length(), bert.embeddings  # positions continue after the prefix
    positions = torch.arange(length, length + ids.shape[1])
    states = emb.LayerNorm(emb.word_embeddings(ids) + emb.position_embeddings(positions)[None]
                           + emb.token_type_embeddings(torch.zeros_like(ids)))
    full_mask = torch.cat([torch.ones(ids.shape[0], length, dtype=mask.dtype), mask], 1)
    additive = (1.0 - full_mask[:, None, None, :].double()) * torch.finfo(torch.float64).min
    for index, layer in enumerate(bert.encoder.layer):
        attn = layer.attention.self
        heads, width = attn.num_attention_heads, attn.attention_head_size

        def split(x):
            return x.view(x.shape[0], -1, heads, width).transpose(1, 2)

        keys = torch.cat([prompt.layers[index].keys.double(), split(attn.key(states))], 2)
        values = torch.cat([prompt.layers[index].values.double(), split(attn.value(states))], 2)
        scores = split(attn.query(states)) @ keys.transpose(-1, -2) / width**0.5 + additive
        context = (scores.softmax(-1) @ values).transpose(1, 2).reshape(states.shape)
        attended = layer.attention.output(context, states)
        states = layer.output(layer.intermediate(attended), attended)
    return base.classifier(bert.pooler(states))


def test_prefix_classifier_runs_and_attends_to_the_prefix():
    model, _ = _prefix_classifier()
    enable_prefix_tuning(model)
    ids, mask, y = classification_batch()
    out = model(input_ids=ids, attention_mask=mask, labels=y)
    out.loss.backward()
    prompt_grad = model.prompt_encoder["default"].embedding.weight.grad
    assert prompt_grad is not None and prompt_grad.abs().sum() > 0
    with torch.no_grad():
        expected = _attention_with_prefix(copy.deepcopy(model), ids, mask)
    assert_close(out.logits.double(), expected, torch.float32, name="prefix-tuned logits")


def test_the_prefix_changes_the_output():
    """A test that could not fail if the prefix were dropped on the way to the attention."""
    model, base = _prefix_classifier()
    enable_prefix_tuning(model)
    ids, mask, _ = classification_batch()
    with torch.no_grad():
        with_prefix = model(input_ids=ids, attention_mask=mask).logits
        without = base(input_ids=ids, attention_mask=mask).logits
    assert (with_prefix - without).abs().max() > 1e-4


def test_enable_is_idempotent_and_survives_deepcopy_and_pickle():
    model, _ = _prefix_classifier()
    enable_prefix_tuning(model)
    enable_prefix_tuning(model)
    bert = model.base_model.bert
    assert "past_key_values" in inspect.signature(bert.forward).parameters
    ids, mask, _ = classification_batch()
    with torch.no_grad():
        expected = model(input_ids=ids, attention_mask=mask).logits
        twin = copy.deepcopy(model)
        forward = twin.base_model.bert.forward  # renamed (our callable) or plain (bound method)
        assert getattr(forward, "module", getattr(forward, "__self__", None)) is twin.base_model.bert
        buffer = io.BytesIO()
        torch.save(model, buffer)
        buffer.seek(0)
        loaded = torch.load(buffer, weights_only=False)
        for copy_ in (twin, loaded):
            assert torch.equal(copy_(input_ids=ids, attention_mask=mask).logits, expected)


def test_order_does_not_matter_and_plain_models_are_untouched():
    """enable before or after get_peft_model gives the same model; a model that still names
    past_key_values (transformers < 5.24) or is not prefix-tuned is left as it is."""
    ids, mask, _ = classification_batch()
    torch.manual_seed(0)
    base = BertForSequenceClassification(tiny_bert_config()).eval()
    early = get_peft_model(enable_prefix_tuning(base), PrefixTuningConfig(task_type=TaskType.SEQ_CLS, num_virtual_tokens=4))
    late, _ = _prefix_classifier()
    enable_prefix_tuning(late)
    with torch.no_grad():
        assert torch.equal(early(input_ids=ids, attention_mask=mask).logits, late(input_ids=ids, attention_mask=mask).logits)
    assert is_prefix_tuned(late) and not is_prefix_tuned(BertModel(tiny_bert_config()))


def test_capture_enables_prefix_tuning_by_itself():
    """BridgeCapture (and so BridgeTrainer) makes a prefix-tuned peft model runnable: the user's
    get_peft_model output works as it did on transformers 5.23."""
    model, base = _prefix_classifier()
    reg = tiny_regularizer(base)
    ids, mask, y = classification_batch()
    labels = masked_lm_bridge_labels(ids, y, MASK_ID, LABEL_WORDS)
    capture = BridgeCapture(model, reg)
    with capture.armed(labels, mask):
        model(input_ids=ids, attention_mask=mask, labels=y)
    assert capture.loss() > 0


def test_both_cache_keywords_at_once_is_an_error():
    model, _ = _prefix_classifier()
    enable_prefix_tuning(model)
    bert = model.base_model.bert
    if "cache" not in inspect.signature(type(bert).forward).parameters:
        pytest.skip("this transformers names past_key_values itself: nothing is renamed")
    prompt = model.get_prompt(2)
    with pytest.raises(ValueError, match="either past_key_values or cache"):
        bert(input_ids=torch.ones(2, 3, dtype=torch.long), past_key_values=prompt, cache=prompt)


@pytest.mark.parametrize("target", ["model", "class"])
def test_a_model_without_a_cache_is_refused_naming_type_and_versions(target):
    import transformers

    subject = _tiny_distilbert() if target == "model" else DistilBertModel
    reason = prefix_tuning_support(subject)
    assert reason is not None
    for part in ("DistilBertModel", "'distilbert'", f"transformers {transformers.__version__}",
                 f"peft {peft.__version__}"):
        assert part in reason, reason
    if target == "model":
        with pytest.raises(PrefixTuningUnsupported, match="model type 'distilbert'"):
            enable_prefix_tuning(subject)
    assert prefix_tuning_support(BertModel) is None


def test_apply_pet_refuses_prefix_for_a_model_without_a_cache():
    from sbpet.cli.demo import apply_pet

    with pytest.raises(PrefixTuningUnsupported, match="DistilBertModel"):
        apply_pet(_tiny_distilbert().distilbert, "prefix")


def test_cli_refuses_prefix_for_a_model_without_a_cache_before_loading(tmp_path, monkeypatch, capsys):
    from sbpet.cli import experiment
    from sbpet.cli.main import main

    model_dir, data_dir = tiny_model_and_corpus(tmp_path)
    _tiny_distilbert().distilbert.save_pretrained(model_dir)  # overwrites config + weights; tokenizer stays
    monkeypatch.setattr(experiment.Setup, "encoder", lambda *a, **k: pytest.fail("model loaded before checking"))
    monkeypatch.setattr(experiment.Setup, "regularizer", lambda *a, **k: pytest.fail("g fitted before checking"))
    code = main(["train", "--model-dir", model_dir, "--data-dir", data_dir, "--cache-dir", str(tmp_path / "c"),
                 "--no-progress", "--device", "cpu", "--test-per-class", "2", "--val-per-class", "2",
                 "--shots", "2", "--pet", "prefix"])
    err = capsys.readouterr().err
    assert code == 2, err
    assert "sbpet train: error: --pet prefix with --model-dir" in err and "'distilbert'" in err, err
    assert os.path.isdir(model_dir)
