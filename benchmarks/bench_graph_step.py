"""pytest entry of the CUDA-graph training-step benchmark (benchmarks/graph_step.py): a BERT
masked-LM step with the regulariser eager at exact positions, eager at a fixed capacity and (CUDA)
replayed from a CUDA graph, checked and timed in the same run.

CPU: the tiny configuration, eager variants only; CUDA: bert-base at two batch sizes.
``SBPET_GRAPH_CONFIGS`` (comma list of names in ``graph_step.GRAPH_CONFIGS``) picks others.

Timed run:
    python -m pytest benchmarks/bench_graph_step.py --benchmark-json OUT.json
Smoke run (CI, ``--benchmark-disable``): every variant checked, two interleaved rounds. The records
are in each test's ``extra_info["records"]``; pytest-benchmark's own statistics time the graph
replay with the torch backend (CUDA) or its eager exact step (CPU).
"""

from __future__ import annotations

import json

import pytest
import torch

from benchmarks import graph_step, suite

pytest.importorskip("transformers")

DEVICE = suite.bench_device()
CONFIGS = suite.config_names("SBPET_GRAPH_CONFIGS", DEVICE, graph_step.GPU_GRAPH_CONFIGS, graph_step.CPU_GRAPH_CONFIGS)


@pytest.mark.parametrize("config_name", CONFIGS)
def test_graph_step(bench, config_name):
    timed = not getattr(bench, "disabled", True)
    handed = {}
    timed_key = "torch graph" if DEVICE.type == "cuda" else "torch exact"

    def on_steps(steps):
        handed.update(steps)
        bench.pedantic(steps[timed_key], rounds=5 if timed else 1, iterations=1, warmup_rounds=1 if timed else 0)

    records = graph_step.run([config_name], DEVICE, quick=not timed, log=lambda *a: None, on_steps=on_steps)
    json.dumps(records)
    ran = {f"{r['backend']} {r['mode']}": r for r in records if r.get("status") != "skipped"}
    if "none exact" not in ran:
        pytest.skip(next((r.get("reason") for r in records), "nothing ran"))
    bad = [f"{k}: {r['status']}: {r.get('reason')}" for k, r in ran.items() if r["status"] != "ok"]
    assert not bad, bad
    expected = {"none exact", "torch exact", "torch capacity"} | (
        {"none graph", "torch graph", "triton exact", "triton capacity", "triton graph"} if DEVICE.type == "cuda"
        else set())
    assert set(ran) == expected
    tol = suite.CHECK_TOLERANCE[torch.bfloat16 if DEVICE.type == "cuda" else torch.float32]
    for key, r in ran.items():
        assert r["median_s"] > 0 and r["rounds"] >= 2, key
        if not key.startswith("none"):
            assert r["bridge_loss"] > 0 and r["check_error"] <= tol and "overhead" in r, r
    if DEVICE.type == "cuda":
        assert ran["torch graph"]["syncs_per_step"] == 0, ran["torch graph"]
    assert timed_key in handed, "the timed step was not handed to pytest-benchmark"
    bench.group = f"graph step {config_name}"
    bench.extra_info.update(benchmark="graph_step", config=config_name, records=records)
    if timed:
        bench.extra_info["environment"] = suite.environment(DEVICE)
