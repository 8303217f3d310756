"""sbpet.cli.protocol and `sbpet train --protocol`: the presets and their parts, the released code's
protocol end to end (steps, constant lr, dropout off, best validation checkpoint restored, prompt
tuning from [MASK]), and that our protocol keeps the runs' keys of before."""

import json
import os

import pytest
import torch

from hf_helpers import tiny_model_and_corpus
from sbpet.cli import demo, protocol
from sbpet.cli.experiment import Setup, train_few_shot
from sbpet.cli.main import build_parser, main


def test_presets_and_parts():
    ours, paper = protocol.resolve("ours"), protocol.resolve("paper")
    assert ours == protocol.OURS and ours.key() == {}
    assert (paper.steps, paper.batch_size, paper.schedule, paper.weight_decay, paper.dropout, paper.eval_every,
            paper.prompt_init, paper.virtual_tokens, paper.lora_alpha) == (1000, 2, "constant", 0.01, False, 50,
                                                                          "mask", 20, 8)
    assert [paper.learning_rate(p) for p in ("lora", "bitfit", "prompt")] == [1e-4, 1e-4, 1e-3]
    assert ours.learning_rate("prompt") == 5e-3
    mixed = protocol.resolve("paper", steps=30, lr=2e-4, dropout=None)
    assert (mixed.steps, mixed.learning_rate("prompt"), mixed.dropout) == (30, 2e-4, False)
    assert protocol.resolve("ours", eval_every=5).key() == {"eval_every": 5}
    assert (protocol.resolve("paper", epochs=3).steps, protocol.resolve("paper", epochs=3, steps=9).steps) == (None, 9)


@pytest.mark.parametrize("parts, message", [({"steps": 0}, "--steps must be >= 1"),
                                             ({"weight_decay": -1.0}, "--weight-decay must be >= 0"),
                                             ({"schedule": "cosine"}, "--schedule must be linear or constant")])
def test_bad_parts_are_named(parts, message):
    with pytest.raises(ValueError, match=message):
        protocol.resolve("paper", **parts)
    with pytest.raises(ValueError, match="--protocol must be one of ours, paper"):
        protocol.resolve("released")


def test_prompt_tuning_from_mask(tmp_path):
    from transformers import BertModel

    model_dir, _ = tiny_model_and_corpus(tmp_path)
    encoder = BertModel.from_pretrained(model_dir)
    mask_row = encoder.get_input_embeddings().weight[4].detach().clone()
    model = demo.apply_pet(encoder, "prompt", virtual_tokens=7, prompt_init_id=4)
    prompt = model.prompt_encoder[model.active_adapter].embedding.weight
    assert prompt.shape[0] == 7 and torch.equal(prompt.detach(), mask_row.expand(7, -1))
    assert prompt.requires_grad


def _options(tmp_path):
    model_dir, data_dir = tiny_model_and_corpus(tmp_path)
    config = json.load(open(os.path.join(model_dir, "config.json")))
    config["hidden_dropout_prob"] = 0.1  # so that "dropout off" has something to turn off
    json.dump(config, open(os.path.join(model_dir, "config.json"), "w"))
    return ["--model-dir", model_dir, "--data-dir", data_dir, "--cache-dir", str(tmp_path / "cache"),
            "--fit-steps", "2", "--fit-batch-size", "4", "--max-length", "24", "--dims", "16,4", "--no-progress",
            "--device", "cpu", "--test-per-class", "2", "--val-per-class", "2"]


@pytest.mark.parametrize("name", ["ours", "paper"])
def test_dropout_follows_the_protocol(tmp_path, name):
    args = build_parser().parse_args(["train", *_options(tmp_path), "--protocol", name, "--steps", "2"])
    chosen = protocol.protocol_from_args(args)
    setup = Setup(args)
    train, val = setup.sample(2, 0)
    classifier, *_ = train_few_shot(setup, "lora", train, 0, protocol=chosen, validation_rows=val, quiet=True)
    rates = {m.p for m in classifier.modules() if isinstance(m, torch.nn.Dropout)}
    assert (rates == {0.0}) if name == "paper" else (0.1 in rates), rates  # attention's and LoRA's are 0 here


