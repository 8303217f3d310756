"""Under FSDP with 2 processes the loss (task + alpha * R) and the gradients on the PET parameters
equal one process on the whole batch (one regularised [MASK] per sequence, so every rank has the
same number of regularised positions).

What runs where (torch 2.13, accelerate 1.15, transformers 5.23):

- torch's FSDP2 (``torch.distributed.fsdp.fully_shard``) and FSDP1 (``FullyShardedDataParallel``
  with ``device_id=cpu``, ``use_orig_params=True``) run on CPU tensors over gloo: gloo has the
  all-gather and reduce-scatter both need. Tested here, with BridgeCapture's hooks placed before
  sharding as BridgeTrainer places them.
- The Trainer's ``fsdp`` option cannot run on CPU: accelerate's ``AcceleratorState`` switches to
  ``DistributedType.FSDP`` only for GPU-class devices (MULTI_GPU, MULTI_NPU, MULTI_XPU, ...), never
  for MULTI_CPU, so ``TrainingArguments(fsdp=True, use_cpu=True)`` on several CPU processes wraps
  the model in DistributedDataParallel instead (tried: the Trainer's ``model_wrapped`` is a DDP
  module). That configuration is the CUDA-only test below, which benchmarks/gpu_check.py runs
  (``pytest tests`` on a CUDA machine), on as many GPUs as there are, up to 2 (NCCL needs a GPU per
  process; with one GPU it is FSDP over a single rank, which still runs the sharded forward,
  backward and gradient accumulation).
"""

import os
import socket
import sys

import pytest
import torch
import torch.distributed as dist

# spawned workers import this module and the shared helpers (tests/) by name
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from hf_helpers import assert_trainer_steps_match, init_gloo, spawn_workers  # noqa: E402

pytest.importorskip("peft")

ALPHA = 0.5
FLAVOURS = ("fsdp2", "fsdp1")


def _build():
    from peft import LoraConfig, TaskType, get_peft_model
    from transformers import BertForSequenceClassification

    from hf_helpers import LABEL_WORDS, MASK_ID, classification_batch, tiny_bert_config, tiny_regularizer
    from sbpet.hf import masked_lm_bridge_labels

    torch.manual_seed(0)
    base = BertForSequenceClassification(tiny_bert_config())
    model = get_peft_model(base, LoraConfig(task_type=TaskType.SEQ_CLS, r=4, target_modules=["query", "value"]))
    for name, p in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.05)
    model.train()  # dropout is off in the tiny config
    reg = tiny_regularizer(base).requires_grad_(False)
    ids, mask, y = classification_batch(batch=6, seed=4)
    labels = masked_lm_bridge_labels(ids, y, MASK_ID, LABEL_WORDS)
    return model, reg, ids, mask, y, labels


def _loss(model, capture, ids, mask, y, labels):
    with capture.armed(labels, mask):
        out = model(input_ids=ids, attention_mask=mask, labels=y)
    return out.loss + ALPHA * capture.loss()


def _shard(model, flavour):
    from transformers.models.bert.modeling_bert import BertLayer

    from sbpet.hf import find_backbone_and_layers

    if flavour == "fsdp2":
        from torch.distributed.fsdp import fully_shard

        for layer in find_backbone_and_layers(model)[1]:
            fully_shard(layer)
        fully_shard(model)
        return model
    from torch.distributed.fsdp import FullyShardedDataParallel
    from torch.distributed.fsdp.wrap import ModuleWrapPolicy

    return FullyShardedDataParallel(model, auto_wrap_policy=ModuleWrapPolicy({BertLayer}),
                                    device_id=torch.device("cpu"), use_orig_params=True)


def _full_grads(sharded, flavour):
    """The PET parameters' whole gradients (after FSDP's reduce-scatter), by clean name."""
    if flavour == "fsdp2":
        return {n: p.grad.full_tensor().clone() for n, p in sharded.named_parameters() if p.grad is not None}
    from torch.distributed.fsdp import FullyShardedDataParallel

    # A flat parameter mixes frozen and PET parameters; the frozen ones show (zero) gradients.
    with FullyShardedDataParallel.summon_full_params(sharded, with_grads=True):
        return {n.replace("_fsdp_wrapped_module.", ""): p.grad.clone()
                for n, p in sharded.named_parameters() if p.grad is not None and p.requires_grad}


