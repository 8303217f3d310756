"""Benchmarks of sbpet's bridge loss: backends x shapes x passes, with correctness, memory and the
roofline floor measured in the same run.

- :mod:`benchmarks.suite`: shapes, inputs, backends, timing, memory, ceilings and floor formulas;
- ``benchmarks/bench_bridge.py``: the pytest-benchmark suite (CPU and GPU);
- :mod:`benchmarks.gpu_check`: the one-command GPU validation (``python -m benchmarks.gpu_check OUTDIR``);
- :mod:`benchmarks.report`: JSON -> markdown table (``python -m benchmarks.report RESULTS.json``).
"""
