"""kernels/compile_check.py: the kernels compile for sm_80 and sm_90a without a GPU.

Runs the full ``python -m sbpet.kernels.compile_check`` (every configuration the dispatcher can
choose, 1-2 minutes on 2 cores with a warm Triton cache) in a subprocess WITHOUT TRITON_INTERPRET,
so CI compiles every kernel for real GPU targets with the installed Triton. CI's second step
(``.ci/run``) runs this file again with the newest Triton from PyPI. The other tests check the
pieces: the ptxas log parser, the occupancy arithmetic and that the ptxas is the one Triton
resolves (``TRITON_PTXAS_PATH`` honoured).
"""

import os
import stat
import subprocess
import sys

import pytest

pytest.importorskip("triton")

import triton  # noqa: E402
import triton.language as tl  # noqa: E402
from triton.runtime.jit import JITFunction  # noqa: E402

from sbpet.kernels.compile_check import (  # noqa: E402
    LIMITS,
    count_atomics,
    cubin_resources,
    must_be_deterministic,
    occupancy,
    parse_ptxas_entry,
    resolve_cuobjdump,
    resolve_ptxas,
    triton_ptxas_log,
)


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
    assert all("CTAs/SM" in line for line in lines), out.stdout
    assert f"triton {triton.__version__}" in out.stdout.splitlines()[0]
    # Kernel 2's backward: no atomic with g and the tail frozen (what the dispatcher relies on
    # under deterministic algorithms), atomics once g trains (so the count reads real PTX).
    frozen = [l for l in lines if "bridge_bwd" in l and "train_mapping=False train_tail=False" in l]
    trained = [l for l in lines if "bridge_bwd" in l and "train_mapping=True" in l]
    assert frozen and all(" 0 atomics" in l for l in frozen), "\n".join(frozen)
    assert trained and all(" 0 atomics" not in l for l in trained), "\n".join(trained)
    assert any(l.startswith("OK") and "pair_sum" in l for l in lines)


def test_atomic_count_and_which_kernels_must_be_deterministic():
    ptx = "\n".join([
        "\tld.global.f32 %f1, [%rd1];",
        "\t@%p1 atom.global.gpu.acq_rel.add.f32 %f2, [%rd2], %f1;",
        "\t@!%p3 red.global.add.f32 [%rd3], %f1;",
        "\tred.global.gpu.add.f32 [%rd3], %f1;",
        "// atom.global in a comment does not count",
    ])
    assert count_atomics(ptx) == 3
    assert must_be_deterministic("bridge_backward_kernel", dict(TRAIN_MAPPING=False, TRAIN_TAIL=False))
    assert not must_be_deterministic("bridge_backward_kernel", dict(TRAIN_MAPPING=True, TRAIN_TAIL=False))
    assert not must_be_deterministic("bridge_backward_kernel", dict(TRAIN_MAPPING=False, TRAIN_TAIL=True))
    assert must_be_deterministic("context_backward_kernel", {})
    assert must_be_deterministic("pair_sum_kernel", dict(BLOCK_D=128))


def test_ptxas_parser_reads_the_kernel_entry():
    """Registers and spills come from the kernel's own entry block, not a max / sum over every
    function ptxas lists (a device function's numbers must not leak in)."""
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
    assert parse_ptxas_entry(text, "bridge_forward_kernel") == (168, 16, 16)
    assert parse_ptxas_entry(text, "helper_kernel") == (250, 300, 0)
    with pytest.raises(ValueError, match="no entry function"):
        parse_ptxas_entry(text, "missing_kernel")
    # Triton >= 3.9 runs ptxas-blackwell for sm_90a; ptxas names its lines after its binary.
    blackwell = text.replace("ptxas info", "ptxas-blackwell info")
    assert parse_ptxas_entry(blackwell, "bridge_forward_kernel") == (168, 16, 16)


