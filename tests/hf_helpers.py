"""Tiny randomly initialised Hugging Face models and data for the integration tests (no hub)."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch

import sbpet

VOCAB = 97
MASK_ID = 4
LABEL_WORDS = (10, 20, 30)


def tiny_bert_config(**kw):
    from transformers import BertConfig

    args = dict(
        vocab_size=VOCAB, hidden_size=32, num_hidden_layers=3, num_attention_heads=4,
        intermediate_size=37, max_position_embeddings=64, hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0, num_labels=len(LABEL_WORDS),
    )
    args.update(kw)
    return BertConfig(**args)


def tiny_gpt2_config(**kw):
    from transformers import GPT2Config

    args = dict(vocab_size=VOCAB, n_embd=32, n_layer=3, n_head=4, n_positions=64,
                resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, pad_token_id=0)
    args.update(kw)
    return GPT2Config(**args)


def tiny_regularizer(model, shift_labels=False, dims=(24, 6), bridge="brownian"):
    cfg = model.config
    return sbpet.BridgeRegularizer(
        cfg.hidden_size, cfg.num_hidden_layers, dims=dims, bridge=bridge,
        word_embeddings=model.get_input_embeddings().weight, shift_labels=shift_labels,
        backend="torch",
    )


def classification_batch(batch=4, seq=11, seed=0, mask_token=True):
    """input_ids with one [MASK] (id MASK_ID) per sequence, right padding, class labels."""
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, VOCAB, (batch, seq), generator=gen)
    mask = torch.ones(batch, seq, dtype=torch.long)
    for b in range(1, batch):
        mask[b, seq - 1 - 2 * (b % 3):] = 0
    ids[mask == 0] = 0
    if mask_token:
        for b in range(batch):
            ids[b, int(mask[b].sum()) - 2] = MASK_ID
    labels = torch.randint(0, len(LABEL_WORDS), (batch,), generator=gen)
    return ids, mask, labels


def collate(rows):
    """Stack a list of example dicts into a batch."""
    return {k: torch.stack([r[k] for r in rows]) for k in rows[0]}


ACCUMULATION_KINDS = ("masked_lm", "seq_cls_lora", "seq_cls_bitfit", "causal_lm")


def accumulation_setup(kind):
    """(PET model, its base model, 4 examples, regulariser) for the gradient-accumulation checks:
    a LoRA masked LM (BERT), a LoRA or BitFit sequence classifier (BERT), a LoRA causal LM
    (GPT-2). Seeded, dropout off, the same number of regularised positions in every example."""
    from peft import LoraConfig, TaskType, get_peft_model
    from transformers import BertForMaskedLM, BertForSequenceClassification, GPT2LMHeadModel

    from sbpet.hf import apply_bitfit, masked_lm_bridge_labels

    torch.manual_seed(0)
    if kind == "causal_lm":
        base = GPT2LMHeadModel(tiny_gpt2_config())
        model = get_peft_model(base, LoraConfig(task_type=TaskType.CAUSAL_LM, r=4, target_modules=["c_attn"]))
        ids = torch.randint(5, VOCAB, (4, 9), generator=torch.Generator().manual_seed(3))  # no padding
        data = [{"input_ids": ids[i], "attention_mask": torch.ones(9, dtype=torch.long), "labels": ids[i]}
                for i in range(4)]
        reg = tiny_regularizer(base, shift_labels=True)
    else:
        ids, mask, y = classification_batch(batch=4, seed=5)
        bridge_labels = masked_lm_bridge_labels(ids, y, MASK_ID, LABEL_WORDS)
        if kind == "masked_lm":
            base = BertForMaskedLM(tiny_bert_config())
            model = get_peft_model(base, LoraConfig(r=4, target_modules=["query", "value"]))
            labels = bridge_labels  # the [MASK] predicts the label word
        elif kind == "seq_cls_bitfit":
            model = base = BertForSequenceClassification(tiny_bert_config())
            apply_bitfit(base)
            labels = y
        else:
            base = BertForSequenceClassification(tiny_bert_config())
            model = get_peft_model(base, LoraConfig(task_type=TaskType.SEQ_CLS, r=4, target_modules=["query", "value"]))
            labels = y
        data = [{"input_ids": ids[i], "attention_mask": mask[i], "labels": labels[i],
                 "bridge_labels": bridge_labels[i]} for i in range(4)]
        reg = tiny_regularizer(base)
    for name, p in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.1)
    return model, base, data, reg


def trainer_one_step(args, kind, batch_size, accumulation, capture="hooks", bridge_weight=2.0):
    """One plain-SGD optimizer step of BridgeTrainer on :func:`accumulation_setup`'s 4 examples
    in order, at ``batch_size`` x ``accumulation`` per process (``args``: TrainingArguments to
    copy). Returns the accumulated gradients of the trainable parameters just before the step
    (after any DDP/FSDP reduction) and the step's log entry."""
    import dataclasses

    from transformers import TrainerCallback

    from sbpet.hf import BridgeTrainer

    model, _, data, reg = accumulation_setup(kind)
    args = dataclasses.replace(
        args, per_device_train_batch_size=batch_size, gradient_accumulation_steps=accumulation, max_steps=1,
        optim="sgd", learning_rate=1.0, lr_scheduler_type="constant", max_grad_norm=0.0, logging_steps=1,
    )
    grads = {}

    class Recorder(TrainerCallback):
        def on_pre_optimizer_step(self, args, state, control, **kwargs):
            for name, p in model.named_parameters():
                if p.requires_grad and p.grad is not None:
                    grad = p.grad.full_tensor() if hasattr(p.grad, "full_tensor") else p.grad  # FSDP2: DTensor
                    grads[name] = grad.detach().cpu().clone()

    trainer = BridgeTrainer(model=model, args=args, train_dataset=data, data_collator=collate, bridge=reg,
                            bridge_weight=bridge_weight, capture=capture, callbacks=[Recorder()])
    if trainer.accelerator.num_processes == 1:
        trainer.get_train_dataloader = lambda: torch.utils.data.DataLoader(data, batch_size=batch_size,
                                                                           collate_fn=collate)
    trainer.train()
    return grads, next(e for e in trainer.state.log_history if "bridge_loss" in e)


