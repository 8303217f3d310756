"""BridgeTrainer: a few steps with LoRA, prompt tuning, IA3 and BitFit (tiny BERT) and LoRA on a
tiny GPT-2; logs; frozen g; gradient accumulation (masked LM, sequence classifier, causal LM);
bfloat16 autocast; evaluation's bridge loss; the regulariser in checkpoints and on resuming;
gradient accumulation with unequal numbers of regularised positions (tiny Llama), counted on the
host by the collator; the mixin on another Trainer subclass."""

import pytest
import torch

from hf_helpers import (
    ACCUMULATION_KINDS,
    LABEL_WORDS,
    accumulation_setup,
    assert_same_step,
    classification_batch,
    classification_data,
    collate,
    pet_model,
    tiny_gpt2_config,
    tiny_regularizer,
    trainer_args,
    trainer_one_step,
    unequal_examples,
)

pytest.importorskip("peft")
pytest.importorskip("accelerate")
from peft import LoraConfig, TaskType, get_peft_model  # noqa: E402
from transformers import GPT2LMHeadModel  # noqa: E402

from sbpet.hf import causal_lm_bridge_labels  # noqa: E402
from sbpet.hf.trainer import BridgeTrainer  # noqa: E402


@pytest.mark.parametrize("method", ["lora", "prompt", "ia3", "bitfit"])
def test_bridge_trainer_trains_pet_only(method, tmp_path):
    model, base = pet_model(method)
    reg = tiny_regularizer(base)
    g_before = {k: v.clone() for k, v in reg.state_dict().items()}
    frozen_before = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    pet_before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    trainer = BridgeTrainer(model=model, args=trainer_args(tmp_path), train_dataset=classification_data(),
                            data_collator=collate, bridge=reg, bridge_weight=0.5)
    trainer.train()
    logs = [entry for entry in trainer.state.log_history if "task_loss" in entry]
    assert len(logs) == 3
    for entry in logs:
        assert entry["bridge_loss"] > 0
        assert entry["loss"] == pytest.approx(entry["task_loss"] + 0.5 * entry["bridge_loss"], rel=1e-3, abs=1e-4)
    for k, v in reg.state_dict().items():
        assert torch.equal(v.cpu(), g_before[k]), f"g changed: {k}"
    for n, p in model.named_parameters():
        if n in frozen_before:
            assert torch.equal(p.detach(), frozen_before[n]), f"frozen {n} changed"
    assert any(not torch.equal(p.detach(), pet_before[n]) for n, p in model.named_parameters() if n in pet_before)


def test_bridge_trainer_causal_lm_and_bfloat16(tmp_path):
    torch.manual_seed(0)
    base = GPT2LMHeadModel(tiny_gpt2_config())
    model = get_peft_model(base, LoraConfig(task_type=TaskType.CAUSAL_LM, r=4, target_modules=["c_attn"]))
    reg = tiny_regularizer(base, shift_labels=True)
    ids, mask, _ = classification_batch(batch=8, mask_token=False)
    labels = causal_lm_bridge_labels(ids, mask)
    data = [{"input_ids": ids[i], "attention_mask": mask[i], "labels": labels[i]} for i in range(8)]
    trainer = BridgeTrainer(model=model, args=trainer_args(tmp_path, bf16=True, max_steps=2), train_dataset=data,
                            data_collator=collate, bridge=reg, bridge_weight=0.1)
    trainer.train()
    logs = [entry for entry in trainer.state.log_history if "bridge_loss" in entry]
    assert logs and all(torch.isfinite(torch.tensor(e["bridge_loss"])) for e in logs)


def _one_step(tmp_path, kind, batch_size, accumulation, **kw):
    return trainer_one_step(trainer_args(tmp_path), kind, batch_size, accumulation, **kw)


def _batch_losses(kind):
    """The task loss and R of the whole batch of 4 at the initial weights, computed directly."""
    model, _, data, reg = accumulation_setup(kind)
    batch = collate(data)
    bridge_labels = batch.pop("bridge_labels", batch["labels"])
    model.train()
    with torch.no_grad():
        out = model(**batch, output_hidden_states=True)
    return out.loss.item(), reg(out.hidden_states, bridge_labels, batch["attention_mask"]).item()


