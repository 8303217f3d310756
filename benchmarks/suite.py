"""The benchmark suite's building blocks, shared by ``bench_bridge.py`` and ``gpu_check.py``.

What is timed: one call of ``sbpet.bridge_loss`` (validation included, as a user calls it), either
under ``torch.no_grad`` ("fwd") or followed by ``torch.autograd.grad`` of the loss with respect to
every hidden state, and for the fitting shapes also to g's parameters ("fwd+bwd").
Every backend is checked against the eager reference on the same inputs before it is timed.
Formulas for bytes, FLOPs and the floor are in benchmarks/README.md; keep the two in step.
"""

from __future__ import annotations

import contextlib
import functools
import math
import os
import sys
import time
from dataclasses import asdict, dataclass

import torch

import sbpet
from benchmarks.measure import (  # noqa: F401  (measure_ceilings, environment, time_*: re-exported)
    apply_threads, bench_device, config_names, environment, free_device, is_oom, measure_ceilings, measure_memory,
    summarize, sync, time_cuda, time_interleaved,
)
from benchmarks.paper import paper_bridge_loss

__all__ = [
    "Shape", "SHAPES", "CPU_SHAPES", "GPU_SHAPES", "TINY_SHAPES", "PASSES", "BACKENDS", "TARGETS",
    "Case", "make_labels", "make_case", "make_runner", "backend_unavailable", "check_outputs", "measure_memory",
    "floor", "measure_ceilings", "time_interleaved", "time_cuda", "environment", "apply_threads",
    "bench_device", "config_names",
]

PASSES = ("fwd", "fwd+bwd")
# paper: benchmarks/paper.py; auto: sbpet's dispatcher (on CUDA it times torch and triton once).
# Variants "<backend>[:<strategy>][@<precision>]": precision "bf16" (g's products with bfloat16
# operands, what issue 11's targets compare), kernel 2's strategy ("gemm", "fused", or "tuned": gemm
# with SBPET_AUTOTUNE=1). Last, so that a GPU run's time budget drops them first.
BACKENDS = ("paper", "reference", "compile", "torch", "triton", "auto",
            "torch@bf16", "triton@bf16", "triton:fused@bf16", "triton:tuned@bf16")
# Normwise check tolerance of a variant at precision "bf16" against the fp32 reference: bfloat16
# operands round to 2^-9 relative, a few dozen accumulated products stay within ~1e-2.
BF16_PRECISION_TOLERANCE = 5e-2
DIMS = (1024, 256, 128)

# Shown in the table, never asserted (the benchmarks issue): triton vs eager / vs compile, fwd+bwd.
TARGETS = {
    "speedup_vs_eager": {"default": 5.0, "llama7b-clm": 2.0},
    "speedup_vs_compile": {"default": 2.0, "llama7b-clm": 1.5},
    "memory_vs_eager": 0.10,
    "floor_fraction": 0.60,
    # CPU, fwd+bwd: torch vs the paper's data path (benchmarks/paper.py) and vs the eager reference.
    "cpu_torch_vs_paper": {"minilm-glue": 6.0, "minilm-fit": 2.5},
    "cpu_torch_vs_eager": {"minilm-glue": 1.4, "minilm-fit": 1.4},
    # Issue 11 (kernel 2 rebuilt), GPU, bf16 states, triton@bf16 fwd+bwd against paper / torch@bf16.
    "kernel2_bf16": {
        "vs_paper": {"bert-large-glue": 10.0, "bert-large-fit": 12.0, "llama7b-clm": 15.0},
        "vs_torch": {"bert-large-fit": 1.2, "llama7b-clm": 1.5},
        "floor_fraction": 0.50,
    },
}


@dataclass(frozen=True)
class Shape:
    """One benchmark shape. ``positions``: "one" regularised position per sequence (GLUE-style),
    "15%" of the real tokens (fitting g; g trainable), or "all" real tokens (causal LM, labels
    shifted)."""

    name: str
    layers: int
    hidden: int
    batch: int
    seq: int
    positions: str = "one"
    fit: bool = False
    causal: bool = False
    vocab: int = 30522
    dims: tuple = DIMS

    @property
    def num_states(self) -> int:
        return self.layers + 1


