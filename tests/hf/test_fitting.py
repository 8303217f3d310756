"""fit_mapping: R decreases, only g trains, the PLM is untouched, checkpoints resume exactly, a
list and a stream of the same texts give the same g, and so do one and two processes."""

import contextlib
import itertools
import os
import sys

import pytest
import torch
from transformers import BertForMaskedLM, GPT2LMHeadModel

# spawned workers import this module and the shared helpers (tests/) by name
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import sbpet.hf.fitting as fitting  # noqa: E402
from hf_helpers import (  # noqa: E402
    documented_fitting_order, init_gloo, spawn_workers, tiny_bert_config, tiny_gpt2_config, tiny_regularizer,
    tiny_texts, tiny_tokenizer,
)
from sbpet.hf.corpus import TextFiles  # noqa: E402
from sbpet.hf.fitting import fit_mapping  # noqa: E402
from sbpet.modules.regularizer import BridgeRegularizer  # noqa: E402


def _setup(tmp_path):
    torch.manual_seed(0)
    model = BertForMaskedLM(tiny_bert_config())
    return model, tiny_tokenizer(tmp_path), tiny_texts(), tiny_regularizer(model)


@contextlib.contextmanager
def _stopped_after_its_first_checkpoint():
    """fit_mapping, run inside, stops (KeyboardInterrupt, expected) right after writing its first
    checkpoint, as a crash would."""
    real_save = fitting._save_checkpoint

    def save_then_stop(*args):
        real_save(*args)
        raise KeyboardInterrupt

    fitting._save_checkpoint = save_then_stop
    try:
        with pytest.raises(KeyboardInterrupt):
            yield
    finally:
        fitting._save_checkpoint = real_save


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


def test_fit_checkpoint_resume_is_exact(tmp_path):
    model, tokenizer, texts, reg = _setup(tmp_path)
    straight = tiny_regularizer(model)
    straight.load_state_dict(reg.state_dict())
    fit_mapping(model, tokenizer, texts, straight, steps=8, batch_size=4, progress=False, seed=1)

    ckpt = tmp_path / "ckpt"
    with _stopped_after_its_first_checkpoint():  # R read back every 2 steps, and at the step-3 checkpoint
        fit_mapping(model, tokenizer, texts, reg, steps=8, batch_size=4, progress=False, seed=1,
                    checkpoint_dir=ckpt, save_every=3, log_every=2)
    assert len(fitting.read_fit_state(str(ckpt / "checkpoint"))["history"]) == 3
    engine = {p.name for p in (ckpt / "checkpoint" / "engine").iterdir()}  # accelerate's save_state
    assert {"optimizer.bin", "scheduler.bin", "model.safetensors"} <= engine, engine
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
    (ckpt / "checkpoint" / "fit_state.json").write_bytes(b"not json")
    with pytest.raises(ValueError, match="damaged"):
        fit_mapping(model, tokenizer, texts, tiny_regularizer(model), steps=8, batch_size=4,
                    progress=False, seed=1, checkpoint_dir=ckpt)


def test_a_checkpoint_from_before_the_engine_resumes(tmp_path):
    """A checkpoint written before accelerate held the engine state (optimizer and scheduler in
    fit_state.pt, no engine/) still resumes to the g of an uninterrupted run."""
    model, tokenizer, texts, reg = _setup(tmp_path)
    straight = tiny_regularizer(model)
    straight.load_state_dict(reg.state_dict())
    common = dict(steps=4, batch_size=4, progress=False, seed=1, save_every=2)
    fit_mapping(model, tokenizer, texts, straight, **common)
    ckpt = tmp_path / "ckpt"
    with _stopped_after_its_first_checkpoint():
        fit_mapping(model, tokenizer, texts, reg, checkpoint_dir=ckpt, **common)
    saved = ckpt / "checkpoint"
    state = fitting.read_fit_state(str(saved))
    state["optimizer"] = torch.load(saved / "engine" / "optimizer.bin", weights_only=True)
    state["scheduler"] = torch.load(saved / "engine" / "scheduler.bin", weights_only=True)
    torch.save(state, saved / "fit_state.pt")  # the format of earlier versions, read weights_only
    (saved / "fit_state.json").unlink()
    for path in (saved / "engine").iterdir():
        path.unlink()
    (saved / "engine").rmdir()
    resumed = tiny_regularizer(model)
    history = fit_mapping(model, tokenizer, texts, resumed, checkpoint_dir=ckpt, **common)
    assert history["resumed_from"] == 2
    for k, v in straight.state_dict().items():
        torch.testing.assert_close(resumed.state_dict()[k], v, msg=k)