def test_paper_protocol_end_to_end(tmp_path, capsys):
    out = tmp_path / "run"
    code = main(["train", *_options(tmp_path), "--protocol", "paper", "--pet", "prompt", "--shots", "2",
                 "--steps", "6", "--eval-every", "2", "--out", str(out)])
    assert code == 0, capsys.readouterr().err[-2000:]
    meta = json.load(open(out / "run.json"))
    assert meta["protocol"]["name"] == "paper" and meta["protocol"]["steps"] == 6
    assert (meta["batch_size"], meta["lr"]) == (2, 1e-3)  # the preset's, prompt tuning's rate
    curve, chosen = meta["selection"]["curve"], meta["selection"]["chosen_step"]
    assert [p["step"] for p in curve] == [2, 4, 6]
    best = min(curve, key=lambda p: (-p["accuracy"], p["task_loss"], p["step"]))
    assert chosen == best["step"]
    # The tested classifier is the chosen step's: the validation scores after training are its.
    assert meta["validation"]["accuracy"] == best["accuracy"]
    assert meta["validation"]["task_loss"] == pytest.approx(best["task_loss"], rel=1e-6)
    assert meta["config"]["protocol"]["virtual_tokens"] == 20 and meta["config"]["protocol"]["steps"] == 6
    # The saved run loads back into a classifier built by its protocol (20 virtual tokens).
    assert main(["plot", *_options(tmp_path), "--runs", str(out), "--out", str(tmp_path / "t.png"),
                 "--examples", "2"]) == 0


def test_our_protocol_keeps_the_run_keys_of_before(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["train", *_options(tmp_path), "--shots", "2", "--epochs", "1", "--out", str(out)]) == 0
    meta = json.load(open(out / "run.json"))
    assert "protocol" not in meta["config"] and meta["selection"] is None
    assert (meta["config"]["epochs"], meta["config"]["batch_size"], meta["config"]["lr"]) == (1.0, 8, 5e-3)


def test_best_checkpoint_restores_the_chosen_step(monkeypatch):
    """The selection rule and the restore, with scripted validation scores: step 4 ties step 6 on
    accuracy but has the lower loss; the parameters come back as they were at step 4."""
    from types import SimpleNamespace

    from sbpet.cli import experiment

    scores = iter([{"accuracy": 0.5, "task_loss": 0.9}, {"accuracy": 0.75, "task_loss": 0.6},
                   {"accuracy": 0.75, "task_loss": 0.7}, {"accuracy": 0.25, "task_loss": 0.1}])
    monkeypatch.setattr(experiment, "evaluate", lambda *a, **k: next(scores))
    model = torch.nn.Linear(2, 2)
    model.bias.requires_grad_(False)
    selector = experiment._BestCheckpoint(model, (None, None, None), [1, 2], 4, every=2)
    for step in range(1, 8):
        with torch.no_grad():
            model.weight.fill_(float(step))
        selector.on_step_end(None, SimpleNamespace(global_step=step, max_steps=7), None)
    selection = selector.restore_best()
    assert [p["step"] for p in selection["curve"]] == [2, 4, 6, 7]  # every 2 steps and the last (7)
    assert selection["chosen_step"] == 4 and torch.all(model.weight == 4.0)


def test_trimmed_padding_changes_no_prediction(tmp_path):
    """Prompts are right-padded to --max-length; training and evaluation drop the trailing pad
    columns. The [MASK] logits and the bridge loss are those of the padded batch."""
    from sbpet.cli.experiment import evaluate, trim_padding

    args = build_parser().parse_args(["train", *_options(tmp_path), "--max-length", "40"])
    setup = Setup(args)
    ids, mask, labels = setup.encode(setup.test)
    batch = trim_padding({"input_ids": ids, "attention_mask": mask, "labels": labels})
    length = int(mask.sum(1).max())
    assert length < 40 and batch["input_ids"].shape == (len(labels), length) and torch.equal(batch["labels"], labels)
    assert torch.equal(batch["attention_mask"], mask[:, :length]) and not mask[:, length:].any()
    classifier, _, words = setup.build_classifier("lora", 0)
    reg = setup.regularizer("brownian")
    kw = dict(label_word_ids=words, mask_token_id=setup.tokenizer.mask_token_id, regularizers={"g": reg})
    whole, one_by_one = evaluate(classifier, ids, mask, labels, **kw), evaluate(classifier, ids, mask, labels,
                                                                                batch_size=1, **kw)
    with torch.no_grad():
        padded = classifier(input_ids=ids, attention_mask=mask, labels=labels).logits
        trimmed = classifier(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    torch.testing.assert_close(trimmed, padded, rtol=1e-5, atol=1e-5)
    assert whole["accuracy"] == one_by_one["accuracy"]
    assert whole["task_loss"] == pytest.approx(one_by_one["task_loss"], rel=1e-5)
    assert whole["bridge_loss"]["g"] == pytest.approx(one_by_one["bridge_loss"]["g"], rel=1e-4)
