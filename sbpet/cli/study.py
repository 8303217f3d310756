"""``sbpet study``: the paper's claim tested on a seeded grid the user can rerun.

The grid is PET method x regulariser x shots x alpha x seed; "none" (the vanilla PET) runs once per
PET, shots and seed, every other regulariser once per alpha. The design:

- **Paired.** For a seed, every regulariser and alpha trains on the same few-shot sample, from the
  same PET initialisation, with the same data order (:func:`~sbpet.cli.experiment.train_few_shot`
  seeds everything with the run's seed), so the difference to the vanilla run of the same seed
  is the regulariser's effect.
- **One test split** for the whole study (:data:`~sbpet.cli.experiment.TEST_SPLIT_SEED`), never used
  for choosing anything; g is fitted once per regulariser kind and bridge on the rest of the
  corpus (unlabelled) and cached. Each seed draws its own validation split from the training
  pool; alpha is chosen per PET, shots and regulariser by mean validation accuracy.
- **Cached by configuration.** Every run is a JSON file ``<out>/runs/<hash>.json`` named by a hash
  of everything it depends on (model and data folders, g's configuration, budgets, seed, device,
  backend, library versions): an interrupted study resumes, a changed setting reruns only the
  runs it changes, and an unreadable or inconsistent file is rerun with a warning.
- **The paper's analysis.** Vanilla runs also score their test paths with the fitted PDF g of
  each bridge under the true label's endpoint and under shuffled endpoints: a ratio well below 1
  says the vanilla PET's latent paths already end where the bridge would send them.

Outputs in ``--out``: ``runs.json`` / ``runs.csv`` (every run), ``table.md`` and ``study.png``.
"""

from __future__ import annotations

import csv
import hashlib
import json
import math
import os
import sys
import time
from dataclasses import asdict, dataclass

from .demo import PET_METHODS

__all__ = ["run_study", "parse_grid", "plan_runs", "summarize", "write_outputs", "REGULARIZERS", "QUICK"]

REGULARIZERS = ("none", "pdf-brownian", "pdf-ou", "sde-brownian", "sde-ou")
ANALYSIS_BRIDGES = ("brownian", "ou")
DEFAULT_GRID = {"pets": "lora,prompt,bitfit", "regularizers": "none,pdf-brownian,pdf-ou", "shots": "4,16",
                "alphas": "0.1,0.5", "seeds": 5}
QUICK = {"pets": "lora", "regularizers": "none,pdf-brownian", "shots": "4", "alphas": "0.1", "seeds": 2,
         "epochs": 1.0, "fit_steps": 20, "test_per_class": 20, "val_per_class": 4}
CACHE_FORMAT = 1  # bump when a run's protocol changes: every cached run is then rerun
RESULT_KEYS = ("val_accuracy", "test_accuracy", "task_loss", "train_loss", "seconds")


@dataclass(frozen=True)
class Run:
    """One cell of the grid for one seed (``alpha`` is None for the vanilla PET)."""

    pet: str
    regularizer: str
    alpha: float | None
    shots: int
    seed: int

    @property
    def kind_and_bridge(self) -> tuple[str, str] | None:
        return None if self.regularizer == "none" else tuple(self.regularizer.split("-"))


# ----------------------------------------------------------------------------------------------
# Options


def resolve_options(args, defaults: dict) -> None:
    """Fill the options left unset (None): from :data:`QUICK` with ``--quick``, else from the
    default grid and ``defaults`` (the values ``sbpet train`` uses)."""
    for name, value in {**defaults, **DEFAULT_GRID, **(QUICK if args.quick else {})}.items():
        if getattr(args, name, None) is None:
            setattr(args, name, value)


def _items(value, option: str, what: str) -> list[str]:
    items = [v.strip() for v in str(value).split(",") if v.strip()]
    if not items:
        raise ValueError(f"{option} is empty: the grid needs at least one {what}")
    return list(dict.fromkeys(items))


def _names(value, option: str, allowed) -> list[str]:
    items = _items(value, option, "name")
    for item in items:
        if item not in allowed:
            raise ValueError(f"{option}: unknown name {item!r} (choose from {', '.join(allowed)})")
    return items