def test_a_non_finite_r_is_reported_with_its_step(tmp_path, monkeypatch):
    """R is read back every log_every steps, not every step; a NaN R is an error naming its step."""
    model, tokenizer, texts, reg = _setup(tmp_path)
    calls = []
    real_loss = fitting.BridgeCapture.loss

    def nan_from_the_third(self):
        calls.append(None)
        loss = real_loss(self)
        return loss * float("nan") if len(calls) >= 3 else loss

    monkeypatch.setattr(fitting.BridgeCapture, "loss", nan_from_the_third)
    with pytest.raises(FloatingPointError, match="at step 2"):
        fit_mapping(model, tokenizer, texts, reg, steps=8, batch_size=4, progress=False, log_every=3)
    assert len(calls) == 3  # read back with steps 0 and 1 after step 2 (on the CPU the next step's eager
    # input check would also stop it: g is NaN by then)


def test_fsdp_and_deepspeed_engines_are_refused(tmp_path, monkeypatch):
    """accelerate's FSDP / DeepSpeed would shard g itself: refused, pointing at sharding the backbone."""
    from accelerate import Accelerator
    from accelerate.utils import DistributedType

    model, tokenizer, texts, reg = _setup(tmp_path)
    flags = [p.requires_grad for p in (*model.parameters(), *reg.parameters())]
    for kind in (DistributedType.FSDP, DistributedType.DEEPSPEED):
        monkeypatch.setattr(Accelerator, "distributed_type", property(lambda self, kind=kind: kind))
        with pytest.raises(ValueError, match=f"does not run under {kind.value}.*fully_shard"):
            fit_mapping(model, tokenizer, texts, reg, steps=1, batch_size=2, progress=False)
    assert flags == [p.requires_grad for p in (*model.parameters(), *reg.parameters())]  # refused before any change


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


def _state(reg):
    return {k: v.detach().clone() for k, v in reg.state_dict().items()}


def _endless_texts():
    """tiny_texts over and over, one at a time (never ends: fit_mapping must not hold it whole)."""
    return itertools.cycle(tiny_texts())


def test_fit_of_a_list_follows_the_documented_order(tmp_path):
    """A list is fitted in its documented order: a stream of the same texts in that order (whose
    batches are consecutive chunks) gives bit for bit the same losses and g."""
    model, tokenizer, texts, reg = _setup(tmp_path)
    streamed = tiny_regularizer(model)
    streamed.load_state_dict(reg.state_dict())
    common = dict(steps=7, batch_size=5, progress=False, seed=3, learning_rate=1e-2)  # batches cross epochs
    from_list = fit_mapping(model, tokenizer, texts, reg, **common)
    order = (t for batch in documented_fitting_order(texts, 5, 3, 7) for t in batch)
    from_stream = fit_mapping(model, tokenizer, order, streamed, **common)
    assert from_stream["loss"] == from_list["loss"]
    for k, v in _state(reg).items():
        assert torch.equal(streamed.state_dict()[k], v), k


def test_streamed_fit_resumes_where_it_stopped(tmp_path):
    """An endless generator trains at once; a run that stops (after its step-3 checkpoint) and is
    called again with the same generator skips the texts it used and ends with the g of a run that
    never stopped. Text files are a stream too."""
    model, tokenizer, _, reg = _setup(tmp_path)
    start = _state(reg)
    resumed = tiny_regularizer(model)
    resumed.load_state_dict(start)
    common = dict(steps=6, batch_size=4, progress=False, seed=1, save_every=3)
    straight = fit_mapping(model, tokenizer, _endless_texts(), reg, **common)

    ckpt = tmp_path / "ckpt"
    with _stopped_after_its_first_checkpoint():
        fit_mapping(model, tokenizer, _endless_texts(), resumed, checkpoint_dir=ckpt, **common)
    again = fit_mapping(model, tokenizer, _endless_texts(), resumed, checkpoint_dir=ckpt, **common)
    assert again["resumed_from"] == 3 and again["loss"] == straight["loss"]
    for k, v in _state(reg).items():
        assert torch.equal(resumed.state_dict()[k], v), k

    (tmp_path / "corpus").mkdir()
    (tmp_path / "corpus" / "a.txt").write_text("\n".join(tiny_texts()) + "\n")
    files = tiny_regularizer(model)
    files.load_state_dict(start)
    from_files = fit_mapping(model, tokenizer, TextFiles(str(tmp_path / "corpus" / "*.txt")), files, **common)
    assert from_files["loss"] == straight["loss"]  # the file's lines, cycled, are the same stream
    with pytest.raises(ValueError, match="texts is empty"):
        fit_mapping(model, tokenizer, iter([]), tiny_regularizer(model), steps=1)
    assert any(p.requires_grad for p in model.parameters())  # restored after the error too


