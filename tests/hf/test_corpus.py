"""sbpet.hf.corpus: the texts fit_mapping reads (lists, streams, datasets, text files) and the
order of its batches."""

import itertools

import pytest
import torch

from hf_helpers import documented_fitting_order
from sbpet.hf.corpus import TextFiles, batch_indices, fitting_texts, text_batches


class FakeDataset:
    """What fit_mapping reads of a map-style ``datasets.Dataset``: column_names, len, rows by index."""

    def __init__(self, rows):
        self.rows = rows
        self.column_names = list(rows[0]) if rows else ["text"]

    def __len__(self):
        return len(self.rows)

    def __getitem__(self, index):
        return self.rows[index]


class FakeIterableDataset:
    """What fit_mapping reads of a ``datasets.IterableDataset``: column_names, a fresh pass per iter()."""

    def __init__(self, rows, column_names=None):
        self.rows, self.column_names = rows, column_names

    def __iter__(self):
        return iter(self.rows)


def test_list_batches_follow_the_documented_order_and_resume():
    texts = [f"text {i}" for i in range(7)]
    expected = documented_fitting_order(texts, 3, 5, 9)  # batches cross epoch boundaries
    assert list(itertools.islice(text_batches(texts, 3, 5, 0), 9)) == expected
    assert list(itertools.islice(text_batches(texts, 3, 5, 4), 5)) == expected[4:]
    assert [texts[i] for i in batch_indices(2, 3, 7, 5)] == expected[2]


def test_stream_batches_are_consecutive_chunks_and_resume_skips():
    def endless():
        for i in itertools.count():
            yield f"text {i}" if i % 4 else "   "  # blank texts are dropped

    kept = [f"text {i}" for i in range(60) if i % 4]
    assert list(itertools.islice(text_batches(endless(), 4, 0, 0), 3)) == [kept[0:4], kept[4:8], kept[8:12]]
    assert next(text_batches(endless(), 4, 0, 2)) == kept[8:12]  # resumed at step 2: 8 texts skipped
    # a re-iterable stream starts again where it ends; a one-shot iterator that ends is an error
    cycled = text_batches(FakeIterableDataset(["a", "b", "c"]), 2, 0, 0)
    assert list(itertools.islice(cycled, 3)) == [["a", "b"], ["c", "a"], ["b", "c"]]
    ran_out = text_batches(iter(["a", "b", "c"]), 2, 0, 0)
    assert next(ran_out) == ["a", "b"]
    with pytest.raises(ValueError, match="ran out"):
        next(ran_out)
    with pytest.raises(ValueError, match="texts is empty"):
        text_batches(iter(["", " "]), 2, 0, 0)  # read at once, before any step


def test_datasets_are_read_by_their_text_column():
    data = FakeDataset([{"text": f"row {i}", "label": i} for i in range(5)])
    view = fitting_texts(data, "text")
    assert len(view) == 5 and view[3] == "row 3"
    assert next(text_batches(view, 3, 1, 0)) == documented_fitting_order([f"row {i}" for i in range(5)], 3, 1, 1)[0]
    with pytest.raises(ValueError, match="text_column='body'"):
        fitting_texts(data, "body")
    with pytest.raises(ValueError, match="texts is empty"):
        fitting_texts(FakeDataset([]), "text")
    stream = FakeIterableDataset([{"body": "a b"}, {"body": "c"}, {"body": ""}, {"body": "d"}])
    assert fitting_texts(stream, "body") is stream
    assert next(text_batches(stream, 3, 0, 0, "body")) == ["a b", "c", "d"]
    with pytest.raises(ValueError, match="text_column='text'"):
        next(text_batches(stream, 3, 0, 0, "text"))
    with pytest.raises(ValueError, match="text_column='text'"):
        fitting_texts(FakeIterableDataset([], column_names=["body"]), "text")


def test_bad_texts_name_the_argument():
    with pytest.raises(ValueError, match="single string"):
        fitting_texts("some text")
    with pytest.raises(ValueError, match="texts is empty"):
        fitting_texts(["", "  ", None])
    with pytest.raises(ValueError, match="not a string"):
        next(text_batches(iter([1, 2]), 1, 0, 0))
    with pytest.raises(ValueError, match="texts must be"):
        fitting_texts(42)


def test_text_files(tmp_path):
    (tmp_path / "b.txt").write_text("second file\n\n  last line  \n")
    (tmp_path / "a.txt").write_text("first line\n   \nsecond line\n")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "c.md").write_text("in a folder\n")
    files = TextFiles(str(tmp_path / "*.txt"))
    assert list(files) == ["first line", "second line", "second file", "last line"]
    assert list(files) == list(files)  # re-iterable
    both = TextFiles(f"{tmp_path}/sub/*.md, {tmp_path}/a.txt")
    assert list(both) == ["in a folder", "first line", "second line"]
    assert list(TextFiles([str(tmp_path / "**" / "*.md")])) == ["in a folder"]
    with pytest.raises(ValueError, match="patterns: .*nothing.*matches no file"):
        TextFiles(str(tmp_path / "nothing*.txt"))
    with pytest.raises(ValueError, match="patterns is empty"):
        TextFiles(" , ")