@pytest.mark.parametrize("kind", ACCUMULATION_KINDS)
def test_gradient_accumulation_matches_whole_batch(kind, tmp_path):
    """One optimizer step at batch 4 / GA 1 and at batch 2 / GA 2 (the same samples) accumulate
    the same gradient of task + alpha * R, whether or not the model's loss uses the Trainer's
    num_items_in_batch (BERT's heads ignore it, GPT-2's uses it), and log the same per-batch
    task_loss and bridge_loss."""
    whole, whole_log = _one_step(tmp_path / "a", kind, 4, 1)
    accumulated, acc_log = _one_step(tmp_path / "b", kind, 2, 2)
    assert whole.keys() == accumulated.keys() and whole
    for name in whole:
        torch.testing.assert_close(accumulated[name], whole[name], rtol=1e-5, atol=1e-7, msg=lambda m: f"{name}: {m}")
    task, bridge = _batch_losses(kind)
    assert acc_log["task_loss"] == pytest.approx(whole_log["task_loss"], rel=1e-5)
    for log in (whole_log, acc_log):
        assert log["bridge_loss"] == pytest.approx(bridge, rel=1e-5)  # the batch's R, not R / GA
        if kind != "causal_lm":  # GPT-2's task loss is normalised by the Trainer's own token count
            assert log["task_loss"] == pytest.approx(task, rel=1e-5)


def test_gradient_accumulation_via_hidden_states(tmp_path):
    whole, _ = _one_step(tmp_path / "a", "seq_cls_lora", 4, 1)
    via_states, _ = _one_step(tmp_path / "b", "seq_cls_lora", 2, 2, capture="hidden_states")
    for name in whole:
        torch.testing.assert_close(via_states[name], whole[name], rtol=1e-5, atol=1e-7, msg=lambda m: f"{name}: {m}")


def test_bridge_trainer_errors(tmp_path):
    model, base = pet_model("lora")
    reg = tiny_regularizer(base)
    with pytest.raises(ValueError, match="capture"):
        BridgeTrainer(model=model, args=trainer_args(tmp_path), bridge=reg, capture="nope")
    trainer = BridgeTrainer(model=model, args=trainer_args(tmp_path), bridge=reg)
    ids, mask, y = classification_batch()
    model.train()
    with pytest.raises(ValueError, match="bridge_labels"):
        trainer.compute_loss(model, {"input_ids": ids, "attention_mask": mask, "labels": y})


@pytest.mark.parametrize("capture", ["hooks", "hidden_states"])
def test_evaluate_reports_bridge_and_task_loss(capture, tmp_path):
    """eval_bridge_loss is R of the whole eval set (uneven batches of 3, 3 and 2), with the
    regulariser used in training; eval_task_loss is the task loss (eval_loss)."""
    model, base = pet_model("lora")
    for name, p in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.1)
    reg = tiny_regularizer(base)
    data = classification_data(n=8, seed=2)
    trainer = BridgeTrainer(model=model, args=trainer_args(tmp_path, per_device_eval_batch_size=3), train_dataset=data,
                            eval_dataset=data, data_collator=collate, bridge=reg, bridge_weight=0.5, capture=capture)
    metrics = trainer.evaluate()
    batch = collate(data)
    model.eval()
    with torch.no_grad():
        out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"],
                    output_hidden_states=True)
        want = reg(out.hidden_states, batch["bridge_labels"], batch["attention_mask"]).item()
    assert metrics["eval_bridge_loss"] == pytest.approx(want, rel=1e-5)
    assert metrics["eval_task_loss"] == metrics["eval_loss"] == pytest.approx(out.loss.item(), rel=1e-5)
    predictions = trainer.predict(data)
    assert predictions.predictions.shape == (8, len(LABEL_WORDS))  # no hidden states among the predictions
    assert predictions.metrics["test_bridge_loss"] == pytest.approx(want, rel=1e-5)
    plain = BridgeTrainer(model=model, args=trainer_args(tmp_path), eval_dataset=data, data_collator=collate)
    assert "eval_bridge_loss" not in plain.evaluate()


