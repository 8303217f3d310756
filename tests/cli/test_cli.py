"""The sbpet command: --help on each subcommand, and a smoke run of fit / train / plot on a tiny
random BERT and a tiny corpus (no hub, no demo packages needed)."""

import json
import math
import os
import subprocess
import sys

import pytest
import torch

from hf_helpers import tiny_model_and_corpus
from sbpet.cli.main import build_parser, main
from sbpet.hf.fitting import read_fit_state


@pytest.mark.parametrize("command", ["fit", "train", "plot", "study"])
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
    common += ["--test-per-class", "2", "--val-per-class", "2"]
    train = ["--epochs", "1", "--batch-size", "2", "--shots", "2"]
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
    from sbpet.backends import triton_backend

    calls = []
    for name in ("triton_capture_layer", "triton_loss_from_parts"):
        original = getattr(triton_backend, name)
        monkeypatch.setattr(triton_backend, name,
                            lambda *a, _o=original, _n=name, **k: calls.append(_n) or _o(*a, **k))
    model_dir, data_dir = tiny_model_and_corpus(tmp_path)
    common = ["--model-dir", model_dir, "--data-dir", data_dir, "--cache-dir", str(tmp_path / "cache"),
              "--fit-steps", "2", "--fit-batch-size", "2", "--max-length", "16", "--dims", "8,4",
              "--no-progress", "--device", "cpu", "--test-per-class", "1", "--val-per-class", "1",
              "--backend", "triton", "--precision", "tf32"]
    assert main(["fit", *common, "--out", str(tmp_path / "g")]) == 0
    fitted = len(calls)
    assert fitted > 0 and calls.count("triton_loss_from_parts") == 2  # one loss per fitting step
    assert main(["train", *common, "--epochs", "1", "--batch-size", "2", "--shots", "2"]) == 0
    assert calls.count("triton_loss_from_parts") > 2 and len(calls) > fitted
    assert '"precision": "tf32"' in (tmp_path / "g" / "sbpet_config.json").read_text()
    capsys.readouterr()


def _tiny_options(tmp_path, cache):
    model_dir, data_dir = tiny_model_and_corpus(tmp_path)
    return ["--model-dir", model_dir, "--data-dir", data_dir, "--cache-dir", str(cache), "--fit-steps", "4",
            "--fit-batch-size", "4", "--max-length", "24", "--dims", "16,4", "--no-progress", "--device", "cpu",
            "--test-per-class", "2", "--val-per-class", "2"]


def test_train_is_reproducible(tmp_path, capsys):
    """The same `sbpet train` command with the same seed and fresh caches (so g is fitted twice
    too), once in this process after other random draws and once in a fresh process, saves
    bit-identical metrics and PET weights."""
    saved = []
    for name in ("here", "fresh process"):
        common = _tiny_options(tmp_path, tmp_path / f"cache-{len(saved)}")
        out = tmp_path / f"run-{len(saved)}"
        command = ["train", *common, "--shots", "2", "--epochs", "2", "--batch-size", "2", "--seed", "3",
                   "--out", str(out)]
        if name == "here":
            torch.manual_seed(1234)
            torch.rand(7)
            assert main(command) == 0
            capsys.readouterr()
        else:
            # The same thread count (other tests may have changed this process's): float32 sums
            # split over another number of threads differ in the last bits (documented).
            env = dict(os.environ, OMP_NUM_THREADS=str(torch.get_num_threads()))
            result = subprocess.run([sys.executable, "-m", "sbpet.cli", *command], capture_output=True, text=True,
                                    env=env)
            assert result.returncode == 0, result.stderr[-2000:]
        meta = json.loads((out / "run.json").read_text())
        saved.append((meta["metrics"], meta["validation"], (out / "pet.safetensors").read_bytes()))
    assert saved[0][0] == saved[1][0] and saved[0][1] == saved[1][1]  # floats compared exactly
    assert saved[0][2] == saved[1][2]
    assert all(math.isfinite(v) for v in saved[0][0].values())