def _worker(rank, world, store, out):
    init_gloo(rank, world, store)
    try:
        from sbpet.hf import BridgeCapture

        results = {}
        for flavour in FLAVOURS:
            model, reg, ids, mask, y, labels = _build()
            capture = BridgeCapture(model, reg)  # hooks first, then sharding, as in BridgeTrainer
            sharded = _shard(model, flavour)
            part = slice(rank * 3, rank * 3 + 3)
            loss = _loss(sharded, capture, ids[part], mask[part], y[part], labels[part])
            loss.backward()
            mean_loss = loss.detach().clone()
            dist.all_reduce(mean_loss)
            results[flavour] = (mean_loss / world, _full_grads(sharded, flavour))
        if rank == 0:
            torch.save(results, out)
        dist.barrier()
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_fsdp_on_cpu_equals_single_process(tmp_path):
    from sbpet.hf import BridgeCapture

    out = str(tmp_path / "fsdp.pt")
    spawn_workers(_worker, (2, str(tmp_path / "store"), out), "FSDP", nprocs=2)
    sharded = torch.load(out)
    model, reg, ids, mask, y, labels = _build()
    loss = _loss(model, BridgeCapture(model, reg), ids, mask, y, labels)
    loss.backward()
    single = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    assert any("lora" in n for n in single) and any("classifier" in n for n in single)
    for flavour in FLAVOURS:
        distributed_loss, grads = sharded[flavour]
        torch.testing.assert_close(distributed_loss, loss.detach(), rtol=1e-5, atol=1e-7)
        assert grads.keys() == single.keys(), flavour
        for name, grad in single.items():
            torch.testing.assert_close(grads[name], grad, rtol=1e-4, atol=1e-6, msg=lambda m: f"{flavour} {name}: {m}")


# ------------------------------------------------------------------------------------------------
# The Trainer's fsdp option: CUDA only (see the module docstring)

TRAINER_KINDS = ("seq_cls_lora", "causal_lm")
LAYER_CLASSES = {"seq_cls_lora": "BertLayer", "causal_lm": "GPT2Block"}


def _trainer_args(output_dir, kind=None):
    from transformers import TrainingArguments

    fsdp = {} if kind is None else dict(fsdp=True, fsdp_config={"version": 2, "transformer_layer_cls_to_wrap":
                                                                [LAYER_CLASSES[kind]]})
    return TrainingArguments(output_dir=output_dir, report_to=[], save_strategy="no", disable_tqdm=True, seed=0, **fsdp)


def _trainer_worker(rank, world, store, port, out):
    os.environ.update({"RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": str(world),
                       "LOCAL_WORLD_SIZE": str(world), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)})
    torch.cuda.set_device(rank)
    try:
        from hf_helpers import trainer_one_step

        results = {}
        for kind in TRAINER_KINDS:
            # world x batch 1 x GA 4 / world: the 4 examples in one optimizer step
            results[kind] = trainer_one_step(_trainer_args(f"{store}-{kind}-{rank}", kind), kind, 1, 4 // world)
        if rank == 0:
            torch.save(results, out)
        dist.barrier()
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
@pytest.mark.skipif(not torch.cuda.is_available(), reason="the Trainer's fsdp option needs CUDA: accelerate turns "
                    "FSDP on only for GPU-class devices and uses DDP for CPU processes")
def test_bridge_trainer_fsdp_option_equals_single_process(tmp_path):
    """BridgeTrainer with ``fsdp=True`` (FSDP2 through accelerate) on up to 2 GPUs, batch 1 and
    gradient accumulation, gives the gradients and logs of one process without FSDP at batch 4."""
    from hf_helpers import trainer_one_step

    world = min(2, torch.cuda.device_count())
    out = str(tmp_path / "trainer_fsdp.pt")
    spawn_workers(_trainer_worker, (world, str(tmp_path / "store"), _free_port(), out), "BridgeTrainer FSDP",
                  nprocs=world, limit_s=300)
    sharded = torch.load(out)
    assert_trainer_steps_match(sharded, TRAINER_KINDS,
                               lambda kind: trainer_one_step(_trainer_args(str(tmp_path / kind)), kind, 4, 1))
