"""Measuring, shared by the benchmark suite, gpu_check and the training-step benchmark: timing
(CUDA events or interleaved CPU rounds), peak memory beyond the inputs, the roofline's two ceilings,
out-of-memory handling, and the environment recorded with every result."""

from __future__ import annotations

import argparse
import contextlib
import datetime
import gc
import json
import os
import platform
import statistics
import sys
import time
import warnings
import weakref

import torch

import sbpet

__all__ = [
    "AllocationTracker", "apply_threads", "bench_device", "config_names", "count_syncs", "environment",
    "free_device", "is_oom", "measure_ceilings", "measure_memory", "output_bytes", "quiet_transformers",
    "step_main", "step_parser", "summarize", "sync", "time_cuda", "time_interleaved",
]


def output_bytes(out) -> int:
    loss, grads = out
    return sum(g.numel() * g.element_size() for g in grads if g is not None)


class AllocationTracker:
    """Peak bytes of tensor storages created while active (CPU): every op's outputs go through
    ``__torch_dispatch__``; a storage counts from its creation until it is freed. Kernels that
    allocate without the dispatcher (Inductor's generated CPU code) are not seen: the caller
    reports "n/a" for those."""

    def __init__(self):
        from torch.utils._python_dispatch import TorchDispatchMode
        from torch.utils._pytree import tree_flatten

        tracker = self

        class Mode(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                out = func(*args, **(kwargs or {}))
                for t in tree_flatten(out)[0]:
                    if isinstance(t, torch.Tensor):
                        tracker._add(t)
                return out

        self.mode = Mode()
        self.live = self.peak = 0
        self.seen: set = set()

    def _add(self, tensor):
        storage = tensor.untyped_storage()
        key, size = storage.data_ptr(), storage.nbytes()
        if size == 0 or key in self.seen:
            return
        self.seen.add(key)
        self.live += size
        self.peak = max(self.peak, self.live)
        weakref.finalize(storage, self._free, key, size)

    def _free(self, key, size):
        if key in self.seen:
            self.seen.discard(key)
            self.live -= size


def measure_memory(step, device, backend: str) -> dict:
    """Peak device memory allocated during one ``step()`` beyond what existed before (the inputs),
    and the bytes of the returned gradients. ``temp_bytes`` = peak - gradients: the temporaries a
    backend needs beyond its unavoidable outputs. None values mean "not measurable here"."""
    device = torch.device(device)
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        base = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        out = step()
        torch.cuda.synchronize(device)
        peak = torch.cuda.max_memory_allocated(device) - base
        method = "torch.cuda.max_memory_allocated"
    elif device.type == "cpu" and backend != "compile":
        tracker = AllocationTracker()
        with tracker.mode:
            out = step()
        peak, method = tracker.peak, "TorchDispatchMode storage tracking"
    else:
        return {"peak_bytes": None, "output_bytes": None, "temp_bytes": None,
                "memory_method": "n/a (Inductor's CPU kernels allocate outside the dispatcher)"}
    outputs = output_bytes(out)
    del out
    return {"peak_bytes": int(peak), "output_bytes": int(outputs), "temp_bytes": int(max(peak - outputs, 0)),
            "memory_method": method}


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def count_syncs(step, device) -> int:
    """Host synchronisations in one ``step()`` on CUDA: the warnings of
    ``torch.cuda.set_sync_debug_mode("warn")`` (the Trainer's own included: compare with ``none``)."""
    sync(device)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            step()
        finally:
            torch.cuda.set_sync_debug_mode(0)
    return sum("synchroniz" in str(w.message).lower() for w in caught)


def time_cuda(fn, warmup_ms: float = 25, rep_ms: float = 100) -> list[float]:
    """Median-ready times (seconds) of ``fn`` on CUDA: ``triton.testing.do_bench`` (CUDA events,
    L2 flushed between calls) when triton is importable, else CUDA events here."""
    try:
        from triton.testing import do_bench

        times_ms = do_bench(fn, warmup=warmup_ms, rep=rep_ms, return_mode="all")
        return [t / 1e3 for t in times_ms]
    except ImportError:
        pass
    fn()
    torch.cuda.synchronize()
    times = []
    deadline = time.perf_counter() + rep_ms / 1e3
    while len(times) < 5 or (time.perf_counter() < deadline and len(times) < 1000):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    return times


def time_interleaved(runners: dict, device, min_rounds: int = 5, max_rounds: int = 50,
                     seconds: float = 10.0, warmup: int = 2, deadline: float | None = None,
                     cuda_events: bool = False) -> dict:
    """Times (seconds) of each runner, interleaved round by round (the order rotates every round)
    so that drift in the machine's load hits every backend alike. Stops after ``max_rounds`` or
    once ``min_rounds`` are done and ``seconds`` have passed or ``deadline`` (time.monotonic()) is
    5 s away. The wall clock between syncs, or with ``cuda_events`` on CUDA a pair of CUDA events
    around each call."""
    device = torch.device(device)
    events = cuda_events and device.type == "cuda"
    names = list(runners)
    for _ in range(warmup):
        for name in names:
            runners[name]()
    sync(device)
    times = {name: [] for name in names}
    start = time.perf_counter()
    for r in range(max_rounds):
        order = names[r % len(names):] + names[: r % len(names)]
        for name in order:
            sync(device)
            if events:
                begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                begin.record()
                out = runners[name]()
                end.record()
                end.synchronize()
                times[name].append(begin.elapsed_time(end) / 1e3)
            else:
                t0 = time.perf_counter()
                out = runners[name]()
                sync(device)
                times[name].append(time.perf_counter() - t0)
            del out
        if r + 1 >= min_rounds and (time.perf_counter() - start > seconds
                                    or (deadline is not None and time.monotonic() + 5 > deadline)):
            break
    return times


@contextlib.contextmanager
def quiet_transformers():
    """transformers' logging at error level and its (and peft's) FutureWarnings silenced."""
    from transformers.utils import logging

    level = logging.get_verbosity()
    logging.set_verbosity_error()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # deprecations inside transformers / peft
            yield
    finally:
        logging.set_verbosity(level)


def summarize(times: list[float]) -> dict:
    return {"median_s": statistics.median(times), "min_s": min(times), "rounds": len(times)}


def measure_ceilings(device, quick: bool = False) -> dict:
    """The two ceilings of the roofline, measured once: device-to-device copy bandwidth (bytes read
    + written per second) and a large matmul's rate (bf16 8192^3 on CUDA, float32 2048^3 on CPU),
    medians. ``quick``: small sizes (dry runs)."""
    device = torch.device(device)
    if device.type == "cuda":
        numel = (1 << 20) if quick else (1 << 29)  # 1 GiB of bf16
        src = torch.randn(numel, device=device, dtype=torch.bfloat16)
        dst = torch.empty_like(src)
        copy_s = statistics.median(time_cuda(lambda: dst.copy_(src)))
        n = 1024 if quick else 8192
        a = torch.randn(n, n, device=device, dtype=torch.bfloat16)
        b = torch.randn(n, n, device=device, dtype=torch.bfloat16)
        mm_s = statistics.median(time_cuda(lambda: a @ b))
        mm_dtype = "bfloat16"
        del a, b
    else:
        numel = (1 << 18) if quick else (1 << 24)  # 64 MiB of float32
        src = torch.randn(numel)
        dst = torch.empty_like(src)
        n = 256 if quick else 2048
        a, b = torch.randn(n, n), torch.randn(n, n)
        t = time_interleaved({"copy": lambda: dst.copy_(src), "mm": lambda: a @ b}, device,
                             min_rounds=5, max_rounds=30, seconds=0.2 if quick else 3.0)
        copy_s, mm_s = statistics.median(t["copy"]), statistics.median(t["mm"])
        mm_dtype = "float32"
    nbytes = 2 * src.numel() * src.element_size()
    del src, dst
    return {"copy_bytes_per_s": nbytes / copy_s, "matmul_flops_per_s": 2 * n**3 / mm_s,
            "matmul_shape": f"{n}^3 {mm_dtype}", "copy_bytes": nbytes}


def environment(device) -> dict:
    """Device, driver and versions recorded with every result."""
    device = torch.device(device)
    info = {
        "date": datetime.date.today().isoformat(),
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "sbpet": getattr(sbpet, "__version__", "?"),
        "platform": platform.platform(),
        "device_type": device.type,
        "threads": torch.get_num_threads(),
    }
    try:
        import triton

        info["triton"] = triton.__version__
    except ImportError:
        info["triton"] = None
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info.update(device=props.name, device_memory_bytes=props.total_memory,
                    cuda=torch.version.cuda, capability=f"{props.major}.{props.minor}")
        try:
            import subprocess

            info["driver"] = subprocess.run(
                ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                capture_output=True, text=True, timeout=20).stdout.strip().splitlines()[0]
        except Exception as exc:  # no nvidia-smi: keep going
            info["driver"] = f"unknown ({type(exc).__name__})"
    else:
        info["device"] = platform.processor() or platform.machine()
        try:
            with open("/proc/cpuinfo") as f:
                names = [l.split(":", 1)[1].strip() for l in f if l.startswith("model name")]
            if names:
                info["device"] = names[0]
        except OSError:
            pass
        info["cpus"] = os.cpu_count()
    return info


def is_oom(exc: BaseException) -> bool:
    oom = getattr(torch, "OutOfMemoryError", None) or getattr(torch.cuda, "OutOfMemoryError", ())
    return isinstance(exc, oom) or "out of memory" in str(exc).lower()


def free_device(device):
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def apply_threads() -> int:
    """Honour ``SBPET_BENCH_THREADS`` (CPU timings on a shared machine are far more stable with 1:
    an OpenMP barrier waiting for a descheduled thread can cost 10x). Returns the thread count."""
    threads = os.environ.get("SBPET_BENCH_THREADS")
    if threads:
        torch.set_num_threads(int(threads))
    return torch.get_num_threads()


def bench_device() -> torch.device:
    """The device of a benchmark session: ``SBPET_BENCH_DEVICE``, default cuda when available."""
    return torch.device(os.environ.get("SBPET_BENCH_DEVICE") or ("cuda" if torch.cuda.is_available() else "cpu"))


def config_names(env: str, device, gpu: tuple[str, ...], cpu: tuple[str, ...]) -> tuple[str, ...]:
    """The configurations a benchmark runs: the comma list in ``$env``, else ``gpu`` on CUDA and
    ``cpu`` elsewhere."""
    return tuple(c for c in os.environ.get(env, "").split(",") if c) or (gpu if device.type == "cuda" else cpu)


def step_parser(doc: str, configs: str) -> argparse.ArgumentParser:
    """The options of a training-step benchmark's command line: --configs (names in ``configs``),
    --device, --quick and --json; the caller adds its own."""
    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--configs", default=None, help=f"comma list of {configs} (default: by device)")
    parser.add_argument("--device", default=None, help="cuda (default when available) or cpu")
    parser.add_argument("--quick", action="store_true", help="one warm-up step, two rounds")
    parser.add_argument("--json", default=None, help="write the records here")
    return parser


def step_main(args, key: str, gpu: tuple[str, ...], cpu: tuple[str, ...], run, render) -> int:
    """Run a training-step benchmark from its parsed command line: ``run(names, device, log)`` gives
    the records (written to ``--json`` under ``key`` with the environment), ``render(records)`` is
    printed. Exit status 1 when a record is wrong or failed."""
    device = torch.device(args.device) if args.device else bench_device()
    names = args.configs.split(",") if args.configs else (gpu if device.type == "cuda" else cpu)
    apply_threads()
    records = run(names, device, lambda *a: print(*a, file=sys.stderr, flush=True))
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump({"environment": environment(device), key: records}, f, indent=1)
    print(render(records))
    return 1 if any(r.get("status") in ("wrong", "error") for r in records) else 0
