"""Running the study: every run's cache key, the run cache, g and its diagnostics, the loop."""

from __future__ import annotations

import hashlib
import json
import os
import sys
import time
from dataclasses import asdict

from ...core.files import write_json
from .grid import Run, parse_grid, plan_runs, resolve_options, run_protocol

__all__ = ["run_study", "run_config", "config_hash", "load_cached", "save_cached", "analysis_gs", "check_out",
           "CACHE_FORMAT", "OUTPUTS"]

# Bump when a run's protocol changes: every cached run is then rerun. 2: protocols, g budgets,
# positions; prompts trimmed of trailing padding.
CACHE_FORMAT = 2
RESULT_KEYS = ("val_accuracy", "test_accuracy", "task_loss", "train_loss", "seconds")
OUTPUTS = ("runs.json", "runs.csv", "table.md", "study.png", "fit_curves.png")  # what a study writes into --out
UNTUNED = "untuned.json"  # in a g's folder: R of the untuned PLM's test paths, true and shuffled endpoints


def check_out(out: str, overwrite: bool) -> None:
    """ValueError naming ``--out`` when it is a file, or when it holds one of the study's output
    files (runs.csv, table.md, the PNGs, ...) but is not a study's folder (its runs.json written by
    ``sbpet study``, whose outputs a rerun refreshes as it resumes) and ``--overwrite`` is not
    given: nothing is replaced unasked."""
    if os.path.exists(out) and not os.path.isdir(out):  # else it fails when the first run is saved
        raise ValueError(f"--out: {out} exists and is not a folder")
    if overwrite:
        return
    present = [name for name in OUTPUTS if os.path.lexists(os.path.join(out, name))]
    if not present:
        return
    try:
        with open(os.path.join(out, "runs.json"), encoding="utf-8") as f:
            written = json.load(f)
        if isinstance(written, dict) and {"study", "grid", "runs"} <= set(written):
            return  # a study's own folder: its outputs are refreshed as the study resumes
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        pass
    raise ValueError(f"--out: {os.path.join(out, present[0])} exists and was not written by sbpet study; pass "
                     "--overwrite to replace it, or choose another --out")


def analysis_gs(grid: dict) -> list[tuple[str, str, int]]:
    """The g's that score the vanilla runs' paths (the paper's "are PETs already bridge-like"):
    the PDF g of each bridge the grid regularises with (brownian when none), at the longest budget."""
    bridges = sorted({r.split("-")[1] for r in grid["regularizers"] if r != "none"}) or ["brownian"]
    return [("pdf", b, max(grid["fit_steps"])) for b in bridges]


def grid_gs(grid: dict, runs: list[Run]) -> list[tuple[str, str, int]]:
    """Every g the grid uses, cheapest fit first."""
    keys = {r.g_key for r in runs if r.g_key is not None} | set(analysis_gs(grid))
    return sorted(keys, key=lambda k: (k[2], k[0], k[1]))


