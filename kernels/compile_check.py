"""Compile every kernel configuration the launchers can choose, for sm_80 and sm_90a, without a GPU.

    python -m sbpet.kernels.compile_check [--quick] [--jobs N]

For each (target, kernel, dtype, mapping depth, block config, flags) it builds the kernel with
``triton.compile(ASTSource(...), target=GPUTarget(...))`` (PTX + cubin, no device needed), runs the
ptxas shipped in the triton package with ``-v`` on Triton's PTX (same options as Triton's own
build) and reads the block of the kernel's own entry function for registers and spill bytes; the
register count is cross-checked against ``cuobjdump --dump-resource-usage`` of Triton's cubin (the
binary a GPU would load). Exit status 1 when a configuration fails to compile, needs more shared
memory than the target has (sm_80: 163 KB, sm_90: 227 KB) or the two register counts disagree.
Triton's own cache (keyed by the kernel source hash) makes a second run fast. Must run without
TRITON_INTERPRET (the kernels must be real JIT functions).

Low register counts with large spills (e.g. "32 registers, 26 KB spills") are real ptxas -O3
results, not a parse error: for some very large kernels ptxas picks a small register budget and
spills to local memory; the dispatcher's block sizes avoid those kernels.

The configuration set follows the dispatcher (``context_config`` / ``bridge_config``): the widths
below hit every BLOCK_M / BLOCK_D1 / BLOCK_N3 branch of ``bridge_config``, every mapping depth and
both passes (the backward takes narrower chunks). The dtype picks the dot precision (bf16/fp16
operands for 16-bit states, tf32x3 for float32) and the float32 block branch, so every shape is
built for bfloat16 and float32, and the paper's mapping for float16 too (same blocks as bfloat16).
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
    (1024, (128,), ("float32", "bfloat16")),  # 1 layer
    (768, (512, 64), ("float32", "bfloat16")),  # 2 layers, P2 = 64 -> BLOCK_M 64, BLOCK_D1 64
    (4096, (1024, 512, 128), ("float32", "bfloat16")),  # P2 = 512 -> BLOCK_M 16
    (2048, (512, 256, 128, 64), ("float32", "bfloat16")),  # 4 layers
]
QUICK_SHAPES = [(4096, (1024, 256, 128), ("bfloat16",))]


def _configs(quick: bool):
    """Yield (name, kernel name, dtype, constexprs, num_warps, num_stages) to compile."""
    import torch

    from .context import context_config
    from .fused_bridge import bridge_config, dot_precision

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
        for dtype in dtypes:
            torch_dtype = getattr(torch, dtype)
            precision = dot_precision(torch_dtype)
            cfg = dict(bridge_config(hidden, dims, interpret=False, dtype=torch_dtype))
            num_warps, num_stages = cfg.pop("num_warps"), cfg.pop("num_stages")
            consts = dict(cfg, CONTIGUOUS_H=True, ALIGNED=True, DOT_PRECISION=precision)
            tag = f"H={hidden} dims={dims} {dtype} {precision}"
            yield (f"bridge_fwd {tag} {_blocks(cfg)} w{num_warps}s{num_stages}", "bridge_forward_kernel", dtype,
                   consts, num_warps, num_stages)
            flag_sets = [(False, False), (True, True)] if not quick else [(False, False)]
            for train_mapping, train_tail in flag_sets:
                bcfg = dict(bridge_config(hidden, dims, interpret=False, train_mapping=train_mapping,
                                          dtype=torch_dtype, backward=True))
                bwarps, bstages = bcfg.pop("num_warps"), bcfg.pop("num_stages")
                bconsts = dict(bcfg, CONTIGUOUS_H=True, ALIGNED=True, DOT_PRECISION=precision,
                               TRAIN_MAPPING=train_mapping, TRAIN_TAIL=train_tail)
                yield (f"bridge_bwd {tag} {_blocks(bcfg)} w{bwarps}s{bstages} train_mapping={train_mapping} "
                       f"train_tail={train_tail}", "bridge_backward_kernel", dtype, bconsts, bwarps, bstages)


def _blocks(cfg: dict) -> str:
    return " ".join(f"{k}={v}" for k, v in cfg.items() if k != "NUM_LINEAR")


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


def _tool(name: str) -> str:
    import triton

    return os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", name)


def parse_ptxas_entry(text: str, kernel_name: str) -> tuple[int, int]:
    """(registers, spill store + load bytes) of ``kernel_name``'s own entry in ``ptxas -v`` output.

    ptxas prints one block per function ("Compiling entry function 'k'" / "Function properties for
    f" then its spill and "Used N registers" lines); only the kernel's block counts (a max or sum over
    every block would mix in device functions). Raises ValueError when the entry is missing.
    """
    blocks = re.split(r"(?=ptxas info\s*: Compiling entry function ')", text)
    for block in blocks:
        match = re.match(r"ptxas info\s*: Compiling entry function '([^']+)'", block)
        if not match or match.group(1) != kernel_name:
            continue
        props = block.split(f"Function properties for {kernel_name}", 1)
        body = props[1] if len(props) == 2 else block
        regs = re.search(r"Used (\d+) registers", body)
        spill = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", body)
        if regs is None:
            break
        return int(regs.group(1)), (int(spill.group(1)) + int(spill.group(2))) if spill else 0
    raise ValueError(f"ptxas -v output has no entry function {kernel_name!r}:\n{text[:2000]}")


def _ptxas_report(ptx: str, arch: int, kernel_name: str) -> tuple[int, int]:
    """(registers, spill bytes) of the kernel's entry, from the packaged ptxas -v."""
    gpu = "sm_90a" if arch == 90 else f"sm_{arch}"
    with tempfile.TemporaryDirectory() as tmp:
        src = os.path.join(tmp, "k.ptx")
        with open(src, "w") as f:
            f.write(ptx)
        out = subprocess.run([_tool("ptxas"), "-lineinfo", "-v", f"--gpu-name={gpu}", src,
                              "-o", os.path.join(tmp, "k.cubin")],
                             capture_output=True, text=True, check=True)
    return parse_ptxas_entry(out.stdout + out.stderr, kernel_name)


def _cubin_registers(cubin: bytes, kernel_name: str) -> int:
    """Registers of ``kernel_name`` in Triton's own cubin (cuobjdump --dump-resource-usage)."""
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "k.cubin")
        with open(path, "wb") as f:
            f.write(cubin)
        out = subprocess.run([_tool("cuobjdump"), "--dump-resource-usage", path],
                             capture_output=True, text=True, check=True).stdout
    match = re.search(rf"Function {re.escape(kernel_name)}:\s*\n\s*REG:(\d+)", out)
    if match is None:
        raise ValueError(f"cuobjdump has no function {kernel_name!r}:\n{out[:2000]}")
    return int(match.group(1))


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
        entry = compiled.metadata.name
        regs, spills = _ptxas_report(compiled.asm["ptx"], arch, entry)
        cubin_regs = _cubin_registers(compiled.asm["cubin"], entry)
    except Exception as exc:  # noqa: BLE001 - reported, then the exit status says it failed
        return dict(name=name, arch=arch, ok=False, error=f"{type(exc).__name__}: {str(exc)[:2000]}")
    error = None
    if shared > SHARED_LIMIT[arch]:
        error = "shared memory over the target's limit"
    elif cubin_regs != regs:
        error = f"ptxas -v says {regs} registers but Triton's cubin has {cubin_regs}"
    return dict(name=name, arch=arch, ok=error is None, shared=shared, regs=regs, spills=spills,
                seconds=time.time() - start, error=error)


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