SHAPES = {
    s.name: s
    for s in (
        # CPU (reduced) shapes: MiniLM-like (all-MiniLM-L6: L=6, H=384).
        Shape("minilm-glue", 6, 384, 16, 128, "one", vocab=1000),
        Shape("minilm-fit", 6, 384, 16, 128, "15%", fit=True, vocab=1000),
        # GPU shapes of the benchmarks issue (bf16).
        Shape("bert-large-glue", 24, 1024, 32, 512, "one"),
        Shape("bert-large-fit", 24, 1024, 32, 512, "15%", fit=True),
        Shape("deberta-xlarge-glue", 48, 1024, 16, 512, "one", vocab=128100),
        Shape("llama7b-clm", 32, 4096, 4, 2048, "all", causal=True, vocab=32000),
        # Tiny shapes: the Triton interpreter on CPU and the dry run of gpu_check.
        Shape("tiny-glue", 2, 32, 2, 16, "one", vocab=50, dims=(24, 16, 8)),
        Shape("tiny-fit", 2, 32, 2, 16, "15%", fit=True, vocab=50, dims=(24, 16, 8)),
    )
}
CPU_SHAPES = ("minilm-glue", "minilm-fit")
GPU_SHAPES = ("bert-large-glue", "bert-large-fit", "deberta-xlarge-glue", "llama7b-clm")
TINY_SHAPES = ("tiny-glue", "tiny-fit")

# Normwise relative error allowed against the reference (max |a - e| / max |e|), by input dtype.
# The reference computes in float32 whatever the input dtype, so these only cover summation order
# and the final cast of the gradients; they are tight enough to catch a wrong element.
CHECK_TOLERANCE = {torch.float64: 1e-10, torch.float32: 1e-4, torch.float16: 5e-3, torch.bfloat16: 2e-2}


def bench_target() -> tuple[torch.device, torch.dtype, tuple[str, ...]]:
    """Device, hidden-state dtype and shape names of a benchmark session: ``SBPET_BENCH_DEVICE``
    (default cuda when available), bf16 on CUDA / float32 on CPU, ``SBPET_BENCH_SHAPES`` (comma
    separated) or the GPU shapes on CUDA and the CPU + tiny shapes on CPU."""
    device = bench_device()
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    if os.environ.get("SBPET_BENCH_SHAPES"):
        names = tuple(s for s in os.environ["SBPET_BENCH_SHAPES"].split(",") if s)
    elif device.type == "cuda":
        names = GPU_SHAPES
    else:
        names = CPU_SHAPES + TINY_SHAPES
    return device, dtype, names


@dataclass
class Case:
    """Inputs of one shape on one device: L+1 hidden states (leaves requiring grad), labels, mask,
    g (float32, trainable only for fitting shapes) and the tail."""

    shape: Shape
    device: torch.device
    dtype: torch.dtype
    states: list
    labels: torch.Tensor
    mask: torch.Tensor
    mapping: sbpet.BridgeMapping
    tail: torch.Tensor
    num_positions: int

    @property
    def grad_targets(self) -> list:
        params = [p for p in self.mapping.parameters() if p.requires_grad]
        return list(self.states) + params

    @property
    def input_bytes(self) -> int:
        return sum(h.numel() * h.element_size() for h in self.states)


