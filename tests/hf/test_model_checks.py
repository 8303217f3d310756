"""A g is used only with the model it was fitted for (issue 34, finding 7): from_pretrained(model=),
BridgeCapture and BridgeTrainer check hidden size, layer count and the word-embedding fingerprint
(another vocabulary order is an error naming both, a fine-tuned relative a warning); a NaN or
infinite bridge_weight is refused (finding 8)."""

import pytest
import torch
from transformers import BertForMaskedLM, TrainingArguments

from hf_helpers import tiny_bert_config, tiny_regularizer
from sbpet import BridgeRegularizer
from sbpet.hf import BridgeCapture, BridgeTrainer


def _model(seed=0, **kw):
    torch.manual_seed(seed)
    return BertForMaskedLM(tiny_bert_config(**kw))


def test_a_g_of_another_hidden_size_fails_at_construction(tmp_path):
    """from_pretrained(path) without model=, then a model of another hidden size: a clear error
    when the hooks are built, not a raw shape error at the first step."""
    tiny_regularizer(_model()).save_pretrained(tmp_path / "g")
    g = BridgeRegularizer.from_pretrained(tmp_path / "g")
    wider = _model(hidden_size=48, intermediate_size=64)
    with pytest.raises(ValueError, match=r"hidden_size=\d+ but the .*hidden_size=48"):
        BridgeCapture(wider, g)


def test_another_vocabulary_order_is_an_error_naming_both(tmp_path):
    model = _model()
    tiny_regularizer(model).save_pretrained(tmp_path / "g")
    other = _model()
    with torch.no_grad():  # the same model with another tokenizer: its embedding rows permuted
        emb = other.get_input_embeddings().weight
        emb.copy_(emb[torch.randperm(emb.shape[0], generator=torch.Generator().manual_seed(0))])
    other.config.name_or_path = "other-tokenizer"
    with pytest.raises(ValueError, match="fitted for another model: the model 'other-tokenizer'"):
        BridgeRegularizer.from_pretrained(tmp_path / "g", model=other)
    g = BridgeRegularizer.from_pretrained(tmp_path / "g")
    with pytest.raises(ValueError, match="another vocabulary order"):
        BridgeCapture(other, g)
    BridgeCapture(model, g).remove()  # its own model passes
    args = TrainingArguments(output_dir=str(tmp_path / "out"), report_to=[], use_cpu=True)
    with pytest.raises(ValueError, match="another model"):
        BridgeTrainer(model=other, args=args, bridge=g, capture="hidden_states")


def test_a_fine_tuned_relative_is_a_warning(tmp_path):
    model = _model()
    tiny_regularizer(model).save_pretrained(tmp_path / "g")
    tuned = _model()
    with torch.no_grad():
        tuned.get_input_embeddings().weight.add_(1e-3 * torch.randn_like(tuned.get_input_embeddings().weight))
    with pytest.warns(UserWarning, match="fine-tuned from the same base"):
        BridgeRegularizer.from_pretrained(tmp_path / "g", model=tuned)


@pytest.mark.parametrize("weight", [float("nan"), float("inf")])
def test_bridge_weight_must_be_finite(tmp_path, weight):
    model = _model()
    args = TrainingArguments(output_dir=str(tmp_path / "out"), report_to=[], use_cpu=True)
    with pytest.raises(ValueError, match="bridge_weight must be a finite number"):
        BridgeTrainer(model=model, args=args, bridge=tiny_regularizer(model), bridge_weight=weight)
