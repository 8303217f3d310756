"""The text :func:`~sbpet.hf.fitting.fit_mapping` fits g on, and its batches (docs/METHOD.md
"Fitting g"): a finite list shuffled epoch by epoch, or a stream (a generator, an endless
iterator, a Hugging Face ``datasets`` dataset, :class:`TextFiles`) read in order, never held in
memory whole, tokenised batch by batch."""

from __future__ import annotations

import glob
import itertools
import os
from collections.abc import Iterable, Iterator, Mapping, Sequence

import torch

__all__ = ["TextFiles", "fitting_texts", "text_batches", "batch_indices", "tokenise_texts", "make_fitting_batch"]


class TextFiles:
    """The non-empty lines (stripped) of the text files matching ``patterns``, one text per line,
    read lazily file by file: iterating again reads the files again (so a fit cycles through them).

    Args:
        patterns: a glob (``"corpus/*.txt"``), a comma list of globs, or a list of either; each
            glob's matches are taken in sorted order, the globs in the order given; ``**``
            matches folders recursively.
        encoding: the files' encoding (undecodable bytes are replaced).

    Raises:
        ValueError: naming ``patterns`` when it is empty or a glob matches no file.

    Example:
        >>> fit_mapping(model, tokenizer, TextFiles("wiki/*.txt"), reg, steps=1000)
    """

    def __init__(self, patterns: str | os.PathLike | Sequence[str | os.PathLike], encoding: str = "utf-8"):
        if isinstance(patterns, (str, os.PathLike)):
            patterns = [patterns]
        globs = [p.strip() for item in patterns for p in os.fspath(item).split(",") if p.strip()]
        if not globs:
            raise ValueError("patterns is empty: give at least one glob of text files")
        self.paths: list[str] = []
        for pattern in globs:
            matches = sorted(p for p in glob.glob(os.path.expanduser(pattern), recursive=True) if os.path.isfile(p))
            if not matches:
                raise ValueError(f"patterns: {pattern!r} matches no file")
            self.paths += matches
        self.encoding = encoding

    def __iter__(self) -> Iterator[str]:
        for path in self.paths:
            with open(path, encoding=self.encoding, errors="replace") as f:
                for line in f:
                    line = line.strip()
                    if line:
                        yield line

    def __repr__(self) -> str:
        return f"TextFiles({len(self.paths)} files)"


class _TextColumn(Sequence):
    """A map-style ``datasets.Dataset``'s text column, read row by row when asked (never copied)."""

    def __init__(self, dataset, column: str):
        self.dataset, self.column = dataset, column

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index):
        text = self.dataset[int(index)][self.column]
        if not isinstance(text, str):
            raise ValueError(f"texts: row {index}'s {self.column!r} is a {type(text).__name__}, not a string")
        return text


def fitting_texts(texts, text_column: str = "text"):
    """What :func:`~sbpet.hf.fitting.fit_mapping` reads ``texts`` as: a list of its non-blank
    strings for a list or other ``Sequence`` (shuffled epoch by epoch); a lazy view of the
    ``text_column`` of a map-style ``datasets.Dataset`` (shuffled alike; blank rows kept, they give
    no targets); and the iterable itself for anything else (a stream, read in order).

    Raises:
        ValueError: a single string, an empty list, or a dataset without ``text_column``.
    """
    if isinstance(texts, (str, bytes)):
        raise ValueError("texts is a single string: give a list or an iterable of strings")
    columns = getattr(texts, "column_names", None)  # a datasets.Dataset / IterableDataset
    if isinstance(columns, dict):  # a DatasetDict: which split is meant is not ours to guess
        raise ValueError(f"texts is a DatasetDict ({sorted(columns)}): pass one split, e.g. texts['train']")
    if columns is not None and text_column not in columns:
        raise ValueError(f"text_column={text_column!r} is not a column of texts (its columns: {list(columns)})")
    if columns is not None and hasattr(texts, "__len__") and hasattr(texts, "__getitem__"):
        if len(texts) == 0:
            raise ValueError("texts is empty: fit_mapping needs some text")
        return _TextColumn(texts, text_column)
    if isinstance(texts, Sequence):
        texts = [t for t in texts if isinstance(t, str) and t.strip()]
        if not texts:
            raise ValueError("texts is empty: fit_mapping needs some text")
        return texts
    if not isinstance(texts, Iterable):
        raise ValueError(f"texts must be a list or an iterable of strings, got {type(texts).__name__}")
    return texts


def batch_indices(step: int, batch_size: int, count: int, seed: int, _perms: dict | None = None) -> list[int]:
    """The indices into a list of ``count`` texts of step ``step``'s batch: deterministic in
    (seed, step), an epoch-wise shuffle (text k of the run is ``randperm(count)[k % count]`` under
    the seed ``seed * 7919 + k // count``), so a resumed run sees the same data."""
    out = []
    for k in range(step * batch_size, (step + 1) * batch_size):
        epoch, offset = divmod(k, count)
        if _perms is None or epoch not in _perms:
            perm = torch.randperm(count, generator=torch.Generator().manual_seed(seed * 7919 + epoch))
            if _perms is not None:
                _perms.clear()  # one epoch's permutation at a time
                _perms[epoch] = perm
        else:
            perm = _perms[epoch]
        out.append(int(perm[offset]))
    return out