def _positive(value, option: str, cast) -> list:
    numbers = []
    for item in _items(value, option, "value"):
        try:
            number = cast(item)
        except ValueError:
            raise ValueError(f"{option}: {item!r} is not a {'whole ' if cast is int else ''}number") from None
        if not (math.isfinite(number) and number > 0):
            raise ValueError(f"{option} must hold positive numbers, got {item}")
        numbers.append(number)
    return sorted(set(numbers))


def parse_grid(args) -> dict:
    """The grid from the (resolved) options: ``{"pets", "regularizers", "shots", "alphas",
    "seeds"}`` as lists. Raises ValueError naming the option for unknown names, empty lists,
    non-positive numbers and an empty grid."""
    if args.seeds is None or args.seeds < 1:
        raise ValueError(f"--seeds must be >= 1 (the grid is empty), got {args.seeds}")
    for option, value in (("--epochs", args.epochs), ("--lr", args.lr), ("--batch-size", args.batch_size),
                          ("--fit-steps", args.fit_steps), ("--fit-batch-size", args.fit_batch_size)):
        if not value > 0:
            raise ValueError(f"{option} must be positive, got {value}")
    return {
        "pets": _names(args.pets, "--pets", PET_METHODS),
        "regularizers": _names(args.regularizers, "--regularizers", REGULARIZERS),
        "shots": _positive(args.shots, "--shots", int),
        "alphas": _positive(args.alphas, "--alphas", float),
        "seeds": list(range(args.seeds)),
    }


def plan_runs(grid: dict) -> list[Run]:
    """Every run of the grid, seed by seed (a stopped study has whole seeds done first)."""
    runs = []
    for seed in grid["seeds"]:
        for shots in grid["shots"]:
            for pet in grid["pets"]:
                for reg in grid["regularizers"]:
                    for alpha in [None] if reg == "none" else grid["alphas"]:
                        runs.append(Run(pet, reg, alpha, shots, seed))
    return runs


# ----------------------------------------------------------------------------------------------
# The run cache


def run_config(setup, run: Run) -> dict:
    """Everything a run's result depends on: its cache key."""
    import peft
    import torch
    import transformers

    from ..core.version import __version__
    from .experiment import TEST_SPLIT_SEED

    a = setup.args
    if run.kind_and_bridge is None:
        g = {f"pdf-{b}": setup.g_config(b, "pdf") for b in ANALYSIS_BRIDGES}
    else:
        kind, bridge = run.kind_and_bridge
        g = {run.regularizer: setup.g_config(bridge, kind)}
    return {
        "format": CACHE_FORMAT, **asdict(run), "model_dir": setup.model_dir, "data_dir": setup.data_dir,
        "epochs": float(a.epochs), "lr": float(a.lr), "batch_size": int(a.batch_size), "max_length": int(a.max_length),
        "val_per_class": int(a.val_per_class), "test_per_class": int(a.test_per_class),
        "test_split_seed": TEST_SPLIT_SEED, "device": setup.device.type, "backend": a.backend,
        "precision": a.precision, "g": g,
        "versions": {"sbpet": __version__, "torch": torch.__version__, "transformers": transformers.__version__,
                     "peft": peft.__version__},
    }


def config_hash(config: dict) -> str:
    """The cache file name of a run configuration."""
    return hashlib.sha1(json.dumps(config, sort_keys=True).encode()).hexdigest()[:16]


def _number(value) -> bool:
    # NaN is a number here: a diverged run's loss is its result, not a damaged entry.
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _problem(entry, config: dict) -> str | None:
    """Why a cached entry cannot be reused (None: it can)."""
    if not isinstance(entry, dict) or entry.get("config") != config:
        return "its configuration does not match the run's"
    result = entry.get("result")
    if not isinstance(result, dict):
        return "it holds no result"
    missing = [k for k in RESULT_KEYS if not _number(result.get(k))]
    if missing:
        return f"its result lacks {', '.join(missing)}"
    if config["regularizer"] == "none":
        analysis = result.get("analysis")
        if not isinstance(analysis, dict) or not all(
            isinstance(analysis.get(b), dict) and _number(analysis[b].get("true")) and _number(analysis[b].get("shuffled"))
            for b in ANALYSIS_BRIDGES
        ):
            return "its bridge-likeness analysis is incomplete"
    elif not _number(result.get("bridge_loss")):
        return "its result lacks bridge_loss"
    return None


