"""Compile every kernel configuration the launchers can choose, for sm_80 and sm_90a, without a GPU.

    python -m sbpet.kernels.compile_check [--quick] [--jobs N]

For each (target, kernel, dtype, mapping depth, block config, flags) it builds the kernel with
``triton.compile(ASTSource(...), target=GPUTarget(...))`` (PTX + cubin, no device needed). The
figures then come from the installed Triton's own tools, resolved the way Triton resolves them, so
the check works with every Triton from 3.6 on:

- registers, spill bytes and stack frame: the ``ptxas -v`` log of Triton's own PTX -> cubin step
  (the nvidia backend's ``make_cubin`` run again on Triton's PTX with ``TRITON_DUMP_PTXAS_LOG``).
  That step runs the ptxas Triton picks for the target (``get_ptxas(arch)``: the wheel's ``ptxas``
  or ``ptxas-blackwell`` by Triton version and architecture, or ``TRITON_PTXAS_PATH`` /
  ``TRITON_PTXAS_BLACKWELL_PATH``) with Triton's own options, the same ptxas whose version fixed
  the PTX ``.version``; only the kernel's own entry block of the log counts;
- shared memory: Triton's ``metadata.shared`` (dynamic) plus the cubin's static shared memory;
- cross-check that the log describes the binary a GPU would load: ``cuobjdump
  --dump-resource-usage`` (Triton's ``cuobjdump``, ``TRITON_CUOBJDUMP_PATH`` honoured) of the cubin
  that ``triton.compile`` returned must show the same registers and the same stack frame (the
  per-thread local memory that holds the spills) as the log;
- CTAs per SM: the CUDA occupancy calculator's arithmetic (registers allocated per warp in units of
  256 over 4 sub-partitions, shared memory plus 1 KB reserved per CTA in units of 128 bytes, warp
  slots, CTA slots) against the target's limits (:data:`LIMITS`), with the limiting resource.

Exit status 1 when a configuration fails to compile, needs more shared memory than one CTA may have
(sm_80: 163 KB, sm_90: 227 KB), cannot launch at all (0 CTAs per SM), when ptxas and cuobjdump
disagree, when a kernel that must be deterministic has an atomic instruction in its PTX (kernel 1,
the GEMM strategy's kernels and kernel 2's backward with g and the tail frozen: the dispatcher relies
on it under ``torch.use_deterministic_algorithms``), or when a GEMM-strategy kernel with 16-bit dots
spills. The first line names the Triton version and the ptxas / cuobjdump used per target; the
last lines give counts and the worst registers / spills / occupancy per target and dtype. Triton's
own cache (keyed by the kernel source and the ptxas version) makes a second run faster; the ptxas
report runs every time. Must run without TRITON_INTERPRET (the kernels must be real JIT functions).

Low register counts with large spills (e.g. "32 registers, 26 KB spills") are real ptxas -O3
results, not a parse error: for some very large kernels ptxas picks a small register budget and
spills to local memory; the dispatcher's block sizes avoid those kernels. Figures differ between
Triton versions (different LLVM and ptxas); the check passes or fails on each installed Triton.

The configuration set follows the launchers (``context_config`` / ``bridge_config``): kernel 2's
blocks and dots are fixed by the user's ``precision`` ("fp32" -> tf32x3 dots on float32 operands,
"tf32", "bf16" -> bfloat16 operands) and its token loads by the states' dtype. The paper's mapping is
built for every (states dtype, precision) pair; the widths of the other shapes hit every BLOCK_M /
BLOCK_D1 / BLOCK_N3 branch of ``bridge_config`` and every mapping depth, for float32 states at "fp32"
and bfloat16 states at "fp32" (the default) and "bf16"; both passes (the backward takes narrower
chunks). Kernel 1's forward is built with and without ``GATHER_ROWS``, contiguous and strided.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import os
import re
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from typing import NamedTuple

from .check_configs import configs

TARGETS = (80, 90)
DTYPES = {"float32": "fp32", "float16": "fp16", "bfloat16": "bf16"}


@dataclass(frozen=True)
class Limits:
    """Per-SM resources of a target (CUDA occupancy calculator / programming guide tables)."""

    regs_per_sm: int = 65536
    regs_per_cta: int = 65536
    max_regs_per_thread: int = 255
    reg_alloc_unit: int = 256  # registers are allocated per warp in units of 256
    sub_partitions: int = 4  # ... and each warp's registers lie in one of 4 sub-partitions
    threads_per_sm: int = 2048
    threads_per_cta: int = 1024
    ctas_per_sm: int = 32
    smem_per_sm: int = 164 * 1024  # largest shared-memory carveout
    smem_per_cta: int = 163 * 1024  # opt-in maximum of one CTA (what Triton checks on load)
    smem_reserved_per_cta: int = 1024  # the driver's reserved shared memory of every CTA
    smem_alloc_unit: int = 128
    warp_size: int = 32


LIMITS = {
    80: Limits(smem_per_sm=164 * 1024, smem_per_cta=163 * 1024),
    90: Limits(smem_per_sm=228 * 1024, smem_per_cta=227 * 1024),
}


def _round_up(value: int, unit: int) -> int:
    return -(-value // unit) * unit


class Occupancy(NamedTuple):
    ctas: int  # resident CTAs per SM
    limit: str  # what bounds it: "registers", "shared", "threads" or "ctas" (first in that order)
    by_registers: int
    by_shared: int
    by_threads: int


def occupancy(arch: int, registers: int, num_warps: int, shared: int) -> Occupancy:
    """CTAs of one kernel resident per SM of sm_<arch> (the CUDA occupancy calculator's arithmetic).

    registers: per thread (ptxas); shared: bytes per CTA (dynamic + static, without the reserve).
    0 CTAs means the kernel cannot launch (too many registers per CTA or too much shared memory).
    """
    lim = LIMITS[arch]
    threads = num_warps * lim.warp_size
    regs_per_warp = _round_up(registers * lim.warp_size, lim.reg_alloc_unit)
    if (registers > lim.max_regs_per_thread or regs_per_warp * num_warps > lim.regs_per_cta
            or regs_per_warp * _round_up(num_warps, lim.sub_partitions) > lim.regs_per_cta):
        by_registers = 0
    elif regs_per_warp == 0:
        by_registers = lim.ctas_per_sm
    else:
        warps_per_sub = (lim.regs_per_sm // lim.sub_partitions) // regs_per_warp
        by_registers = warps_per_sub * lim.sub_partitions // num_warps
    smem = _round_up(shared + lim.smem_reserved_per_cta, lim.smem_alloc_unit)
    by_shared = 0 if shared > lim.smem_per_cta else lim.smem_per_sm // smem
    by_threads = 0 if threads > lim.threads_per_cta else lim.threads_per_sm // threads
    limits = dict(registers=by_registers, shared=by_shared, threads=by_threads, ctas=lim.ctas_per_sm)
    ctas = min(limits.values())
    limit = next(name for name, value in limits.items() if value == ctas)
    return Occupancy(ctas, limit, by_registers, by_shared, by_threads)


def _signature(fn, states_dtype: str, constexprs: dict) -> tuple[dict, dict]:
    """ASTSource signature (Triton >= 3.6): pointer args '*<ty>', ints 'i32'/'i64', floats 'fp32'.

    The GEMM strategy's a1 / da1 buffers and its W1 copy are in the dots' operand dtype (16 bits at
    "bf16" / "fp16", else float32); its token gradients (``out_ptr``) in the states' dtype."""
    signature, attrs = {}, {}
    float_args = {"inv_pairs"}
    operand = {"bf16": "bf16", "fp16": "fp16"}.get(constexprs.get("DOT_PRECISION"), "fp32")
    gemm = fn.fn.__name__ in ("first_layer_kernel", "token_grad_kernel")
    for i, name in enumerate(fn.arg_names):
        if name in constexprs:
            signature[name] = "constexpr"
        elif name.endswith("_ptr"):
            if name in ("states_ptr", "grad_states_ptr", "tokens_ptr") or (gemm and name == "out_ptr"):
                ty = DTYPES[states_dtype]
            elif name in ("a1_ptr", "da1_ptr") or (gemm and name == "w1_ptr"):
                ty = operand
            elif name in ("layer_offsets_ptr", "layer_strides_ptr", "batch_index_ptr", "seq_index_ptr",
                          "targets_ptr", "num_valid_ptr", "segment_start_ptr", "segment_end_ptr",
                          "context_index_ptr"):
                ty = "i64"
            elif name in ("row_of_ptr", "pair_ids_ptr"):
                ty = "i32"
            elif name == "pair_starts_ptr":
                ty = "i64"
            else:
                ty = "fp32"
            signature[name] = "*" + ty
            attrs[(i,)] = [["tt.divisibility", 16]]
        elif name in float_args:
            signature[name] = "fp32"
        else:
            signature[name] = "i32"
    return signature, attrs


class Tool(NamedTuple):
    path: str
    version: str  # CUDA release, e.g. "12.8"


def _tool_version(path: str) -> str | None:
    try:
        out = subprocess.run([path, "--version"], capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return None
    match = re.search(r"release (\d+\.\d+)", out)
    return match.group(1) if match else None


def _env_tool(binary: str) -> Tool:
    """Triton's rule for a packaged CUDA tool: ``TRITON_<BINARY>_PATH`` if it runs, else the wheel's."""
    import triton

    default = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", binary)
    env = os.environ.get(f"TRITON_{binary.upper().replace('-', '_')}_PATH")
    for path in ([env] if env else []) + [default]:
        version = _tool_version(path)
        if version is not None:
            return Tool(path, version)
    raise RuntimeError(f"cannot find {binary} (TRITON_{binary.upper().replace('-', '_')}_PATH or {default})")


def resolve_ptxas(arch: int) -> Tool:
    """The ptxas the installed Triton uses for sm_<arch>: its nvidia backend's ``get_ptxas(arch)``
    (Triton 3.6-3.8: ``ptxas`` below sm_100, ``ptxas-blackwell`` from sm_100; 3.9: ``ptxas`` below
    sm_90, ``ptxas-blackwell`` from sm_90; ``TRITON_PTXAS_PATH`` / ``TRITON_PTXAS_BLACKWELL_PATH``
    override each). That ptxas's version also sets the ``.version`` of the PTX Triton emits, so
    any other ptxas may reject it. Falls back to Triton's environment rule for ``ptxas`` when the
    backend has no ``get_ptxas``."""
    try:
        from triton.backends.nvidia.compiler import get_ptxas
    except ImportError:
        return _env_tool("ptxas")
    tool = get_ptxas(arch)
    return Tool(tool.path, tool.version)


def resolve_cuobjdump() -> Tool:
    """Triton's cuobjdump (``knobs.nvidia.cuobjdump``: ``TRITON_CUOBJDUMP_PATH`` or the wheel's)."""
    try:
        from triton import knobs

        tool = knobs.nvidia.cuobjdump
    except (ImportError, AttributeError):
        return _env_tool("cuobjdump")
    return Tool(tool.path, tool.version)


class PtxasEntry(NamedTuple):
    registers: int
    spills: int  # spill store + spill load bytes
    stack: int  # stack frame bytes per thread (local memory: spill slots and local arrays)


def parse_ptxas_entry(text: str, kernel_name: str) -> PtxasEntry:
    """(registers, spill store + load bytes, stack frame bytes) of ``kernel_name``'s own entry in
    ``ptxas -v`` output.

    ptxas prints one block per function ("Compiling entry function 'k'" / "Function properties for
    f" then its spill and "Used N registers" lines); only the kernel's block counts (a max or sum over
    every block would mix in device functions). The prefix is the binary's name ("ptxas info",
    "ptxas-blackwell info"). Raises ValueError when the entry is missing.
    """
    prefix = r"ptxas[\w.-]* info\s*: "
    blocks = re.split(rf"(?={prefix}Compiling entry function ')", text)
    for block in blocks:
        match = re.match(rf"{prefix}Compiling entry function '([^']+)'", block)
        if not match or match.group(1) != kernel_name:
            continue
        props = block.split(f"Function properties for {kernel_name}", 1)
        body = props[1] if len(props) == 2 else block
        regs = re.search(r"Used (\d+) registers", body)
        spill = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", body)
        stack = re.search(r"(\d+) bytes stack frame", body)
        if regs is None:
            break
        return PtxasEntry(int(regs.group(1)), (int(spill.group(1)) + int(spill.group(2))) if spill else 0,
                          int(stack.group(1)) if stack else 0)
    raise ValueError(f"ptxas -v output has no entry function {kernel_name!r}:\n{text[:2000]}")


@contextlib.contextmanager
def _dump_ptxas_log(out: io.StringIO):
    """Within the block Triton's ``make_cubin`` prints its ptxas -v log (``knobs.nvidia.dump_ptxas_log``,
    not part of Triton's cache key) and stdout goes to ``out``; both are restored afterwards."""
    from triton import knobs

    with knobs.nvidia.scope(), contextlib.redirect_stdout(out):
        knobs.nvidia.dump_ptxas_log = True
        yield


def triton_ptxas_log(ptx: str, arch: int, options: dict) -> tuple[str, bytes]:
    """Triton's own PTX -> cubin step for sm_<arch> (its ptxas, see :func:`resolve_ptxas`, and its
    ptxas options, which differ between Triton versions) run on ``ptx``. Returns (ptxas -v log, cubin)."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler.compiler import make_backend

    backend = make_backend(GPUTarget("cuda", arch, 32))
    opt = backend.parse_options(dict(options))
    out = io.StringIO()
    with _dump_ptxas_log(out):
        cubin = backend.make_cubin(ptx, {}, opt, arch)
    return out.getvalue(), cubin


_LOG_FILE = "sbpet-ptxas-v.log"  # kept beside the cubin in Triton's cache, under the same key


def _log_cache(compiled):
    try:
        from triton.runtime.cache import get_cache_manager

        return get_cache_manager(compiled.hash)
    except Exception:  # noqa: BLE001 - no cache: the log is made again next time
        return None


def compile_with_ptxas_log(src, arch: int, options: dict):
    """``triton.compile(src)`` for sm_<arch> and the ptxas -v log of the very cubin it returns.

    On a compile the log is the one of Triton's own ptxas run (captured); on a hit of Triton's
    cache it is the log stored with that cache entry, or else :func:`triton_ptxas_log` runs
    Triton's ptxas step again on the cached PTX. Returns (compiled, log)."""
    import triton
    from triton.backends.compiler import GPUTarget

    out = io.StringIO()
    with _dump_ptxas_log(out):
        compiled = triton.compile(src, target=GPUTarget("cuda", arch, 32), options=options)
    log = out.getvalue()
    if f"Compiling entry function '{compiled.metadata.name}'" in log:
        fresh = True
    else:  # Triton's cache had the kernel: no ptxas ran
        fresh, cache, log = False, _log_cache(compiled), None
        path = cache.get_file(_LOG_FILE) if cache is not None else None
        if path is not None:
            with open(path, encoding="utf-8") as f:
                log = f.read()
        if log is None:
            fresh, log = True, triton_ptxas_log(compiled.asm["ptx"], arch, options)[0]
    if fresh and (cache := _log_cache(compiled)) is not None:
        try:
            cache.put(log, _LOG_FILE, binary=False)
        except Exception:  # noqa: BLE001 - only a cache
            pass
    return compiled, log


def cubin_resources(cubin: bytes, kernel_name: str, cuobjdump: str | None = None) -> dict[str, int]:
    """``kernel_name``'s line of ``cuobjdump --dump-resource-usage`` (REG, STACK, SHARED, LOCAL, ...)."""
    cuobjdump = cuobjdump or resolve_cuobjdump().path
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "k.cubin")
        with open(path, "wb") as f:
            f.write(cubin)
        out = subprocess.run([cuobjdump, "--dump-resource-usage", path],
                             capture_output=True, text=True, check=True).stdout
    match = re.search(rf"Function {re.escape(kernel_name)}:\s*\n\s*(REG:.*)", out)
    if match is None:
        raise ValueError(f"cuobjdump has no function {kernel_name!r}:\n{out[:2000]}")
    return {key: int(value) for key, value in re.findall(r"([A-Z]+(?:\[\d+\])?):(\d+)", match.group(1))}


def _compile_one(job):
    name, kernel_name, dtype, constexprs, num_warps, num_stages, arch = job
    from triton.compiler import ASTSource

    from . import context, fused_bridge, layer_gemm, segments

    modules = (context, fused_bridge, layer_gemm, segments)
    fn = next(getattr(m, kernel_name) for m in modules if hasattr(m, kernel_name))
    signature, attrs = _signature(fn, dtype, constexprs)
    options = dict(num_warps=num_warps, num_stages=num_stages)
    start = time.time()
    base = dict(name=name, arch=arch, dtype=dtype, dot=constexprs.get("DOT_PRECISION", "-"))
    try:
        src = ASTSource(fn=fn, signature=signature, constexprs=constexprs, attrs=attrs)
        compiled, log = compile_with_ptxas_log(src, arch, options)
        entry = compiled.metadata.name
        ptxas = parse_ptxas_entry(log, entry)
        cubin = cubin_resources(compiled.asm["cubin"], entry)
    except Exception as exc:  # noqa: BLE001 - reported, then the exit status says it failed
        return dict(base, ok=False, error=f"{type(exc).__name__}: {str(exc)[:2000]}")
    shared = int(compiled.metadata.shared) + cubin.get("SHARED", 0)
    atomics = count_atomics(compiled.asm["ptx"])
    occ = occupancy(arch, ptxas.registers, num_warps, shared)
    error = None
    if shared > LIMITS[arch].smem_per_cta:
        error = "shared memory over the target's limit"
    elif cubin.get("REG") != ptxas.registers:
        error = f"ptxas -v says {ptxas.registers} registers but Triton's cubin has {cubin.get('REG')}"
    elif cubin.get("STACK") != ptxas.stack:
        error = f"ptxas -v says {ptxas.stack} bytes stack frame but Triton's cubin has STACK:{cubin.get('STACK')}"
    elif occ.ctas == 0:
        error = f"cannot launch: 0 CTAs per SM ({occ.limit})"
    elif atomics and must_be_deterministic(kernel_name, constexprs):
        error = f"{atomics} atomic instructions in a kernel that must be deterministic"
    elif ptxas.spills and must_not_spill(kernel_name, constexprs):
        error = f"{ptxas.spills} spill bytes in a configuration that must not spill (must_not_spill)"
    return dict(base, ok=error is None, shared=shared, regs=ptxas.registers, spills=ptxas.spills,
                warps=num_warps, ctas=occ.ctas, limit=occ.limit, atomics=atomics, seconds=time.time() - start,
                error=error)


def count_atomics(ptx: str) -> int:
    """Atomic and reduction instructions (``atom.*``, ``red.*``) in a kernel's PTX."""
    return len(re.findall(r"^\s*(?:@!?%p\d+\s+)?(?:atom|red)\.", ptx, flags=re.M))


def must_be_deterministic(kernel_name: str, constexprs: dict) -> bool:
    """Kernels whose results may not depend on the order programs run in: kernel 1 both ways, the
    pair sum, the GEMM strategy's layer-1 kernels, and kernel 2's backward when it trains neither g
    nor the tail."""
    if kernel_name == "bridge_backward_kernel":
        return not constexprs.get("TRAIN_MAPPING") and not constexprs.get("TRAIN_TAIL")
    return True  # (the GEMM strategy launches kernel 2's backward only frozen: covered above)


def must_not_spill(kernel_name: str, constexprs: dict) -> bool:
    """Blocks chosen spill-free: layer 1's GEMMs at every precision (each tile autotuning may
    choose, the fixed one included) and kernel 2 on the saved a1 with 16-bit dots."""
    if kernel_name in ("first_layer_kernel", "token_grad_kernel"):
        return True
    return bool(constexprs.get("A1_SAVED")) and constexprs.get("DOT_PRECISION") in ("bf16", "fp16")


def _target_name(arch: int) -> str:
    return f"sm_{arch}{'a' if arch == 90 else ''}"


def _tools_line() -> str:
    import triton

    parts = []
    for arch in TARGETS:
        try:
            tool = resolve_ptxas(arch)
            parts.append(f"{_target_name(arch)}: ptxas {tool.version} ({tool.path})")
        except Exception as exc:  # noqa: BLE001 - every configuration of the target then fails too
            parts.append(f"{_target_name(arch)}: no ptxas ({exc})")
    try:
        tool = resolve_cuobjdump()
        parts.append(f"cuobjdump {tool.version} ({tool.path})")
    except Exception as exc:  # noqa: BLE001
        parts.append(f"no cuobjdump ({exc})")
    return f"compile_check: triton {triton.__version__}; " + "; ".join(parts)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="one configuration per kernel (tests)")
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 1)
    args = parser.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        print("compile_check: unset TRITON_INTERPRET (the kernels must be compiled, not interpreted)")
        return 2
    print(_tools_line(), flush=True)
    jobs = [(*cfg, arch) for arch in TARGETS for cfg in configs(args.quick)]
    start = time.time()
    failures = 0
    worst: dict[tuple[int, str, str], dict] = {}
    with ProcessPoolExecutor(max_workers=max(1, args.jobs)) as pool:
        for result in pool.map(_compile_one, jobs):
            target = _target_name(result["arch"])
            if "regs" in result:
                key = (result["arch"], result["dtype"], result["dot"])
                w = worst.setdefault(key, dict(regs=0, spills=0, ctas=10**9))
                w["regs"] = max(w["regs"], result["regs"])
                w["spills"] = max(w["spills"], result["spills"])
                w["ctas"] = min(w["ctas"], result["ctas"])
            if result["ok"]:
                print(f"OK   {target:6s} {result['name']}: {result['regs']} registers x {result['warps'] * 32} threads, "
                      f"{result['spills']} spill bytes, {result['atomics']} atomics, "
                      f"shared {result['shared'] / 1024:.1f} KB, {result['ctas']} CTAs/SM ({result['limit']}) "
                      f"({result['seconds']:.1f}s)", flush=True)
            else:
                failures += 1
                print(f"FAIL {target:6s} {result['name']}: {result['error']}", flush=True)
    for (arch, dtype, dot), w in sorted(worst.items()):
        print(f"compile_check: {_target_name(arch):6s} {dtype:8s} dots {dot:6s}: max {w['regs']} registers, "
              f"max {w['spills']} spill bytes, min {w['ctas']} CTAs/SM")
    print(f"compile_check: {len(jobs)} configurations, {len(jobs) - failures} OK, {failures} failed, "
          f"{time.time() - start:.0f}s")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