def test_occupancy_arithmetic():
    """CTAs per SM as the CUDA occupancy calculator counts them (hand-computed cases)."""
    # 255 registers -> 8160 per warp, allocated 8192: 2 warps per sub-partition, 8 per SM.
    assert occupancy(80, 255, 8, 52 * 1024) == (1, "registers", 1, 3, 8)
    assert occupancy(90, 255, 8, 52 * 1024) == (1, "registers", 1, 4, 8)
    # 128 registers x 4 warps: 4096 per warp, 4 warps per sub-partition, 16 per SM -> 4 CTAs.
    assert occupancy(80, 128, 4, 0).ctas == 4
    # Allocation in units of 256 registers per warp: 33 registers cost as much as 40.
    assert occupancy(80, 33, 4, 0) == occupancy(80, 40, 4, 0)
    assert occupancy(80, 33, 4, 0).by_registers == 12  # 16384 // 1280 = 12 warps per sub-partition, x 4 / 4
    # Small kernels hit the thread limit (2048 / 128 = 16) or the 32-CTA limit.
    assert occupancy(80, 24, 4, 0)[:2] == (16, "threads")  # registers alone would allow 21
    assert occupancy(80, 16, 1, 0)[:2] == (32, "ctas")
    # Shared memory: + 1 KB reserved per CTA, 128-byte units; sm_80 164 KB per SM, sm_90 228 KB.
    assert occupancy(80, 64, 4, 80 * 1024)[:2] == (2, "shared")  # 81 KB x 2 <= 164 KB
    assert occupancy(80, 64, 4, 82 * 1024)[:2] == (1, "shared")  # 83 KB x 2 > 164 KB
    assert occupancy(90, 64, 4, 82 * 1024)[:2] == (2, "shared")
    assert occupancy(90, 64, 4, 112 * 1024)[:2] == (2, "shared")  # 113 KB x 2 = 226 KB <= 228 KB
    assert occupancy(90, 64, 4, 114 * 1024)[:2] == (1, "shared")
    # Beyond one CTA's limits the kernel cannot launch.
    assert occupancy(80, 64, 4, LIMITS[80].smem_per_cta + 1).ctas == 0
    assert occupancy(90, 64, 4, LIMITS[90].smem_per_cta).ctas == 1
    assert occupancy(80, 255, 16, 0)[:2] == (0, "registers")  # 8192 x 16 warps > 65536
    assert occupancy(80, 128, 16, 0).ctas == 1  # 4096 x 16 = 65536 fits exactly


