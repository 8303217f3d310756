"""pytest-benchmark: fitting g's throughput (:func:`sbpet.fit_mapping`), sequences/s and tokens/s,
with and without the regulariser's share, checked in the same run.

Timed per configuration: ``fit`` — ``STEPS`` steps of ``fit_mapping`` on a stream of synthetic
texts (tokenising, the frozen backbone, the hooks, R, its backward, clipping, AdamW); ``backbone``
— the frozen backbone alone (``torch.no_grad``, the same autocast) on the same batches, i.e. the
step without the regulariser's share. The regulariser's share is 1 - backbone / fit. Configurations:
a tiny BERT on CPU (seconds); a BERT-base shape on CUDA (bf16 backbone, fit_mapping's default there).

Timed run:
    SBPET_BENCH_THREADS=1 python -m pytest benchmarks/bench_fitting.py --benchmark-json OUT.json
Smoke run: ``python -m pytest benchmarks/bench_fitting.py --benchmark-disable -q``. The numbers
are in each test's ``extra_info`` (``seq_per_s``, ``tok_per_s``, ``backbone_seq_per_s``,
``backbone_tok_per_s``, ``regulariser_share``).
"""

from __future__ import annotations

import math
import tempfile
import time

import pytest
import torch

import sbpet
from benchmarks import measure, suite
from sbpet.hf.corpus import make_fitting_batch, text_batches, tokenise_texts

DEVICE = suite.bench_device()
# name: (hidden, layers, heads, intermediate, words per text, batch, dims of g)
CONFIGS = {
    "tiny-bert": (64, 4, 4, 128, 48, 16, (64, 16)),
    "bert-base": (768, 12, 12, 3072, 100, 64, (512, 128)),
}
NAMES = ("bert-base",) if DEVICE.type == "cuda" else ("tiny-bert",)
STEPS, VOCAB, SEED = 8, 500, 0


def _setup(name: str, directory: str, device: torch.device = DEVICE):
    from transformers import BertConfig, BertForMaskedLM, BertTokenizerFast

    hidden, layers, heads, inner, words, batch, dims = CONFIGS[name]
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + [f"w{i}" for i in range(VOCAB - 5)]
    tokenizer = BertTokenizerFast(vocab={w: i for i, w in enumerate(vocab)})
    tokenizer.save_pretrained(directory)
    torch.manual_seed(SEED)
    config = BertConfig(vocab_size=VOCAB, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
                        intermediate_size=inner, max_position_embeddings=512)
    model = BertForMaskedLM(config).to(device)
    gen = torch.Generator().manual_seed(SEED)
    texts = [" ".join(f"w{int(i)}" for i in torch.randint(VOCAB - 5, (int(n),), generator=gen))
             for n in torch.randint(words // 2, words + 1, (STEPS * batch,), generator=gen)]
    reg = sbpet.BridgeRegularizer(hidden, layers, dims=dims, word_embeddings=model.get_input_embeddings().weight,
                                  backend="torch", seed=SEED)
    return model, tokenizer, texts, reg, batch


def _backbone_only(model, tokenizer, texts, batch: int, device: torch.device = DEVICE) -> float:
    """Seconds for the frozen backbone on the fit's batches (the step without the regulariser)."""
    from sbpet.hf.capture import find_backbone_and_layers

    backbone, _ = find_backbone_and_layers(model)
    model.eval()
    batches = text_batches(texts, batch, SEED, 0)
    dtype = torch.bfloat16 if device.type == "cuda" else None
    began = time.perf_counter()
    for step in range(STEPS):
        rows = tokenise_texts(tokenizer, next(batches), 128)
        ids, mask, _ = make_fitting_batch(rows, range(len(rows)), 0, tokenizer.mask_token_id, len(tokenizer), 0.15,
                                          True, False, -100, torch.Generator().manual_seed(step))
        with torch.no_grad(), torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
            backbone(input_ids=ids.to(device), attention_mask=mask.to(device))
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - began


def measure_fitting(name: str, device: torch.device = DEVICE, rounds: int = 3, timer=None) -> dict:
    """Fitting throughput of configuration ``name`` on ``device``: ``rounds`` timed fits (after
    one warm-up round; ``timer(fit, rounds)`` runs them instead when given: pytest-benchmark)
    and as many backbone-only passes, medians; checks that R is finite and g trains. Returns
    the record (``seq_per_s``, ``tok_per_s``, their ``backbone_`` twins, ``regulariser_share``)."""
    with tempfile.TemporaryDirectory() as directory:
        model, tokenizer, texts, reg, batch = _setup(name, directory, device)
    tokens = sum(len(ids) for ids in tokenizer(texts, truncation=True, max_length=128)["input_ids"])
    start = {k: v.clone() for k, v in reg.state_dict().items()}
    runs = []

    def fit():
        reg.load_state_dict(start)
        began = time.perf_counter()
        history = sbpet.fit_mapping(model, tokenizer, iter(texts), reg, steps=STEPS, batch_size=batch,
                                    max_length=128, progress=False, seed=SEED)
        if device.type == "cuda":
            torch.cuda.synchronize()
        runs.append((time.perf_counter() - began, history["loss"]))

    if timer is not None:
        timer(fit, rounds)
    else:
        for _ in range(rounds + 1):
            fit()
        runs = runs[1:]  # the warm-up round
    losses = runs[-1][1]
    assert len(losses) == STEPS and all(math.isfinite(v) and v > 0 for v in losses), losses
    assert any(not torch.equal(v, start[k]) for k, v in reg.state_dict().items()), "g did not train"
    fit_s = sorted(s for s, _ in runs)[len(runs) // 2]
    backbone_s = sorted(_backbone_only(model, tokenizer, texts, batch, device) for _ in range(rounds))[rounds // 2]
    sequences = STEPS * batch
    return dict(config=name, environment=measure.environment(device), steps=STEPS, batch=batch, tokens=tokens,
                fit_s=fit_s, seq_per_s=sequences / fit_s, tok_per_s=tokens / fit_s, backbone_s=backbone_s,
                backbone_seq_per_s=sequences / backbone_s, backbone_tok_per_s=tokens / backbone_s,
                regulariser_share=max(0.0, 1 - backbone_s / fit_s))


@pytest.mark.parametrize("name", NAMES)
def test_fitting_throughput(bench, name):
    suite.apply_threads()
    timed = not getattr(bench, "disabled", True)

    def timer(fit, rounds):
        bench.pedantic(fit, rounds=rounds, iterations=1, warmup_rounds=1 if timed else 0)

    bench.extra_info.update(measure_fitting(name, DEVICE, rounds=3 if timed else 1, timer=timer))
    bench.group = f"fitting g {name}"
