"""Run folders of `sbpet train` and what `sbpet plot` draws: a run's default folder is named by its
whole configuration, the same configuration again prints the stored run, nothing already saved is
replaced without --overwrite (checked before any slow work), and plot draws every saved run or refuses, never an untuned PLM unasked."""

import json
import os

import pytest

from hf_helpers import tiny_model_and_corpus
from sbpet.cli import experiment
from sbpet.cli import plot as plot_module
from sbpet.cli.main import main
from sbpet.cli.runs import run_name, saved_runs


@pytest.fixture
def tiny(tmp_path):
    model_dir, data_dir = tiny_model_and_corpus(tmp_path)
    return ["--model-dir", model_dir, "--data-dir", data_dir, "--cache-dir", str(tmp_path / "cache"),
            "--fit-steps", "3", "--fit-batch-size", "4", "--max-length", "24", "--dims", "16,4", "--no-progress",
            "--device", "cpu", "--test-per-class", "2", "--val-per-class", "2"]


TRAIN = ["--shots", "2", "--epochs", "1", "--batch-size", "2"]


def _no_slow_work(monkeypatch):
    monkeypatch.setattr(experiment.Setup, "regularizer", lambda *a, **k: pytest.fail("g fitted before checking"))
    monkeypatch.setattr(experiment.Setup, "encoder", lambda *a, **k: pytest.fail("model loaded before checking"))


def test_run_names_hold_the_configuration(tiny, tmp_path, capsys, monkeypatch):
    """Runs with another alpha, seed, shots, budget or bridge used to overwrite <cache>/runs/<pet>-<bridge>;
    the same configuration again prints the stored run before any slow work (exit 0), and is
    replaced only with --overwrite."""
    variants = [[], ["--alpha", "0.5"], ["--seed", "1"], ["--epochs", "2"], ["--bridge", "none"], ["--bridge", "ou"]]
    for options in variants:
        assert main(["train", *tiny, *TRAIN, *options]) == 0
    capsys.readouterr()
    runs = saved_runs(str(tmp_path / "cache"))
    names = sorted(os.path.basename(r) for r in runs)
    assert len(runs) == len(variants), names
    for prefix in ("lora-pdf-brownian-a0.1-2shot-seed0-", "lora-pdf-brownian-a0.5-2shot-seed0-",
                   "lora-pdf-brownian-a0.1-2shot-seed1-", "lora-none-2shot-seed0-", "lora-pdf-ou-a0.1-2shot-seed0-"):
        assert any(n.startswith(prefix) for n in names), (prefix, names)
    assert sum(n.startswith("lora-pdf-brownian-a0.1-2shot-seed0-") for n in names) == 2  # --epochs 2: another hash
    first = next(r for r in runs if json.load(open(os.path.join(r, "run.json")))["config"]["alpha"] == 0.5)
    meta = json.load(open(os.path.join(first, "run.json")))
    assert os.path.basename(first) == run_name(meta["config"]) and meta["config"]["epochs"] == 1.0
    weights = open(os.path.join(first, "pet.safetensors"), "rb").read()

    # The same configuration again: runs are deterministic, so the stored run is the answer. It is
    # printed (metrics and folder, said to be stored) and the command succeeds, before any slow work
    # and touching nothing; the same through an explicit --out naming that run's folder.
    stored = (f"validation accuracy {meta['validation']['accuracy']:.4f}  test accuracy "
              f"{meta['metrics']['accuracy']:.4f}  task loss {meta['metrics']['task_loss']:.4f}  bridge loss "
              f"{meta['metrics']['bridge_loss']:.4f}  (stored run, not retrained: the same configuration is in {first}")
    before = open(os.path.join(first, "run.json"), "rb").read()
    for options in ([], ["--out", first]):
        with monkeypatch.context() as patch:
            _no_slow_work(patch)
            assert main(["train", *tiny, *TRAIN, "--alpha", "0.5", *options]) == 0
        out, err = capsys.readouterr()
        assert out.strip().splitlines()[-1].startswith(stored), out
        assert "--overwrite" in out and err == ""
    assert open(os.path.join(first, "pet.safetensors"), "rb").read() == weights
    assert open(os.path.join(first, "run.json"), "rb").read() == before

    # A stored run whose configuration does not match (an older or edited run.json) is not taken
    # for this one: refused, nothing touched.
    edited = json.loads(before)
    edited["config"]["lr"] = 0.123
    with open(os.path.join(first, "run.json"), "w") as f:
        json.dump(edited, f)
    with monkeypatch.context() as patch:
        _no_slow_work(patch)
        assert main(["train", *tiny, *TRAIN, "--alpha", "0.5"]) == 2
    err = capsys.readouterr().err
    assert f"sbpet train: error: {first} already holds a run of another or unreadable configuration (test" in err
    assert "--overwrite" in err and "Traceback" not in err
    assert open(os.path.join(first, "pet.safetensors"), "rb").read() == weights

    # --overwrite retrains it in place (bit-identical on this machine) and says so.
    assert main(["train", *tiny, *TRAIN, "--alpha", "0.5", "--overwrite"]) == 0
    assert f"run replaced in {first}" in capsys.readouterr().out
    assert open(os.path.join(first, "pet.safetensors"), "rb").read() == weights
    assert len(saved_runs(str(tmp_path / "cache"))) == len(variants)

    # An explicit --out that holds a run (of any configuration) is not replaced either.
    with monkeypatch.context() as patch:
        _no_slow_work(patch)
        assert main(["train", *tiny, *TRAIN, "--out", first]) == 2
        assert f"--out: {first} already holds another run (test accuracy" in capsys.readouterr().err
        a_file = tmp_path / "a-file"
        a_file.write_text("x")
        assert main(["train", *tiny, *TRAIN, "--out", str(a_file)]) == 2
        assert "--out: " in capsys.readouterr().err and a_file.read_text() == "x"

    # sbpet plot draws every saved run of this model and corpus (it used to see only the last).
    drawn = []
    monkeypatch.setattr(plot_module, "plot_runs", lambda setup, runs, out, **k: drawn.append((runs, k)) or out)
    other = os.path.join(tmp_path, "cache", "runs", "from-another-model")
    os.makedirs(other)
    with open(os.path.join(other, "run.json"), "w") as f:
        json.dump({"pet": "lora", "bridge": "none", "model_dir": "/elsewhere", "data_dir": "/elsewhere"}, f)
    open(os.path.join(other, "pet.safetensors"), "wb").close()
    assert main(["plot", *tiny]) == 0
    assert drawn == [(runs, {"examples": 40, "untuned": False})]
    assert "1 saved run(s) of another model or corpus left out" in capsys.readouterr().err
    assert main(["plot", *tiny, "--runs", other]) == 2
    assert "--runs: " in capsys.readouterr().err