def _copy(x_ptr, y_ptr, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    tl.store(y_ptr + offs, tl.load(x_ptr + offs, mask=offs < n), mask=offs < n)


# A compilable JIT function even under TRITON_INTERPRET=1 (the CPU test suite's setting, under which
# @triton.jit would make an interpreted one).
_copy_kernel = JITFunction(_copy)


def _sass(cubin: bytes, tmp_path) -> str:
    path = tmp_path / "k.cubin"
    path.write_bytes(cubin)
    return subprocess.run([resolve_cuobjdump().path, "-sass", str(path)], capture_output=True, text=True,
                          check=True).stdout


def _wrapper(path, real, log):
    """A ptxas stand-in that records its arguments and runs the real ptxas."""
    path.write_text(f'#!/bin/sh\necho "$(basename "$0") $*" >> "{log}"\nexec "{real}" "$@"\n')
    path.chmod(path.stat().st_mode | stat.S_IXUSR)
    return str(path)


def test_ptxas_is_the_one_triton_resolves(tmp_path, monkeypatch, real_triton_language):
    """resolve_ptxas follows Triton's own rule (TRITON_PTXAS_PATH / TRITON_PTXAS_BLACKWELL_PATH,
    else the wheel's binary), and the ptxas -v report runs exactly that ptxas."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    real = {arch: resolve_ptxas(arch) for arch in (80, 90)}
    bundled = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")
    for tool in real.values():
        assert tool.version and os.path.basename(tool.path).startswith("ptxas")
        if not os.environ.get("TRITON_PTXAS_PATH") and not os.environ.get("TRITON_PTXAS_BLACKWELL_PATH"):
            assert os.path.dirname(tool.path) == bundled
    assert resolve_cuobjdump().version

    log = tmp_path / "calls.log"
    compiled = {}
    for arch in (80, 90):  # PTX made with the real ptxas, before the stand-ins are in place
        src = ASTSource(fn=_copy_kernel, signature={"x_ptr": "*fp32", "y_ptr": "*fp32", "n": "i32",
                                                    "BLOCK": "constexpr"}, constexprs={"BLOCK": 128})
        compiled[arch] = triton.compile(src, target=GPUTarget("cuda", arch, 32), options=dict(num_warps=4))
    # Each variable gets a stand-in for the binary Triton would take from the wheel for it.
    env_names = {"TRITON_PTXAS_PATH": "ptxas", "TRITON_PTXAS_BLACKWELL_PATH": "ptxas-blackwell"}
    stand_ins = {}
    for var, binary in env_names.items():
        target = os.environ.get(var) or os.path.join(bundled, binary)
        stand_ins[var] = _wrapper(tmp_path / f"{binary}-stand-in", target, log)
        monkeypatch.setenv(var, stand_ins[var])
    assert resolve_ptxas(80).path == stand_ins["TRITON_PTXAS_PATH"]
    assert resolve_ptxas(90).path in stand_ins.values()
    try:
        from triton.backends.nvidia.compiler import get_ptxas
    except ImportError:  # pragma: no cover - a Triton without get_ptxas: the fallback rule
        assert resolve_ptxas(90).path == stand_ins["TRITON_PTXAS_PATH"]
    else:
        assert resolve_ptxas(90).path == get_ptxas(90).path
    for arch in (80, 90):
        text, cubin = triton_ptxas_log(compiled[arch].asm["ptx"], arch, dict(num_warps=4))
        assert parse_ptxas_entry(text, "_copy").registers > 0
        # The same binary triton.compile made: same resources and same machine code. (Not the same
        # bytes: ptxas records the source file's mtime and size in the line table, and a warm Triton
        # cache may hold a cubin built before this file was last edited.)
        assert cubin_resources(cubin, "_copy") == cubin_resources(compiled[arch].asm["cubin"], "_copy")
        assert _sass(cubin, tmp_path) == _sass(compiled[arch].asm["cubin"], tmp_path)
    calls = [line for line in log.read_text().splitlines() if "--gpu-name" in line]  # not --version
    assert len(calls) == 2, calls
    for arch, call in zip((80, 90), calls):
        name = os.path.basename(resolve_ptxas(arch).path)
        gpu = "sm_90a" if arch == 90 else "sm_80"
        assert call.startswith(name + " ") and f"--gpu-name={gpu}" in call, call

    # A variable naming a binary that does not run falls back to the wheel's, as in Triton.
    monkeypatch.setenv("TRITON_PTXAS_PATH", str(tmp_path / "missing-ptxas"))
    monkeypatch.delenv("TRITON_PTXAS_BLACKWELL_PATH")
    assert resolve_ptxas(80).path == os.path.join(bundled, "ptxas")


def test_which_kernels_must_not_spill():
    """Layer 1's GEMMs at every precision (every tile autotuning may choose); kernel 2 on the saved
    a1 with 16-bit dots only; the fused kernel 2 never (its float32 blocks are known to spill)."""
    from sbpet.kernels.compile_check import must_not_spill

    for dot in ("bf16", "fp16", "tf32", "tf32x3"):
        assert must_not_spill("first_layer_kernel", dict(DOT_PRECISION=dot))
        assert must_not_spill("token_grad_kernel", dict(DOT_PRECISION=dot))
    assert must_not_spill("bridge_backward_kernel", dict(A1_SAVED=True, DOT_PRECISION="bf16"))
    assert not must_not_spill("bridge_backward_kernel", dict(A1_SAVED=True, DOT_PRECISION="tf32x3"))
    assert not must_not_spill("bridge_forward_kernel", dict(A1_SAVED=False, DOT_PRECISION="bf16"))
