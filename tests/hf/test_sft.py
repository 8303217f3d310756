"""BridgeSFTTrainer (TRL's SFTTrainer with the regulariser) on a tiny random Llama with LoRA:
R over every completion token (TRL's labels, shifted), one model forward per training step and no
FutureWarning, gradient accumulation exact with unequal numbers of regularised positions, TRL's
padding_free and packing rows = padded batches, eval R, the regulariser in checkpoints, the shift
check, the ImportError without trl, and the packaging (extra, pins, drift)."""

import os
import re
import sys
import warnings

import pytest
import torch

from hf_helpers import (
    assert_same_step,
    grad_recorder,
    in_order,
    llama_lora_config,
    llama_regularizer,
    spread_lora_b,
    tiny_llama,
    tiny_tokenizer,
    unequal_examples,
)

pytest.importorskip("peft")
trl = pytest.importorskip("trl")
from datasets import Dataset  # noqa: E402
from trl import SFTConfig  # noqa: E402

import sbpet  # noqa: E402
from sbpet.hf import find_backbone_and_layers  # noqa: E402
from sbpet.hf.models import ShiftLabelsWarning  # noqa: E402
from sbpet.hf.sft import BridgeSFTTrainer  # noqa: E402
from sbpet.hf.trainer import REGULARIZER_DIR  # noqa: E402

REPO = os.path.join(os.path.dirname(__file__), "..", "..")


def prompt_completion(n=6):
    words = "the cat dog sat on mat ran fast slow market shares rose fell team won lost game".split()
    gen = torch.Generator().manual_seed(5)

    def text(k):
        return " ".join(words[int(i)] for i in torch.randint(len(words), (k,), generator=gen))

    return Dataset.from_dict({"prompt": [text(3 + i % 3) for i in range(n)],
                              "completion": [" " + text(2 + (i * 2) % 5) for i in range(n)]})


def sft_args(tmp_path, **kw):
    args = dict(output_dir=str(tmp_path), per_device_train_batch_size=3, max_steps=2, logging_steps=1,
                learning_rate=1e-2, report_to=[], use_cpu=True, save_strategy="no", disable_tqdm=True, seed=0,
                max_length=64, dataset_num_proc=None, bf16=False)  # fp32: TRL defaults to bf16 autocast
    args.update(kw)
    return SFTConfig(**args)


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    tok = tiny_tokenizer(tmp_path_factory.mktemp("tok"))
    tok.eos_token = "[SEP]"
    return tok


def sft_trainer(tmp_path, tokenizer, data=None, shift_labels=True, **kw):
    model = tiny_llama()
    reg = llama_regularizer(model, shift_labels)
    options = {k: kw.pop(k) for k in ("capture", "bridge_weight", "callbacks", "eval_dataset") if k in kw}
    options.setdefault("bridge_weight", 0.5)
    trainer = BridgeSFTTrainer(model=model, args=sft_args(tmp_path, **kw), train_dataset=data or prompt_completion(),
                               processing_class=tokenizer, peft_config=llama_lora_config(), bridge=reg, **options)
    spread_lora_b(trainer.model)
    return trainer, reg


def count_backbone_forwards(trainer):
    """A forward-hook counter on the backbone: every model forward (TRL's fused head, the plain
    one, a no-grad one for metrics) runs it once."""
    backbone, _ = find_backbone_and_layers(trainer.model)
    count = [0]
    backbone.register_forward_hook(lambda *args: count.__setitem__(0, count[0] + 1))
    return count


def r_by_hand(model, batch, reg):
    """R of one collated batch from output_hidden_states (the regulariser's own path), float64-free
    but independent of the hooks and of the trainer."""
    inputs = {k: batch[k] for k in ("input_ids", "attention_mask") if k in batch}
    with torch.no_grad():
        out = model(**inputs, output_hidden_states=True)
        return reg(out.hidden_states, batch["labels"], batch.get("attention_mask")).item()


# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("capture", ["hooks", "hidden_states"])
def test_sft_regularises_every_completion_token_with_one_forward_per_step(capture, tmp_path, tokenizer):
    """Completion-only labels from TRL; R of each logged step is R over the completion tokens of
    its batch (states paired with the next token), as computed by hand; exactly one model forward
    per micro-batch (2 steps x GA 2 = 4) and no FutureWarning; only LoRA trains, g stays frozen."""
    trainer, reg = sft_trainer(tmp_path, tokenizer, capture=capture, completion_only_loss=True,
                               per_device_train_batch_size=3, gradient_accumulation_steps=1)
    seen = []
    compute_loss = trainer.compute_loss

    def spy(model, inputs, *args, **kwargs):
        labels = inputs["labels"]
        prompt_masked = (labels == -100) & (inputs["attention_mask"] != 0)
        assert prompt_masked.any(dim=1).all(), "TRL's labels should leave the prompt out"
        seen.append(r_by_hand(model, inputs, reg))
        return compute_loss(model, inputs, *args, **kwargs)

    trainer.compute_loss = spy
    forwards = count_backbone_forwards(trainer)
    g_before = {k: v.clone() for k, v in reg.state_dict().items()}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        counted_before = forwards[0]
        trainer.train()
    # TRL's warning names return_outputs (it is attributed to its caller's file, not to trl)
    future = [str(w.message) for w in caught if issubclass(w.category, FutureWarning) and "return_outputs" in str(w.message)]
    assert not future, future
    assert forwards[0] - counted_before == 2 * len(seen), "one forward per step (and the spy's own)"
    logs = [e for e in trainer.state.log_history if "bridge_loss" in e]
    assert len(logs) == 2 and len(seen) == 2
    for entry, want in zip(logs, seen):
        assert entry["bridge_loss"] == pytest.approx(want, rel=1e-5)
        assert entry["loss"] == pytest.approx(entry["task_loss"] + 0.5 * entry["bridge_loss"], rel=1e-4)
    for k, v in reg.state_dict().items():
        assert torch.equal(v.cpu(), g_before[k]), f"g changed: {k}"


def test_sft_forwards_with_gradient_accumulation(tmp_path, tokenizer):
    trainer, _ = sft_trainer(tmp_path, tokenizer, completion_only_loss=True, per_device_train_batch_size=1,
                             gradient_accumulation_steps=2, max_steps=3)
    forwards = count_backbone_forwards(trainer)
    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)  # TRL's per-step warning would fail here
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
        trainer.train()
    assert forwards[0] == 3 * 2


def test_sft_eval_and_checkpoint(tmp_path, tokenizer):
    """eval_bridge_loss is R of the eval set (one batch of 3), the regulariser is saved with the
    checkpoint and loaded back on resuming."""
    data = prompt_completion(3)
    trainer, reg = sft_trainer(tmp_path / "out", tokenizer, data=data, eval_dataset=data, completion_only_loss=True,
                               per_device_eval_batch_size=3, save_strategy="steps", save_steps=1, max_steps=1)
    trainer.train()
    assert (tmp_path / "out" / "checkpoint-1" / REGULARIZER_DIR / "sbpet_model.safetensors").is_file()
    batch = next(iter(trainer.get_eval_dataloader()))
    trainer.model.eval()
    want = r_by_hand(trainer.model, batch, reg)
    metrics = trainer.evaluate()
    assert metrics["eval_bridge_loss"] == pytest.approx(want, rel=1e-5)
    assert metrics["eval_task_loss"] == metrics["eval_loss"]
    resumed, _ = sft_trainer(tmp_path / "out", tokenizer, data=data, completion_only_loss=True,
                             save_strategy="no", max_steps=2)
    torch.nn.init.normal_(resumed.bridge.mapping.layers[0].weight)
    resumed.train(resume_from_checkpoint=True)
    for key, value in reg.state_dict().items():
        assert torch.equal(resumed.bridge.state_dict()[key].cpu(), value.cpu()), key


