"""The sbpet command and the user's files (issue 34): --force deletes only what sbpet wrote (3),
two `sbpet fit` on one cache fit g once (4), caches keyed by content (6), no pickle read by the
study, a damaged fit state ends it with a message (1, 8), --out never replaced unasked (8), the
environment left as it was (8)."""

import json
import os
import shutil
import subprocess
import sys
import textwrap

import pytest
import torch

from hf_helpers import tiny_model_and_corpus
from sbpet.cli.main import main

SMALL = ["--fit-steps", "2", "--fit-batch-size", "4", "--max-length", "24", "--dims", "16,4", "--no-progress",
         "--device", "cpu", "--test-per-class", "2", "--val-per-class", "2"]


@pytest.fixture
def tiny(tmp_path):
    model_dir, data_dir = tiny_model_and_corpus(tmp_path)
    return model_dir, data_dir, ["--model-dir", model_dir, "--data-dir", data_dir,
                                 "--cache-dir", str(tmp_path / "cache"), *SMALL]


def _g_dir(capsys) -> str:
    out = capsys.readouterr().out
    return out.strip().splitlines()[-1].removeprefix("g: ")


def test_force_deletes_only_the_checkpoint_sbpet_wrote(tiny, tmp_path, capsys):
    """`sbpet fit --text-files G --out DIR --force` removed DIR/fit whatever it held."""
    *_, common = tiny
    texts = tmp_path / "a.txt"
    texts.write_text("the cat sat on the mat\nmarket shares rose\nteam won the game\nfilm star music\n")
    out = tmp_path / "g"
    assert main(["fit", *common, "--text-files", str(texts), "--out", str(out)]) == 0
    mine = out / "fit" / "notes.txt"
    mine.write_text("the user's")
    capsys.readouterr()
    assert main(["fit", *common, "--text-files", str(texts), "--out", str(out), "--overwrite", "--force"]) == 2
    assert "notes.txt, which sbpet did not write" in capsys.readouterr().err
    assert mine.read_text() == "the user's"
    mine.unlink()
    assert main(["fit", *common, "--text-files", str(texts), "--out", str(out), "--overwrite", "--force"]) == 0
    # The same for the cache's g folder.
    assert main(["fit", *common]) == 0
    g_dir = _g_dir(capsys)
    (open(os.path.join(g_dir, "fit", "mine.txt"), "w")).close()
    assert main(["fit", *common, "--force"]) == 2
    assert "mine.txt, which sbpet did not write" in capsys.readouterr().err
    assert os.path.isfile(os.path.join(g_dir, "fit", "mine.txt"))


def test_caches_are_keyed_by_content(tiny, tmp_path, capsys):
    """The same model and corpus at another path hit the cache; a file added to the corpus (whose
    test split must stay out of fitting) refits."""
    model_dir, data_dir, common = tiny
    assert main(["fit", *common]) == 0
    first = _g_dir(capsys)
    moved = tmp_path / "moved"
    shutil.copytree(model_dir, moved / "model")
    shutil.copytree(data_dir, moved / "data")
    other = ["--model-dir", str(moved / "model"), "--data-dir", str(moved / "data"), *common[4:]]
    assert main(["fit", *other]) == 0
    out = capsys.readouterr().out
    assert "using the cached g" in out and out.strip().endswith(os.path.basename(first))
    (moved / "data" / "film" / "100.txt").write_text("a new review of the film\n")
    assert main(["fit", *other]) == 0
    out = capsys.readouterr().out
    assert "fitting the pdf g" in out and not out.strip().endswith(os.path.basename(first))


RUN_FIT = textwrap.dedent("""
    import sys
    from sbpet.cli.main import main
    sys.exit(main(["fit", *sys.argv[1:]]))
""")


def test_two_fits_on_one_cache_fit_g_once(tiny, tmp_path):
    """Two `sbpet fit` sharing a cache both fitted the whole g into the same folder; now the
    second waits for the first and uses its g."""
    *_, common = tiny
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    procs = [subprocess.Popen([sys.executable, "-c", RUN_FIT, *common], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True, env=env) for _ in range(2)]
    outs = [p.communicate(timeout=300) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], [err[-2000:] for _, err in outs]
    printed = "".join(out for out, _ in outs)
    assert printed.count("fitting the pdf g") == 1 and printed.count("using the cached g") == 1, printed


class _Evil:
    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


def _study(common, out):
    return ["study", "--quick", *common, "--protocols", "ours", "--seeds", "1", "--shots", "2", "--fit-steps", "2",
            "--batch-size", "2", "--out", str(out)]