def make_labels(shape: Shape, device="cpu", gen=None):
    """(labels [B, S], mask [B, S], N) for ``shape``: sequence b keeps its first
    S - b*S/(2B) tokens; the regularised positions follow ``shape.positions``."""
    device = torch.device(device)
    gen = gen if gen is not None else torch.Generator(device=device).manual_seed(0)
    B, S = shape.batch, shape.seq
    lengths = torch.tensor([S - (b * S) // (2 * B) for b in range(B)], device=device)
    mask = (torch.arange(S, device=device)[None, :] < lengths[:, None]).long()
    scores = torch.rand(B, S, generator=gen, device=device) * mask
    if shape.positions == "one":
        chosen = torch.zeros(B, S, dtype=torch.bool, device=device)
        chosen[torch.arange(B, device=device), scores.argmax(dim=1)] = True
    elif shape.positions == "15%":
        chosen = (scores > 0.85) & mask.bool()
    elif shape.positions == "all":
        chosen = mask.bool()
    else:
        raise ValueError(f"unknown positions {shape.positions!r}")
    ids = torch.randint(0, shape.vocab, (B, S), generator=gen, device=device)
    labels = torch.where(chosen, ids, torch.full_like(ids, -100))
    if shape.causal:  # h[s] pairs with labels[s + 1]
        num_positions = int((labels[:, 1:] != -100).sum())
    else:
        num_positions = int(chosen.sum())
    return labels, mask, num_positions


def make_case(shape: Shape, device="cpu", dtype=torch.float32, seed: int = 0) -> Case:
    """Random inputs for ``shape`` (never zeros): states with a nonzero mean so the context matters,
    every sequence but the first padded at its end, labels per ``shape.positions``."""
    device = torch.device(device)
    gen = torch.Generator(device=device).manual_seed(seed)
    labels, mask, num_positions = make_labels(shape, device, gen)
    states = []
    for _ in range(shape.num_states):
        h = torch.randn(shape.batch, shape.seq, shape.hidden, generator=gen, device=device).add_(0.5).to(dtype)
        states.append(h.requires_grad_(True))
    torch.manual_seed(seed)
    mapping = sbpet.BridgeMapping(shape.hidden, shape.dims).to(device)
    mapping.requires_grad_(shape.fit)
    tail = torch.randn(shape.vocab, shape.dims[-1], generator=gen, device=device)
    tail = tail / tail.norm(dim=1, keepdim=True)
    return Case(shape, device, dtype, states, labels, mask, mapping, tail, num_positions)


def parse_backend(spec: str) -> tuple[str, str | None, str]:
    """``"triton:fused@bf16"`` -> ("triton", "fused", "bf16"); plain names -> (name, None, "fp32")."""
    spec, _, precision = spec.partition("@")
    name, _, strategy = spec.partition(":")
    return name, strategy or None, precision or "fp32"


@contextlib.contextmanager
def _strategy_env(strategy: str | None):
    """SBPET_TRITON_STRATEGY / SBPET_AUTOTUNE for one step of a ``triton:<strategy>`` variant."""
    if strategy is None:
        yield
        return
    wanted = {"SBPET_TRITON_STRATEGY": "gemm" if strategy == "tuned" else strategy,
              "SBPET_AUTOTUNE": "1" if strategy == "tuned" else "0"}
    saved = {k: os.environ.get(k) for k in wanted}
    os.environ.update(wanted)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def backend_unavailable(backend: str, device) -> str | None:
    """None when ``backend`` can run on ``device``, else the reason (recorded as the skip reason)."""
    device = torch.device(device)
    if backend not in BACKENDS:
        return f"unknown backend {backend!r}"
    backend = parse_backend(backend)[0]
    if backend == "triton":
        try:
            sbpet.backends.api.resolve_backend("triton", device)
        except Exception as exc:  # ImportError, ValueError, or a half-written backend
            return f"triton backend unavailable: {type(exc).__name__}: {exc}"
        return None
    if backend == "compile" and not hasattr(torch, "compile"):
        return "torch.compile unavailable"
    if backend == "auto" and torch.device(device).type != "cuda":
        return "auto is the torch backend on CPU"
    return None


def _loss_function(case: Case, backend: str):
    kwargs = dict(shift_labels=case.shape.causal)
    if backend == "paper":  # the paper's released data path, eager (benchmarks/paper.py)
        return functools.partial(paper_bridge_loss, **kwargs)
    if backend == "compile":
        # What a user tries first: torch.compile around the eager reference. bridge_loss graph-breaks
        # at the validation's host synchronisation; the reference's math is compiled.
        import torch._dynamo

        for knob in ("cache_size_limit", "recompile_limit"):
            if hasattr(torch._dynamo.config, knob):
                setattr(torch._dynamo.config, knob, max(getattr(torch._dynamo.config, knob), 64))
        # dynamic=False: every shape gets its own static kernels, as a fixed-shape training run would.
        return torch.compile(functools.partial(sbpet.bridge_loss, backend="reference", **kwargs), dynamic=False)
    name, _, precision = parse_backend(backend)
    return functools.partial(sbpet.bridge_loss, backend=name, precision=precision, **kwargs)


def make_runner(case: Case, backend: str, pass_: str):
    """A callable running one step of ``backend`` (a name of :data:`BACKENDS`) on ``case``;
    returns (loss, gradients)."""
    loss_fn = _loss_function(case, backend)
    strategy = parse_backend(backend)[1]
    args = (case.states, case.labels, case.mask, case.mapping, case.tail)
    if pass_ == "fwd":

        def step():
            with torch.no_grad(), _strategy_env(strategy):
                return loss_fn(*args), ()

    elif pass_ == "fwd+bwd":
        targets = case.grad_targets

        def step():
            with _strategy_env(strategy):
                loss = loss_fn(*args)
                return loss, torch.autograd.grad(loss, targets)

    else:
        raise ValueError(f"unknown pass {pass_!r}")
    return step


def check_tolerance(backend: str, dtype: torch.dtype) -> float:
    """The normwise tolerance of ``backend``'s check against the fp32 reference."""
    tol = CHECK_TOLERANCE[dtype]
    return max(tol, BF16_PRECISION_TOLERANCE) if parse_backend(backend)[2] == "bf16" else tol


def check_outputs(actual, expected, dtype, tol: float | None = None) -> tuple[bool, str, float]:
    """Compare (loss, grads) of a backend with the reference's. Returns (ok, message, worst error),
    the error being normwise relative (max |a - e| / max |e|); NaN or a missing gradient fails.
    ``tol``: default the states dtype's (:data:`CHECK_TOLERANCE`)."""
    tol = CHECK_TOLERANCE[dtype] if tol is None else tol
    (loss, grads), (ref_loss, ref_grads) = actual, expected
    pairs = [("loss", loss, ref_loss)] + [(f"grad[{i}]", g, r) for i, (g, r) in enumerate(zip(grads, ref_grads))]
    if len(grads) != len(ref_grads):
        return False, f"{len(grads)} gradients, the reference gives {len(ref_grads)}", math.inf
    worst, problems = 0.0, []
    for name, a, e in pairs:
        if a is None:
            problems.append(f"{name} is None")
            worst = math.inf
            continue
        if a.shape != e.shape:
            problems.append(f"{name} shape {tuple(a.shape)} != {tuple(e.shape)}")
            worst = math.inf
            continue
        a, e = a.detach().float(), e.detach().float()
        if not torch.isfinite(a).all():
            problems.append(f"{name} has NaN/inf")
            worst = math.inf
            continue
        scale = e.abs().max().clamp_min(1e-30)
        err = float((a - e).abs().max() / scale)
        worst = max(worst, err)
        if not err <= tol:
            problems.append(f"{name} normwise rel err {err:.2e} > {tol:.0e}")
    return not problems, "; ".join(problems[:4]) or "ok", worst


def floor(shape: Shape, pass_: str, num_positions: int, elem_bytes: int, ceilings: dict | None,
          param_bytes: int = 4) -> dict:
    """The roofline floor of one case (formulas in benchmarks/README.md).

    Bytes: every hidden state read once, mask and labels read once, g read once; fwd+bwd adds the
    hidden-state gradients written once (and g's gradients for fitting shapes).
    FLOPs: the masked-mean context (2 per element), g with the first Linear split (context half per
    (layer, sequence), token half per (layer, position)); fwd+bwd adds the input gradients of g
    (same FLOPs as its forward), the context gradient's broadcast (2 per element) and, for fitting
    shapes, g's weight gradients (same FLOPs again).
    """
    P, B, S, H, N = shape.num_states, shape.batch, shape.seq, shape.hidden, num_positions
    dims = shape.dims
    state_elems = P * B * S * H
    params = 2 * H * dims[0] + dims[0] + sum(a * b + b for a, b in zip(dims[:-1], dims[1:]))
    bytes_ = state_elems * elem_bytes + B * S * 8 * 2 + params * param_bytes
    context = 2 * state_elems
    mapping = 2 * P * (B * H * dims[0] + N * H * dims[0] + N * sum(a * b for a, b in zip(dims[:-1], dims[1:])))
    flops = context + mapping
    if pass_ == "fwd+bwd":
        bytes_ += state_elems * elem_bytes + (params * param_bytes if shape.fit else 0)
        flops += mapping + 2 * state_elems + (mapping if shape.fit else 0)
    out = {"bytes": int(bytes_), "flops": int(flops), "num_positions": int(N)}
    if ceilings:
        memory_s = bytes_ / ceilings["copy_bytes_per_s"]
        compute_s = flops / ceilings["matmul_flops_per_s"]
        out.update(memory_floor_s=memory_s, compute_floor_s=compute_s, floor_s=max(memory_s, compute_s),
                   bound="memory" if memory_s >= compute_s else "compute")
    return out


def shape_record(shape: Shape) -> dict:
    return asdict(shape)


def measure_shape_pass(case: Case, pass_: str, backends, *, skip: dict | None = None,
                       time_it: bool = True, ceilings: dict | None = None,
                       deadline: float | None = None, seconds: float = 10.0,
                       compile_margin_s: float = 90.0, min_rounds: int = 5, max_rounds: int = 50,
                       warmup: int = 2):
    """Check, measure and (``time_it``) time every backend of one (shape, pass).

    Returns ``(records, runners)``: one record per backend (a dict with ``status`` "ok", "skipped",
    "wrong" or "error" and its ``reason``; for "ok" the check's error, memory, floor, and the
    times when ``time_it``), and the runners of the backends that passed the check.
    Every backend is compared with the eager reference (or, when the reference cannot run, with
    the torch backend, recorded in ``checked_against``) before it is timed: a wrong result is never
    timed. ``deadline`` (time.monotonic()) skips what would not fit, with the reason recorded.
    """
    device, shape = case.device, case.shape
    skip = dict(skip or {})
    base = {"shape": shape.name, "pass": pass_, "dtype": str(case.dtype).replace("torch.", ""),
            "device": device.type, "num_positions": case.num_positions,
            "input_bytes": case.input_bytes}
    fl = floor(shape, pass_, case.num_positions, case.states[0].element_size(), ceilings)
    records, runners = {}, {}

    def out_of_time(backend):
        if deadline is None:
            return False
        margin = compile_margin_s if backend == "compile" else 10.0
        return time.monotonic() + margin > deadline

    expected, checked_against, reference_status = None, None, "skipped"
    for ref_backend in ("reference", "torch"):
        if ref_backend in skip or backend_unavailable(ref_backend, device):
            continue
        try:
            expected = make_runner(case, ref_backend, pass_)()
            checked_against = ref_backend
            break
        except Exception as exc:  # OOM of the reference: fall back to the torch backend
            if ref_backend == "reference":
                skip["reference"] = f"reference failed: {type(exc).__name__}: {str(exc)[:200]}"
                reference_status = "skipped" if is_oom(exc) else "error"
            free_device(device)
    for backend in backends:
        record = dict(base, backend=backend, **fl)
        records[backend] = record
        reason = skip.get(backend) or backend_unavailable(backend, device)
        if reason is None and expected is None:
            reason = "no reference result to check against"
        if reason is None and out_of_time(backend):
            reason = "time budget spent"
        if reason:
            failed = backend == "reference" and reason.startswith("reference failed")
            record.update(status=reference_status if failed else "skipped", reason=reason)
            continue
        try:
            step = make_runner(case, backend, pass_)
            t0 = time.perf_counter()
            first = step()
            sync(device)
            record["first_call_s"] = time.perf_counter() - t0
            ok, message, err = check_outputs(first, expected, case.dtype, check_tolerance(backend, case.dtype))
            del first
        except Exception as exc:
            record.update(status="skipped" if is_oom(exc) else "error",
                          reason=f"{type(exc).__name__}: {str(exc)[:300]}")
            free_device(device)
            continue
        record.update(checked_against=checked_against, check_error=err)
        if not ok:
            record.update(status="wrong", reason=message)
            continue
        try:
            record.update(measure_memory(step, device, backend))
        except Exception as exc:
            record.update(peak_bytes=None, temp_bytes=None, memory_method=f"failed: {type(exc).__name__}: {exc}")
            free_device(device)
        record.update(status="ok", reason="")
        runners[backend] = step
    del expected
    free_device(device)
    if time_it and runners:
        if device.type == "cuda":
            times = {}
            for name, step in runners.items():
                if deadline is not None and time.monotonic() + 5 > deadline:
                    records[name].update(status="skipped", reason="time budget spent before timing")
                    continue
                try:
                    times[name] = time_cuda(step)
                except Exception as exc:
                    records[name].update(status="skipped" if is_oom(exc) else "error",
                                         reason=f"timing: {type(exc).__name__}: {str(exc)[:200]}")
                    free_device(device)
        else:
            times = time_interleaved(runners, device, min_rounds=min_rounds, max_rounds=max_rounds,
                                     seconds=seconds, warmup=warmup)
        for name, t in times.items():
            records[name].update(summarize(t), timing="cuda-events median (do_bench)"
                                 if device.type == "cuda" else "interleaved wall-clock")
            if "floor_s" in fl:
                records[name]["floor_fraction"] = fl["floor_s"] / records[name]["median_s"]
    return records, runners


# The measured reference ceilings of docs/gpu-check.md (bytes/s read + written, FLOP/s): for predictions only.
REFERENCE_CEILINGS = {
    "h100": {"copy_bytes_per_s": 3.0e12, "matmul_flops_per_s": 800e12},
    "h200": {"copy_bytes_per_s": 4.3e12, "matmul_flops_per_s": 790e12},
}


def floor_table(shape_names, ceilings: dict, elem_bytes: int = 2) -> str:
    """Markdown table of bytes, FLOPs and floors per shape and pass (N from :func:`make_labels`)."""
    rows = ["| shape | pass | N | GB moved | GFLOP | memory floor ms | compute floor ms | floor ms | bound |",
            "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | --- |"]
    for name in shape_names:
        shape = SHAPES[name]
        n = make_labels(shape)[2]
        for pass_ in PASSES:
            f = floor(shape, pass_, n, elem_bytes, ceilings)
            rows.append(f"| {name} | {pass_} | {n} | {f['bytes'] / 1e9:.3f} | {f['flops'] / 1e9:.1f} | "
                        f"{f['memory_floor_s'] * 1e3:.3f} | {f['compute_floor_s'] * 1e3:.3f} | "
                        f"{f['floor_s'] * 1e3:.3f} | {f['bound']} |")
    return "\n".join(rows)


if __name__ == "__main__":  # python -m benchmarks.suite [h100|h200]: the floors of the GPU shapes
    gpu = sys.argv[1] if len(sys.argv) > 1 else "h100"
    print(f"Floors with the {gpu} reference ceilings (docs/gpu-check.md), bf16 hidden states:\n")
    print(floor_table(GPU_SHAPES, REFERENCE_CEILINGS[gpu], 2))
