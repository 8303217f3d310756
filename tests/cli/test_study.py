"""`sbpet study` on a tiny random BERT and corpus: the --quick grid's outputs, resume, a changed
alpha, a corrupted cache entry, and bad input named by its option before any slow work."""

import csv
import json
import re

import pytest

from hf_helpers import tiny_model_and_corpus
from sbpet.cli import experiment
from sbpet.cli import study
from sbpet.cli import main

pytest.importorskip("matplotlib")


@pytest.fixture
def tiny(tmp_path):
    model_dir, data_dir = tiny_model_and_corpus(tmp_path)
    # 8 articles per class: 2 shots + 2 validation + 2 test fit.
    return ["study", "--quick", "--model-dir", model_dir, "--data-dir", data_dir, "--cache-dir", str(tmp_path / "cache"),
            "--shots", "2", "--test-per-class", "2", "--val-per-class", "2", "--fit-steps", "4", "--fit-batch-size", "4",
            "--max-length", "24", "--dims", "16,4", "--batch-size", "2", "--device", "cpu", "--no-progress",
            "--out", str(tmp_path / "study")]


@pytest.fixture
def trained(monkeypatch):
    """The regulariser of every run trained (None: vanilla), in order."""
    calls = []
    original = experiment.train_few_shot

    def counting(setup, pet, rows, seed, **kw):
        calls.append((pet, seed, kw.get("regularizer") is not None, kw.get("alpha")))
        return original(setup, pet, rows, seed, **kw)

    monkeypatch.setattr(experiment, "train_few_shot", counting)
    return calls


def _runs(out):
    return json.loads((out / "runs.json").read_text())["runs"]


def test_quick_study_outputs_resume_and_reruns(tiny, trained, tmp_path, capsys):
    out = tmp_path / "study"
    assert main(tiny) == 0
    printed = capsys.readouterr().out
    assert len(trained) == 4  # lora x {none, pdf-brownian @ 0.1} x 2 seeds
    for name in ("runs.json", "runs.csv", "table.md", "study.png"):
        assert f"wrote {out / name}" in printed
    assert "wall time" in printed and (out / "study.png").stat().st_size > 10_000
    table = (out / "table.md").read_text()
    assert "| lora | 2 | none |  |" in table and "| lora | 2 | pdf-brownian | 0.1 |" in table
    assert "validation" in table and re.search(r"\| [012]/2 \|", table)  # wins out of 2 seeds
    assert "| lora | 2 | brownian |" in table and "| lora | 2 | ou |" in table  # the bridge-likeness table
    with open(out / "runs.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 4 and {r["regularizer"] for r in rows} == {"none", "pdf-brownian"}
    vanilla = [r for r in rows if r["regularizer"] == "none"]
    assert all(float(r["R_true_brownian"]) > 0 and float(r["R_shuffled_ou"]) > 0 for r in vanilla)
    first = _runs(out)
    assert all(0 <= r["val_accuracy"] <= 1 and r["seconds"] > 0 and not r["cached"] for r in first)

    # Resume: nothing is trained again, and the outputs are the same.
    assert main(tiny) == 0
    assert len(trained) == 4 and "0 runs trained, 4 cached" in capsys.readouterr().out
    assert [{k: v for k, v in r.items() if k != "cached"} for r in _runs(out)] == \
        [{k: v for k, v in r.items() if k != "cached"} for r in first]

    # A changed alpha reruns only the regularised runs.
    assert main([*tiny, "--alphas", "0.2"]) == 0
    assert [(reg, alpha) for _, _, reg, alpha in trained[4:]] == [(True, 0.2), (True, 0.2)]
    capsys.readouterr()

    # Damaged entries (unreadable; readable but not a result) are rerun with a warning, and the
    # rerun gives the same numbers bit for bit.
    damaged = {r["config_hash"]: r for r in first if r["regularizer"] == "none"}
    (hash_a, run_a), (hash_b, _) = damaged.items()
    (out / "runs" / f"{hash_a}.json").write_text("{not json")
    (out / "runs" / f"{hash_b}.json").write_text(json.dumps({"config": {}, "result": {}}))
    assert main(tiny) == 0
    err = capsys.readouterr().err
    assert err.count("sbpet study: warning:") == 2 and "rerunning it" in err
    assert len(trained) == 8 and not any(reg for _, _, reg, _ in trained[6:])
    again = {r["config_hash"]: r for r in _runs(out)}[hash_a]
    assert {k: again[k] for k in ("test_accuracy", "task_loss", "train_loss", "analysis")} == \
        {k: run_a[k] for k in ("test_accuracy", "task_loss", "train_loss", "analysis")}


@pytest.mark.parametrize("options, named", [
    (["--pets", "lora,loraa"], "--pets"),
    (["--pets", ""], "--pets"),
    (["--regularizers", "none,pdf-cauchy"], "--regularizers"),
    (["--seeds", "0"], "--seeds"),
    (["--shots", "0"], "--shots"),
    (["--shots", "2,x"], "--shots"),
    (["--alphas", "-0.1"], "--alphas"),
    (["--epochs", "0"], "--epochs"),
    (["--shots", "5"], "--val-per-class 2 + --test-per-class 2"),  # 8 per class < 5 + 2 + 2
])
def test_bad_input_names_the_option_before_any_work(tiny, trained, monkeypatch, tmp_path, capsys, options, named):
    monkeypatch.setattr(experiment.Setup, "regularizer", lambda *a, **k: pytest.fail("g fitted before checking"))
    assert main([*tiny, *options]) == 2
    err = capsys.readouterr().err
    assert "sbpet study: error:" in err and named in err and "Traceback" not in err
    assert not trained and not (tmp_path / "study").exists()


def test_grid_and_summary():
    """The plan pairs every regulariser with each seed; alpha is chosen on validation accuracy and
    the paired difference is taken seed by seed."""
    grid = {"pets": ["lora"], "regularizers": ["none", "pdf-ou"], "shots": [4], "alphas": [0.1, 0.5], "seeds": [0, 1]}
    runs = study.plan_runs(grid)
    assert len(runs) == 6 and sum(r.regularizer == "none" for r in runs) == 2
    val = {0.1: (0.5, 0.5), 0.5: (0.9, 0.8)}
    test = {None: (0.50, 0.60), 0.1: (0.90, 0.90), 0.5: (0.55, 0.58)}
    records = [{"pet": r.pet, "shots": r.shots, "regularizer": r.regularizer, "alpha": r.alpha, "seed": r.seed,
                "val_accuracy": 0.5 if r.alpha is None else val[r.alpha][r.seed],
                "test_accuracy": test[r.alpha][r.seed],
                "analysis": {"brownian": {"true": 1.0, "shuffled": 2.0}, "ou": {"true": 3.0, "shuffled": 3.0}}
                if r.alpha is None else None} for r in runs]
    rows, analysis = study.summarize(records, grid)
    reg = next(r for r in rows if r["regularizer"] == "pdf-ou")
    assert reg["alpha"] == 0.5  # the best on validation, not on test (0.1)
    assert reg["test_mean"] == pytest.approx(0.565) and reg["wins"] == 1 and reg["paired"] == 2
    assert reg["diff_mean"] == pytest.approx((0.05 - 0.02) / 2)
    assert [(a["bridge"], a["ratio"]) for a in analysis] == [("brownian", 0.5), ("ou", 1.0)]
