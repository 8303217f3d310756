"""Input the `sbpet` command checks before any slow work (no model loaded, no g fitted): prompt
room and model positions (--max-length), model folders, the corpus (empty class folders, files
that are not UTF-8), the deprecated --bridge-type; and --help's defaults and --version."""

import os

import pytest

from hf_helpers import tiny_model_and_corpus
from sbpet.cli import demo, experiment
from sbpet.cli.main import build_parser, main


@pytest.fixture
def nothing_slow(monkeypatch):
    """Fail the test if a model is loaded or g fitted: the checks must come first."""
    monkeypatch.setattr(experiment.Setup, "regularizer", lambda *a, **k: pytest.fail("g fitted before checking"))
    monkeypatch.setattr(experiment.Setup, "encoder", lambda *a, **k: pytest.fail("model loaded before checking"))


@pytest.fixture
def tiny(tmp_path):
    model_dir, data_dir = tiny_model_and_corpus(tmp_path)
    common = ["--model-dir", model_dir, "--data-dir", data_dir, "--cache-dir", str(tmp_path / "cache"), "--no-progress",
              "--device", "cpu", "--test-per-class", "2", "--val-per-class", "2"]
    return model_dir, data_dir, common


def _error(capsys, command):
    err = capsys.readouterr().err
    assert f"sbpet {command}: error:" in err and "Traceback" not in err, err
    return err


@pytest.mark.parametrize("command", ["fit", "train", "plot", "study"])
def test_max_length_without_room_for_the_prompt_is_named_before_g(command, tiny, nothing_slow, capsys):
    """--max-length 5 used to fit g and then fail encoding the prompts."""
    *_, common = tiny
    extra = ["--untuned"] if command == "plot" else ["--shots", "2"] if command in ("train", "study") else []
    assert main([command, *common, "--max-length", "5", *extra]) == 2
    err = _error(capsys, command)
    assert "--max-length 5 leaves no room" in err and "use at least" in err


@pytest.mark.parametrize("options", [["--max-length", "65"], ["--max-length", "60", "--pet", "prompt"]])
def test_max_length_beyond_the_models_positions_is_named(options, tiny, nothing_slow, capsys):
    *_, common = tiny  # the tiny BERT has 64 positions; prompt tuning adds 10 virtual tokens
    assert main(["train", *common, "--shots", "2", *options]) == 2
    assert "exceeds the 64 positions" in _error(capsys, "train")


def test_model_folder_without_a_tokenizer_is_named(tiny, tmp_path, nothing_slow, capsys):
    """A folder with only config.json: transformers 5 makes a tokenizer of the special tokens."""
    model_dir, _, common = tiny
    bare = tmp_path / "bare"
    bare.mkdir()
    (bare / "config.json").write_text(open(os.path.join(model_dir, "config.json")).read())
    assert main(["train", *common, "--model-dir", str(bare)]) == 2
    assert f"--model-dir {bare}: holds no tokenizer" in _error(capsys, "train")


def test_model_folder_without_config_is_an_option_error(tmp_path, capsys):
    assert main(["train", "--model-dir", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "argument --model-dir" in err and "no config.json" in err


def test_empty_class_folder_is_an_error_naming_it(tiny, nothing_slow, capsys):
    """An empty class folder used to become a class (3 outputs for 2 real classes); a hidden
    folder is not a class at all."""
    _, data_dir, common = tiny
    os.makedirs(os.path.join(data_dir, "zz-empty"))
    with open(os.path.join(data_dir, "zz-empty", "notes.md"), "w") as f:
        f.write("not a document")
    os.makedirs(os.path.join(data_dir, ".ipynb_checkpoints"))
    assert main(["fit", *common]) == 2
    err = _error(capsys, "fit")
    assert "--data-dir" in err and "'zz-empty'" in err and "ipynb" not in err
    os.rename(os.path.join(data_dir, "zz-empty"), os.path.join(data_dir, ".zz-empty"))
    examples, classes = demo.load_corpus(data_dir)
    assert classes == ["film", "game", "market"] and len(examples) == 24


def test_files_that_are_not_utf8_are_reported_by_name(tiny, capsys):
    """They used to be read with replacement characters silently; they are still read that way
    (the BBC corpus has one, and dropping it would change the seeded splits) but named."""
    _, data_dir, common = tiny
    bad = os.path.join(data_dir, "film", "latin1.txt")
    with open(bad, "wb") as f:
        f.write("star film \xa315m music".encode("latin-1"))
    warnings = []
    examples, _ = demo.load_corpus(data_dir, warn=warnings.append)
    assert len(warnings) == 1 and bad in warnings[0] and "not valid UTF-8" in warnings[0]
    assert ("star film \ufffd15m music", 0) in examples
    with pytest.warns(UserWarning, match="latin1.txt"):
        demo.load_corpus(data_dir)
    # Through the command: a warning on stderr naming the file, and the command goes on.
    assert main(["plot", *common]) == 2  # stops later, at "no saved run"
    err = capsys.readouterr().err
    assert "sbpet plot: warning:" not in err  # plot refuses before it reads the corpus
    assert main(["train", *common, "--shots", "20"]) == 2  # stops at the size check, after reading it
    err = capsys.readouterr().err
    assert f"sbpet train: warning: 1 file(s) of {data_dir} are not valid UTF-8" in err and bad in err


def test_bridge_type_is_a_deprecated_alias_of_bridge(tiny, monkeypatch, capsys):
    *_, common = tiny
    fitted = []
    monkeypatch.setattr(experiment.Setup, "regularizer", lambda self, bridge, **k: fitted.append(bridge))

    assert main(["fit", *common, "--bridge-type", "ou"]) == 0
    assert fitted == ["ou"] and "--bridge-type is deprecated; use --bridge ou" in capsys.readouterr().err
    assert main(["fit", *common, "--bridge", "ou"]) == 0
    assert fitted == ["ou", "ou"] and "deprecated" not in capsys.readouterr().err
    # Contradicting values used to let --bridge win silently.
    assert main(["train", *common, "--bridge", "brownian", "--bridge-type", "ou"]) == 2
    assert "--bridge brownian and --bridge-type ou disagree" in _error(capsys, "train")


def test_help_shows_defaults_and_the_deprecated_alias(capsys):
    with pytest.raises(SystemExit):
        build_parser().parse_args(["train", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    for shown in ("weight of the bridge loss (default: 0.1)", "PET method (default: lora)",
                  "few-shot training examples per class (default: 16)",
                  "PET learning rate (default: 0.005; --protocol paper changes it)",
                  "(default: brownian)", "deprecated alias of --bridge"):
        assert shown in text, shown
    assert "(default: None)" not in text and "(default: False)" not in text


def test_version(capsys):
    from sbpet.core.version import __version__

    assert main(["--version"]) == 0
    assert capsys.readouterr().out.strip() == f"sbpet {__version__}"