def test_backbone_autocast(tmp_path):
    """backbone_dtype: off on the CPU by default, bf16 autocast when asked (recorded in the
    signature, with every other fitting setting), bad values named."""
    model, tokenizer, texts, reg = _setup(tmp_path)
    fit_mapping(model, tokenizer, texts, reg, steps=2, batch_size=4, progress=False, checkpoint_dir=tmp_path / "a")
    state = fitting.read_fit_state(str(tmp_path / "a" / "checkpoint"))
    assert state["signature"]["backbone_dtype"] is None
    history = fit_mapping(model, tokenizer, texts, reg, steps=2, batch_size=4, progress=False,
                          backbone_dtype="bf16", checkpoint_dir=tmp_path / "b")
    assert all(torch.isfinite(torch.tensor(history["loss"])))
    state = fitting.read_fit_state(str(tmp_path / "b" / "checkpoint"))
    assert state["signature"]["backbone_dtype"] == "bfloat16"
    with pytest.raises(ValueError, match="backbone_dtype"):
        fit_mapping(model, tokenizer, texts, reg, steps=1, backbone_dtype="int8")


FIT = dict(steps=6, batch_size=5, progress=False, seed=2, learning_rate=1e-2, save_every=3)


def _fresh(directory):
    torch.manual_seed(0)
    model = BertForMaskedLM(tiny_bert_config())
    return model, tiny_tokenizer(directory), tiny_regularizer(model)


def _shard_backbone(model):
    from torch.distributed.fsdp import fully_shard

    from sbpet.hf import find_backbone_and_layers

    backbone, layers = find_backbone_and_layers(model)
    for layer in layers:
        fully_shard(layer)
    fully_shard(backbone)


def _fitting_worker(rank, world, store, out):
    # what torchrun sets: accelerate, the engine under fit_mapping, reads the process group from it
    os.environ.update({"RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": str(world),
                       "LOCAL_WORLD_SIZE": str(world), "OMP_NUM_THREADS": "1"})
    init_gloo(rank, world, store)
    try:
        model, tokenizer, reg = _fresh(f"{store}-tok-{rank}")
        start = _state(reg)
        engines, real_engine = [], fitting._engine
        fitting._engine = lambda *a: engines.append(real_engine(*a)) or engines[-1]
        listed = fit_mapping(model, tokenizer, tiny_texts(), reg, **FIT)
        fitting._engine = real_engine
        results = {"list": (listed["loss"], _state(reg)), "engine": engines[0].distributed_type.value}
        # a backbone sharded by the caller (FSDP2: each layer, then the backbone as the root)
        sharded_model, _, sharded_reg = _fresh(f"{store}-tok-{rank}")
        _shard_backbone(sharded_model)
        sharded = fit_mapping(sharded_model, tokenizer, tiny_texts(), sharded_reg, **FIT)
        results["sharded"] = (sharded["loss"], _state(sharded_reg))
        # a streamed run that stops on every process after its step-3 checkpoint
        reg.load_state_dict(start)
        with _stopped_after_its_first_checkpoint():
            fit_mapping(model, tokenizer, _endless_texts(), reg, checkpoint_dir=f"{store}-ckpt", **FIT)
        results["stopped"] = True
        if rank == 0:
            torch.save(results, out)
        torch.distributed.barrier()
    finally:
        torch.distributed.destroy_process_group()


