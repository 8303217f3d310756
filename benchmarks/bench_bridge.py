"""pytest-benchmark suite: backend x shape x pass, correctness checked in the same run.

CPU (no CUDA): the MiniLM-like shapes in float32 with the paper's data path (benchmarks/paper.py),
the eager reference, torch.compile of the reference and the torch backend; the triton backend runs
only at the tiny shapes, under the interpreter. CUDA: the shapes of the benchmarks issue in
bfloat16, all five.

Timed run (tables in benchmarks/README.md):
    SBPET_BENCH_THREADS=1 python -m pytest benchmarks/bench_bridge.py --benchmark-json OUT.json
    python -m benchmarks.report OUT.json
Smoke run (CI): ``python -m pytest benchmarks --benchmark-disable -q`` checks every case once, no
timing. Environment: SBPET_BENCH_SHAPES (comma list of names in suite.SHAPES),
SBPET_BENCH_COMPILE=1 (torch.compile on CPU in a smoke run too: ~20 s of compilation per case),
SBPET_BENCH_SECONDS (time spent timing each shape and pass, default 10 on CPU),
SBPET_BENCH_THREADS (CPU threads).

Each (shape, pass) is measured once for all its backends (interleaved rounds on CPU, so that load
drift hits every backend alike); the per-backend tests then report that measurement in
``extra_info`` (what benchmarks.report reads) and let pytest-benchmark time a few rounds of their
own for its usual statistics. Without pytest-benchmark (or with ``-p no:benchmark``) the ``bench``
fixture of conftest.py runs each case once, like ``--benchmark-disable``.
"""

from __future__ import annotations

import os

import pytest
import torch

from benchmarks import suite

DEVICE, DTYPE, SHAPE_NAMES = suite.bench_target()

_cases: dict = {}
_measured: dict = {}
_ceilings: dict = {}


def _static_skip(shape_name: str, backend: str, timed: bool) -> str | None:
    """Skips decided by the configuration, before anything runs."""
    tiny = shape_name in suite.TINY_SHAPES
    if DEVICE.type == "cpu":
        if suite.parse_backend(backend)[0] == "triton" and not tiny:
            return "triton on CPU runs under the interpreter: tiny shapes only"
        if backend == "compile" and not timed and os.environ.get("SBPET_BENCH_COMPILE") != "1":
            return "torch.compile on CPU costs ~20 s per case: timed runs only (or SBPET_BENCH_COMPILE=1)"
        if backend == "compile" and tiny:
            return "torch.compile skipped at the tiny shapes"
    return None


def _ceilings_for(timed: bool):
    if not timed:
        return None
    if "value" not in _ceilings:
        _ceilings["value"] = suite.measure_ceilings(DEVICE)
    return _ceilings["value"]


def _measure(shape_name: str, pass_: str, timed: bool):
    key = (shape_name, pass_, timed)
    if key not in _measured:
        if shape_name not in _cases:
            _cases.clear()  # one shape's inputs alive at a time
            _measured.clear()
            _cases[shape_name] = suite.make_case(suite.SHAPES[shape_name], DEVICE, DTYPE)
        case = _cases[shape_name]
        skip = {b: r for b in suite.BACKENDS if (r := _static_skip(shape_name, b, timed))}
        seconds = float(os.environ.get("SBPET_BENCH_SECONDS", "10"))
        _measured[key] = suite.measure_shape_pass(
            case, pass_, suite.BACKENDS, skip=skip, time_it=timed, ceilings=_ceilings_for(timed),
            seconds=seconds)
    return _measured[key]


@pytest.fixture(scope="module", autouse=True)
def _threads():
    suite.apply_threads()
    yield
    _cases.clear()
    _measured.clear()


@pytest.mark.parametrize("backend", suite.BACKENDS)
@pytest.mark.parametrize("pass_", suite.PASSES)
@pytest.mark.parametrize("shape_name", SHAPE_NAMES)
def test_bridge_loss(bench, shape_name, pass_, backend):
    timed = not getattr(bench, "disabled", True)
    if timed and DEVICE.type == "cpu" and shape_name in suite.TINY_SHAPES:
        pytest.skip("tiny shapes only check the backends (smoke run); their timings mean nothing")
    if reason := _static_skip(shape_name, backend, timed):
        pytest.skip(reason)
    records, runners = _measure(shape_name, pass_, timed)
    record = records[backend]
    if record["status"] == "skipped":
        pytest.skip(record["reason"])
    assert record["status"] == "ok", f"{backend} at {shape_name} {pass_}: {record['status']}: {record['reason']}"
    bench.group = f"{shape_name} {pass_}"
    bench.extra_info.update(record)
    if timed:
        bench.extra_info["environment"] = suite.environment(DEVICE)
        bench.extra_info["ceilings"] = _ceilings_for(timed)
        bench.extra_info["targets"] = suite.TARGETS
    step = runners[backend]
    bench.pedantic(step, rounds=3 if timed else 1, iterations=1, warmup_rounds=0)