def load_cached(path: str, config: dict, warn) -> dict | None:
    """The cached result at ``path`` for ``config``, or None (absent; or unreadable / not this
    run's, reported through ``warn`` and to be rerun, never reused)."""
    if not os.path.exists(path):
        return None
    try:
        with open(path, encoding="utf-8") as f:
            entry = json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        warn(f"the cached run {path} is unreadable ({exc}): rerunning it")
        return None
    problem = _problem(entry, config)
    if problem:
        warn(f"the cached run {path} cannot be reused ({problem}): rerunning it")
        return None
    return entry["result"]


def save_cached(path: str, config: dict, result: dict) -> None:
    """Write a run's entry atomically (an interrupted write never leaves half a file)."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    partial = path + ".partial"
    with open(partial, "w", encoding="utf-8") as f:
        json.dump({"config": config, "result": result}, f, indent=1)
    os.replace(partial, path)


# ----------------------------------------------------------------------------------------------
# Running


def _execute(setup, run: Run, regularizers: dict, test_data) -> dict:
    """Train and score one run; the result stored in its cache file."""
    import torch

    from .experiment import evaluate, train_few_shot

    start = time.time()
    a = setup.args
    train_rows, val_rows = setup.sample(run.shots, run.seed)
    reg = None if run.kind_and_bridge is None else regularizers[run.kind_and_bridge]
    classifier, words, train_loss, _ = train_few_shot(
        setup, run.pet, train_rows, run.seed, regularizer=reg, alpha=run.alpha or 0.0, epochs=a.epochs,
        batch_size=a.batch_size, lr=a.lr, quiet=True,
    )
    mask_id = setup.tokenizer.mask_token_id
    if reg is None:
        scorers = {b: regularizers[("pdf", b)] for b in ANALYSIS_BRIDGES}
        test = evaluate(classifier, *test_data, words, mask_id, scorers, shuffled=True)
    else:
        test = evaluate(classifier, *test_data, words, mask_id, {"own": reg})
    val = evaluate(classifier, *setup.encode(val_rows), words, mask_id)
    result = {"val_accuracy": val["accuracy"], "test_accuracy": test["accuracy"], "task_loss": test["task_loss"],
              "bridge_loss": None if reg is None else test["bridge_loss"]["own"], "train_loss": train_loss,
              "seconds": time.time() - start, "threads": torch.get_num_threads()}
    if reg is None:
        result["analysis"] = {b: {"true": test["bridge_loss"][b], "shuffled": test["shuffled_bridge_loss"][b]}
                              for b in ANALYSIS_BRIDGES}
    return result


def run_study(args, defaults: dict) -> int:
    """``sbpet study``: resolve and check the options (errors name the option, before any slow
    work), run every uncached run of the grid under a progress bar, write the outputs and print
    their paths and the wall time. Returns 0."""
    from tqdm.auto import tqdm
    from transformers.utils import logging as hf_logging

    from .experiment import Setup, deterministic_algorithms

    start = time.time()
    resolve_options(args, defaults)
    grid = parse_grid(args)
    setup = Setup(args)
    setup.check_sizes(grid["shots"], grid["pets"])
    out = args.out or os.path.join(setup.cache, "study")
    if os.path.exists(out) and not os.path.isdir(out):  # else it fails when the first run is saved
        raise ValueError(f"--out: {out} exists and is not a folder")
    runs = plan_runs(grid)
    configs = [run_config(setup, run) for run in runs]
    paths = [os.path.join(out, "runs", f"{config_hash(c)}.json") for c in configs]
    messages = []
    results = [load_cached(p, c, messages.append) for p, c in zip(paths, configs)]
    for message in messages:
        print(f"sbpet study: warning: {message}", file=sys.stderr)
    todo = [i for i, r in enumerate(results) if r is None]
    print(f"sbpet study: {len(runs)} runs ({len(runs) - len(todo)} cached, {len(todo)} to train) -> {out}")
    if todo:
        with deterministic_algorithms():
            regularizers = {}
            needed = {runs[i].kind_and_bridge for i in todo}
            if None in needed:
                needed |= {("pdf", b) for b in ANALYSIS_BRIDGES}
            for kind, bridge in sorted(k for k in needed if k is not None):
                regularizers[(kind, bridge)] = setup.regularizer(bridge, kind=kind)
            test_data = setup.encode(setup.test)
            # Cached runs count as done; the time estimate comes from the runs trained now.
            bar = tqdm(total=len(runs), initial=len(runs) - len(todo), desc="study", unit="run",
                       disable=not setup.progress, dynamic_ncols=True)
            loading_bars = hf_logging.is_progress_bar_enabled()
            hf_logging.disable_progress_bar()  # one bar for the grid, not one per model load
            try:
                for i in todo:
                    run = runs[i]
                    bar.set_postfix_str(f"{run.pet} {run.regularizer} a={run.alpha} shots={run.shots} seed={run.seed}")
                    results[i] = _execute(setup, run, regularizers, test_data)
                    save_cached(paths[i], configs[i], results[i])
                    bar.update(1)
            finally:
                bar.close()
                if loading_bars:
                    hf_logging.enable_progress_bar()
    records = [{**asdict(run), **result, "cached": i not in todo, "config_hash": config_hash(config)}
               for i, (run, result, config) in enumerate(zip(runs, results, configs))]
    wall = time.time() - start
    written = write_outputs(records, grid, out, _describe(setup, grid, records, wall))
    for path in written:
        print(f"wrote {path}")
    print(f"sbpet study: {len(todo)} runs trained, {len(runs) - len(todo)} cached; wall time {wall:.0f} s")
    return 0


def _describe(setup, grid: dict, records: list, wall: float) -> dict:
    """The study's settings, the command that reproduces it, and its timing."""
    a = setup.args
    command = (f"sbpet study --pets {','.join(grid['pets'])} --regularizers {','.join(grid['regularizers'])} "
               f"--shots {','.join(map(str, grid['shots']))} --alphas {','.join(map(str, grid['alphas']))} "
               f"--seeds {len(grid['seeds'])} --epochs {a.epochs:g} --lr {a.lr:g} --batch-size {a.batch_size} "
               f"--fit-steps {a.fit_steps} --max-length {a.max_length} --dims {a.dims} "
               f"--test-per-class {a.test_per_class} --val-per-class {a.val_per_class}")
    if a.model_dir:
        command += f" --model-dir {a.model_dir}"
    if getattr(a, "dataset", "bbc") != "bbc":
        command += f" --dataset {a.dataset}"
    if a.data_dir:
        command += f" --data-dir {a.data_dir}"
    return {"command": command, "model_dir": setup.model_dir, "data_dir": setup.data_dir,
            "classes": setup.classes, "test_examples": len(setup.test), "val_per_class": a.val_per_class,
            "wall_seconds": wall,
            "run_seconds": sum(r["seconds"] for r in records),
            "threads": sorted({r.get("threads") for r in records if r.get("threads") is not None})}


