"""The sbpet command: --help on each subcommand, and a smoke run of fit / train / plot on a tiny
random BERT and a tiny corpus (no hub, no demo packages needed)."""

import os
import subprocess
import sys

import pytest

from hf_helpers import tiny_model_and_corpus
from sbpet.cli import build_parser, main


@pytest.mark.parametrize("command", ["fit", "train", "plot"])
def test_help(command, capsys):
    with pytest.raises(SystemExit) as exit_info:
        build_parser().parse_args([command, "--help"])
    assert exit_info.value.code == 0
    assert "--model-dir" in capsys.readouterr().out


def test_console_script_help():
    result = subprocess.run([sys.executable, "-m", "sbpet.cli", "--help"], capture_output=True, text=True)
    assert result.returncode == 0 and "fit" in result.stdout and "plot" in result.stdout


def test_cli_smoke_fit_train_plot(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    model_dir, data_dir = tiny_model_and_corpus(tmp_path)
    common = ["--model-dir", model_dir, "--data-dir", data_dir, "--cache-dir", str(tmp_path / "cache"),
              "--fit-steps", "3", "--fit-batch-size", "4", "--max-length", "24", "--dims", "16,4",
              "--no-progress", "--device", "cpu"]
    common += ["--shots", "2", "--test-per-class", "2"]
    train = ["--epochs", "1", "--batch-size", "2"]
    assert main(["fit", *common, "--out", str(tmp_path / "g")]) == 0
    assert os.path.isfile(tmp_path / "g" / "sbpet_config.json")
    assert main(["train", *common, *train]) == 0
    out = capsys.readouterr().out
    assert "using the cached g" in out and "test accuracy" in out and "bridge loss" in out
    assert main(["train", *common, *train, "--bridge", "none"]) == 0
    png = tmp_path / "traj.png"
    assert main(["plot", *common, "--out", str(png), "--examples", "4"]) == 0
    assert png.stat().st_size > 10_000


def test_cli_errors(tmp_path, capsys):
    assert main(["train", "--data-dir", str(tmp_path / "missing"), "--model-dir", str(tmp_path)]) == 2
    assert "error" in capsys.readouterr().err


def test_cli_backend_reaches_the_kernels(tmp_path, capsys, monkeypatch):
    """`--backend triton` reaches the Triton kernels through fitting g and training (interpreter on
    CPU), and `--precision` reaches the regulariser."""
    pytest.importorskip("triton")
    from sbpet import triton_backend

    calls = []
    for name in ("triton_capture_layer", "triton_loss_from_parts"):
        original = getattr(triton_backend, name)
        monkeypatch.setattr(triton_backend, name,
                            lambda *a, _o=original, _n=name, **k: calls.append(_n) or _o(*a, **k))
    model_dir, data_dir = tiny_model_and_corpus(tmp_path)
    common = ["--model-dir", model_dir, "--data-dir", data_dir, "--cache-dir", str(tmp_path / "cache"),
              "--fit-steps", "2", "--fit-batch-size", "2", "--max-length", "16", "--dims", "8,4",
              "--no-progress", "--device", "cpu", "--shots", "2", "--test-per-class", "1",
              "--backend", "triton", "--precision", "tf32"]
    assert main(["fit", *common, "--out", str(tmp_path / "g")]) == 0
    fitted = len(calls)
    assert fitted > 0 and calls.count("triton_loss_from_parts") == 2  # one loss per fitting step
    assert main(["train", *common, "--epochs", "1", "--batch-size", "2"]) == 0
    assert calls.count("triton_loss_from_parts") > 2 and len(calls) > fitted
    assert '"precision": "tf32"' in (tmp_path / "g" / "sbpet_config.json").read_text()
    capsys.readouterr()