def test_checkpoints_hold_the_regulariser_and_resume(tmp_path, caplog):
    from sbpet.hf.trainer import REGULARIZER_DIR
    from sbpet.modules.regularizer import BridgeRegularizer

    def trainer_for(model, reg, **kw):
        args = trainer_args(tmp_path / "out", save_strategy="steps", save_steps=2, **kw)
        return BridgeTrainer(model=model, args=args, train_dataset=classification_data(), data_collator=collate,
                             bridge=reg, bridge_weight=0.5)

    model, base = pet_model("lora")
    reg = tiny_regularizer(base)
    trainer = trainer_for(model, reg, max_steps=2)
    trainer.train()
    saved = tmp_path / "out" / "checkpoint-2" / REGULARIZER_DIR
    assert (saved / "sbpet_config.json").is_file() and (saved / "sbpet_model.safetensors").is_file()
    loaded = BridgeRegularizer.from_pretrained(saved, model=base)
    assert loaded.config == reg.config
    for key, value in reg.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value.cpu()), key
    trainer.save_model(str(tmp_path / "final"))
    assert (tmp_path / "final" / REGULARIZER_DIR / "sbpet_model.safetensors").is_file()

    # Resume with another g: the run goes on with the checkpoint's, and says so.
    model, base = pet_model("lora")
    other = tiny_regularizer(base, dims=(24, 6))
    torch.nn.init.normal_(other.mapping.layers[0].weight)
    resumed = trainer_for(model, other, max_steps=3)
    with caplog.at_level("WARNING", logger="sbpet.hf.trainer"):
        resumed.train(resume_from_checkpoint=True)
    assert resumed.state.global_step == 3
    assert "differs" in caplog.text
    for key, value in reg.state_dict().items():
        assert torch.equal(other.state_dict()[key].cpu(), value.cpu()), key
    wrong = tiny_regularizer(base, dims=(24, 5))
    with pytest.raises(ValueError, match="does not match"):
        trainer_for(model, wrong, max_steps=4).train(resume_from_checkpoint=str(tmp_path / "out" / "checkpoint-2"))


def _collate_and_tag(rows):
    """``collate``, with the bridge labels tagged as the host's copy (storage addresses are reused,
    so a tag, not an address, tells a copy from the original)."""
    batch = collate(rows)
    batch["bridge_labels"].sbpet_test_copy = "host"
    return batch


def _spy_on_positions(monkeypatch) -> list:
    """The tag of every labels tensor the positions are found on (capture and whole-states routes)."""
    import sbpet.core.validation
    import sbpet.hf.capture

    seen = []
    for module in (sbpet.hf.capture, sbpet.core.validation):
        found = module.find_positions

        def spy(labels, real, *args, _found=found, **kwargs):
            seen.append(getattr(labels, "sbpet_test_copy", None))
            return _found(labels, real, *args, **kwargs)

        monkeypatch.setattr(module, "find_positions", spy)
    return seen


@pytest.mark.parametrize("capture", ["hooks", "hidden_states"])
def test_the_regulariser_gets_the_host_labels_and_mask(capture, tmp_path, monkeypatch):
    """BridgeTrainer finds the positions on the batch's host copy of the labels (no device read), not
    on the copy the Trainer moves to the device: the move is simulated by a clone, and each tensor is
    tagged (storage addresses are reused, so they cannot tell the two apart)."""
    from transformers import Trainer


    def move(self, data):
        if isinstance(data, torch.Tensor):
            moved = data.clone()
            moved.sbpet_test_copy = "moved"
            return moved
        return original(self, data)

    original = Trainer._prepare_input
    monkeypatch.setattr(Trainer, "_prepare_input", move)
    seen = _spy_on_positions(monkeypatch)
    model, base = pet_model("lora")
    trainer = BridgeTrainer(model=model, args=trainer_args(tmp_path, max_steps=2), train_dataset=classification_data(),
                            data_collator=_collate_and_tag, bridge=tiny_regularizer(base), capture=capture)
    trainer.train()
    assert seen == ["host", "host"]