WORDS = ("the cat dog sat on mat ran fast slow market shares rose fell team won lost game film "
         "star music vote party election minister phone software chip profit bank").split()


def tiny_tokenizer(directory):
    """A BertTokenizerFast over a small vocabulary written to ``directory`` (no hub)."""
    from transformers import BertTokenizerFast

    special = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    vocab = special + WORDS + [f"w{i}" for i in range(VOCAB - len(special) - len(WORDS))]
    tokenizer = BertTokenizerFast(vocab={word: i for i, word in enumerate(vocab[:VOCAB])})
    tokenizer.save_pretrained(str(directory))
    return tokenizer


def tiny_texts(count=24, seed=0):
    gen = torch.Generator().manual_seed(seed)
    texts = []
    for _ in range(count):
        n = int(torch.randint(4, 14, (1,), generator=gen))
        texts.append(" ".join(WORDS[int(i)] for i in torch.randint(len(WORDS), (n,), generator=gen)))
    return texts


def tiny_model_and_corpus(root):
    """A tiny random BertModel + tokenizer saved under root/model and a 3-class corpus of
    <class>/*.txt under root/data, in the layout the CLI reads (no hub, no demo packages)."""
    from transformers import BertModel

    model_dir, data_dir = os.path.join(str(root), "model"), os.path.join(str(root), "data")
    os.makedirs(model_dir, exist_ok=True)
    torch.manual_seed(0)
    BertModel(tiny_bert_config()).save_pretrained(model_dir)
    tiny_tokenizer(model_dir)
    topics = {"film": "film star music", "game": "team won lost game", "market": "market shares rose fell profit bank"}
    gen = torch.Generator().manual_seed(0)
    for name, words in topics.items():
        folder = os.path.join(data_dir, name)
        os.makedirs(folder, exist_ok=True)
        words = words.split()
        for i in range(8):
            text = " ".join(words[int(j)] for j in torch.randint(len(words), (8,), generator=gen))
            with open(os.path.join(folder, f"{i:03d}.txt"), "w") as f:
                f.write(text + " the cat sat\n")
    return model_dir, data_dir


