"""One command that validates and times sbpet on a CUDA machine (docs/gpu-check.md), offline, in < 10 minutes.

    python -m benchmarks.gpu_check benchmarks/results

1. prints the device, driver, torch and triton versions;
2. measures the two ceilings once: device-to-device copy bandwidth (bytes read + written) and a
   bf16 8192^3 matmul's rate (``triton.testing.do_bench`` medians);
3. runs the test suite on CUDA tensors in a subprocess (``pytest tests -q -x``, junit XML and log
   into OUTDIR; the tests pick CUDA when it is available), tests/hf/test_sync_free.py included: no sync after
   the first call on either route (``torch.cuda.set_sync_debug_mode("error")``) and a CUDA-graph
   replay of the torch backend with new labels;
4. runs the benchmark suite: the paper's data path (benchmarks/paper.py), eager reference, torch,
   triton at the four shapes of the benchmarks issue in bf16, forward and forward+backward; every
   backend is checked against the reference before it is timed; a backend that OOMs or does not
   fit in the time budget is skipped with the reason recorded;
5. runs the training-step benchmark (benchmarks/train_step.py): one BridgeTrainer step with LoRA,
   bf16 autocast, without and with the regulariser for every backend, on BERT-large at the GLUE
   shape and a Llama with H = 4096, S = 2048 (``--train-budget-s`` of the time), with the host
   syncs of one warm step per variant; then the CUDA-graph step (benchmarks/graph_step.py: a BERT
   masked-LM step with R eager at exact positions, at a fixed capacity, and replayed from a CUDA
   graph; ``--graph-budget-s`` of the time);
6. fitting g's throughput (benchmarks/bench_fitting.py: fit_mapping on a BERT-base shape, bf16
   backbone, sequences/s and tokens/s with and without the regulariser's share), then the first
   training-step configuration again under torch.compile (``--train-compile-budget-s`` at most,
   in the time left);
7. torch.compile of the reference (fwd+bwd first) in the time left;
8. writes ``<gpu>-<yyyy-mm-dd>.json`` and ``.md`` into OUTDIR and prints the table last.

``--dry-run`` runs the whole flow on the CPU (tiny shapes and tiny training configurations, small
ceilings, one quick test module) in seconds: it is what tests/bench/test_gpu_check.py runs. Optional
packages (triton, pytest, peft) may be missing: the affected step records why and the rest goes on.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time
import xml.etree.ElementTree as ET

import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _say(*parts):
    print("[gpu_check]", *parts, flush=True)


def slug(name: str) -> str:
    """'NVIDIA H100 80GB HBM3' -> 'h100-80gb-hbm3'."""
    name = re.sub(r"^(nvidia|amd)\s+", "", name.strip(), flags=re.I)
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-") or "device"


def run_tests(outdir: str, pytest_args: list[str], timeout_s: float, device) -> dict:
    """The test suite in a subprocess; a summary parsed from its junit XML."""
    try:
        import pytest  # noqa: F401
    except ImportError:
        return {"summary": "not run: pytest is not importable", "returncode": None}
    junit = os.path.join(outdir, "tests-junit.xml")
    log = os.path.join(outdir, "tests.log")
    cmd = [sys.executable, "-m", "pytest", *pytest_args, "-q", "-x", "-p", "no:cacheprovider",
           f"--junitxml={junit}"]
    _say("running", " ".join(cmd), f"(timeout {timeout_s:.0f} s)")
    env = dict(os.environ)
    if torch.device(device).type == "cuda":
        env.pop("TRITON_INTERPRET", None)
    start = time.monotonic()
    try:
        proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=max(timeout_s, 1), env=env)
        output, returncode, timed_out = proc.stdout + proc.stderr, proc.returncode, False
    except subprocess.TimeoutExpired as exc:
        output = (exc.stdout or b"").decode() if isinstance(exc.stdout, bytes) else (exc.stdout or "")
        returncode, timed_out = None, True
    with open(log, "w", encoding="utf-8") as f:
        f.write(output)
    result = {"command": " ".join(cmd), "returncode": returncode, "timed_out": timed_out,
              "seconds": round(time.monotonic() - start, 1), "log": os.path.basename(log)}
    try:
        root = ET.parse(junit).getroot()
        suites = [root] if root.tag == "testsuite" else list(root.iter("testsuite"))
        counts = {k: sum(int(s.get(k, 0)) for s in suites) for k in ("tests", "failures", "errors", "skipped")}
        result.update(counts)
        failed = [f"{c.get('classname')}::{c.get('name')}" for c in root.iter("testcase")
                  if c.find("failure") is not None or c.find("error") is not None]
        result["failed"] = failed[:20]
        passed = counts["tests"] - counts["failures"] - counts["errors"] - counts["skipped"]
        result["summary"] = (f"{passed} passed, {counts['failures']} failed, {counts['errors']} errors, "
                             f"{counts['skipped']} skipped in {result['seconds']} s"
                             + (" (timed out: stopped early)" if timed_out else "")
                             + (f"; first failure {failed[0]}" if failed else ""))
    except (OSError, ET.ParseError):
        tail = output.strip().splitlines()[-1:] or ["no output"]
        result["summary"] = ("timed out" if timed_out else f"exit {returncode}") + f": {tail[0][:200]}"
    return result


def run_benchmarks(suite, device, dtype, shapes, deadline, with_compile: bool, ceilings,
                   quick: bool = False, phases=("main", "compile")) -> list[dict]:
    """Phase "main": every shape and pass without torch.compile; phase "compile": torch.compile
    (fwd+bwd first) in the time left. Returns the records of every (shape, pass, backend) of the
    phases run, in table order."""
    results: dict = {}
    phase1 = [b for b in suite.BACKENDS if b != "compile"]
    # fwd+bwd first: the targets are on it, so a spent budget drops the forward-only rows first.
    plan = [(phase1, pass_) for pass_ in reversed(suite.PASSES)] if "main" in phases else []
    if "compile" in phases and with_compile:
        plan += [(["compile"], "fwd+bwd"), (["compile"], "fwd")]
    elif "compile" in phases:
        for name in shapes:
            for pass_ in suite.PASSES:
                results[(name, pass_, "compile")] = {"shape": name, "pass": pass_, "backend": "compile",
                                                     "status": "skipped", "reason": "not requested"}
    for phase, (backends, pass_) in enumerate(plan):
        for name in shapes:
            shape = suite.SHAPES[name]
            if time.monotonic() + 15 > deadline:
                for b in backends:
                    results[(name, pass_, b)] = {"shape": name, "pass": pass_, "backend": b,
                                                 "status": "skipped", "reason": "time budget spent"}
                continue
            _say(f"{name} {pass_}: {', '.join(backends)} ({deadline - time.monotonic():.0f} s left)")
            try:
                case = suite.make_case(shape, device, dtype)
            except Exception as exc:
                for b in backends:
                    results[(name, pass_, b)] = {"shape": name, "pass": pass_, "backend": b, "status": "skipped",
                                                 "reason": f"inputs: {type(exc).__name__}: {str(exc)[:200]}"}
                suite.free_device(torch.device(device))
                continue
            records, runners = suite.measure_shape_pass(case, pass_, backends, ceilings=ceilings,
                                                        deadline=deadline, seconds=0.5 if quick else 2.0,
                                                        min_rounds=1 if quick else 5,
                                                        max_rounds=2 if quick else 50,
                                                        warmup=0 if quick else 2)
            del runners, case
            suite.free_device(torch.device(device))
            for b, r in records.items():
                results[(name, pass_, b)] = r
                med = r.get("median_s")
                _say(f"  {b:9s} {r['status']:7s} " + (f"{med * 1e3:9.3f} ms" if med else r.get("reason", "")[:150]))
    return table_order(suite, shapes, list(results.values()))


def table_order(suite, shapes, records: list[dict]) -> list[dict]:
    """Records sorted by shape, pass (fwd first) and backend as in ``suite.BACKENDS``."""
    order = {b: i for i, b in enumerate(suite.BACKENDS)}
    return sorted(records, key=lambda r: (shapes.index(r["shape"]), r["pass"] != "fwd", order[r["backend"]]))


def run_train_steps(device, configs, deadline, quick: bool, compile_model: bool = False) -> list[dict]:
    """The training-step benchmark (benchmarks/train_step.py) until ``deadline``; records.
    ``compile_model``: the model under torch.compile (records marked ``compiled``)."""
    try:
        import accelerate  # noqa: F401
        import peft  # noqa: F401
        import transformers  # noqa: F401

        from benchmarks import train_step
    except ImportError as exc:
        return [{"benchmark": "train_step", "config": name, "variant": "none", "status": "skipped",
                 "reason": f"not run: {type(exc).__name__}: {exc}"} for name in configs]
    try:
        return train_step.run(configs, device, quick=quick, deadline=deadline, seconds=0.5 if quick else 10.0,
                              log=_say, compile_model=compile_model)
    except Exception as exc:  # a failure here must not cost the rest of the run
        return [{"benchmark": "train_step", "config": name, "variant": "none", "status": "error",
                 "compiled": compile_model, "reason": f"{type(exc).__name__}: {str(exc)[:300]}"}
                for name in configs]


def run_graph_steps(device, deadline, quick: bool) -> list[dict]:
    """The CUDA-graph step benchmark (benchmarks/graph_step.py) until ``deadline``; records."""
    from benchmarks import graph_step

    configs = graph_step.CPU_GRAPH_CONFIGS if device.type == "cpu" else graph_step.GPU_GRAPH_CONFIGS
    try:
        return graph_step.run(configs, device, quick=quick, deadline=deadline, log=_say)
    except Exception as exc:  # a failure here must not cost the rest of the run
        return [{"benchmark": "graph_step", "config": name, "backend": "-", "mode": "-", "status": "error",
                 "reason": f"{type(exc).__name__}: {str(exc)[:300]}"} for name in configs]


def run_fitting(device, deadline) -> list[dict]:
    """Fitting g's throughput (benchmarks/bench_fitting.py), one record per configuration."""
    from benchmarks.bench_fitting import measure_fitting

    name = "bert-base" if device.type == "cuda" else "tiny-bert"
    if time.monotonic() > deadline:
        return [{"benchmark": "fitting", "config": name, "status": "skipped", "reason": "out of time"}]
    try:
        record = measure_fitting(name, device, rounds=3)
    except Exception as exc:  # recorded, the rest of the check goes on
        return [{"benchmark": "fitting", "config": name, "status": "error", "reason": repr(exc)[:300]}]
    _say(f"fitting {name}: {record['seq_per_s']:.0f} seq/s, {record['tok_per_s']:.0f} tok/s "
         f"(backbone alone {record['backbone_seq_per_s']:.0f} seq/s; regulariser share "
         f"{record['regulariser_share']:.0%})")
    return [{"benchmark": "fitting", "status": "ok", **record}]