@pytest.mark.parametrize("capture", ["hooks", "hidden_states"])
def test_host_copies_pass_the_dataloaders_move_to_the_device(capture, tmp_path, monkeypatch):
    """On a GPU the Trainer's dataloader (accelerate's DataLoaderShard) moves the whole batch to the
    device before ``_prepare_inputs`` sees it: the regulariser still finds its positions on the
    collator's host copies (HostCopies, which the move passes as it is). The move is simulated by
    a clone, each tensor tagged as in the test above."""
    import accelerate.data_loader
    from sbpet.hf.batches import HOST_KEY, HostCopies


    def move(data, *args, **kwargs):
        if isinstance(data, torch.Tensor):
            moved = data.clone()
            moved.sbpet_test_copy = "moved"
            return moved
        if isinstance(data, dict):
            return {key: move(value) for key, value in data.items()}
        return data

    monkeypatch.setattr(accelerate.data_loader, "send_to_device", move)
    seen = _spy_on_positions(monkeypatch)
    model, base = pet_model("lora")
    trainer = BridgeTrainer(model=model, args=trainer_args(tmp_path, max_steps=2), train_dataset=classification_data(),
                            data_collator=_collate_and_tag, bridge=tiny_regularizer(base), capture=capture)
    batch = next(iter(trainer.get_train_dataloader()))
    assert getattr(batch["bridge_labels"], "sbpet_test_copy", None) == "moved"  # the simulated move ran
    assert isinstance(batch[HOST_KEY], HostCopies)
    trainer.train()  # HOST_KEY never reaches the model's forward
    assert seen == ["host", "host"]


# ----------------------------------------------------------------------------------------------
# Gradient accumulation with unequal numbers of regularised positions (tiny Llama, LoRA)


def _unequal_step(tmp_path, batch_size, accumulation, capture="hooks", route="collator"):
    """One plain-SGD step on unequal_examples() (3 then 32 regularised positions), right-padded to
    40. ``route``: "collator" (the Trainer's dataloader: counted by the counting collator on the
    host) or "fallback" (a plain DataLoader: counted in get_batch_samples)."""
    from hf_helpers import grad_recorder, in_order, llama_lora_config, llama_regularizer, spread_lora_b, tiny_llama
    from transformers import TrainingArguments

    recorder = grad_recorder()
    model = get_peft_model(tiny_llama(), llama_lora_config())
    spread_lora_b(model)
    reg = llama_regularizer(model.get_base_model())
    data = []
    for ids, completion in unequal_examples():
        pad = [0] * (40 - len(ids))
        ids, completion = torch.tensor(ids + pad), torch.tensor(completion + pad)
        data.append({"input_ids": ids, "attention_mask": (torch.arange(40) < 40 - len(pad)).long(),
                     "labels": torch.where(completion.bool(), ids, -100)})
    args = TrainingArguments(
        str(tmp_path), per_device_train_batch_size=batch_size, gradient_accumulation_steps=accumulation,
        max_steps=1, optim="sgd", learning_rate=1.0, lr_scheduler_type="constant", max_grad_norm=0.0,
        logging_steps=1, report_to=[], use_cpu=True, save_strategy="no", disable_tqdm=True)
    trainer = BridgeTrainer(model=model, args=args, train_dataset=data, data_collator=collate, bridge=reg,
                            bridge_weight=4.0, capture=capture, callbacks=[recorder])
    if route == "fallback":
        trainer.get_train_dataloader = lambda: torch.utils.data.DataLoader(data, batch_size=batch_size,
                                                                           collate_fn=collate)
    in_order(trainer).train()
    return recorder.grads, next(e for e in trainer.state.log_history if "bridge_loss" in e)


@pytest.mark.parametrize("capture, route", [("hooks", "collator"), ("hidden_states", "collator"),
                                            ("hooks", "fallback")])
def test_gradient_accumulation_with_unequal_counts(capture, route, tmp_path):
    """Micro-batches of 3 and 32 regularised positions at GA 2 accumulate the gradient of one batch
    of both (R's mean over all 35 positions, as the task loss over num_items_in_batch), and log that
    batch's R and task loss."""
    whole, whole_log = _unequal_step(tmp_path / "a", 2, 1, capture, route)
    accumulated, acc_log = _unequal_step(tmp_path / "b", 1, 2, capture, route)
    assert_same_step(whole, whole_log, accumulated, acc_log)


def test_the_unequal_counts_tell_the_means_apart():
    """The data above can fail the test: R's mean over the 35 positions differs clearly from the
    mean of the two micro-batches' means."""
    from hf_helpers import llama_regularizer, tiny_llama

    model = tiny_llama()
    reg = llama_regularizer(model)
    per_example = []
    for ids, completion in unequal_examples():
        ids = torch.tensor([ids])
        labels = torch.where(torch.tensor([completion]).bool(), ids, -100)
        with torch.no_grad():
            states = model(input_ids=ids, output_hidden_states=True).hidden_states
        per_example.append(reg(states, labels).item())
    pooled = (3 * per_example[0] + 32 * per_example[1]) / 35
    assert abs(pooled - sum(per_example) / 2) > 0.02 * pooled