# ----------------------------------------------------------------------------------------------
# Summaries


def _mean_std(values) -> tuple[float, float]:
    values = list(values)
    if not values:
        return math.nan, math.nan
    mean = sum(values) / len(values)
    if len(values) < 2:
        return mean, math.nan
    return mean, math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1))


def summarize(records: list, grid: dict) -> tuple[list, list]:
    """The two tables as lists of dicts.

    Accuracy rows (per PET x shots x regulariser): alpha with the highest mean validation
    accuracy over seeds (ties: the smaller alpha), the mean validation and test accuracy and
    their std over seeds there, and the paired per-seed test-accuracy difference to the vanilla
    run of the same seed (mean, std, wins = seeds where the regulariser is strictly better).
    Analysis rows (per PET x shots x bridge, vanilla runs): mean R under the true endpoints,
    under shuffled ones, and their ratio.
    """
    rows, analysis = [], []
    for pet in grid["pets"]:
        for shots in grid["shots"]:
            cell = [r for r in records if r["pet"] == pet and r["shots"] == shots]
            vanilla = {r["seed"]: r["test_accuracy"] for r in cell if r["regularizer"] == "none"}
            for reg in grid["regularizers"]:
                mine = [r for r in cell if r["regularizer"] == reg]
                if not mine:
                    continue
                by_alpha: dict = {}
                for r in mine:
                    by_alpha.setdefault(r["alpha"], []).append(r)
                alpha = max(sorted(by_alpha, key=lambda x: -1 if x is None else x),
                            key=lambda x: _mean_std(r["val_accuracy"] for r in by_alpha[x])[0])
                chosen = by_alpha[alpha]
                row = {"pet": pet, "shots": shots, "regularizer": reg, "alpha": alpha, "seeds": len(chosen)}
                row["val_mean"], row["val_std"] = _mean_std(r["val_accuracy"] for r in chosen)
                row["test_mean"], row["test_std"] = _mean_std(r["test_accuracy"] for r in chosen)
                diffs = [r["test_accuracy"] - vanilla[r["seed"]] for r in chosen if r["seed"] in vanilla]
                if reg != "none" and diffs:
                    row["diff_mean"], row["diff_std"] = _mean_std(diffs)
                    row["wins"], row["paired"] = sum(d > 0 for d in diffs), len(diffs)
                rows.append(row)
            for bridge in ANALYSIS_BRIDGES:
                found = [r["analysis"][bridge] for r in cell if r["regularizer"] == "none" and r.get("analysis")]
                if found:
                    true, _ = _mean_std(a["true"] for a in found)
                    shuffled, _ = _mean_std(a["shuffled"] for a in found)
                    analysis.append({"pet": pet, "shots": shots, "bridge": bridge, "seeds": len(found),
                                     "true": true, "shuffled": shuffled, "ratio": true / shuffled})
    return rows, analysis


