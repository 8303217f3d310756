"""`sbpet study` on a tiny random BERT and corpus: the --quick grid's outputs (both protocols, g's
diagnostics, the dose-response plot), resume, a changed alpha, a corrupted cache entry, bad input
named by its option before any slow work; the plan of the budget and positions axes; the paired
statistics against known values."""

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


def test_quick_study_outputs_resume_and_reruns(tiny, trained, tmp_path, capsys, monkeypatch):
    from sbpet.cli.study import report

    out = tmp_path / "study"
    written, original = [], report.write_outputs
    monkeypatch.setattr(report, "write_outputs", lambda records, *a: written.append(records) or original(records, *a))
    assert main(tiny) == 0
    printed = capsys.readouterr().out
    assert len(trained) == 8  # {ours, paper} x lora x {none, pdf-brownian @ 0.1} x 2 seeds
    # The outputs are rewritten when seed 0 is done, and at the end; a line per run (--no-progress).
    assert [sorted({r["seed"] for r in records}) for records in written] == [[0], [0, 1]]
    assert printed.count("sbpet study: [") == 8 and "[8/8] paper lora pdf-brownian g=4 mask a=0.1" in printed
    for name in ("runs.json", "runs.csv", "table.md", "study.png", "fit_curves.png"):
        assert f"wrote {out / name}" in printed
    assert "wall time" in printed and (out / "study.png").stat().st_size > 10_000
    table = (out / "table.md").read_text()
    for protocol in ("ours", "paper"):
        assert f"| {protocol} | lora | 2 | none |  |  |  |" in table
        assert f"| {protocol} | lora | 2 | pdf-brownian | 4 | mask | 0.1 |" in table
        assert f"| {protocol} | lora | 2 | brownian |" in table  # the bridge-likeness table
    assert "validation" in table and re.search(r"\| [012]/[012]/[012] \|", table)  # W/T/L out of 2 seeds
    # The paper protocol's kept checkpoints (validated at steps 2 and 4), per cell; none for ours.
    kept = table.split("**Checkpoints kept**")[1].split("**g, per fitting budget.**")[0]
    assert re.search(r"\| paper \| lora \| 2 \| none \|  \|  \|  \| [234](\.0)? \| [24], [24] \|", kept), kept
    assert re.search(r"\| paper \| lora \| 2 \| pdf-brownian \| 4 \| mask \| 0.1 \| [234](\.0)? \| [24], [24] \|",
                     kept), kept
    assert "| ours |" not in kept
    assert re.search(r"\| pdf-brownian \| 4 \| \d\.\d{4} \| \d\.\d{4} \| \d\.\d{4} \| \d\.\d{4} \| \d\.\d{3} \|", table)
    with open(out / "runs.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 8 and {r["regularizer"] for r in rows} == {"none", "pdf-brownian"}
    assert {r["protocol"] for r in rows} == {"ours", "paper"}
    vanilla = [r for r in rows if r["regularizer"] == "none"]
    assert all(float(r["R_true_brownian"]) > 0 and float(r["R_shuffled_brownian"]) > 0 for r in vanilla)
    first = _runs(out)
    assert all(0 <= r["val_accuracy"] <= 1 and r["seconds"] > 0 and not r["cached"] for r in first)
    # The paper protocol restores its best validation step (4 steps, validated every 2).
    assert all(r["chosen_step"] in (2, 4) and len(r["val_curve"]) == 2 for r in first if r["protocol"] == "paper")
    assert all("chosen_step" not in r for r in first if r["protocol"] == "ours")
    # g: its fitting curve (one R per step) and the untuned PLM's R, cached in its folder.
    (g,) = json.loads((out / "runs.json").read_text())["g"]
    assert len(g["curve"]) == 4 and g["untuned"]["ratio"] > 0
    assert (tmp_path / "cache" / "g" / g["folder"] / "untuned.json").is_file()

    # Resume: nothing is trained again, and the outputs are the same.
    assert main(tiny) == 0
    assert len(trained) == 8 and "0 runs trained, 8 cached" in capsys.readouterr().out
    assert [{k: v for k, v in r.items() if k != "cached"} for r in _runs(out)] == \
        [{k: v for k, v in r.items() if k != "cached"} for r in first]

    # A changed alpha reruns only the regularised runs.
    assert main([*tiny, "--alphas", "0.2"]) == 0
    assert [(reg, alpha) for _, _, reg, alpha in trained[8:]] == [(True, 0.2)] * 4
    capsys.readouterr()

    # Damaged entries (unreadable; readable but not a result) are rerun with a warning, and the
    # rerun gives the same numbers bit for bit.
    damaged = {r["config_hash"]: r for r in first if r["regularizer"] == "none"}
    (hash_a, run_a), (hash_b, _) = list(damaged.items())[:2]
    (out / "runs" / f"{hash_a}.json").write_text("{not json")
    (out / "runs" / f"{hash_b}.json").write_text(json.dumps({"config": {}, "result": {}}))
    assert main(tiny) == 0
    err = capsys.readouterr().err
    assert err.count("sbpet study: warning:") == 2 and "rerunning it" in err
    assert len(trained) == 14 and not any(reg for _, _, reg, _ in trained[12:])
    again = {r["config_hash"]: r for r in _runs(out)}[hash_a]
    assert {k: again[k] for k in ("test_accuracy", "task_loss", "train_loss", "analysis")} == \
        {k: run_a[k] for k in ("test_accuracy", "task_loss", "train_loss", "analysis")}


def test_jobs_train_the_same_runs_in_a_pool(tiny, trained, tmp_path, capsys):
    """--jobs 2 from a process with two threads: the runs go to two pool processes (none is
    trained in this one) with one thread each, and give the numbers of one process with one
    thread, bit for bit. (A different thread count may change the last bits: the tiny shapes here
    do differ between one and two threads.)"""
    import torch

    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        assert main([*tiny, "--out", str(tmp_path / "one")]) == 0
        assert len(trained) == 8
        torch.set_num_threads(2)
        assert main([*tiny, "--out", str(tmp_path / "pool"), "--jobs", "2"]) == 0
    finally:
        torch.set_num_threads(threads)
    assert len(trained) == 8  # the pool's processes trained the second study's runs
    printed = capsys.readouterr().out
    assert printed.count("sbpet study: [") == 16 and printed.count("[8/8] paper lora pdf-brownian g=4 mask a=0.1") == 2
    one, pool = _runs(tmp_path / "one"), _runs(tmp_path / "pool")
    assert len(pool) == 8 and {r["threads"] for r in one} == {r["threads"] for r in pool} == {1}
    assert [{k: v for k, v in r.items() if k != "seconds"} for r in pool] == \
        [{k: v for k, v in r.items() if k != "seconds"} for r in one]


def test_a_pool_process_that_cannot_set_up_fails_its_first_run(tmp_path, monkeypatch):
    """A --jobs process whose setup raises keeps the error and raises it from its first run (a
    pool initializer that raised would be restarted forever)."""
    import argparse

    import torch

    from sbpet.cli.study import runner

    monkeypatch.setattr(runner, "_WORKER", {})
    threads = torch.get_num_threads()
    try:
        runner._worker_init(argparse.Namespace(model_dir=str(tmp_path / "missing")), 1, [], [])
    finally:
        torch.set_num_threads(threads)
    with pytest.raises(RuntimeError, match="could not set up"):
        runner._worker_execute(study.Run("lora", "none", None, 4, 0))


def test_jobs_are_for_the_cpu():
    import argparse

    import torch

    from sbpet.cli.study import runner

    on = lambda kind: argparse.Namespace(device=torch.device(kind))  # noqa: E731
    assert runner.check_jobs(argparse.Namespace(jobs=3), on("cpu")) == 3
    assert runner.check_jobs(argparse.Namespace(jobs=1), on("cuda")) == 1
    with pytest.raises(ValueError, match="--jobs 2: parallel runs are for the CPU"):
        runner.check_jobs(argparse.Namespace(jobs=2), on("cuda"))


@pytest.mark.parametrize("options, named", [
    (["--pets", "lora,loraa"], "--pets"),
    (["--pets", ""], "--pets"),
    (["--regularizers", "none,pdf-cauchy"], "--regularizers"),
    (["--seeds", "0"], "--seeds"),
    (["--shots", "0"], "--shots"),
    (["--shots", "2,x"], "--shots"),
    (["--alphas", "-0.1"], "--alphas"),
    (["--fit-steps", "150,0"], "--fit-steps"),
    (["--protocols", "ours,theirs"], "--protocols"),
    (["--positions", "mask,some"], "--positions"),
    (["--steps", "0"], "--steps"),
    (["--epochs", "0"], "--epochs"),
    (["--jobs", "0"], "--jobs"),
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
    assert [r.seed for r in runs] == [0, 0, 0, 1, 1, 1]  # whole seeds first: a stopped study is usable
    val = {0.1: (0.5, 0.5), 0.5: (0.9, 0.8)}
    test = {None: (0.50, 0.60), 0.1: (0.90, 0.90), 0.5: (0.55, 0.58)}
    records = [{"pet": r.pet, "shots": r.shots, "regularizer": r.regularizer, "alpha": r.alpha, "seed": r.seed,
                "val_accuracy": 0.5 if r.alpha is None else val[r.alpha][r.seed],
                "test_accuracy": test[r.alpha][r.seed],
                "analysis": {"brownian": {"true": 1.0, "shuffled": 2.0}, "ou": {"true": 3.0, "shuffled": 3.0}}
                if r.alpha is None else None} for r in runs]
    rows, analysis = study.summarize(records, grid)
    reg = next(r for r in rows if r["regularizer"] == "pdf-ou")
    assert reg["alpha"] == 0.5 and reg["protocol"] == "ours"  # the best on validation, not on test (0.1)
    assert reg["test_mean"] == pytest.approx(0.565) and reg["diff_wins"] == 1 and reg["diff_losses"] == 1
    assert reg["diff_n"] == 2 and reg["diff_mean"] == pytest.approx((0.05 - 0.02) / 2)
    # 95% t interval with 1 degree of freedom: mean -+ 12.706 * std / sqrt(2).
    half = 12.7062047 * reg["diff_std"] / 2 ** 0.5
    assert (reg["diff_low"], reg["diff_high"]) == pytest.approx((reg["diff_mean"] - half, reg["diff_mean"] + half))
    assert [(a["bridge"], a["ratio"]) for a in analysis] == [("brownian", 0.5), ("ou", 1.0)]


@pytest.mark.parametrize("where, expected", [("every", 1 + 2 * 2 * 2), ("longest", 1 + 2 * 2 + 2)])
def test_plan_budgets_and_positions(where, expected):
    """Every g budget at every alpha; the second position set at every budget or only the longest."""
    grid = {"pets": ["lora"], "regularizers": ["none", "pdf-brownian"], "shots": [4], "alphas": [0.1, 0.5],
            "seeds": [0], "protocols": ["ours"], "fit_steps": [150, 2000], "positions": ["mask", "all"],
            "extra_positions_at": where}
    runs = study.plan_runs(grid)
    assert len(runs) == expected and len(set(runs)) == expected
    extra = {r.fit_steps for r in runs if r.positions == "all"}
    assert extra == ({150, 2000} if where == "every" else {2000})
    assert {r.g_key for r in runs} == {None, ("pdf", "brownian", 150), ("pdf", "brownian", 2000)}


def test_statistics_against_known_values():
    """Student's t quantiles (tables / SciPy), the exact sign test and the detectable effect."""
    assert study.t_quantile(0.975, 1) == pytest.approx(12.7062047, abs=1e-6)
    assert study.t_quantile(0.975, 9) == pytest.approx(2.26215716, abs=1e-7)
    assert study.t_quantile(0.8, 9) == pytest.approx(0.88340386, abs=1e-7)
    assert study.t_quantile(0.025, 30) == pytest.approx(-2.04227246, abs=1e-7)
    with pytest.raises(ValueError, match="0 < p < 1"):
        study.t_quantile(1.0, 3)
    assert study.sign_test([1] * 9 + [-1]) == pytest.approx(0.021484375)  # 2 * 11 / 1024
    assert study.sign_test([0.0, 0.0]) == 1.0 and study.sign_test([1, -1]) == 1.0
    s = study.paired_summary([0.02, 0.01, 0.0, 0.03, -0.01])
    assert (s["n"], s["wins"], s["ties"], s["losses"]) == (5, 3, 1, 1) and s["p"] == pytest.approx(0.625)
    assert s["detectable"] == pytest.approx((2.77644511 + 0.94096457) * s["std"] / 5 ** 0.5, rel=1e-6)
    one = study.paired_summary([0.1])
    assert one["mean"] == 0.1 and all(one[k] != one[k] for k in ("low", "high", "detectable"))  # NaN