def test_fit_force_twice_gives_the_same_g(tmp_path, capsys):
    """`sbpet fit --force` refits g from the same seed: the same R history and weights (g's initial
    weights used to come from the unseeded global RNG)."""
    common = _tiny_options(tmp_path, tmp_path / "cache")
    fits = []
    for _ in range(2):
        torch.manual_seed(len(fits))  # whatever the global RNG holds
        assert main(["fit", *common, "--force", "--out", str(tmp_path / "g"), "--overwrite"]) == 0
        g_dir = capsys.readouterr().out.strip().splitlines()[-1].removeprefix("g: ")
        state = read_fit_state(os.path.join(g_dir, "fit", "checkpoint"))
        fits.append((state["history"], (tmp_path / "g" / "sbpet_model.safetensors").read_bytes()))
    assert len(fits[0][0]) == 4 and fits[0][0] == fits[1][0]
    assert fits[0][1] == fits[1][1]


def test_fit_on_text_files(tmp_path, capsys):
    """`sbpet fit --text-files`: g fitted on the files' lines, saved to --out with its checkpoint,
    nothing in the cache; a glob matching nothing and a missing --out are refused by name."""
    common = _tiny_options(tmp_path, tmp_path / "cache")
    corpus = tmp_path / "texts"
    corpus.mkdir()
    (corpus / "a.txt").write_text("the cat sat on the mat\n\nmarket shares rose\n")
    (corpus / "b.txt").write_text("team won the game\nfilm star music\n")
    out = tmp_path / "g_files"
    assert main(["fit", *common, "--text-files", f"{corpus}/a.txt,{corpus}/none*.txt", "--out", str(out)]) == 2
    assert "--text-files: patterns: " in capsys.readouterr().err
    assert main(["fit", *common, "--text-files", str(corpus / "*.txt")]) == 2
    assert "--text-files needs --out" in capsys.readouterr().err
    assert main(["fit", *common, "--text-files", str(corpus / "a.txt"), "--text-files", str(corpus / "b*"),
                 "--out", str(out)]) == 0
    assert "on the lines of 2 file(s)" in capsys.readouterr().out
    state = read_fit_state(str(out / "fit" / "checkpoint"))
    assert len(state["history"]) == 4 and state["signature"]["texts"] == "stream"
    assert (out / "sbpet_config.json").is_file() and not (tmp_path / "cache" / "g").exists()


def test_train_with_the_sde_regularizer(tmp_path, capsys):
    """`--regularizer sde`: its own g (fitted and cached under a key holding the kind) trains
    through BridgeTrainer's hidden-states path."""
    common = _tiny_options(tmp_path, tmp_path / "cache")
    train = ["--shots", "2", "--epochs", "1", "--batch-size", "2"]
    assert main(["train", *common, *train, "--regularizer", "sde", "--bridge", "ou"]) == 0
    out = capsys.readouterr().out
    assert "fitting the sde g (ou bridge" in out and "test accuracy" in out
    (run,) = (tmp_path / "cache" / "runs").glob("lora-sde-ou-a0.1-2shot-seed0-*")
    meta = json.loads((run / "run.json").read_text())
    assert meta["regularizer"] == "sde" and "-sde-ou-" in meta["g_dir"]
    assert json.loads(open(os.path.join(meta["g_dir"], "sbpet_config.json")).read())["kind"] == "sde"
    assert math.isfinite(meta["metrics"]["bridge_loss"]) and meta["metrics"]["bridge_loss"] > 0
    assert main(["train", *common, *train, "--regularizer", "sde", "--bridge", "ou", "--seed", "1"]) == 0
    assert "using the cached g" in capsys.readouterr().out
    assert main(["fit", *common, "--bridge", "ou"]) == 0  # the PDF g of the same bridge: another key
    assert "fitting the pdf g (ou bridge" in capsys.readouterr().out


def test_too_small_corpus_names_the_options(tmp_path, capsys):
    common = _tiny_options(tmp_path, tmp_path / "cache")
    assert main(["train", *common, "--shots", "5"]) == 2  # 8 per class < 5 + 2 + 2
    err = capsys.readouterr().err
    assert "sbpet train: error:" in err and "--shots 5" in err and "--val-per-class 2" in err