def _pm(mean: float, std: float, signed: bool = False) -> str:
    if math.isnan(mean):
        return ""
    text = f"{mean:+.3f}" if signed else f"{mean:.3f}"
    return text + ("" if math.isnan(std) else f" ± {std:.3f}")


def format_table(rows: list, analysis: list, info: dict) -> str:
    """table.md: the settings, the accuracy table and the bridge-likeness table."""
    seeds = max((r["seeds"] for r in rows), default=0)
    lines = ["# sbpet study", "", f"Reproduce: `{info['command']}`", "",
             f"Model `{info['model_dir']}`, data `{info['data_dir']}` ({len(info['classes'])} classes, "
             f"{info['test_examples']} test examples, one split for every seed); wall time of the runs "
             f"{info['run_seconds']:.0f} s on {'/'.join(map(str, info['threads']))} CPU thread(s).", "",
             f"**Test accuracy**, mean ± std over {seeds} seed{'' if seeds == 1 else 's'}. For each regulariser, alpha is the one with the "
             f"highest mean **validation** accuracy ({info['val_per_class']} examples per class per seed, drawn from the "
             "training pool, never the test split). Δ vs vanilla: the per-seed difference in test accuracy to the "
             "vanilla PET of the same seed (same few-shot sample, PET initialisation and data order), mean ± std; "
             "wins: seeds where the regulariser is strictly better.", "",
             "| PET | shots | regulariser | alpha (by validation) | validation acc | test acc | Δ vs vanilla | wins |",
             "| --- | ---: | --- | ---: | ---: | ---: | ---: | ---: |"]
    for r in rows:
        wins = f"{r['wins']}/{r['paired']}" if "wins" in r else ""
        alpha = "" if r["alpha"] is None else f"{r['alpha']:g}"
        lines.append(f"| {r['pet']} | {r['shots']} | {r['regularizer']} | {alpha} | "
                     f"{_pm(r['val_mean'], r['val_std'])} | {_pm(r['test_mean'], r['test_std'])} | "
                     f"{_pm(r.get('diff_mean', math.nan), r.get('diff_std', math.nan), True)} | {wins} |")
    if analysis:
        lines += ["", "**Are vanilla PETs already bridge-like?** Bridge loss R (the fitted PDF g of each bridge) of "
                  "the vanilla runs' test [MASK] paths ending at the true label word's tail point vs at shuffled "
                  "labels' (the labels permuted across the test examples with a fixed generator; with C balanced "
                  "classes about 1/C of them still match), mean over seeds. A ratio below 1: the paths already end "
                  "nearer their own label's endpoint, as the bridge would have them.", "",
                  "| PET | shots | bridge | R, true endpoint | R, shuffled endpoint | ratio true / shuffled |",
                  "| --- | ---: | --- | ---: | ---: | ---: |"]
        for r in analysis:
            lines.append(f"| {r['pet']} | {r['shots']} | {r['bridge']} | {r['true']:.4f} | {r['shuffled']:.4f} | "
                         f"{r['ratio']:.3f} |")
    return "\n".join(lines) + "\n"


