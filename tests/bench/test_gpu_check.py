"""benchmarks.gpu_check's whole flow in its CPU dry-run mode (tiny shape, one quick test module,
one tiny training configuration): ceilings, the test subprocess, the checked benchmark records
(the paper's data path included), the training-step and graph-step records, fitting g's throughput,
the JSON and the markdown table."""

import json
import os
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_gpu_check_dry_run(tmp_path):
    # A generous budget: ~20 s on an idle 2-core machine, but a loaded one (CI neighbours) must not
    # turn the budget guard into skipped rows.
    env = dict(os.environ, SBPET_BENCH_THREADS="1")
    env.pop("TRITON_INTERPRET", None)  # gpu_check sets it itself for a CPU run
    cmd = [sys.executable, "-m", "benchmarks.gpu_check", str(tmp_path), "--dry-run", "--shapes", "tiny-glue",
           "--pytest-args", "tests/core/test_bridges.py::test_layer_times_spec_step5", "--budget-s", "600",
           "--train-configs", "tiny-llama-clm"]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=900, env=env)
    out = proc.stdout + proc.stderr
    # Exit 1 flags a backend that errs or disagrees with the reference; only triton may do that here
    # (the CPU interpreter), and the reason must then be recorded.
    assert proc.returncode in (0, 1), out[-4000:]
    (json_file,) = [p for p in tmp_path.iterdir() if p.suffix == ".json"]
    assert json_file.name.startswith("dryrun-") and json_file.with_suffix(".md").exists()
    data = json.loads(json_file.read_text())
    for key in ("torch", "triton", "device", "date"):
        assert key in data["environment"]
    assert data["ceilings"]["copy_bytes_per_s"] > 0 and data["ceilings"]["matmul_flops_per_s"] > 0
    assert data["tests"]["returncode"] == 0 and data["tests"]["tests"] == 1, data["tests"]
    by_backend = {(r["pass"], r["backend"]): r for r in data["results"]}
    backends = ("paper", "reference", "compile", "torch", "triton", "auto", "torch@bf16", "triton@bf16",
                "triton:fused@bf16", "triton:tuned@bf16")
    assert set(by_backend) == {(p, b) for p in ("fwd", "fwd+bwd") for b in backends}
    for pass_ in ("fwd", "fwd+bwd"):
        for backend in ("paper", "reference", "torch"):
            r = by_backend[(pass_, backend)]
            assert r["status"] == "ok", r
            assert r["median_s"] > 0 and r["check_error"] <= 1e-4 and r["floor_s"] > 0
            assert r["temp_bytes"] is not None and r["bytes"] > 0 and r["flops"] > 0
        triton = by_backend[(pass_, "triton")]
        assert triton["status"] == "ok" or triton["reason"], triton
        assert by_backend[(pass_, "compile")]["status"] == "skipped"
        assert by_backend[(pass_, "auto")]["status"] == "skipped"  # on CPU auto is torch
        bf16 = by_backend[(pass_, "torch@bf16")]  # precision "bf16": a looser check, still a check
        assert bf16["status"] == "ok" and 0 < bf16["check_error"] <= 5e-2, bf16
        if by_backend[(pass_, "triton:tuned@bf16")]["status"] == "ok":
            assert data["autotune"] and all(c["tile"]["BLOCK_M"] > 0 for c in data["autotune"]), data["autotune"]
    if proc.returncode == 1:
        assert any(by_backend[(p, "triton")]["status"] in ("error", "wrong") for p in ("fwd", "fwd+bwd")), out[-4000:]
    train = {(r["config"], r["variant"]): r for r in data["train_step"]}
    assert set(train) == {("tiny-llama-clm", v) for v in ("none", "torch", "triton", "auto")}, train
    for variant in ("none", "torch", "auto"):
        r = train[("tiny-llama-clm", variant)]
        assert r["status"] == "ok" and r["median_s"] > 0 and r["rounds"] >= 2, r
    for variant in ("torch", "auto"):
        r = train[("tiny-llama-clm", variant)]
        assert r["bridge_loss"] > 0 and r["check_error"] <= 1e-4 and "overhead" in r, r
    assert train[("tiny-llama-clm", "triton")]["status"] == "skipped" and train[("tiny-llama-clm", "triton")]["reason"]
    table = out[out.rindex("### sbpet bridge loss"):]  # the table is printed last
    assert "| tiny-glue | fwd+bwd | torch |" in table and "| tiny-glue | fwd+bwd | paper |" in table
    assert "vs paper" in table and "Not measured:" in table
    assert "Training step" in table and "| tiny-llama-clm |" in table
    assert "auto: no timed choice in this run" in table and data["dispatch"] == []
    graph = {(r["backend"], r["mode"]): r for r in data["graph_step"]}  # the CUDA-graph step: eager on the CPU
    for key in (("none", "exact"), ("torch", "exact"), ("torch", "capacity")):
        assert graph[key]["status"] == "ok" and graph[key]["median_s"] > 0, graph[key]
    assert graph[("-", "graph")]["status"] == "skipped" and "CUDA" in graph[("-", "graph")]["reason"]
    assert "Training step in a CUDA graph" in table and "| tiny-bert-mlm | 4x32 | torch | capacity |" in table
    (fit,) = data["fitting"]  # fitting g's throughput row
    assert fit["status"] == "ok" and fit["config"] == "tiny-bert", fit
    assert fit["seq_per_s"] > 0 and fit["backbone_seq_per_s"] > 0 and 0 <= fit["regulariser_share"] < 1
    assert "| fitting g |" in json_file.with_suffix(".md").read_text()
