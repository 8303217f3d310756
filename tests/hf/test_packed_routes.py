"""Packed rows on every Hugging Face route: a tiny random Llama, causal shift. On the CPU its sdpa
attention does not keep packed sequences apart from ``position_ids`` alone (flash-attention does,
which TRL's padding-free collator relies on), so the model gets a block-diagonal causal 4D mask built
from the positions (:func:`_separate_packed_sequences`); sbpet sees what a padding-free batch
carries: ``position_ids`` and no attention mask. The packed row's R and gradients (w.r.t. the hidden states, the model's
trainable parameters) equal the padded batch's: the hooks (``BridgeCapture.armed(...,
position_ids)``), the module on ``output_hidden_states``, ``BridgeTrainer`` (both captures), and
TRL's own padding-free collator when trl is installed."""

from __future__ import annotations

import pytest
import torch

import sbpet
from helpers import assert_close
from hf_helpers import VOCAB
from sbpet.hf import packing_arguments

LENGTHS = (6, 3, 8)


def _close(actual, expected, name):
    scale = float(expected.detach().abs().max()) if expected.numel() else 0.0
    assert_close(actual, expected, name=name, rtol=1e-6, atol=1e-6 * scale)


def _block_mask(position_ids):
    """[B, 1, T, T] bool: causal within each packed sequence (position 0 starts one)."""
    seg = (position_ids == 0).long().cumsum(-1)
    size = position_ids.shape[-1]
    causal = torch.ones(size, size, dtype=torch.bool).tril()
    return ((seg[:, :, None] == seg[:, None, :]) & causal)[:, None]


def _separate_packed_sequences(model):
    """A pre-hook giving the model the block mask of a packed batch (position_ids, no mask)."""
    def hook(module, args, kwargs):
        if kwargs.get("attention_mask") is None and kwargs.get("position_ids") is not None:
            kwargs["attention_mask"] = _block_mask(kwargs["position_ids"])
        return args, kwargs

    return model.register_forward_pre_hook(hook, with_kwargs=True)


def _llama(seed=0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                         attn_implementation="sdpa", pad_token_id=0)
    model = LlamaForCausalLM(config).eval()
    _separate_packed_sequences(model)
    reg = sbpet.BridgeRegularizer(32, 2, dims=(20, 6), word_embeddings=model.get_input_embeddings().weight.detach(),
                                  shift_labels=True, backend="torch")
    return model, reg