def _stream_texts(iterable, text_column: str) -> Iterator[str]:
    for item in iterable:
        if isinstance(item, Mapping):  # a dataset row
            if text_column not in item:
                raise ValueError(f"text_column={text_column!r} is not a column of texts (its rows have {sorted(item)})")
            item = item[text_column]
        if not isinstance(item, str):
            raise ValueError(f"texts yielded a {type(item).__name__}, not a string")
        if item.strip():
            yield item


def _endless(texts, text_column: str) -> Iterator[str]:
    """The stream's non-blank texts; a re-iterable one (a list-like, :class:`TextFiles`, a
    dataset) starts again when it ends, a one-shot iterator that ends is an error."""
    one_shot = iter(texts) is texts
    while True:
        count = 0
        for text in _stream_texts(texts, text_column):
            count += 1
            yield text
        if count == 0:
            raise ValueError("texts is empty: fit_mapping needs some text")
        if one_shot:
            raise ValueError("texts (an iterator) ran out before the last step: give a longer (or endless) stream, "
                             "a re-iterable one (a list, TextFiles, a dataset), or fewer steps")


def text_batches(texts, batch_size: int, seed: int, start: int, text_column: str = "text") -> Iterator[list[str]]:
    """The texts of steps ``start``, ``start + 1``, ... (lists of ``batch_size`` strings) of
    :func:`fitting_texts`'s ``texts``: for a list, :func:`batch_indices`' epoch-wise shuffle; for
    a stream, consecutive chunks in stream order, the first ``start * batch_size`` non-blank texts
    skipped (a resumed run continues where it stopped). The first text of a stream is read at once,
    so an empty stream fails before anything else."""
    if isinstance(texts, Sequence):
        def from_list():
            perms: dict = {}
            for step in itertools.count(start):
                yield [texts[i] for i in batch_indices(step, batch_size, len(texts), seed, perms)]

        return from_list()
    stream = _endless(texts, text_column)
    first = next(stream)  # raises for an empty stream
    stream = itertools.chain([first], stream)
    for _ in range(start * batch_size):
        next(stream)

    def from_stream():
        while True:
            yield [next(stream) for _ in range(batch_size)]

    return from_stream()


def tokenise_texts(tokenizer, texts: Sequence[str], max_length: int):
    """Tokenise ``texts`` (truncated to ``max_length``) as :func:`fit_mapping` does: one
    (input ids [S] long, special-token mask [S] bool) pair per text."""
    encoded = tokenizer(list(texts), truncation=True, max_length=max_length)
    rows = []
    for ids in encoded["input_ids"]:
        special = tokenizer.get_special_tokens_mask(ids, already_has_special_tokens=True)
        rows.append((torch.tensor(ids, dtype=torch.long), torch.tensor(special, dtype=torch.bool)))
    return rows


def make_fitting_batch(rows, indices, pad_id, mask_id, vocab, probability, corrupt, causal, ignore, gen):
    """One of :func:`fit_mapping`'s batches from :func:`tokenise_texts`'s ``rows``: pad, choose ~``probability`` of the ordinary tokens as targets (at least one per
    sequence), and corrupt the inputs as in masked-LM training (80% [MASK], 10% random, 10%
    kept) unless the model is causal. Returns input_ids, attention_mask, labels [B, S]."""
    length = max(rows[i][0].numel() for i in indices)
    batch = len(indices)
    input_ids = torch.full((batch, length), pad_id, dtype=torch.long)
    attention_mask = torch.zeros(batch, length, dtype=torch.long)
    labels = torch.full((batch, length), ignore, dtype=torch.long)
    for b, i in enumerate(indices):
        ids, special = rows[i]
        n = ids.numel()
        input_ids[b, :n] = ids
        attention_mask[b, :n] = 1
        candidates = (~special).nonzero().squeeze(1)
        if causal:
            candidates = candidates[candidates >= 1]  # the first token has no predecessor state
        if candidates.numel() == 0:
            continue
        chosen = candidates[torch.rand(candidates.numel(), generator=gen) < probability]
        if chosen.numel() == 0:
            chosen = candidates[torch.randint(candidates.numel(), (1,), generator=gen)]
        labels[b, chosen] = ids[chosen]
        if corrupt and not causal and mask_id is not None:
            draw = torch.rand(chosen.numel(), generator=gen)
            masked, randomised = chosen[draw < 0.8], chosen[(draw >= 0.8) & (draw < 0.9)]
            input_ids[b, masked] = mask_id
            input_ids[b, randomised] = torch.randint(vocab, (randomised.numel(),), generator=gen)
    return input_ids, attention_mask, labels


def pack_fitting_batch(input_ids, attention_mask, labels):
    """A padded fitting batch [B, S] packed into one row [1, T] (T real tokens, no padding), as
    transformers' ``DataCollatorWithFlattening`` packs: the rows' real tokens one after another,
    ``position_ids`` restarting at 0 for each. Returns input_ids, labels, position_ids [1, T]; the
    model keeps the sequences apart from the positions (flash-attention), the regulariser takes one
    context per sequence from them (:func:`sbpet.core.positions.find_segments`)."""
    real = attention_mask != 0
    position_ids = (real.long().cumsum(dim=1) - 1)[real]
    return input_ids[real][None], labels[real][None], position_ids[None]