def test_plot_without_runs_refuses_before_loading_anything(tiny, tmp_path, capsys, monkeypatch):
    """It used to fit g and draw an untuned PLM silently; now that needs --untuned."""
    monkeypatch.setattr(experiment.Setup, "__init__", lambda *a, **k: pytest.fail("Setup was built"))
    assert main(["plot", *tiny]) == 2
    err = capsys.readouterr().err
    assert "sbpet plot: error: no saved run in" in err and "--untuned" in err and "--runs" in err
    assert main(["plot", *tiny, "--runs", str(tmp_path)]) == 2
    assert f"sbpet plot: error: --runs: {tmp_path} is not a run folder" in capsys.readouterr().err
    assert not (tmp_path / "cache").exists()


def test_plot_untuned_on_request(tiny, tmp_path, capsys):
    pytest.importorskip("matplotlib")
    png = tmp_path / "untuned.png"
    assert main(["plot", *tiny, "--untuned", "--examples", "4", "--out", str(png)]) == 0
    assert png.stat().st_size > 10_000 and f"wrote {png}" in capsys.readouterr().out


def test_fit_out_is_not_replaced_unasked(tiny, tmp_path, capsys, monkeypatch):
    g = tmp_path / "g"
    assert main(["fit", *tiny, "--out", str(g)]) == 0
    saved = (g / "sbpet_model.safetensors").read_bytes()
    with monkeypatch.context() as patch:
        _no_slow_work(patch)
        assert main(["fit", *tiny, "--bridge", "ou", "--out", str(g)]) == 2
    assert f"--out: {g} already holds another g; pass --overwrite" in capsys.readouterr().err
    assert (g / "sbpet_model.safetensors").read_bytes() == saved
    with monkeypatch.context() as patch:  # the same g again: the stored one is the answer (exit 0)
        _no_slow_work(patch)
        assert main(["fit", *tiny, "--out", str(g)]) == 0
    assert f"{g} already holds this g" in capsys.readouterr().out
    assert (g / "sbpet_model.safetensors").read_bytes() == saved
    assert main(["fit", *tiny, "--bridge", "ou", "--out", str(g), "--overwrite"]) == 0
    assert '"ou"' in (g / "sbpet_config.json").read_text()