def plot_study(rows: list, grid: dict, path: str) -> str:
    """study.png: test accuracy vs shots, one panel per PET, one line per regulariser (at the
    alpha chosen on validation), error bars = std over seeds."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    pets = grid["pets"]
    fig, axes = plt.subplots(1, len(pets), figsize=(4.5 * len(pets), 3.8), squeeze=False, sharey=True)
    for ax, pet in zip(axes[0], pets):
        for k, reg in enumerate(grid["regularizers"]):
            mine = sorted((r for r in rows if r["pet"] == pet and r["regularizer"] == reg), key=lambda r: r["shots"])
            if not mine:
                continue
            # Small horizontal offsets keep the error bars of the lines apart.
            xs = [r["shots"] * (1 + 0.03 * (k - (len(grid["regularizers"]) - 1) / 2)) for r in mine]
            ax.errorbar(xs, [r["test_mean"] for r in mine], yerr=[0 if math.isnan(r["test_std"]) else r["test_std"] for r in mine],
                        marker="o", capsize=3, label=reg)
        ax.set_xscale("log")
        ax.set_xticks(grid["shots"], [str(s) for s in grid["shots"]])
        ax.minorticks_off()
        ax.set_title(pet)
        ax.set_xlabel("shots per class")
        ax.grid(alpha=0.3)
    axes[0, 0].set_ylabel("test accuracy (mean ± std over seeds)")
    fig.suptitle("regularised runs at the alpha chosen on validation accuracy", fontsize=9)
    axes[0, -1].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write_outputs(records: list, grid: dict, out: str, info: dict) -> list[str]:
    """Write runs.json, runs.csv, table.md and study.png into ``out``; returns their paths."""
    os.makedirs(out, exist_ok=True)
    rows, analysis = summarize(records, grid)
    paths = [os.path.join(out, name) for name in ("runs.json", "runs.csv", "table.md", "study.png")]
    with open(paths[0], "w", encoding="utf-8") as f:
        json.dump({"study": info, "grid": grid, "runs": records, "table": rows, "analysis": analysis}, f, indent=1)
    columns = ["pet", "regularizer", "alpha", "shots", "seed", "val_accuracy", "test_accuracy", "task_loss",
               "bridge_loss", "train_loss", "seconds", "threads", "cached", "config_hash"]
    columns += [f"R_{which}_{b}" for b in ANALYSIS_BRIDGES for which in ("true", "shuffled")]
    with open(paths[1], "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=columns)
        writer.writeheader()
        for r in records:
            flat = {k: r.get(k) for k in columns}
            for b, values in (r.get("analysis") or {}).items():
                flat[f"R_true_{b}"], flat[f"R_shuffled_{b}"] = values["true"], values["shuffled"]
            writer.writerow(flat)
    with open(paths[2], "w", encoding="utf-8") as f:
        f.write(format_table(rows, analysis, info))
    plot_study(rows, grid, paths[3])
    return paths
