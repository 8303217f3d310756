"""kernels/compile_check.py: the kernels compile for sm_80 and sm_90a without a GPU.

Runs the full ``python -m sbpet.kernels.compile_check`` (every configuration the dispatcher can
choose, about 1.5 minutes on 2 cores) in a subprocess WITHOUT TRITON_INTERPRET, so CI compiles
every kernel for real GPU targets.
"""

import os
import subprocess
import sys

import pytest

pytest.importorskip("triton")


def test_compile_check_every_configuration():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = subprocess.run(
        [sys.executable, "-m", "sbpet.kernels.compile_check"],
        env=env, capture_output=True, text=True, timeout=1200,
    )
    assert out.returncode == 0, out.stdout + out.stderr
    lines = [line for line in out.stdout.splitlines() if line.startswith(("OK", "FAIL"))]
    assert len(lines) >= 60 and all(line.startswith("OK") for line in lines), out.stdout
    assert "sm_80" in out.stdout and "sm_90a" in out.stdout


def test_ptxas_parser_reads_the_kernel_entry():
    """Registers and spills come from the kernel's own entry block, not a max / sum over every
    function ptxas lists (a device function's numbers must not leak in)."""
    from sbpet.kernels.compile_check import parse_ptxas_entry

    text = (
        "ptxas info    : 0 bytes gmem\n"
        "ptxas info    : Compiling entry function 'helper_kernel' for 'sm_80'\n"
        "ptxas info    : Function properties for helper_kernel\n"
        "    0 bytes stack frame, 100 bytes spill stores, 200 bytes spill loads\n"
        "ptxas info    : Used 250 registers, 380 bytes cmem[0]\n"
        "ptxas info    : Function properties for __internal_device_fn\n"
        "    8 bytes stack frame, 7 bytes spill stores, 9 bytes spill loads\n"
        "ptxas info    : Compiling entry function 'bridge_forward_kernel' for 'sm_80'\n"
        "ptxas info    : Function properties for bridge_forward_kernel\n"
        "    16 bytes stack frame, 12 bytes spill stores, 4 bytes spill loads\n"
        "ptxas info    : Used 168 registers, used 1 barriers, 552 bytes cmem[0]\n"
    )
    assert parse_ptxas_entry(text, "bridge_forward_kernel") == (168, 16)
    assert parse_ptxas_entry(text, "helper_kernel") == (250, 300)
    with pytest.raises(ValueError, match="no entry function"):
        parse_ptxas_entry(text, "missing_kernel")