def test_sft_says_a_missing_shift(tmp_path, tokenizer):
    with pytest.warns(ShiftLabelsWarning, match="LlamaForCausalLM is a causal LM.*shift_labels=True"):
        sft_trainer(tmp_path, tokenizer, shift_labels=False)
    with pytest.warns(ShiftLabelsWarning, match="LlamaForCausalLM"):
        sft_trainer(tmp_path, tokenizer, shift_labels=False, capture="hidden_states")


# ----------------------------------------------------------------------------------------------
# Gradient accumulation with unequal numbers of regularised positions


def one_step_sft(tmp_path, tokenizer, batch_size, accumulation):
    recorder = grad_recorder()
    data = Dataset.from_dict({"input_ids": [e[0] for e in unequal_examples()],
                              "completion_mask": [e[1] for e in unequal_examples()]})
    trainer, _ = sft_trainer(tmp_path, tokenizer, data=data, completion_only_loss=True, bridge_weight=4.0,
                             callbacks=[recorder], per_device_train_batch_size=batch_size,
                             gradient_accumulation_steps=accumulation, max_steps=1, optim="sgd",
                             lr_scheduler_type="constant", max_grad_norm=0.0, shuffle_dataset=False)
    in_order(trainer).train()
    return recorder.grads, next(e for e in trainer.state.log_history if "bridge_loss" in e)


def test_gradient_accumulation_with_unequal_counts(tmp_path, tokenizer):
    """Micro-batches of 3 and 32 regularised positions at GA 2 accumulate the gradient of one batch
    of both (R's mean over all 35 positions, not the mean of the two micro-batches' means), and log
    that batch's R (BridgeTrainer's: tests/hf/test_trainer.py)."""
    whole, whole_log = one_step_sft(tmp_path / "a", tokenizer, 2, 1)
    accumulated, acc_log = one_step_sft(tmp_path / "b", tokenizer, 1, 2)
    assert_same_step(whole, whole_log, accumulated, acc_log)


# ----------------------------------------------------------------------------------------------
# Packaging


def test_without_trl_the_name_says_what_to_install(monkeypatch):
    import sbpet.hf

    for module in (sbpet, sbpet.hf):  # forget the imported name (before trl goes: hasattr imports it)
        monkeypatch.delattr(module, "BridgeSFTTrainer", raising=False)
    monkeypatch.delattr(sbpet.hf, "sft", raising=False)
    monkeypatch.delitem(sys.modules, "sbpet.hf.sft")
    monkeypatch.setitem(sys.modules, "trl", None)  # `import trl` raises ImportError
    with pytest.raises(ImportError, match=re.escape('pip install "sbpet[trl]"')):
        sbpet.BridgeSFTTrainer
    with pytest.raises(ImportError, match=re.escape('pip install "sbpet[trl]"')):
        from sbpet.hf import BridgeSFTTrainer  # noqa: F401
    assert "BridgeSFTTrainer" not in sbpet.__all__  # `from sbpet import *` works without trl
    exec("from sbpet import *", {})


def test_trl_is_an_extra_pinned_and_in_the_drift_check():
    from tools import drift

    with open(os.path.join(REPO, "setup.py"), encoding="utf-8") as f:
        setup = f.read()
    assert re.search(r'"trl": \["trl>=1\.16"\]', setup)
    assert re.search(r'"dev": \[[^\]]*"trl>=1\.16"', setup)
    with open(os.path.join(REPO, "constraints.txt"), encoding="utf-8") as f:
        pins = dict(line.split("==") for line in f.read().split() if "==" in line)
    assert pins["trl"] == trl.__version__
    assert "trl" in drift.EXTRAS.split(",")
    assert any(os.path.normpath("tests/hf/test_sft.py").startswith(os.path.normpath(path)) for path in drift.SUBSET)


# ----------------------------------------------------------------------------------------------
# Packed rows: TRL's padding_free and packing train like padded batches