def classification_data(n=8, seed=0):
    """n examples of the tiny prompt classification task as dicts (with bridge_labels)."""
    from sbpet.hf import masked_lm_bridge_labels

    ids, mask, y = classification_batch(batch=n, seed=seed)
    labels = masked_lm_bridge_labels(ids, y, MASK_ID, LABEL_WORDS)
    return [
        {"input_ids": ids[i], "attention_mask": mask[i], "labels": y[i], "bridge_labels": labels[i]}
        for i in range(n)
    ]


def trainer_args(tmp_path, **kw):
    """TrainingArguments for a few quick CPU steps (no saving, no logging integrations)."""
    from transformers import TrainingArguments

    args = dict(output_dir=str(tmp_path), per_device_train_batch_size=4, max_steps=3, logging_steps=1,
                learning_rate=1e-2, report_to=[], use_cpu=True, save_strategy="no", disable_tqdm=True,
                remove_unused_columns=True, seed=0)
    args.update(kw)
    return TrainingArguments(**args)


def pet_model(method):
    """(PET model, its base) for "lora", "prompt", "ia3" or "bitfit" on a tiny BERT classifier."""
    from peft import IA3Config, LoraConfig, PromptTuningConfig, TaskType, get_peft_model
    from transformers import BertForSequenceClassification

    from sbpet.hf import apply_bitfit

    torch.manual_seed(0)
    base = BertForSequenceClassification(tiny_bert_config())
    if method == "bitfit":
        apply_bitfit(base)  # the new classifier head trains too
        return base, base
    config = {
        "lora": LoraConfig(task_type=TaskType.SEQ_CLS, r=4, target_modules=["query", "value"]),
        "prompt": PromptTuningConfig(task_type=TaskType.SEQ_CLS, num_virtual_tokens=4),
        "ia3": IA3Config(task_type=TaskType.SEQ_CLS, target_modules=["key", "value", "output.dense"],
                         feedforward_modules=["output.dense"]),
    }[method]
    return get_peft_model(base, config), base


def _watched(rank, worker, dump_after_s, *args):
    # A worker that hangs prints every thread's stack to stderr before the parent kills it, so a
    # timeout in CI says where the processes stood (pytest shows the captured stderr). Left armed
    # after the worker returns: a hang while the process exits (atexit, a group's teardown) shows too.
    import faulthandler

    faulthandler.dump_traceback_later(dump_after_s, exit=False)
    worker(rank, *args)


def spawn_workers(worker, args, what, nprocs=2, limit_s=180):
    """Run ``worker(rank, *args)`` in ``nprocs`` spawned processes; fail the test (killing them)
    if they have not finished after ``limit_s`` seconds. A process still running 10 s before the
    limit writes its threads' stacks to stderr first."""
    import time

    import torch.multiprocessing as mp

    context = mp.spawn(_watched, args=(worker, max(limit_s - 10, 1), *args), nprocs=nprocs, join=False)
    deadline = time.monotonic() + limit_s
    while not context.join(timeout=5):
        if time.monotonic() > deadline:
            for process in context.processes:
                process.kill()
            pytest.fail(f"the {nprocs}-process {what} run did not finish in {limit_s} s "
                        "(the workers' stacks, if they hung in Python, are in the captured stderr)")


def init_gloo(rank, world, store):
    """Join a CPU (gloo) process group of ``world`` processes: loopback only, a file rendezvous at
    ``store`` (no port to race for) and a timeout, so a broken run fails instead of hanging CI."""
    import os
    from datetime import timedelta

    import torch.distributed as dist

    os.environ["GLOO_SOCKET_IFNAME"] = "lo"
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world,
                            timeout=timedelta(seconds=60))