def _batches(seed=0):
    """(padded batch: input_ids, attention_mask, labels [B, S]; packed row: input_ids, position_ids,
    labels [1, T]) of the same sequences; every token a label except each sequence's first."""
    gen = torch.Generator().manual_seed(seed)
    seqs = [torch.randint(5, VOCAB, (n,), generator=gen) for n in LENGTHS]
    width = max(LENGTHS)
    ids = torch.zeros(len(seqs), width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    labels = torch.full_like(ids, -100)
    for b, s in enumerate(seqs):
        ids[b, : len(s)] = s
        mask[b, : len(s)] = 1
        labels[b, 1 : len(s)] = s[1:]
    packed_ids = torch.cat(seqs)[None]
    position_ids = torch.cat([torch.arange(len(s)) for s in seqs])[None]
    packed_labels = torch.cat([torch.cat([torch.tensor([-100]), s[1:]]) for s in seqs])[None]
    return (ids, mask, labels), (packed_ids, position_ids, packed_labels)


def _per_sequence(tensor_packed):
    """[.., T, ..] packed rows -> list of per-sequence slices along dim 1 of a [1, T, H] tensor."""
    out, at = [], 0
    for n in LENGTHS:
        out.append(tensor_packed[0, at : at + n])
        at += n
    return out


def _trainable(model):
    return [p for p in model.model.parameters() if p.requires_grad]  # lm_head: no share in R


def _backends():
    from sbpet.backends.triton_backend import triton_is_usable

    return ["reference", "torch"] + (["triton"] if triton_is_usable("cpu") else [])


@pytest.mark.parametrize("backend", _backends())
@pytest.mark.parametrize("route", ["hooks", "hidden_states"])
def test_llama_packed_row_equals_padded_batch(route, backend):
    """R and the gradient of every model parameter: padded batch vs the packed row (causal shift),
    on every backend (triton: kernel 1 per layer in the hooks, kernel 2 on the parts or the states)."""
    model, reg = _llama()
    reg.backend = backend
    (ids, mask, labels), (packed_ids, position_ids, packed_labels) = _batches()
    params = _trainable(model)

    def run(batch, labels, mask, packing):
        if route == "hooks":
            capture = sbpet.BridgeCapture(model, reg)
            with capture.armed(labels, mask, **packing_arguments(packing)):
                model(**batch)
            loss = capture.loss()
            capture.remove()
        else:
            states = model(**batch, output_hidden_states=True).hidden_states
            loss = reg(states, labels, mask, **packing_arguments(packing))
        return loss, torch.autograd.grad(loss, params)

    want, want_grads = run(dict(input_ids=ids, attention_mask=mask), labels, mask, {})
    packed = dict(input_ids=packed_ids, position_ids=position_ids)
    got, got_grads = run(packed, packed_labels, None, packed)
    _close(got, want, "R")
    for i, (a, b) in enumerate(zip(got_grads, want_grads)):
        _close(a, b, f"grad of parameter {i}")
    # without the boundaries the row is one sequence: a different R (what the issue saw)
    unaware, _ = run(packed, packed_labels, None, {})
    assert abs(unaware.item() - want.item()) > 1e-4


def test_hooks_packed_hidden_state_gradients_and_cu_seq_lens():
    """Gradients w.r.t. the hidden states themselves (read by a hook), boundaries from
    ``cu_seq_lens_q`` and from ``seq_idx`` as ``packing_arguments`` picks them out of a batch."""
    model, reg = _llama(1)
    model.requires_grad_(False)
    (ids, mask, labels), (packed_ids, position_ids, packed_labels) = _batches(1)
    cu = torch.tensor([0, *torch.tensor(LENGTHS).cumsum(0).tolist()])
    seq_idx = torch.cat([torch.full((n,), i) for i, n in enumerate(LENGTHS)])[None]

    def run(batch, labels, mask, packing):
        captured = []
        handle = model.model.embed_tokens.register_forward_hook(
            lambda m, a, out: captured.append(out.requires_grad_(True)) or out)
        capture = sbpet.BridgeCapture(model, reg)
        with capture.armed(labels, mask, **packing):
            model(**batch)
        handle.remove()
        loss = capture.loss()
        capture.remove()
        return loss, torch.autograd.grad(loss, captured[0])[0]

    want, want_grad = run(dict(input_ids=ids, attention_mask=mask), labels, mask, {})
    batch = dict(input_ids=packed_ids, position_ids=position_ids)
    for packing in (dict(seq_idx=seq_idx), dict(cu_seq_lens_q=cu, max_length_q=max(LENGTHS))):
        got, got_grad = run(batch, packed_labels, None, packing_arguments({**batch, **packing}))
        _close(got, want, f"R from {list(packing)}")
        for k, rows in enumerate(_per_sequence(got_grad)):
            _close(rows, want_grad[k, : LENGTHS[k]], f"grad of the embedding output, sequence {k}")


def test_packing_arguments_picks_the_boundaries():
    batch = dict(input_ids=torch.ones(1, 3), position_ids=torch.arange(3)[None], cu_seq_lens_q=torch.tensor([0, 3]),
                 max_length_q=3, seq_idx=torch.zeros(1, 3), labels=torch.ones(1, 3))
    assert set(packing_arguments(batch)) == {"position_ids", "cu_seq_lens", "seq_idx"}
    assert packing_arguments(dict(input_ids=torch.ones(1, 3))) == {}


def _trainer_grads(tmp_path, capture, batch):
    """One SGD step's gradients of BridgeTrainer on ``batch`` (the task loss weighted 0: R alone)."""
    from transformers import TrainerCallback

    from hf_helpers import trainer_args
    from sbpet.hf import BridgeTrainer

    model, reg = _llama(2)
    grads = {}

    class Recorder(TrainerCallback):
        def on_pre_optimizer_step(self, args, state, control, **kwargs):
            grads.update({n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None})

    class OneBatch(torch.utils.data.Dataset):
        def __len__(self):
            return 1

        def __getitem__(self, i):
            return {k: v[0] for k, v in batch.items()}

    args = trainer_args(tmp_path, per_device_train_batch_size=1, max_steps=1, optim="sgd", max_grad_norm=0.0,
                        remove_unused_columns=False)
    trainer = BridgeTrainer(model=model, args=args, train_dataset=OneBatch(), bridge=reg, bridge_weight=1.0,
                            capture=capture, callbacks=[Recorder()],
                            data_collator=lambda rows: batch)
    trainer.compute_loss_func = None
    trainer.train()
    log = next(e for e in trainer.state.log_history if "bridge_loss" in e)
    return grads, log["bridge_loss"]


@pytest.mark.parametrize("capture", ["hooks", "hidden_states"])
def test_bridge_trainer_packed_equals_padded(tmp_path, capture):
    """BridgeTrainer passes the batch's position_ids on (from its host copy): the logged R and the
    step's gradients of the packed row equal the padded batch's."""
    (ids, mask, labels), (packed_ids, position_ids, packed_labels) = _batches(2)
    padded = dict(input_ids=ids, attention_mask=mask, labels=labels)
    packed = dict(input_ids=packed_ids, position_ids=position_ids, labels=packed_labels)
    want, want_r = _trainer_grads(tmp_path / "padded", capture, padded)
    got, got_r = _trainer_grads(tmp_path / "packed", capture, packed)
    assert abs(got_r - want_r) <= 1e-6 * abs(want_r)
    assert set(got) == set(want)
    # The task loss (a mean over each batch's tokens) is the same here: the same tokens are predicted.
    for name in want:
        _close(got[name], want[name], f"grad of {name}")


def test_trl_padding_free_collator_packs_like_padding(tmp_path):
    """TRL's own DataCollatorForLanguageModeling(padding_free=True) makes the packed batch: hooks
    armed with packing_arguments of it give the padded batch's R and gradients."""
    trl = pytest.importorskip("trl")
    from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

    model, reg = _llama(3)
    (ids, mask, labels), _ = _batches(3)
    examples = [{"input_ids": ids[b, : n].tolist()} for b, n in enumerate(LENGTHS)]
    batch = DataCollatorForLanguageModeling(pad_token_id=0, padding_free=True, return_position_ids=True)(examples)
    assert batch["input_ids"].shape == (1, sum(LENGTHS)) and "attention_mask" not in batch
    params = _trainable(model)

    def run(inputs, labels, mask, packing):
        capture = sbpet.BridgeCapture(model, reg)
        with capture.armed(labels, mask, **packing_arguments(packing)):
            model(**{k: v for k, v in inputs.items() if k in ("input_ids", "attention_mask", "position_ids")})
        loss = capture.loss()
        capture.remove()
        return loss, torch.autograd.grad(loss, params)

    want, want_grads = run(dict(input_ids=ids, attention_mask=mask), labels, mask, {})
    got, got_grads = run(batch, batch["labels"], None, batch)
    _close(got, want, "R")
    for i, (a, b) in enumerate(zip(got_grads, want_grads)):
        _close(a, b, f"grad of parameter {i}")
    del trl


def test_fit_mapping_packing_equals_padding(tmp_path, monkeypatch):
    """fit_mapping(packing=True) packs each step's texts into one row: the same R per step and the
    same fitted g as unpacked (the backbone kept apart by the block mask, as flash-attention would
    from the positions alone); without flash attention it refuses, naming the fix."""
    from hf_helpers import tiny_texts, tiny_tokenizer
    from sbpet.hf import fitting

    tokenizer = tiny_tokenizer(tmp_path)
    texts = tiny_texts(12)

    def fit(packing):
        model, reg = _llama(4)
        _separate_packed_sequences(model.model)  # fit_mapping runs the backbone
        history = sbpet.fit_mapping(model, tokenizer, texts, reg, steps=3, batch_size=4, progress=False,
                                    log_every=1, packing=packing, max_grad_norm=0.0)
        return history["loss"], [p.detach().clone() for p in reg.mapping.parameters()]

    with pytest.raises(ValueError, match="attn_implementation='flash_attention_2'"):
        fit(True)
    monkeypatch.setattr(fitting, "_check_packing", lambda backbone: None)
    want, want_g = fit(False)
    got, got_g = fit(True)
    for a, b in zip(got, want):
        assert abs(a - b) <= 1e-6 * abs(b), (got, want)
    for i, (a, b) in enumerate(zip(got_g, want_g)):
        _close(a, b, f"fitted g parameter {i}")
