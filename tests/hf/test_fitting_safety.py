"""fit_mapping's files (issue 34): no code runs from a planted pickle (findings 1), resume=False
deletes only a checkpoint's own files (3), one fit per checkpoint_dir, even from two processes
(4), a crash between any two file operations of a save resumes exactly (5), a half-written
checkpoint is reported with its repair (5), the resume signature covers every hyperparameter and
the model (7)."""

import os
import shutil
import sys
import time

import pytest
import torch
from transformers import BertForMaskedLM

# spawned workers import this module and the shared helpers (tests/) by name
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import sbpet.hf.fitting as fitting  # noqa: E402
from hf_helpers import tiny_bert_config, tiny_regularizer, tiny_texts, tiny_tokenizer  # noqa: E402
from sbpet.hf.fitting import fit_mapping  # noqa: E402

FIT = dict(steps=2, batch_size=4, progress=False, seed=1, save_every=1)


def _setup(tmp_path, seed=0):
    torch.manual_seed(seed)
    model = BertForMaskedLM(tiny_bert_config())
    torch.manual_seed(100)
    return model, tiny_tokenizer(tmp_path), tiny_texts(), tiny_regularizer(model)


def _fresh(model, reg):
    fresh = tiny_regularizer(model)
    fresh.load_state_dict(reg.state_dict())
    return fresh