def assert_trainer_steps_match(results, kinds, one_process):
    """Each of ``kinds``: the gradients and logs (loss, task_loss, bridge_loss) of a multi-process
    step (``results[kind]`` = (grads, log)) equal ``one_process(kind)``'s."""
    for kind in kinds:
        single_grads, single_log = one_process(kind)
        grads, log = results[kind]
        assert grads.keys() == single_grads.keys() and grads
        for name, grad in single_grads.items():
            torch.testing.assert_close(grads[name], grad, rtol=1e-4, atol=1e-6, msg=lambda m: f"{kind} {name}: {m}")
        for key in ("loss", "task_loss", "bridge_loss"):
            assert log[key] == pytest.approx(single_log[key], rel=1e-5), (kind, key)


def documented_fitting_order(texts, batch_size, seed, steps):
    """fit_mapping's batches of a list, written out from its docs (not from its code): text k of
    the run is randperm(n)[k % n] under the seed seed * 7919 + k // n."""
    n = len(texts)
    out = []
    for k in range(steps * batch_size):
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 7919 + k // n))
        out.append(texts[int(perm[k % n])])
    return [out[i:i + batch_size] for i in range(0, len(out), batch_size)]


# ----------------------------------------------------------------------------------------------
# A tiny Llama with LoRA for the LLM route (tests/hf/test_trainer.py, tests/hf/test_sft.py)

LLAMA_LORA_TARGETS = ("q_proj", "v_proj")


def tiny_llama(seed=0):
    """A tiny random LlamaForCausalLM (hidden 32, 2 layers, sdpa attention, float32)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        intermediate_size=40, max_position_embeddings=64, pad_token_id=0, bos_token_id=2, eos_token_id=3,
    )
    config._attn_implementation = "sdpa"
    return LlamaForCausalLM(config)


def llama_regularizer(model, shift_labels=True):
    return sbpet.BridgeRegularizer(32, 2, dims=(24, 6), word_embeddings=model.get_input_embeddings().weight,
                                   shift_labels=shift_labels, backend="torch")


def llama_lora_config():
    from peft import LoraConfig

    return LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=list(LLAMA_LORA_TARGETS))


def spread_lora_b(model):
    """LoRA's B starts at zero; a random one makes the LoRA gradients depend on everything."""
    gen = torch.Generator().manual_seed(11)
    for name, p in model.named_parameters():
        if "lora_B" in name:
            with torch.no_grad():
                p.copy_(torch.randn(p.shape, generator=gen) * 0.1)


def unequal_examples():
    """(input ids, completion mask) of two sequences, 40 and 36 tokens: the first trains on its
    last 3 tokens, the second on 32 (after the causal shift: 3 and 32 regularised positions)."""
    gen = torch.Generator().manual_seed(7)
    ids = torch.randint(5, VOCAB, (2, 40), generator=gen)
    return [(ids[0].tolist(), [0] * 37 + [1] * 3), (ids[1, :36].tolist(), [0] * 4 + [1] * 32)]


def grad_recorder():
    """A TrainerCallback keeping the trainable parameters' gradients just before the optimizer
    step (in ``.grads``)."""
    from transformers import TrainerCallback

    class GradRecorder(TrainerCallback):
        def __init__(self):
            self.grads = {}

        def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
            for name, p in model.named_parameters():
                if p.requires_grad and p.grad is not None:
                    self.grads[name] = p.grad.detach().clone()

    return GradRecorder()


def in_order(trainer):
    """Train on the dataset in its order (no shuffling)."""
    trainer._get_train_sampler = lambda *args, **kwargs: torch.utils.data.SequentialSampler(trainer.train_dataset)
    return trainer


def assert_same_step(whole, whole_log, accumulated, acc_log):
    """An accumulated optimizer step (gradients of the LoRA parameters and its logged R and task
    loss) equals one step on the whole batch (q and v, A and B, 2 layers: 8 tensors)."""
    assert whole.keys() == accumulated.keys() and len(whole) == 8
    for name in whole:
        torch.testing.assert_close(accumulated[name], whole[name], rtol=1e-5, atol=1e-7,
                                   msg=lambda m: f"{name}: {m}")
    assert acc_log["bridge_loss"] == pytest.approx(whole_log["bridge_loss"], rel=1e-5)
    assert acc_log["task_loss"] == pytest.approx(whole_log["task_loss"], rel=1e-5)