@pytest.mark.parametrize("command", ["fit", "train", "plot", "study"])
@pytest.mark.parametrize(
    "option, value",
    [("--batch-size", "0"), ("--epochs", "0"), ("--lr", "-1"), ("--device", "tpu"), ("--dims", "abc"),
     ("--dims", "512,0"), ("--model-dir", "/no/such/folder"), ("--data-dir", "/no/such/folder"),
     ("--max-length", "0"), ("--fit-steps", "0"), ("--test-per-class", "0"), ("--shots", "0"),
     ("--alpha", "-0.5"), ("--seed", "-1"), ("--fit-seed", "-1"), ("--examples", "0"),
     ("--model-dir", os.path.dirname(__file__)), ("--cache-dir", __file__)],
)
def test_bad_options_fail_at_parse_time_naming_the_option(command, option, value, capsys, monkeypatch):
    """Bad option values stop the command before it loads anything: exit status 2, a one-line
    error naming the option, no traceback (a hub 'Repo id' error, ZeroDivisionError, a NumPy
    seed error after g was fitted, ...)."""
    parser_options = {a for act in build_parser()._subparsers._group_actions[0].choices[command]._actions
                      for a in act.option_strings}
    if option not in parser_options:
        pytest.skip(f"sbpet {command} has no {option}")
    if command == "study" and option in ("--shots", "--alpha", "--fit-steps"):
        pytest.skip("sbpet study takes lists (tested in test_study.py)")
    monkeypatch.setattr("sbpet.cli.experiment.Setup.__init__", lambda *a, **k: pytest.fail("Setup was built"))
    assert main([command, option, value]) == 2
    err = capsys.readouterr().err
    assert f"argument {option}" in err and "Traceback" not in err, err


def test_cuda_device_without_cuda_is_an_option_error(capsys):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    assert main(["train", "--device", "cuda"]) == 2
    assert "argument --device" in capsys.readouterr().err


def test_train_positions_all_reaches_the_trainer_and_is_recorded(tmp_path, capsys):
    """--positions all regularises every real token too: another run (folder and config), another
    training loss; the default keeps the configuration (and so the folder names) of earlier runs."""
    common = _tiny_options(tmp_path, tmp_path / "cache")
    train = ["--shots", "2", "--epochs", "1", "--batch-size", "2"]
    metas = {}
    for positions in ("mask", "all"):
        out = tmp_path / positions
        assert main(["train", *common, *train, "--positions", positions, "--out", str(out)]) == 0
        metas[positions] = json.loads((out / "run.json").read_text())
    assert metas["mask"]["positions"] == "mask" and "positions" not in metas["mask"]["config"]
    assert metas["all"]["positions"] == "all" and metas["all"]["config"]["positions"] == "all"
    assert metas["mask"]["metrics"]["train_loss"] != metas["all"]["metrics"]["train_loss"]
    capsys.readouterr()
    assert main(["train", *common, *train, "--positions", "every"]) == 2
    assert "invalid choice: 'every'" in capsys.readouterr().err


def test_fit_on_text_files_under_torchrun_shares_the_global_batch(tmp_path):
    """`torchrun --nproc_per_node 2 -m sbpet.cli fit --text-files ...` joins the launcher's process
    group itself (gloo on the CPU) and ends with the g of one process: same losses within 1e-4,
    same weights within 1e-3 (fit_mapping's global batch)."""
    from safetensors.torch import load_file

    common = _tiny_options(tmp_path, tmp_path / "cache")
    corpus = tmp_path / "texts"
    corpus.mkdir()
    (corpus / "a.txt").write_text("the cat sat on the mat\nmarket shares rose\nteam won the game\nfilm star music\n")
    fits = {}
    for procs in (1, 2):
        out = tmp_path / f"g{procs}"
        launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={procs}"]
        command = [*launcher, "-m", "sbpet.cli", "fit", *common, "--text-files", str(corpus / "*.txt"),
                   "--out", str(out)]
        done = subprocess.run(command, capture_output=True, text=True, timeout=600,
                              env={**os.environ, "OMP_NUM_THREADS": "1"})
        assert done.returncode == 0, done.stderr[-3000:]
        assert ("2 processes share each batch" in done.stdout) == (procs == 2), done.stdout
        state = read_fit_state(str(out / "fit" / "checkpoint"))
        fits[procs] = (state["history"], load_file(str(out / "sbpet_model.safetensors")))
    (one_history, one), (two_history, two) = fits[1], fits[2]
    assert len(one_history) == 4
    assert max(abs(a - b) for a, b in zip(one_history, two_history)) <= 1e-4
    assert one.keys() == two.keys()
    for key in one:
        assert torch.allclose(one[key], two[key], atol=1e-3, rtol=0), key
