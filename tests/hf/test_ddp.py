"""Under DistributedDataParallel with 2 CPU processes (gloo), the regulariser's gradients on the
PET parameters equal one process on the whole batch (one regularised [MASK] per sequence, so
every rank has the same number of regularised positions)."""

import os
import sys
import time
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

# spawned workers import this module and the shared helpers (tests/) by name
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

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
    # Loopback only, a file rendezvous (no port to race for) and a timeout, so a broken run fails
    # instead of hanging CI.
    os.environ["GLOO_SOCKET_IFNAME"] = "lo"
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", init_method=f"file://{store}", rank=rank, world_size=world, timeout=timedelta(seconds=60)
    )
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
    context = mp.spawn(_worker, args=(2, str(tmp_path / "store"), out), nprocs=2, join=False)
    deadline = time.monotonic() + 180
    while not context.join(timeout=5):
        if time.monotonic() > deadline:
            for process in context.processes:
                process.kill()
            pytest.fail("the 2-process DDP run did not finish in 180 s")
    distributed = torch.load(out)
    model, reg, ids, mask, labels = _build()
    single = _grads(model, reg, ids, mask, labels)
    assert distributed.keys() == single.keys() and single
    for name, grad in single.items():
        torch.testing.assert_close(distributed[name], grad, rtol=1e-4, atol=1e-7, msg=lambda m: f"{name}: {m}")