@pytest.mark.slow
def test_fit_on_two_processes_equals_one(tmp_path):
    """With 2 processes (gloo, accelerate's DDP on g) the batch of 5 is split 3 + 2 and the result
    is one process's: the same losses and g; also with the backbone sharded (FSDP2) by the caller. A streamed run stopped on 2 processes after its step-3 checkpoint and called
    again on 1 process ends with the g of an uninterrupted run."""
    store, out = str(tmp_path / "store"), str(tmp_path / "two.pt")
    spawn_workers(_fitting_worker, (2, store, out), "fit_mapping")
    two = torch.load(out)
    model, tokenizer, reg = _fresh(tmp_path)
    start = _state(reg)
    one = fit_mapping(model, tokenizer, tiny_texts(), reg, **FIT)
    losses, state = two["list"]
    torch.testing.assert_close(torch.tensor(losses), torch.tensor(one["loss"]), rtol=0, atol=1e-4)
    for k, v in _state(reg).items():
        torch.testing.assert_close(state[k], v, rtol=0, atol=1e-3, msg=lambda m: f"{k}: {m}")

    losses, state = two["sharded"]  # the backbone sharded over the 2 processes: the same fit
    torch.testing.assert_close(torch.tensor(losses), torch.tensor(one["loss"]), rtol=0, atol=1e-4)
    for k, v in _state(reg).items():
        torch.testing.assert_close(state[k], v, rtol=0, atol=1e-3, msg=lambda m: f"{k}: {m}")
    assert two["stopped"] and two["engine"] == "MULTI_CPU"  # accelerate ran the 2 processes
    reg.load_state_dict(start)
    straight = fit_mapping(model, tokenizer, _endless_texts(), reg, **FIT)
    resumed = tiny_regularizer(model)
    again = fit_mapping(model, tokenizer, _endless_texts(), resumed, checkpoint_dir=f"{store}-ckpt", **FIT)
    assert again["resumed_from"] == 3
    torch.testing.assert_close(torch.tensor(again["loss"]), torch.tensor(straight["loss"]), rtol=0, atol=1e-4)
    for k, v in _state(reg).items():
        torch.testing.assert_close(resumed.state_dict()[k], v, rtol=0, atol=1e-3, msg=lambda m: f"{k}: {m}")


_SCRIPT = """
import json, os, sys
sys.path.insert(0, {tests!r})
import torch
from transformers import BertForMaskedLM
from hf_helpers import tiny_bert_config, tiny_regularizer, tiny_texts, tiny_tokenizer
from sbpet.hf import fitting
from sbpet.hf.fitting import fit_mapping
torch.manual_seed(0)
model = BertForMaskedLM(tiny_bert_config())
reg = tiny_regularizer(model)
history = fit_mapping(model, tiny_tokenizer({tok!r} + os.environ["RANK"]), tiny_texts(), reg, **{fit!r})
if os.environ["RANK"] == "0":
    print("LOSSES", json.dumps([torch.distributed.get_world_size(), history["loss"], fitting._GROUP_CLOSED_AT_EXIT]))
"""


@pytest.mark.slow
def test_a_script_under_torchrun_needs_no_process_group_of_its_own(tmp_path):
    """`torchrun --nproc_per_node 2 fit_g.py` with no init_process_group in the script: the engine
    joins the launcher's group (gloo on the CPU) and the losses are one process's. The group the
    engine started is destroyed at exit (left to the interpreter's finalisation, gloo aborted a
    process in one CI run of five: "terminate called without an active exception")."""
    import json
    import subprocess

    fit = dict(FIT, save_every=100)
    script = tmp_path / "fit_g.py"
    tests = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    script.write_text(_SCRIPT.format(tests=tests, tok=str(tmp_path / "tok"), fit=fit))
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(script)]
    done = subprocess.run(command, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr[-3000:]
    (line,) = [x for x in done.stdout.splitlines() if x.startswith("LOSSES ")]
    world, losses, closed_at_exit = json.loads(line.removeprefix("LOSSES "))
    assert closed_at_exit == [True], "the group the engine started is not closed at exit"
    model, tokenizer, reg = _fresh(tmp_path)
    one = fit_mapping(model, tokenizer, tiny_texts(), reg, **fit)
    assert world == 2
    torch.testing.assert_close(torch.tensor(losses), torch.tensor(one["loss"]), rtol=0, atol=1e-4)