def run_config(setup, run: Run, grid: dict) -> dict:
    """Everything a run's result depends on: its cache key."""
    import peft
    import torch
    import transformers

    from ...core.version import __version__
    from ..experiment import TEST_SPLIT_SEED

    a = setup.args
    keys = analysis_gs(grid) if run.g_key is None else [run.g_key]
    g = {f"{kind}-{bridge}": setup.g_config(bridge, kind, steps) for kind, bridge, steps in keys}
    return {
        "format": CACHE_FORMAT, **asdict(run), "protocol": asdict(run_protocol(a, run.protocol)),
        # The model and corpus by content, not by path: a moved copy hits the cache, a changed one reruns.
        "model": setup.model_key, "data": setup.data_key, "max_length": int(a.max_length),
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
        bridges = [name.split("-")[1] for name in config["g"]]
        if not isinstance(analysis, dict) or not all(
            isinstance(analysis.get(b), dict) and _number(analysis[b].get("true"))
            and _number(analysis[b].get("shuffled"))
            for b in bridges
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
    # A temporary file with a unique name: two studies sharing --out never write into the same one.
    write_json(path, {"config": config, "result": result}, indent=1)


# ----------------------------------------------------------------------------------------------
# g and its diagnostics


def g_diagnostics(setup, key, reg, test_data) -> dict:
    """What a g is, as the study reports it: its fitting curve (R per step) and the bridge loss
    of the untuned PLM's test [MASK] paths (LoRA at its zero init, so the plain PLM) under the
    true label words' endpoints and under shuffled ones. The untuned scores are cached in the
    g's folder (``untuned.json``) with the test split they were taken on; ``reg`` None: only
    what is cached."""
    from ..experiment import evaluate, read_fit_curve

    kind, bridge, steps = key
    path = setup.g_dir(bridge, kind, steps)
    stamp = {"test_examples": len(setup.test), "max_length": int(setup.args.max_length),
             "template": setup.task.template, "words": list(map(int, setup.label_word_ids))}
    untuned = None
    try:
        with open(os.path.join(path, UNTUNED), encoding="utf-8") as f:
            cached = json.load(f)
        if cached.get("stamp") == stamp:
            untuned = {k: cached[k] for k in ("true", "shuffled")}
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        pass
    if untuned is None and reg is not None:
        classifier, _, words = setup.build_classifier("lora", 0)
        scores = evaluate(classifier, *test_data, words, setup.tokenizer.mask_token_id, {"g": reg}, shuffled=True)
        untuned = {"true": scores["bridge_loss"]["g"], "shuffled": scores["shuffled_bridge_loss"]["g"]}
        write_json(os.path.join(path, UNTUNED), {"stamp": stamp, **untuned})
    info = {"kind": kind, "bridge": bridge, "fit_steps": steps, "folder": os.path.basename(path),
            "curve": read_fit_curve(path)}
    if untuned is not None:
        info["untuned"] = {**untuned, "ratio": untuned["true"] / untuned["shuffled"]}
    return info


# ----------------------------------------------------------------------------------------------
# Running


def _execute(setup, run: Run, regularizers: dict, analysis: list, test_data) -> dict:
    """Train and score one run; the result stored in its cache file."""
    import torch

    from ..experiment import evaluate, train_few_shot

    start = time.time()
    train_rows, val_rows = setup.sample(run.shots, run.seed)
    reg = None if run.g_key is None else regularizers[run.g_key]
    classifier, words, train_loss, selection = train_few_shot(
        setup, run.pet, train_rows, run.seed, regularizer=reg, alpha=run.alpha or 0.0, quiet=True,
        positions=run.positions or "mask", protocol=run_protocol(setup.args, run.protocol), validation_rows=val_rows,
    )
    mask_id = setup.tokenizer.mask_token_id
    if reg is None:
        scorers = {key[1]: regularizers[key] for key in analysis}
        test = evaluate(classifier, *test_data, words, mask_id, scorers, shuffled=True)
    else:
        test = evaluate(classifier, *test_data, words, mask_id, {"own": reg})
    val = evaluate(classifier, *setup.encode(val_rows), words, mask_id)
    result = {"val_accuracy": val["accuracy"], "test_accuracy": test["accuracy"], "task_loss": test["task_loss"],
              "bridge_loss": None if reg is None else test["bridge_loss"]["own"], "train_loss": train_loss,
              "seconds": time.time() - start, "threads": torch.get_num_threads()}
    if selection is not None:
        result["chosen_step"], result["val_curve"] = selection["chosen_step"], selection["curve"]
    if reg is None:
        result["analysis"] = {b: {"true": test["bridge_loss"][b], "shuffled": test["shuffled_bridge_loss"][b]}
                              for b in scorers}
    return result


# ----------------------------------------------------------------------------------------------
# Parallel runs (--jobs): a pool of processes, each with its own Setup and the cached g's


def check_jobs(args, setup) -> int:
    """``--jobs`` as a count: ValueError naming it when it is not >= 1, or > 1 off the CPU."""
    jobs = int(args.jobs)
    if jobs < 1:
        raise ValueError(f"--jobs must be >= 1, got {jobs}")
    if jobs > 1 and setup.device.type != "cpu":
        raise ValueError(f"--jobs {jobs}: parallel runs are for the CPU; on {setup.device.type} the runs go one at "
                         "a time (use --jobs 1)")
    return jobs


_WORKER: dict = {}  # in a pool process: its Setup, g's, test data and analysis g's


def _worker_init(args, threads: int, g_keys: list, analysis: list) -> None:
    """A pool process: its threads, then Setup and the g's from the cache (fitted by the parent).
    What Setup and the loading print (the corpus warning, "using the cached g") is the parent's
    to say once, so it is dropped here. An error is kept and raised by the first run (an
    initializer that raises would have the pool start processes forever)."""
    import contextlib
    import io

    import torch
    from transformers.utils import logging as hf_logging

    from ..experiment import Setup

    torch.set_num_threads(threads)
    hf_logging.disable_progress_bar()
    try:
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            setup = Setup(args)
            encoder = setup.encoder() if g_keys else None
            regularizers = {key: setup.regularizer(key[1], encoder, key[0], fit_steps=key[2]) for key in g_keys}
        _WORKER.update(setup=setup, regularizers=regularizers, test_data=setup.encode(setup.test), analysis=analysis)
    except Exception as exc:  # noqa: BLE001 - handed to the parent by _worker_execute
        _WORKER["error"] = exc


def _worker_execute(run: Run) -> dict:
    from ..experiment import deterministic_algorithms

    w = _WORKER
    if "error" in w:
        raise RuntimeError(f"a --jobs process could not set up: {type(w['error']).__name__}: {w['error']}")
    with deterministic_algorithms():
        return _execute(w["setup"], run, w["regularizers"], w["analysis"], w["test_data"])


def _results(setup, todo_runs: list, regularizers: dict, analysis: list, test_data, jobs: int):
    """The results of ``todo_runs``, in order: trained here (``jobs`` 1) or by a pool of ``jobs``
    processes that take the runs in order (each with 1/jobs of this process's threads). Closing
    the generator early (an error, Ctrl-C) stops the pool."""
    if jobs == 1:
        for run in todo_runs:
            yield _execute(setup, run, regularizers, analysis, test_data)
        return
    import argparse
    import multiprocessing

    import torch

    args = argparse.Namespace(**{k: v for k, v in vars(setup.args).items() if not callable(v)})
    threads = max(1, torch.get_num_threads() // jobs)
    g_keys = sorted(regularizers)  # the g's these runs need: the workers load them from the cache
    with multiprocessing.get_context("spawn").Pool(min(jobs, len(todo_runs)), initializer=_worker_init,
                                                   initargs=(args, threads, g_keys, analysis)) as pool:
        yield from pool.imap(_worker_execute, todo_runs, chunksize=1)


def run_study(args, defaults: dict) -> int:
    """``sbpet study``: resolve and check the options (errors name the option, before any slow
    work), fit or load every g of the grid (cheapest first) and take its diagnostics, run every
    uncached run (``--jobs`` N: N at once, each in its own process) under a progress bar (with
    ``--no-progress``, a line per run), rewrite the outputs whenever a seed is done (so a long
    study can be read or stopped midway; a rerun resumes from the cache), write them at the end
    and print their paths and the wall time.
    Returns 0."""
    from tqdm.auto import tqdm
    from transformers.utils import logging as hf_logging

    from ..experiment import Setup, deterministic_algorithms
    from .report import write_outputs

    start = time.time()
    resolve_options(args, defaults)
    grid = parse_grid(args)
    setup = Setup(args)
    setup.check_sizes(grid["shots"], grid["pets"])
    jobs = check_jobs(args, setup)
    out = args.out or os.path.join(setup.cache, "study")
    check_out(out, getattr(args, "overwrite", False))
    runs = plan_runs(grid)
    configs = [run_config(setup, run, grid) for run in runs]
    paths = [os.path.join(out, "runs", f"{config_hash(c)}.json") for c in configs]
    messages = []
    results = [load_cached(p, c, messages.append) for p, c in zip(paths, configs)]
    for message in messages:
        print(f"sbpet study: warning: {message}", file=sys.stderr)
    todo = [i for i, r in enumerate(results) if r is None]
    print(f"sbpet study: {len(runs)} runs ({len(runs) - len(todo)} cached, {len(todo)} to train) -> {out}")
    analysis = analysis_gs(grid)
    with deterministic_algorithms():
        regularizers = {}
        needed = {runs[i].g_key for i in todo} | (set(analysis) if any(runs[i].g_key is None for i in todo) else set())
        if needed:
            encoder = setup.encoder()
            for kind, bridge, steps in grid_gs(grid, runs):
                if (kind, bridge, steps) in needed:
                    regularizers[(kind, bridge, steps)] = setup.regularizer(bridge, encoder, kind, fit_steps=steps)
        test_data = setup.encode(setup.test)
        gs = [g_diagnostics(setup, key, regularizers.get(key), test_data) for key in grid_gs(grid, runs)]
        if todo:
            # Cached runs count as done; the time estimate comes from the runs trained now.
            bar = tqdm(total=len(runs), initial=len(runs) - len(todo), desc="study", unit="run",
                       disable=not setup.progress, dynamic_ncols=True)
            loading_bars = hf_logging.is_progress_bar_enabled()
            hf_logging.disable_progress_bar()  # one bar for the grid, not one per model load
            trained = _results(setup, [runs[i] for i in todo], regularizers, analysis, test_data, jobs)
            try:
                for k, i in enumerate(todo):
                    run = runs[i]
                    where = "" if run.g_key is None else f" g={run.fit_steps} {run.positions} a={run.alpha}"
                    name = f"{run.protocol} {run.pet} {run.regularizer}{where} shots={run.shots} seed={run.seed}"
                    bar.set_postfix_str(name)
                    results[i] = next(trained)
                    save_cached(paths[i], configs[i], results[i])
                    bar.update(1)
                    if not setup.progress:  # a log line per run where no bar shows progress
                        print(f"sbpet study: [{k + 1}/{len(todo)}] {name}: test accuracy "
                              f"{results[i]['test_accuracy']:.3f} ({results[i]['seconds']:.0f} s)", flush=True)
                    if k + 1 < len(todo) and runs[todo[k + 1]].seed != run.seed:
                        # A seed is done: the outputs so far, so a long study can be read (or stopped) midway.
                        done = [j for j, r in enumerate(results) if r is not None]
                        write_outputs(_records(runs, results, configs, todo, done), grid, gs, out,
                                      _describe(setup, grid, [{**asdict(runs[j]), **results[j]} for j in done],
                                                time.time() - start))
            finally:
                trained.close()
                bar.close()
                if loading_bars:
                    hf_logging.enable_progress_bar()
    records = _records(runs, results, configs, todo, range(len(runs)))
    wall = time.time() - start
    written = write_outputs(records, grid, gs, out, _describe(setup, grid, records, wall))
    for path in written:
        print(f"wrote {path}")
    print(f"sbpet study: {len(todo)} runs trained, {len(runs) - len(todo)} cached; wall time {wall:.0f} s")
    return 0


def _records(runs: list, results: list, configs: list, todo: list, which) -> list[dict]:
    """The records (run, result, whether cached, cache key) of the runs numbered ``which``."""
    trained = set(todo)
    return [{**asdict(runs[i]), **results[i], "cached": i not in trained, "config_hash": config_hash(configs[i])}
            for i in which]


def _describe(setup, grid: dict, records: list, wall: float) -> dict:
    """The study's settings, the command that reproduces it, and its timing."""
    a = setup.args
    join = lambda values: ",".join(map(str, values))  # noqa: E731
    command = (f"sbpet study --dataset {getattr(a, 'dataset', 'bbc')} --protocols {join(grid['protocols'])} "
               f"--pets {join(grid['pets'])} --regularizers {join(grid['regularizers'])} "
               f"--fit-steps {join(grid['fit_steps'])} --positions {join(grid['positions'])} "
               f"--extra-positions-at {grid['extra_positions_at']} --shots {join(grid['shots'])} "
               f"--alphas {join(grid['alphas'])} --seeds {len(grid['seeds'])}")
    if "ours" in grid["protocols"]:
        command += f" --epochs {a.epochs:g} --lr {a.lr:g} --batch-size {a.batch_size}"
    if "paper" in grid["protocols"] and (a.steps is not None or a.eval_every is not None):
        command += "".join(f" --{name} {value}" for name, value in (("steps", a.steps), ("eval-every", a.eval_every))
                           if value is not None)
    command += (f" --max-length {a.max_length} --dims {a.dims} --fit-batch-size {a.fit_batch_size} "
                f"--test-per-class {a.test_per_class} --val-per-class {a.val_per_class}")
    for option, value in (("--model-dir", a.model_dir), ("--data-dir", a.data_dir)):
        if value:
            command += f" {option} {value}"
    return {"command": command, "dataset": getattr(a, "dataset", "bbc"), "model_dir": setup.model_dir,
            "data_dir": setup.data_dir, "classes": setup.classes, "test_examples": len(setup.test),
            "val_per_class": a.val_per_class, "wall_seconds": wall,
            "run_seconds": sum(r["seconds"] for r in records),
            "threads": sorted({r.get("threads") for r in records if r.get("threads") is not None})}