def test_the_study_reads_no_pickle_and_a_damaged_fit_state_is_a_message(tiny, tmp_path, capsys):
    *_, common = tiny
    out = tmp_path / "study"
    assert main(_study(common, out)) == 0
    (g,) = json.loads((out / "runs.json").read_text())["g"]
    g_dir = tmp_path / "cache" / "g" / g["folder"]
    (g_dir / "fit_curve.json").unlink()  # a g fitted before the curve was saved: read from its checkpoint
    assert main(_study(common, out)) == 0
    assert len(json.loads((out / "runs.json").read_text())["g"][0]["curve"]) == 2
    state = g_dir / "fit" / "checkpoint" / "fit_state.json"
    state.write_text("{damaged")
    capsys.readouterr()
    assert main(_study(common, out)) == 2
    err = capsys.readouterr().err
    assert "sbpet study: error: the fitting curve of the g in" in err and "damaged" in err and "Traceback" not in err
    state.unlink()
    marker = tmp_path / "pwned"
    torch.save({"step": 2, "history": _Evil(str(marker))}, g_dir / "fit" / "checkpoint" / "fit_state.pt")
    assert main(_study(common, out)) == 2
    assert "cannot be read safely" in capsys.readouterr().err
    assert not marker.exists(), "the study unpickled fit_state.pt"


def test_study_and_plot_never_replace_a_file_unasked(tiny, tmp_path, capsys):
    *_, common = tiny
    out = tmp_path / "mine"
    out.mkdir()
    (out / "table.md").write_text("the user's table")
    assert main(_study(common, out)) == 2
    assert "table.md exists and was not written by sbpet study; pass --overwrite" in capsys.readouterr().err
    assert (out / "table.md").read_text() == "the user's table"
    png = tmp_path / "figure.png"
    png.write_bytes(b"the user's figure")
    assert main(["plot", *common, "--out", str(png), "--untuned"]) == 2
    assert "already exists; pass --overwrite" in capsys.readouterr().err
    assert png.read_bytes() == b"the user's figure"


def test_importing_the_cli_leaves_the_environment_alone():
    probe = textwrap.dedent("""
        import os, sys
        import sbpet.cli
        from sbpet.cli.experiment import deterministic_algorithms
        from sbpet.cli.main import main
        seen = [os.environ.get("HF_HUB_OFFLINE")]
        with deterministic_algorithms():
            seen.append(os.environ.get("CUBLAS_WORKSPACE_CONFIG"))
        seen.append(os.environ.get("CUBLAS_WORKSPACE_CONFIG"))
        main(["fit", "--model-dir", "/nonexistent"])
        import huggingface_hub.constants as constants
        seen += [os.environ.get("HF_HUB_OFFLINE"), constants.HF_HUB_OFFLINE]
        print(seen)
    """)
    env = {k: v for k, v in os.environ.items()
           if k not in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "CUBLAS_WORKSPACE_CONFIG")}
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, env=env, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip().splitlines()[-1] == "[None, ':4096:8', None, None, False]"


def test_offline_inside_a_command():
    """The commands still run with the hub off (finding 8 moves the setting, it does not drop it)."""
    from sbpet.cli.main import offline_hub

    before = os.environ.get("HF_HUB_OFFLINE")
    os.environ.pop("HF_HUB_OFFLINE", None)
    try:
        with offline_hub():
            import huggingface_hub.constants as constants

            assert os.environ["HF_HUB_OFFLINE"] == "1" and constants.HF_HUB_OFFLINE
        assert "HF_HUB_OFFLINE" not in os.environ
    finally:
        if before is not None:
            os.environ["HF_HUB_OFFLINE"] = before


def test_study_runs_are_keyed_by_content(tiny, tmp_path, capsys):
    """A study's run cache keyed the model and data folders by path: the same content elsewhere
    reran everything, a changed corpus reused runs."""
    model_dir, data_dir, common = tiny
    out = tmp_path / "study"
    assert main(_study(common, out)) == 0
    moved = tmp_path / "moved"
    shutil.copytree(model_dir, moved / "model")
    shutil.copytree(data_dir, moved / "data")
    other = ["--model-dir", str(moved / "model"), "--data-dir", str(moved / "data"), *common[4:]]
    capsys.readouterr()
    assert main(_study(other, out)) == 0
    assert "0 runs trained, 2 cached" in capsys.readouterr().out
    (moved / "data" / "game" / "100.txt").write_text("a new report of the game\n")
    assert main(_study(other, out)) == 0
    assert "2 runs trained, 0 cached" in capsys.readouterr().out
