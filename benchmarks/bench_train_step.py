"""pytest entry of the training-step benchmark (benchmarks/train_step.py): one BridgeTrainer step
with LoRA, without and with the regulariser for every backend, checked and timed in the same run.

CPU: the tiny BERT / Llama configurations (seconds); CUDA: BERT-large at the GLUE shape and a
Llama with H = 4096, S = 2048 (bf16 autocast). ``SBPET_TRAIN_CONFIGS`` (comma list of names in
``train_step.TRAIN_CONFIGS``) picks others; ``SBPET_BENCH_SECONDS`` is the timing time per
configuration (default 10), ``SBPET_BENCH_THREADS`` the CPU threads.

Timed run:
    SBPET_BENCH_THREADS=1 python -m pytest benchmarks/bench_train_step.py --benchmark-json OUT.json
    python -m benchmarks.report OUT.json
Smoke run (CI, ``--benchmark-disable``): every variant checked, two interleaved rounds, no table.
The records (JSON-able) are in each test's ``extra_info["records"]``; pytest-benchmark's own
statistics time the step with the torch backend's regulariser.
"""

from __future__ import annotations

import json
import os

import pytest
import torch

from benchmarks import suite, train_step

pytest.importorskip("peft")
pytest.importorskip("accelerate")

DEVICE = suite.bench_device()
CONFIGS = suite.config_names("SBPET_TRAIN_CONFIGS", DEVICE, train_step.GPU_TRAIN_CONFIGS, train_step.CPU_TRAIN_CONFIGS)


@pytest.mark.parametrize("config_name", CONFIGS)
def test_train_step(bench, config_name):
    timed = not getattr(bench, "disabled", True)
    settings = dict(seconds=float(os.environ.get("SBPET_BENCH_SECONDS", "10"))) if timed else dict(quick=True)
    handed = {}

    def on_steps(steps):  # while the trainers are alive: pytest-benchmark's own rounds
        handed.update(steps)
        bench.pedantic(steps.get("torch") or steps["none"], rounds=3 if timed else 1, iterations=1, warmup_rounds=0)

    records = train_step.run([config_name], DEVICE, log=lambda *a: None, on_steps=on_steps, **settings)
    json.dumps(records)  # JSON-able, as gpu_check and the report need them
    by_variant = {r["variant"]: r for r in records}
    assert set(by_variant) == set(train_step.VARIANTS)
    if by_variant["none"]["status"] == "skipped":  # out of memory or out of time: nothing to check
        pytest.skip(by_variant["none"]["reason"])
    bad = [f"{r['variant']}: {r['status']}: {r.get('reason')}" for r in records if r.get("status") != "ok"
           and not (r.get("status") == "skipped" and r["variant"] == "triton")]
    assert not bad, bad
    for variant in ("torch", "auto"):
        r = by_variant[variant]
        assert r["bridge_loss"] > 0 and r["check_error"] <= suite.CHECK_TOLERANCE[
            torch.bfloat16 if DEVICE.type == "cuda" else torch.float32], r
        assert r["median_s"] > 0 and r["rounds"] >= 2 and "overhead" in r
    assert handed, "the timed steps were not handed to pytest-benchmark"
    bench.group = f"train step {config_name}"
    bench.extra_info.update(benchmark="train_step", config=config_name, records=records)
    if timed:
        bench.extra_info["environment"] = suite.environment(DEVICE)
