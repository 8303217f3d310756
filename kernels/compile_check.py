"""Compile every kernel configuration the launchers can choose, for sm_80 and sm_90a, without a GPU.

    python -m sbpet.kernels.compile_check [--quick] [--jobs N]

For each (target, kernel, dtype, mapping depth, block config, flags) it builds the kernel with
``triton.compile(ASTSource(...), target=GPUTarget(...))`` (PTX + cubin, no device needed), runs the
ptxas shipped in the triton package with ``-v`` for registers and spill bytes, and prints one line.
Exit status 1 when a configuration fails to compile or needs more shared memory than the target
has (sm_80: 163 KB, sm_90: 227 KB). Triton's own cache (keyed by the kernel source hash) makes a
second run fast. Must run without TRITON_INTERPRET (the kernels must be real JIT functions).

The configuration set follows the dispatcher (``context_config`` / ``bridge_config``): the widths
below hit every BLOCK_M / BLOCK_D1 / BLOCK_N3 branch of ``bridge_config`` and every mapping depth;
all three input dtypes for the paper's mapping, one dtype for the other shapes (the dtype only
changes the load and its conversion).
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor

SHARED_LIMIT = {80: 163 * 1024, 90: 227 * 1024}
TARGETS = (80, 90)
DTYPES = {"float32": "fp32", "float16": "fp16", "bfloat16": "bf16"}

# (hidden, dims, dtypes): the paper's mapping in every dtype; other shapes pick the other branches.
BRIDGE_SHAPES = [
    (4096, (1024, 256, 128), ("float32", "float16", "bfloat16")),  # paper: P2 = 256 -> BLOCK_M 32
    (1024, (128,), ("bfloat16",)),  # 1 layer
    (768, (512, 64), ("bfloat16",)),  # 2 layers, P2 = 64 -> BLOCK_M 64, BLOCK_D1 64
    (4096, (1024, 512, 128), ("bfloat16",)),  # P2 = 512 -> BLOCK_M 16
    (2048, (512, 256, 128, 64), ("bfloat16",)),  # 4 layers
]
QUICK_SHAPES = [(4096, (1024, 256, 128), ("bfloat16",))]


def _configs(quick: bool):
    """Yield (name, kernel name, dtype, constexprs, num_warps, num_stages) to compile."""
    from .context import context_config
    from .fused_bridge import bridge_config

    ctx_cfg = context_config(4096, interpret=False)
    for dtype in ("bfloat16",) if quick else DTYPES:
        for contiguous in (True,) if quick else (True, False):
            consts = dict(BLOCK_S=ctx_cfg["BLOCK_S"], BLOCK_H=ctx_cfg["BLOCK_H"],
                          CONTIGUOUS_H=contiguous, ALIGNED=contiguous)
            yield (f"context_fwd {dtype} contiguous_h={contiguous}", "context_forward_kernel", dtype, consts,
                   ctx_cfg["num_warps"], 2)
        consts = dict(BLOCK_S=ctx_cfg["BLOCK_S"], BLOCK_H=ctx_cfg["BLOCK_H"])
        yield (f"context_bwd {dtype}", "context_backward_kernel", dtype, consts, ctx_cfg["bwd_num_warps"], 2)
    for hidden, dims, dtypes in QUICK_SHAPES if quick else BRIDGE_SHAPES:
        cfg = dict(bridge_config(hidden, dims, interpret=False))
        num_warps, num_stages = cfg.pop("num_warps"), cfg.pop("num_stages")
        blocks = " ".join(f"{k}={v}" for k, v in cfg.items() if k != "NUM_LINEAR")
        for dtype in dtypes:
            consts = dict(cfg, CONTIGUOUS_H=True, ALIGNED=True, PRECISION="tf32x3")
            tag = f"H={hidden} dims={dims} {dtype} {blocks} w{num_warps}s{num_stages}"
            yield (f"bridge_fwd {tag}", "bridge_forward_kernel", dtype, consts, num_warps, num_stages)
            flag_sets = [(False, False), (True, True)] if not quick else [(False, False)]
            for train_mapping, train_tail in flag_sets:
                bcfg = dict(bridge_config(hidden, dims, interpret=False, train_mapping=train_mapping))
                stages = bcfg.pop("num_stages")
                bconsts = dict(consts, TRAIN_MAPPING=train_mapping, TRAIN_TAIL=train_tail)
                yield (f"bridge_bwd {tag} s{stages} train_mapping={train_mapping} train_tail={train_tail}",
                       "bridge_backward_kernel", dtype, bconsts, num_warps, stages)


def _signature(fn, states_dtype: str, constexprs: dict) -> tuple[dict, dict]:
    """Triton 3.6 ASTSource signature: pointer args '*<ty>', ints 'i32'/'i64', floats 'fp32'."""
    signature, attrs = {}, {}
    float_args = {"inv_pairs"}
    for i, name in enumerate(fn.arg_names):
        if name in constexprs:
            signature[name] = "constexpr"
        elif name.endswith("_ptr"):
            if name == "states_ptr":
                ty = DTYPES[states_dtype]
            elif name in ("layer_offsets_ptr", "layer_strides_ptr", "batch_index_ptr", "seq_index_ptr",
                          "targets_ptr"):
                ty = "i64"
            elif name == "row_of_ptr":
                ty = "i32"
            elif name == "grad_states_ptr":
                ty = DTYPES[states_dtype]
            else:
                ty = "fp32"
            signature[name] = "*" + ty
            attrs[(i,)] = [["tt.divisibility", 16]]
        elif name in float_args:
            signature[name] = "fp32"
        else:
            signature[name] = "i32"
    return signature, attrs


def _ptxas_report(ptx: str, arch: int) -> tuple[int, int]:
    """(registers, spill store + load bytes) from the packaged ptxas -v."""
    import triton

    ptxas = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")
    gpu = "sm_90a" if arch == 90 else f"sm_{arch}"
    with tempfile.TemporaryDirectory() as tmp:
        src = os.path.join(tmp, "k.ptx")
        with open(src, "w") as f:
            f.write(ptx)
        out = subprocess.run([ptxas, "-v", f"--gpu-name={gpu}", src, "-o", os.path.join(tmp, "k.cubin")],
                             capture_output=True, text=True, check=True)
    text = out.stdout + out.stderr
    regs = max((int(x) for x in re.findall(r"Used (\d+) registers", text)), default=-1)
    spills = sum(int(a) + int(b) for a, b in re.findall(r"(\d+) bytes spill stores, (\d+) bytes spill loads", text))
    return regs, spills


def _compile_one(job):
    name, kernel_name, dtype, constexprs, num_warps, num_stages, arch = job
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    import triton

    from . import context, fused_bridge

    fn = getattr(context, kernel_name, None) or getattr(fused_bridge, kernel_name)
    signature, attrs = _signature(fn, dtype, constexprs)
    start = time.time()
    try:
        src = ASTSource(fn=fn, signature=signature, constexprs=constexprs, attrs=attrs)
        compiled = triton.compile(src, target=GPUTarget("cuda", arch, 32),
                                  options=dict(num_warps=num_warps, num_stages=num_stages))
        shared = int(compiled.metadata.shared)
        regs, spills = _ptxas_report(compiled.asm["ptx"], arch)
    except Exception as exc:  # noqa: BLE001 - reported, then the exit status says it failed
        return dict(name=name, arch=arch, ok=False, error=f"{type(exc).__name__}: {str(exc)[:2000]}")
    ok = shared <= SHARED_LIMIT[arch]
    return dict(name=name, arch=arch, ok=ok, shared=shared, regs=regs, spills=spills,
                seconds=time.time() - start, error=None if ok else "shared memory over the target's limit")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="one configuration per kernel (tests)")
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 1)
    args = parser.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        print("compile_check: unset TRITON_INTERPRET (the kernels must be compiled, not interpreted)")
        return 2
    jobs = [(*cfg, arch) for arch in TARGETS for cfg in _configs(args.quick)]
    start = time.time()
    failures = 0
    max_regs = max_spill = 0
    with ProcessPoolExecutor(max_workers=max(1, args.jobs)) as pool:
        for result in pool.map(_compile_one, jobs):
            target = f"sm_{result['arch']}{'a' if result['arch'] == 90 else ''}"
            if result["ok"]:
                max_regs = max(max_regs, result["regs"])
                max_spill = max(max_spill, result["spills"])
                print(f"OK   {target:6s} {result['name']}: shared {result['shared'] / 1024:.1f} KB, "
                      f"{result['regs']} registers, {result['spills']} spill bytes "
                      f"({result['seconds']:.1f}s)", flush=True)
            else:
                failures += 1
                print(f"FAIL {target:6s} {result['name']}: {result['error']}", flush=True)
    print(f"compile_check: {len(jobs)} configurations, {failures} failed, max {max_regs} registers, "
          f"max {max_spill} spill bytes, {time.time() - start:.0f}s")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
