"""Under DistributedDataParallel with 2 CPU processes (gloo), the regulariser's gradients on the
PET parameters equal one process on the whole batch (one regularised [MASK] per sequence, so
every rank has the same number of regularised positions), by hand and through BridgeTrainer
(accelerate's MULTI_CPU DDP, with gradient accumulation)."""

import os
import sys

import pytest
import torch
import torch.distributed as dist

# spawned workers import this module and the shared helpers (tests/) by name
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from hf_helpers import assert_trainer_steps_match, init_gloo, spawn_workers  # noqa: E402

pytest.importorskip("peft")


def _build():
    from peft import LoraConfig, TaskType, get_peft_model
    from transformers import BertForSequenceClassification

    from hf_helpers import LABEL_WORDS, MASK_ID, classification_batch, tiny_bert_config, tiny_regularizer
    from sbpet.hf import masked_lm_bridge_labels

    torch.manual_seed(0)
    base = BertForSequenceClassification(tiny_bert_config()).eval()
    model = get_peft_model(base, LoraConfig(task_type=TaskType.SEQ_CLS, r=4, target_modules=["query", "value"]))
    for name, p in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.05)
    reg = tiny_regularizer(base).requires_grad_(False)
    ids, mask, y = classification_batch(batch=6, seed=4)
    labels = masked_lm_bridge_labels(ids, y, MASK_ID, LABEL_WORDS)
    return model, reg, ids, mask, labels


def _grads(model, reg, ids, mask, labels):
    from sbpet.hf import BridgeCapture

    capture = BridgeCapture(model, reg)
    with capture.armed(labels, mask):
        out = model(input_ids=ids, attention_mask=mask)
    # DDP reduces a bucket once every parameter in it has its gradient; R alone never reaches the
    # classifier head, so keep the output in the graph with weight 0 (as task + alpha * R does).
    (capture.loss() + 0.0 * out.logits.sum()).backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None and "classifier" not in n}


def _worker(rank, world, store, out):
    init_gloo(rank, world, store)
    try:
        model, reg, ids, mask, labels = _build()
        ddp = torch.nn.parallel.DistributedDataParallel(model)
        part = slice(rank * 3, rank * 3 + 3)
        grads = _grads(ddp, reg, ids[part], mask[part], labels[part])
        if rank == 0:
            torch.save({n.removeprefix("module."): g for n, g in grads.items()}, out)
        dist.barrier()
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_ddp_gradients_equal_single_process(tmp_path):
    out = str(tmp_path / "ddp_grads.pt")
    spawn_workers(_worker, (2, str(tmp_path / "store"), out), "DDP")
    distributed = torch.load(out)
    model, reg, ids, mask, labels = _build()
    single = _grads(model, reg, ids, mask, labels)
    assert distributed.keys() == single.keys() and single
    for name, grad in single.items():
        torch.testing.assert_close(distributed[name], grad, rtol=1e-4, atol=1e-7, msg=lambda m: f"{name}: {m}")


TRAINER_KINDS = ("seq_cls_lora", "causal_lm")  # a loss that ignores num_items_in_batch, one that uses it


def _trainer_args(output_dir):
    from transformers import TrainingArguments

    return TrainingArguments(output_dir=output_dir, report_to=[], use_cpu=True, save_strategy="no",
                             disable_tqdm=True, seed=0)


def _trainer_worker(rank, world, store, out):
    # accelerate sees a torchrun-style environment and the process group already set up (file
    # rendezvous, as above), and takes it as MULTI_CPU: the Trainer wraps the model in DDP.
    os.environ.update({"RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": str(world),
                       "LOCAL_WORLD_SIZE": str(world), "OMP_NUM_THREADS": "1"})
    init_gloo(rank, world, store)
    try:
        from hf_helpers import trainer_one_step

        results = {}
        for kind in TRAINER_KINDS:
            # 2 processes x batch 1 x GA 2: the 4 examples in one optimizer step
            results[kind] = trainer_one_step(_trainer_args(f"{store}-{kind}-{rank}"), kind, 1, 2)
        if rank == 0:
            torch.save(results, out)
        dist.barrier()
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_bridge_trainer_under_ddp_equals_single_process(tmp_path):
    """BridgeTrainer on 2 processes, batch 1 and gradient accumulation 2 each, gives the gradient
    (after DDP's reduction) and logs of one process at batch 4: for a sequence classifier, whose
    loss ignores num_items_in_batch (without the check the Trainer scaled its task loss by
    GA x processes = 4), and for a causal LM, whose loss divides by the count gathered over the
    processes."""
    from hf_helpers import trainer_one_step

    out = str(tmp_path / "trainer_ddp.pt")
    spawn_workers(_trainer_worker, (2, str(tmp_path / "store"), out), "BridgeTrainer DDP")
    distributed = torch.load(out)
    assert_trainer_steps_match(distributed, TRAINER_KINDS,
                               lambda kind: trainer_one_step(_trainer_args(str(tmp_path / kind)), kind, 4, 1))
