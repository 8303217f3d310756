"""BridgeTrainer: a few steps with LoRA, prompt tuning, IA3 and BitFit (tiny BERT) and LoRA on a
tiny GPT-2; logs; frozen g; gradient accumulation; bfloat16 autocast."""

import pytest
import torch

from hf_helpers import LABEL_WORDS, MASK_ID, classification_batch, tiny_bert_config, tiny_gpt2_config, tiny_regularizer

pytest.importorskip("peft")
pytest.importorskip("accelerate")
from peft import IA3Config, LoraConfig, PromptTuningConfig, TaskType, get_peft_model  # noqa: E402
from transformers import BertForSequenceClassification, GPT2LMHeadModel, TrainingArguments  # noqa: E402

from sbpet.hf import causal_lm_bridge_labels, masked_lm_bridge_labels  # noqa: E402
from sbpet.hf.peft_utils import apply_bitfit  # noqa: E402
from sbpet.hf.trainer import BridgeTrainer  # noqa: E402


def _classification_data(n=8, seed=0):
    ids, mask, y = classification_batch(batch=n, seed=seed)
    labels = masked_lm_bridge_labels(ids, y, MASK_ID, LABEL_WORDS)
    return [
        {"input_ids": ids[i], "attention_mask": mask[i], "labels": y[i], "bridge_labels": labels[i]}
        for i in range(n)
    ]


def _collate(rows):
    return {k: torch.stack([r[k] for r in rows]) for k in rows[0]}


def _args(tmp_path, **kw):
    args = dict(output_dir=str(tmp_path), per_device_train_batch_size=4, max_steps=3, logging_steps=1,
                learning_rate=1e-2, report_to=[], use_cpu=True, save_strategy="no", disable_tqdm=True,
                remove_unused_columns=True, seed=0)
    args.update(kw)
    return TrainingArguments(**args)


def _pet_model(method):
    torch.manual_seed(0)
    base = BertForSequenceClassification(tiny_bert_config())
    if method == "bitfit":
        apply_bitfit(base, extra_trainable=["classifier"])
        return base, base
    config = {
        "lora": LoraConfig(task_type=TaskType.SEQ_CLS, r=4, target_modules=["query", "value"]),
        "prompt": PromptTuningConfig(task_type=TaskType.SEQ_CLS, num_virtual_tokens=4),
        "ia3": IA3Config(task_type=TaskType.SEQ_CLS, target_modules=["key", "value", "output.dense"],
                         feedforward_modules=["output.dense"]),
    }[method]
    return get_peft_model(base, config), base


@pytest.mark.parametrize("method", ["lora", "prompt", "ia3", "bitfit"])
def test_bridge_trainer_trains_pet_only(method, tmp_path):
    model, base = _pet_model(method)
    reg = tiny_regularizer(base)
    g_before = {k: v.clone() for k, v in reg.state_dict().items()}
    frozen_before = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    pet_before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    trainer = BridgeTrainer(model=model, args=_args(tmp_path), train_dataset=_classification_data(),
                            data_collator=_collate, bridge=reg, bridge_weight=0.5)
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
    trainer = BridgeTrainer(model=model, args=_args(tmp_path, bf16=True, max_steps=2), train_dataset=data,
                            data_collator=_collate, bridge=reg, bridge_weight=0.1)
    trainer.train()
    logs = [entry for entry in trainer.state.log_history if "bridge_loss" in entry]
    assert logs and all(torch.isfinite(torch.tensor(e["bridge_loss"])) for e in logs)


def _one_sgd_step(tmp_path, batch_size, accumulation, capture="hooks"):
    torch.manual_seed(0)
    base = GPT2LMHeadModel(tiny_gpt2_config())
    model = get_peft_model(base, LoraConfig(task_type=TaskType.CAUSAL_LM, r=4, target_modules=["c_attn"],
                                            init_lora_weights="gaussian"))
    for name, p in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.1)
    reg = tiny_regularizer(base, shift_labels=True)
    gen = torch.Generator().manual_seed(3)
    ids = torch.randint(5, 97, (4, 9), generator=gen)  # no padding: equal N per micro-batch
    data = [{"input_ids": ids[i], "attention_mask": torch.ones(9, dtype=torch.long), "labels": ids[i]} for i in range(4)]
    args = _args(tmp_path, per_device_train_batch_size=batch_size, gradient_accumulation_steps=accumulation,
                 max_steps=1, optim="sgd", learning_rate=1.0, lr_scheduler_type="constant", max_grad_norm=0.0)
    trainer = BridgeTrainer(model=model, args=args, train_dataset=data, data_collator=_collate, bridge=reg,
                            bridge_weight=2.0, capture=capture)
    trainer.get_train_dataloader = lambda: torch.utils.data.DataLoader(data, batch_size=batch_size, collate_fn=_collate)
    trainer.train()
    log = next(e for e in trainer.state.log_history if "bridge_loss" in e)
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}, log


def test_gradient_accumulation_matches_whole_batch(tmp_path):
    whole, whole_log = _one_sgd_step(tmp_path / "a", 4, 1)
    accumulated, acc_log = _one_sgd_step(tmp_path / "b", 2, 2)
    via_states, _ = _one_sgd_step(tmp_path / "c", 2, 2, capture="hidden_states")
    for name in whole:
        torch.testing.assert_close(accumulated[name], whole[name], rtol=1e-4, atol=1e-6, msg=name)
        torch.testing.assert_close(via_states[name], whole[name], rtol=1e-4, atol=1e-6, msg=name)
    assert acc_log["bridge_loss"] == pytest.approx(whole_log["bridge_loss"], rel=1e-4)
    assert acc_log["task_loss"] == pytest.approx(whole_log["task_loss"], rel=1e-4)


def test_bridge_trainer_errors(tmp_path):
    model, base = _pet_model("lora")
    reg = tiny_regularizer(base)
    with pytest.raises(ValueError, match="capture"):
        BridgeTrainer(model=model, args=_args(tmp_path), bridge=reg, capture="nope")
    trainer = BridgeTrainer(model=model, args=_args(tmp_path), bridge=reg)
    ids, mask, y = classification_batch()
    model.train()
    with pytest.raises(ValueError, match="bridge_labels"):
        trainer.compute_loss(model, {"input_ids": ids, "attention_mask": mask, "labels": y})