def _fitting_table(records: list[dict]) -> str:
    lines = ["", "| fitting g | seq/s | tok/s | backbone seq/s | backbone tok/s | regulariser share |",
             "| --- | ---: | ---: | ---: | ---: | ---: |"]
    for r in records:
        if r.get("status") != "ok":
            lines.append(f"| {r['config']} | {r['status']}: {r.get('reason', '')} | | | | |")
            continue
        lines.append(f"| {r['config']} | {r['seq_per_s']:.0f} | {r['tok_per_s']:.0f} | {r['backbone_seq_per_s']:.0f} "
                     f"| {r['backbone_tok_per_s']:.0f} | {r['regulariser_share']:.0%} |")
    return "\n".join(lines) + "\n"


def _dispatch_choices() -> list[dict]:
    """What ``auto`` chose in this process (kernel table and training steps), with its timings."""
    from sbpet.backends import dispatch

    return [{"key": [str(k) for k in key], "choice": choice, "ms": dispatch.selector.timings.get(key, {})}
            for key, choice in dispatch.selector.choices.items()]


def _autotune_choices() -> list[dict]:
    """The tiles SBPET_AUTOTUNE chose in this process (the ``triton:tuned@bf16`` rows)."""
    try:
        from sbpet.backends import gemm_tuning
    except ImportError:
        return []
    return [{"key": [str(k) for k in key], "tile": tile} for key, tile in gemm_tuning.choices().items()]


