"""kernels/compile_check.py: the kernels compile for sm_80 and sm_90a without a GPU.

Runs the quick subset (one configuration per kernel and target) in a subprocess WITHOUT
TRITON_INTERPRET, as CI runs the full ``python -m sbpet.kernels.compile_check``.
"""

import os
import subprocess
import sys

import pytest

pytest.importorskip("triton")


def test_compile_check_quick_subset():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = subprocess.run(
        [sys.executable, "-m", "sbpet.kernels.compile_check", "--quick"],
        env=env, capture_output=True, text=True, timeout=900,
    )
    assert out.returncode == 0, out.stdout + out.stderr
    lines = [line for line in out.stdout.splitlines() if line.startswith(("OK", "FAIL"))]
    assert len(lines) == 8 and all(line.startswith("OK") for line in lines), out.stdout
    assert "sm_80" in out.stdout and "sm_90a" in out.stdout
