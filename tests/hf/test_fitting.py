"""fit_mapping: R decreases, only g trains, the PLM is untouched, checkpoints resume exactly."""

import os

import pytest
import torch
from transformers import BertForMaskedLM, GPT2LMHeadModel

import sbpet.hf.fitting as fitting
from hf_helpers import tiny_bert_config, tiny_gpt2_config, tiny_regularizer, tiny_texts, tiny_tokenizer
from sbpet.hf.fitting import fit_mapping
from sbpet.modules.regularizer import BridgeRegularizer


def _setup(tmp_path):
    torch.manual_seed(0)
    model = BertForMaskedLM(tiny_bert_config())
    return model, tiny_tokenizer(tmp_path), tiny_texts(), tiny_regularizer(model)


def test_fit_reduces_loss_and_trains_only_g(tmp_path):
    model, tokenizer, texts, reg = _setup(tmp_path)
    plm_before = {k: v.clone() for k, v in model.state_dict().items()}
    tail_before = reg.tail.clone()
    history = fit_mapping(model, tokenizer, texts, reg, steps=30, batch_size=8, learning_rate=1e-2,
                          progress=False)
    losses = history["loss"]
    assert len(losses) == 30
    assert sum(losses[-5:]) / 5 < 0.85 * sum(losses[:5]) / 5, losses
    for k, v in model.state_dict().items():
        assert torch.equal(v, plm_before[k]), f"PLM changed: {k}"
    assert torch.equal(reg.tail, tail_before)
    assert not any(p.requires_grad for p in reg.parameters())
    assert any(p.requires_grad for p in model.parameters())  # requires_grad flags restored


def test_fit_checkpoint_resume_is_exact(tmp_path, monkeypatch):
    model, tokenizer, texts, reg = _setup(tmp_path)
    straight = tiny_regularizer(model)
    straight.load_state_dict(reg.state_dict())
    fit_mapping(model, tokenizer, texts, straight, steps=8, batch_size=4, progress=False, seed=1)

    ckpt = tmp_path / "ckpt"
    real_save = fitting._save_checkpoint

    def save_then_stop(*args):
        real_save(*args)
        raise KeyboardInterrupt

    monkeypatch.setattr(fitting, "_save_checkpoint", save_then_stop)
    with pytest.raises(KeyboardInterrupt):
        fit_mapping(model, tokenizer, texts, reg, steps=8, batch_size=4, progress=False, seed=1,
                    checkpoint_dir=ckpt, save_every=3)
    monkeypatch.setattr(fitting, "_save_checkpoint", real_save)
    resumed = tiny_regularizer(model)
    history = fit_mapping(model, tokenizer, texts, resumed, steps=8, batch_size=4, progress=False, seed=1,
                          checkpoint_dir=ckpt, save_every=3)
    assert history["resumed_from"] == 3 and len(history["loss"]) == 8
    for k, v in straight.state_dict().items():
        torch.testing.assert_close(resumed.state_dict()[k], v, msg=k)
    loaded = BridgeRegularizer.from_pretrained(ckpt / "checkpoint", model=model)
    torch.testing.assert_close(loaded.mapping.layers[0].weight, straight.mapping.layers[0].weight)
    with pytest.raises(ValueError, match="was made with"):
        fit_mapping(model, tokenizer, texts, tiny_regularizer(model), steps=9, batch_size=4,
                    progress=False, seed=1, checkpoint_dir=ckpt)
    (ckpt / "checkpoint" / "fit_state.pt").write_bytes(b"not a torch file")
    with pytest.raises(ValueError, match="damaged"):
        fit_mapping(model, tokenizer, texts, tiny_regularizer(model), steps=8, batch_size=4,
                    progress=False, seed=1, checkpoint_dir=ckpt)


def test_fit_causal_lm_and_errors(tmp_path):
    torch.manual_seed(0)
    model = GPT2LMHeadModel(tiny_gpt2_config())
    tokenizer = tiny_tokenizer(tmp_path)
    reg = tiny_regularizer(model, shift_labels=True)
    history = fit_mapping(model, tokenizer, tiny_texts(), reg, steps=3, batch_size=4, progress=False)
    assert all(torch.isfinite(torch.tensor(history["loss"])))
    with pytest.raises(ValueError, match="texts"):
        fit_mapping(model, tokenizer, ["", "  "], reg, steps=1)
    with pytest.raises(ValueError, match="mask_probability"):
        fit_mapping(model, tokenizer, ["a b"], reg, steps=1, mask_probability=0)


@pytest.mark.parametrize("kind", ["pdf", "sde"])
def test_fit_continues_a_loaded_regulariser(kind, tmp_path):
    """from_pretrained gives a frozen g in eval mode; fit_mapping still trains it (and a trainable
    tail) and freezes it again when done."""
    from sbpet.modules.sde import SDEBridgeRegularizer

    model, tokenizer, texts, _ = _setup(tmp_path)
    cfg = model.config
    common = dict(word_embeddings=model.get_input_embeddings().weight, train_tail=True)
    reg = (BridgeRegularizer(cfg.hidden_size, cfg.num_hidden_layers, dims=(24, 6), backend="torch", **common)
           if kind == "pdf" else SDEBridgeRegularizer(cfg.hidden_size, cfg.num_hidden_layers, latent_size=6,
                                                      width=16, seed=0, **common))
    reg.save_pretrained(tmp_path / "g")
    loaded = BridgeRegularizer.from_pretrained(tmp_path / "g", model=model)
    assert not loaded.training and not any(p.requires_grad for p in loaded.parameters())
    before = {k: v.clone() for k, v in loaded.state_dict().items()}
    history = fit_mapping(model, tokenizer, texts, loaded, steps=4, batch_size=4, learning_rate=1e-2, progress=False)
    assert len(history["loss"]) == 4
    changed = [k for k, v in loaded.state_dict().items() if not torch.equal(v, before[k])]
    assert "tail" in changed and any(k != "tail" for k in changed), changed
    assert not loaded.training and not any(p.requires_grad for p in loaded.parameters())