class _Evil:
    """A pickle that creates ``path`` when it is unpickled: code running from a file."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


def _stop_after_first_save(monkeypatch):
    real = fitting._save_checkpoint

    def save_then_stop(*args):
        real(*args)
        raise KeyboardInterrupt

    monkeypatch.setattr(fitting, "_save_checkpoint", save_then_stop)
    return real


@pytest.mark.parametrize("planted", ["fit_state.pt", "engine/optimizer.bin", "engine/scheduler.bin",
                                     "engine/random_states_0.pkl"])
def test_no_code_runs_from_a_planted_pickle(tmp_path, monkeypatch, planted):
    model, tokenizer, texts, reg = _setup(tmp_path)
    ckpt = tmp_path / "ckpt"
    real = _stop_after_first_save(monkeypatch)
    with pytest.raises(KeyboardInterrupt):
        fit_mapping(model, tokenizer, texts, _fresh(model, reg), checkpoint_dir=ckpt, **FIT)
    monkeypatch.setattr(fitting, "_save_checkpoint", real)
    saved = ckpt / "checkpoint"
    marker = tmp_path / "pwned"
    if planted == "fit_state.pt":  # the format of earlier versions, with a malicious object inside
        for name in ("fit_state.json", "fit_state.pt"):
            if (saved / name).exists():
                (saved / name).unlink()
        torch.save({"step": 1, "history": [0.0], "signature": _Evil(str(marker))}, saved / planted)
    else:
        torch.save({"state": _Evil(str(marker))}, saved / planted)
    try:
        fit_mapping(model, tokenizer, texts, _fresh(model, reg), checkpoint_dir=ckpt, **FIT)
    except ValueError as exc:  # refused: with the way to repair it
        assert "resume=False" in str(exc) and "cannot be read safely" in str(exc), exc
    else:  # accelerate reads its random states weights_only and goes on without them
        assert planted == "engine/random_states_0.pkl"
    assert not marker.exists(), f"unpickling {planted} ran code"


def _straight(model, tokenizer, texts, reg):
    straight = _fresh(model, reg)
    history = fit_mapping(model, tokenizer, texts, straight, **FIT)
    return straight, history["loss"]


def test_a_crash_between_any_two_file_operations_resumes_exactly(tmp_path, monkeypatch):
    """os.replace or shutil.rmtree fails at the k-th call of a checkpointed fit (an rmtree after
    deleting one file: a half-deleted folder), for every k; the rerun resumes to the g and loss
    history of an uninterrupted fit."""
    model, tokenizer, texts, reg = _setup(tmp_path)
    straight, losses = _straight(model, tokenizer, texts, reg)
    real_replace, real_rmtree = os.replace, shutil.rmtree
    k = 0
    while True:
        k += 1
        calls = [0]

        def counted(real, *args, **kwargs):
            calls[0] += 1
            if calls[0] == k:
                if real is real_rmtree and os.path.isdir(args[0]):
                    for root, _, names in os.walk(args[0]):
                        if names:
                            os.remove(os.path.join(root, names[0]))
                            break
                raise OSError(f"injected crash at file operation {k}")
            return real(*args, **kwargs)

        monkeypatch.setattr(os, "replace", lambda *a, **kw: counted(real_replace, *a, **kw))
        monkeypatch.setattr(shutil, "rmtree", lambda *a, **kw: counted(real_rmtree, *a, **kw))
        ckpt = tmp_path / f"ckpt{k}"
        reg_k = _fresh(model, reg)
        try:
            fit_mapping(model, tokenizer, texts, reg_k, checkpoint_dir=ckpt, **FIT)
            crashed = False
        except OSError as exc:
            assert "injected" in str(exc)
            crashed = True
        monkeypatch.setattr(os, "replace", real_replace)
        monkeypatch.setattr(shutil, "rmtree", real_rmtree)
        if not crashed:
            break
        resumed = _fresh(model, reg)
        history = fit_mapping(model, tokenizer, texts, resumed, checkpoint_dir=ckpt, **FIT)
        assert history["loss"] == pytest.approx(losses, rel=1e-5), k
        for name, value in straight.state_dict().items():
            torch.testing.assert_close(resumed.state_dict()[name], value, msg=f"crash at operation {k}: {name}")
        assert sorted(p.name for p in ckpt.iterdir()) == ["checkpoint", "checkpoint.lock"], k
    assert k > 8, f"only {k - 1} file operations were tried"


def test_a_half_written_checkpoint_is_reported_with_its_repair(tmp_path):
    model, tokenizer, texts, reg = _setup(tmp_path)
    ckpt = tmp_path / "ckpt"
    (ckpt / "checkpoint" / "engine").mkdir(parents=True)
    (ckpt / "checkpoint" / "sbpet_config.json").write_text("{}")
    with pytest.raises(ValueError, match=r"half-written.*resume=False \(sbpet fit --force\)"):
        fit_mapping(model, tokenizer, texts, _fresh(model, reg), checkpoint_dir=ckpt, **FIT)
    history = fit_mapping(model, tokenizer, texts, _fresh(model, reg), checkpoint_dir=ckpt, resume=False, **FIT)
    assert history["resumed_from"] == 0 and len(history["loss"]) == 2


def test_resume_false_deletes_only_what_a_checkpoint_holds(tmp_path):
    model, tokenizer, texts, reg = _setup(tmp_path)
    ckpt = tmp_path / "ckpt"
    fit_mapping(model, tokenizer, texts, _fresh(model, reg), checkpoint_dir=ckpt, **FIT)
    notes = ckpt / "checkpoint" / "notes.txt"
    notes.write_text("the user's")
    with pytest.raises(ValueError, match=r"notes\.txt, which sbpet did not write"):
        fit_mapping(model, tokenizer, texts, _fresh(model, reg), checkpoint_dir=ckpt, resume=False, **FIT)
    assert notes.read_text() == "the user's"
    notes.unlink()
    history = fit_mapping(model, tokenizer, texts, _fresh(model, reg), checkpoint_dir=ckpt, resume=False, **FIT)
    assert history["resumed_from"] == 0


@pytest.mark.parametrize("changed", [dict(learning_rate=5e-3), dict(weight_decay=0.0), dict(warmup_ratio=0.5),
                                     dict(max_grad_norm=0.5), dict(corrupt_inputs=False), dict(precision="tf32"),
                                     dict(mask_probability=0.3)])
def test_the_resume_signature_covers_every_hyperparameter(tmp_path, changed):
    model, tokenizer, texts, reg = _setup(tmp_path)
    ckpt = tmp_path / "ckpt"
    fit_mapping(model, tokenizer, texts, _fresh(model, reg), checkpoint_dir=ckpt, **FIT)
    with pytest.raises(ValueError, match=f"other settings \\({next(iter(changed))} differ"):
        fit_mapping(model, tokenizer, texts, _fresh(model, reg), checkpoint_dir=ckpt, **FIT, **changed)


def test_the_resume_signature_covers_the_model_and_the_bridge(tmp_path):
    model, tokenizer, texts, reg = _setup(tmp_path)
    ckpt = tmp_path / "ckpt"
    fit_mapping(model, tokenizer, texts, _fresh(model, reg), checkpoint_dir=ckpt, **FIT)
    other, *_ = _setup(tmp_path, seed=1)  # the same architecture, other weights
    with pytest.raises(ValueError, match=r"\(model differ"):
        fit_mapping(other, tokenizer, texts, tiny_regularizer(other), checkpoint_dir=ckpt, **FIT)
    with pytest.raises(ValueError, match=r"\(regularizer differ"):
        fit_mapping(model, tokenizer, texts, tiny_regularizer(model, bridge="ou"), checkpoint_dir=ckpt, **FIT)
    with pytest.raises(ValueError, match="fitted for another model"):  # g built for one model, fitted with another
        fit_mapping(other, tokenizer, texts, _fresh(model, reg), **FIT)


def _slow_fit_worker(root, ckpt, started):
    """A fit that holds its checkpoint_dir for a few seconds (each save waits 2 s)."""
    model, tokenizer, texts, reg = _setup(root)
    real = fitting._save_checkpoint

    def slow_save(*args):
        real(*args)
        open(started, "w").close()
        time.sleep(2)

    fitting._save_checkpoint = slow_save
    fit_mapping(model, tokenizer, texts, reg, checkpoint_dir=ckpt, **FIT)


def test_two_processes_never_fit_into_one_checkpoint_dir(tmp_path):
    """Two fits into one folder crashed one of them (FileNotFoundError 'checkpoint.partial' ->
    'checkpoint'); the second is now refused at once, and the first finishes whole."""
    import multiprocessing

    ckpt, started = tmp_path / "ckpt", tmp_path / "started"
    worker = multiprocessing.get_context("spawn").Process(target=_slow_fit_worker,
                                                          args=(tmp_path / "w", ckpt, started))
    worker.start()
    try:
        deadline = time.monotonic() + 120
        while not started.exists():
            assert worker.is_alive() and time.monotonic() < deadline, "the first fit did not start"
            time.sleep(0.1)
        model, tokenizer, texts, reg = _setup(tmp_path)
        with pytest.raises(ValueError, match="another fit is writing there"):
            fit_mapping(model, tokenizer, texts, _fresh(model, reg), checkpoint_dir=ckpt, **FIT)
        worker.join(120)
        assert worker.exitcode == 0
    finally:
        if worker.is_alive():
            worker.kill()
    history = fit_mapping(model, tokenizer, texts, _fresh(model, reg), checkpoint_dir=ckpt, **FIT)
    assert history["resumed_from"] == 2  # the first fit's checkpoint is whole