def one_step_layout(tmp_path, tokenizer, layout, capture="hooks"):
    recorder = grad_recorder()
    options = {"padding_free": dict(padding_free=True, max_length=None),
               "packing": dict(packing=True, max_length=64),
               "padded": {}}[layout]
    seen = []
    trainer, _ = sft_trainer(tmp_path, tokenizer, data=prompt_completion(3), completion_only_loss=True,
                             bridge_weight=4.0, capture=capture, callbacks=[recorder], per_device_train_batch_size=3,
                             max_steps=1, optim="sgd", lr_scheduler_type="constant", max_grad_norm=0.0, **options)
    compute_loss = trainer.compute_loss

    def spy(model, inputs, *args, **kwargs):
        seen.append({k: v for k, v in inputs.items() if isinstance(v, torch.Tensor)})
        return compute_loss(model, inputs, *args, **kwargs)

    trainer.compute_loss = spy
    trainer.train()
    return recorder.grads, next(e for e in trainer.state.log_history if "bridge_loss" in e), seen[0]


@pytest.mark.parametrize("layout, capture", [("padding_free", "hooks"), ("packing", "hooks"),
                                             ("padding_free", "hidden_states")])
def test_packed_rows_train_like_padded(layout, capture, tmp_path, tokenizer):
    """The same 3 prompt-completion examples, padded (3 rows) or packed into one row by TRL
    (padding_free: position_ids / seq_idx / cu_seq_lens, no attention mask; packing with 'bfd'): the
    same R, task loss and LoRA gradients (fp32), so each sequence has its own context and the
    causal shift never pairs a state with the next sequence's token."""
    padded, padded_log, padded_batch = one_step_layout(tmp_path / "a", tokenizer, "padded", capture)
    packed, packed_log, packed_batch = one_step_layout(tmp_path / "b", tokenizer, layout, capture)
    assert padded_batch["input_ids"].shape[0] == 3 and packed_batch["input_ids"].shape[0] == 1
    assert "attention_mask" not in packed_batch and "position_ids" in packed_batch
    assert int((packed_batch["position_ids"] == 0).sum()) == 3  # three sequences in the row
    assert packed_log["bridge_loss"] == pytest.approx(padded_log["bridge_loss"], rel=1e-6)
    assert packed_log["task_loss"] == pytest.approx(padded_log["task_loss"], rel=1e-6)
    assert padded.keys() == packed.keys() and len(padded) == 8
    for name in padded:  # float rounding only: 1e-5 of each tensor's largest entry
        scale = float(padded[name].abs().max())
        assert scale > 0, name
        torch.testing.assert_close(packed[name], padded[name], rtol=1e-5, atol=1e-5 * scale,
                                   msg=lambda m: f"{name}: {m}")


def test_gradient_accumulation_of_padding_free_rows(tmp_path, tokenizer):
    """Labels on every token (no completion-only loss), padding_free: three micro-batches of one
    sequence each (unequal counts) accumulate the gradient of one packed row of all three. (TRL
    ignores each sequence's first label, so no pair crosses a boundary here; the count's own
    boundary rule is tested in tests/hf/test_trainer.py.)"""
    def step(path, batch_size, accumulation):
        recorder = grad_recorder()
        trainer, _ = sft_trainer(path, tokenizer, data=prompt_completion(3), completion_only_loss=False,
                                 padding_free=True, max_length=None, bridge_weight=4.0, callbacks=[recorder],
                                 per_device_train_batch_size=batch_size, gradient_accumulation_steps=accumulation,
                                 max_steps=1, optim="sgd", lr_scheduler_type="constant", max_grad_norm=0.0,
                                 shuffle_dataset=False)
        in_order(trainer).train()
        return recorder.grads, next(e for e in trainer.state.log_history if "bridge_loss" in e)

    whole, whole_log = step(tmp_path / "a", 3, 1)
    accumulated, acc_log = step(tmp_path / "b", 1, 3)
    assert acc_log["bridge_loss"] == pytest.approx(whole_log["bridge_loss"], rel=1e-6)
    for name in whole:
        scale = float(whole[name].abs().max())
        torch.testing.assert_close(accumulated[name], whole[name], rtol=1e-5, atol=1e-5 * scale,
                                   msg=lambda m: f"{name}: {m}")