def test_regularised_positions_are_counted_as_the_capture_finds_them():
    """Counted by hand: virtual tokens, the causal shift, and the shift stopping at the end of
    every packed sequence, whichever boundary form marks it."""
    from sbpet.hf.trainer import regularised_positions

    labels = torch.tensor([[-100, 5, 6, 7, 8, -100], [9, 9, -100, 9, 9, 9]])
    assert int(regularised_positions(labels)) == 9
    assert int(regularised_positions(labels, shift_labels=True)) == 8  # labels at s >= 1 only
    assert int(regularised_positions(labels, shift_labels=True, num_virtual=2)) == 9  # the first real token too
    # row 0: sequences [0, 3) and [3, 6); row 1: [0, 2), [2, 6): label 7 starts a sequence, so no state predicts it
    position_ids = torch.tensor([[0, 1, 2, 0, 1, 2], [0, 1, 0, 1, 2, 3]])
    seq_idx = torch.tensor([[0, 0, 0, 1, 1, 1], [2, 2, 3, 3, 3, 3]])
    cu_seq_lens = torch.tensor([0, 3, 6, 8, 12])
    for packing in (dict(position_ids=position_ids), dict(seq_idx=seq_idx), dict(cu_seq_lens=cu_seq_lens)):
        assert int(regularised_positions(labels, shift_labels=True, **packing)) == 7, packing
        assert int(regularised_positions(labels, **packing)) == 9, packing  # no shift: boundaries change nothing


def test_counts_come_from_the_collator_on_the_host(tmp_path):
    """The Trainer's dataloader hands each batch's count over as a Python int, made where the
    collator ran; data_collator stays the one given; a batch that carries it is never read
    again (labels on the meta device here)."""
    from sbpet.hf.trainer import POSITIONS_KEY

    model, base = pet_model("lora")
    trainer = BridgeTrainer(model=model, args=trainer_args(tmp_path), train_dataset=classification_data(),
                            data_collator=collate, bridge=tiny_regularizer(base))
    assert trainer.data_collator is collate
    batch = next(iter(trainer.get_train_dataloader()))
    assert batch[POSITIONS_KEY] == int((batch["bridge_labels"] != -100).sum()) == 4
    meta = {"bridge_labels": torch.empty(4, 11, dtype=torch.long, device="meta"), POSITIONS_KEY: 4}
    assert trainer._batch_count(meta) == 4
    trainer.train()  # the key never reaches the model's forward


def test_the_mixin_gives_another_trainer_subclass_the_regulariser(tmp_path):
    """BridgeTrainerMixin in front of a user's Trainer subclass (its own compute_loss): the loss is
    that subclass's task loss + alpha * R, R as BridgeTrainer computes it."""
    from transformers import Trainer

    from sbpet.hf import BridgeTrainerMixin

    class DoubledLoss(Trainer):
        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            outputs = model(**inputs)
            loss = 2.0 * outputs.loss
            return (loss, outputs) if return_outputs else loss

    class BridgeDoubled(BridgeTrainerMixin, DoubledLoss):
        pass

    logs = {}
    for name, cls in (("mixin", BridgeDoubled), ("bridge", BridgeTrainer)):
        model, base = pet_model("lora")
        trainer = cls(model=model, args=trainer_args(tmp_path / name, max_steps=1), train_dataset=classification_data(),
                      data_collator=collate, bridge=tiny_regularizer(base), bridge_weight=0.5)
        trainer.train()
        logs[name] = next(e for e in trainer.state.log_history if "bridge_loss" in e)
    mixin, plain = logs["mixin"], logs["bridge"]
    assert mixin["bridge_loss"] == pytest.approx(plain["bridge_loss"], rel=1e-6)
    assert mixin["task_loss"] == pytest.approx(2 * plain["task_loss"], rel=1e-5)
    assert mixin["loss"] == pytest.approx(mixin["task_loss"] + 0.5 * mixin["bridge_loss"], rel=1e-4)