def _dispatch_table(choices: list[dict]) -> str:
    if not choices:
        return "\n\nauto: no timed choice in this run (CPU, or a single candidate).\n"
    lines = ["", "", "auto's choices (first call per key; CUDA-event medians, fwd+bwd):", "",
             "| key | choice | timings ms |", "| --- | --- | --- |"]
    for c in choices:
        timings = ", ".join(f"{n} {t:.3f}" for n, t in sorted(c["ms"].items(), key=lambda x: x[1]))
        lines.append(f"| {' '.join(c['key'])} | {c['choice']} | {timings} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("outdir", help="folder for the JSON, the markdown table and the test log")
    parser.add_argument("--device", default=None, help="cuda (default when available) or cpu")
    parser.add_argument("--dry-run", action="store_true",
                        help="the whole flow on tiny shapes with quick ceilings (CPU unless --device)")
    parser.add_argument("--budget-s", type=float, default=540.0, help="whole run's time budget (s)")
    parser.add_argument("--test-budget-s", type=float, default=240.0, help="the test suite's share (s)")
    parser.add_argument("--skip-tests", action="store_true")
    parser.add_argument("--pytest-args", default=None,
                        help="what pytest runs (default 'tests'; 'tests/core/test_bridges.py' in a dry run)")
    parser.add_argument("--shapes", default=None, help="comma list of shapes (see benchmarks/suite.py)")
    parser.add_argument("--no-compile", action="store_true", help="skip torch.compile of the reference")
    parser.add_argument("--train-budget-s", type=float, default=None,
                        help="the training-step benchmark's share (s; default 120, 30 in a dry run); 0 skips it")
    parser.add_argument("--train-compile-budget-s", type=float, default=None,
                        help="at most this long for the compiled training step (s; first configuration only, "
                             "after fitting, in the time left; default 150, 0 in a dry run); 0 skips it")
    parser.add_argument("--graph-budget-s", type=float, default=None,
                        help="the CUDA-graph step benchmark's share (s; default 90, 20 in a dry run); 0 skips it")
    parser.add_argument("--train-configs", default=None,
                        help="comma list of benchmarks/train_step.py configurations (default: by device)")
    args = parser.parse_args(argv)
    start = time.monotonic()
    deadline = start + args.budget_s

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and not torch.cuda.is_available():
        _say("CUDA is not available here; run with --dry-run (CPU) to exercise the flow")
        return 2
    if device.type == "cpu" and not args.dry_run:
        _say("no CUDA device: this command is for GPUs; --dry-run runs its flow on the CPU at tiny shapes")
        return 2
    if device.type == "cpu":
        os.environ.setdefault("TRITON_INTERPRET", "1")  # before sbpet.kernels is imported
    sys.path.insert(0, REPO)
    from benchmarks import report, suite

    os.makedirs(args.outdir, exist_ok=True)
    suite.apply_threads()  # SBPET_BENCH_THREADS, as in the pytest suites
    env = suite.environment(device)
    env["dry_run"] = bool(args.dry_run)
    _say(f"device {env.get('device')}, driver {env.get('driver', '-')}, torch {env['torch']}, "
         f"triton {env['triton']}, python {env['python']}")

    ceilings = suite.measure_ceilings(device, quick=args.dry_run)
    _say(f"ceilings: copy {ceilings['copy_bytes_per_s'] / 1e9:.1f} GB/s (read + write), "
         f"matmul {ceilings['matmul_flops_per_s'] / 1e12:.3g} TFLOP/s ({ceilings['matmul_shape']})")

    if args.skip_tests:
        tests = {"summary": "not run (--skip-tests)"}
    else:
        pytest_args = (args.pytest_args or ("tests/core/test_bridges.py" if args.dry_run else "tests")).split()
        budget = min(args.test_budget_s, max(deadline - time.monotonic() - 60, 1))
        tests = run_tests(args.outdir, pytest_args, budget, device)
    _say("tests:", tests["summary"])

    if args.shapes:
        shapes = [s for s in args.shapes.split(",") if s]
    else:
        shapes = list(suite.TINY_SHAPES if args.dry_run else suite.GPU_SHAPES)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    with_compile = not args.no_compile and not (args.dry_run and device.type == "cpu")
    train_budget = max(args.train_budget_s if args.train_budget_s is not None else 30.0 if args.dry_run else 120.0, 0.0)
    graph_budget = max(args.graph_budget_s if args.graph_budget_s is not None else 20.0 if args.dry_run else 90.0, 0.0)
    compiled_budget = args.train_compile_budget_s
    compiled_budget = max(compiled_budget if compiled_budget is not None else 0.0 if args.dry_run else 150.0, 0.0)
    results = run_benchmarks(suite, device, dtype, shapes, deadline - 5 - train_budget - graph_budget, with_compile,
                             ceilings,
                             quick=args.dry_run, phases=("main",))

    if args.train_configs:
        train_configs = [c for c in args.train_configs.split(",") if c]
    else:
        from benchmarks.train_step import CPU_TRAIN_CONFIGS, GPU_TRAIN_CONFIGS

        train_configs = list(CPU_TRAIN_CONFIGS if device.type == "cpu" else GPU_TRAIN_CONFIGS)
    if train_budget > 0:
        train = run_train_steps(device, train_configs, min(time.monotonic() + train_budget, deadline - 5),
                                quick=args.dry_run)
    else:
        train = [{"benchmark": "train_step", "config": c, "variant": "none", "status": "skipped",
                  "reason": "not requested (--train-budget-s 0)"} for c in train_configs]
    suite.free_device(device)
    graph = run_graph_steps(device, min(time.monotonic() + graph_budget, deadline - 5), args.dry_run) \
        if graph_budget > 0 else []
    suite.free_device(device)
    fitting = run_fitting(device, deadline - 60)
    suite.free_device(device)
    if compiled_budget > 0:  # the first configuration under torch.compile, in the time the kernels left
        train += run_train_steps(device, train_configs[:1], min(time.monotonic() + compiled_budget, deadline - 5),
                                 quick=args.dry_run, compile_model=True)
        suite.free_device(device)
    results = table_order(suite, shapes, results + run_benchmarks(
        suite, device, dtype, shapes, deadline - 5, with_compile, ceilings, quick=args.dry_run, phases=("compile",)))

    data = {"environment": env, "ceilings": ceilings, "targets": suite.TARGETS, "tests": tests,
            "shapes": {s: suite.shape_record(suite.SHAPES[s]) for s in shapes},
            "budget_s": args.budget_s, "elapsed_s": round(time.monotonic() - start, 1), "results": results,
            "train_step": train, "graph_step": graph, "fitting": fitting, "dispatch": _dispatch_choices(), "autotune": _autotune_choices()}
    stem = ("dryrun-" if args.dry_run else "") + f"{slug(env.get('device') or device.type)}-{env['date']}"
    json_path = os.path.join(args.outdir, stem + ".json")
    md_path = os.path.join(args.outdir, stem + ".md")
    with open(json_path, "w", encoding="utf-8") as f:
        json.dump(data, f, indent=1, default=str)
    from benchmarks.graph_step import render as render_graph

    table = report.render(*report.load_records(data)) + ("\n" + render_graph(graph) if graph else "")
    table += _fitting_table(fitting) + _dispatch_table(data["dispatch"])
    table += "".join(f"autotune: {' '.join(c['key'])} -> {c['tile']}\n" for c in data["autotune"])
    with open(md_path, "w", encoding="utf-8") as f:
        f.write(table)
    _say(f"wrote {json_path} and {md_path} in {data['elapsed_s']} s")
    print(table, flush=True)
    bad = [r for r in results + train + graph + fitting if r.get("status") in ("wrong", "error")]
    tests_failed = tests.get("returncode") not in (None, 0) or tests.get("timed_out")
    return 1 if bad or tests_failed else 0


if __name__ == "__main__":
    sys.exit(main())
