"""The backend choice, in one place: names, the parts interface, and ``auto``.

Every public route (``bridge_loss``, ``BridgeRegularizer``, ``BridgeCapture`` and so
``BridgeTrainer`` and ``fit_mapping``) asks :func:`select` for a :class:`Backend`; none imports a
backend module itself. A backend offers three functions with one contract:

- ``capture_layer(states, attention_mask, batch_index, seq_index, segments=None)``: one layer's
  states [B, S, H] (any float dtype, any strides) -> (float32 contexts [G, H], regularised rows
  [N, H]), differentiable (METHOD.md steps 1-2; the forward hooks of :class:`sbpet.hf.BridgeCapture`
  call it); G = B, or one context per packed sequence of ``segments``
  (:class:`sbpet.core.positions.Segments`);
- ``loss_from_parts(contexts, tokens, batch_index, targets, mapping, tail, mean_coef, variance,
  precision)``: R from the L+1 layers' parts (lists of [G, H] and [N, H]; ``batch_index``: each
  row's context, ``Positions.context_index``; METHOD.md steps 3-7);
- ``loss(hidden_states, attention_mask, batch_index, seq_index, targets, mapping, tail, mean_coef,
  variance, precision, segments=None)``: R from the whole hidden states (``output_hidden_states=True``).

and optionally a fourth, ``layer_loss(states, attention_mask, batch_index, seq_index, ends, mean_coef_l,
variance_l, mapping, precision, num_valid, segments=None)``: one layer's unnormalised share of R as one autograd node
that saves no activation of g (the torch backend's recompute, issue 35). When the capture's backend has
one (:func:`layer_loss_of`), the hooks call it on each layer instead of ``capture_layer`` and sum the
shares (each layer's backward then runs when the model's backward reaches the layer).

``auto`` (the default): on CPU the torch backend. On CUDA, the first call of an operation for a
new key (operation, device, dtype, precision, shape bucket, which inputs need a gradient) times
every candidate (torch and each Triton strategy: :data:`TRITON_CANDIDATES` for the losses, kernel
1 alone for the capture) forward + backward with CUDA events after a
warm-up, on the call's own inputs (gradients taken with ``torch.autograd.grad``, so nothing
accumulates into ``.grad``), and keeps the fastest for the process. Candidates run at the same
``precision``: the precision is the user's, the speed is the dispatcher's. A candidate that
fails is dropped with a warning. The choice is logged once at INFO (logger ``sbpet.dispatch``).
``SBPET_BACKEND=torch|triton|reference`` (or an explicit ``backend=``) forces a backend; an explicit
"triton" runs kernel 2's strategy named by ``SBPET_TRITON_STRATEGY`` (default "gemm", see
:func:`sbpet.backends.triton_host.triton_strategy`).
Under ``torch.use_deterministic_algorithms(True)`` a call that trains g or the tail leaves out the
candidates in :data:`ATOMIC_CANDIDATES` (the fused strategy, whose kernel then sums those gradients
with float32 atomics), logged once; the GEMM strategy sums them in a fixed order and stays, as every
Triton strategy does for calls that train neither (PET training: no atomics anywhere); the key
records the mode. Under DDP rank 0's choice is broadcast to every rank and the key leaves out the row
counts (ranks see different batches; a collective per new key must be reached by all ranks
together). During CUDA-graph capture and inside ``torch.compile`` (where sizes are not read: no key
specialises a graph) a recorded choice, else the latest one timed for the key less its sizes, else
the analytic one (torch), is used: never a timing.
"""

from __future__ import annotations

import functools
import logging
import os
import statistics
import warnings
from collections.abc import Callable
from dataclasses import dataclass

import torch

__all__ = [
    "ATOMIC_CANDIDATES", "BACKENDS", "ENV_VAR", "TRITON_CANDIDATES", "Backend", "Selector", "get_backend",
    "layer_loss_of", "resolve_backend", "select", "selector",
    "cuda_event_timer", "runners_for", "shape_key", "fwd_bwd_runner",
]

logger = logging.getLogger("sbpet.dispatch")

BACKENDS = ("auto", "reference", "torch", "triton")
ENV_VAR = "SBPET_BACKEND"
ANALYTIC_CHOICE = "torch"
# ``auto``'s Triton candidates for the losses: "triton:<strategy>" runs kernel 2 with that strategy.
TRITON_CANDIDATES = ("triton:gemm", "triton:fused")
# Candidates whose backward sums g's or the tail's gradients with float32 atomics when they train.
ATOMIC_CANDIDATES = ("triton:fused",)


@dataclass(frozen=True)
class Backend:
    """One backend's implementation of the parts interface (see the module docstring)."""

    name: str
    loss: Callable
    capture_layer: Callable
    loss_from_parts: Callable
    # ``loss(..., check_finite=True)`` raises on a non-finite real token itself (from the contexts
    # it computes anyway: ``sbpet.core.validation.check_finite_contexts``), sparing the caller a
    # read of every state.
    checks_finite: bool = False
    layer_loss: Callable | None = None


def _triton_module():
    from . import triton_backend  # imported lazily: it imports triton

    return triton_backend


def get_backend(name: str) -> Backend:
    """The :class:`Backend` called ``name`` ("reference", "torch" or "triton"; "triton:gemm" /
    "triton:fused" pin kernel 2's strategy, as ``auto`` times them)."""
    if name == "reference":
        from . import reference as ref

        return Backend(name, ref.reference_bridge_loss, ref.reference_capture_layer, ref.reference_loss_from_parts)
    if name == "torch":
        from . import torch_backend as tb
        from . import torch_recompute as tr

        if tr.recompute_enabled():  # g recomputed in the backward (issue 35)
            return Backend(name, tr.recompute_bridge_loss, tb.capture_layer, tb.bridge_loss_from_parts,
                           layer_loss=tr.layer_loss)
        return Backend(name, tb.torch_bridge_loss, tb.capture_layer, tb.bridge_loss_from_parts)
    if name == "triton" or name in TRITON_CANDIDATES:
        tr = _triton_module()
        strategy = name.partition(":")[2] or None
        return Backend(name, functools.partial(tr.triton_bridge_loss, strategy=strategy), tr.triton_capture_layer,
                       functools.partial(tr.triton_loss_from_parts, strategy=strategy), checks_finite=True)
    raise ValueError(f"backend must be one of {BACKENDS}, got {name!r}")


def layer_loss_of(backend: Backend) -> Callable | None:
    """``backend``'s per-layer loss with the recompute, or None (the parts route): the backend has
    none, or ``SBPET_TORCH_RECOMPUTE=0`` asked for the save-everything path when it was looked up."""
    return backend.layer_loss


def check_backend_name(backend: str, argument: str = "backend") -> str:
    if backend not in BACKENDS:
        raise ValueError(f"{argument} must be one of {BACKENDS}, got {backend!r}")
    return backend


def _forced_backend() -> str | None:
    forced = os.environ.get(ENV_VAR, "").strip()
    if not forced or forced == "auto":
        return None
    return check_backend_name(forced, f"the environment variable {ENV_VAR}")


def _triton_candidate(device: torch.device) -> bool:
    try:
        return _triton_module().triton_is_usable(device)
    except ImportError:
        return False


def _deterministic_candidates(candidates: list[str], atomics: bool) -> list[str]:
    """``candidates`` less :data:`ATOMIC_CANDIDATES` when the call trains g or the tail under
    ``torch.use_deterministic_algorithms(True)`` (logged once)."""
    if not (atomics and torch.are_deterministic_algorithms_enabled()):
        return candidates
    dropped = [c for c in candidates if c in ATOMIC_CANDIDATES]
    if dropped:
        _log_once(("deterministic", *dropped), f"auto: {', '.join(dropped)} sum(s) the gradients of a trained g or "
                  "tail with float32 atomics (not deterministic): not a candidate for such calls under "
                  "torch.use_deterministic_algorithms(True)")
    return [c for c in candidates if c not in ATOMIC_CANDIDATES]


def resolve_backend(backend: str, device: torch.device, atomics: bool = True) -> str:
    """Turn ``backend`` into what runs on ``device``: a backend name, or ``"auto"`` when timing
    will choose among several candidates (CUDA with Triton usable).

    ``"auto"`` honours ``SBPET_BACKEND``; on CPU (and wherever Triton cannot run) it is
    ``"torch"``. ``atomics``: the call trains g or the tail; with an explicit ``"triton"`` whose
    strategy sums those gradients with atomics (``fused``) under
    ``torch.use_deterministic_algorithms(True)`` a warning says the result is not deterministic.
    An explicit backend that cannot run on ``device`` raises ValueError (never a silent switch)."""
    check_backend_name(backend)
    device = torch.device(device)
    if backend == "auto":
        backend = _forced_backend() or "auto"
    if backend == "auto":
        return "auto" if device.type == "cuda" and _triton_candidate(device) else "torch"
    if backend == "triton":
        try:
            module = _triton_module()
        except ImportError as exc:
            raise ValueError(f"backend='triton' needs the triton package: {exc}") from exc
        module.check_triton_available(device)
        strategy = module.triton_strategy()
        if atomics and torch.are_deterministic_algorithms_enabled() and f"triton:{strategy}" in ATOMIC_CANDIDATES:
            warnings.warn(f"sbpet: backend='triton' with the {strategy!r} strategy sums a "
                          "trained g's or tail's gradients with float32 atomics: not deterministic under "
                          "torch.use_deterministic_algorithms(True) (the 'gemm' strategy is)", RuntimeWarning,
                          stacklevel=3)
    return backend


_logged: set = set()


def _log_once(key, message: str) -> None:
    if key not in _logged:
        _logged.add(key)
        logger.info(message)


def cuda_event_timer(run: Callable[[], None], warmup: int = 3, repeats: int = 10) -> float:
    """Median milliseconds of ``run()`` timed with CUDA events after ``warmup`` calls."""
    for _ in range(warmup):
        run()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        run()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def _distributed_world() -> bool:
    return (
        torch.distributed.is_available()
        and torch.distributed.is_initialized()
        and torch.distributed.get_world_size() > 1
    )


def _capturing_graph() -> bool:
    return torch.cuda.is_available() and torch.cuda.is_current_stream_capturing()


class Selector:
    """Remembers, per key, the fastest candidate of ``auto`` (for the life of the process).

    ``timer(run) -> milliseconds`` measures one candidate (default :func:`cuda_event_timer`);
    tests inject their own."""

    def __init__(self, timer: Callable[[Callable[[], None]], float] | None = None):
        self.timer = timer
        self.choices: dict = {}
        self.timings: dict = {}
        self.families: dict = {}  # key less its sizes -> the latest timed choice

    def choose(self, key, runners: Callable[[], dict], analytic: str = ANALYTIC_CHOICE, family=None) -> str:
        """The recorded choice for ``key``, else time ``runners()`` (name -> callable) and record
        the fastest. During CUDA-graph capture and inside ``torch.compile`` nothing is timed: the
        choice recorded for ``key``, else the latest one timed for its ``family`` (the key less its
        sizes, which a compiled region does not read), else ``analytic``."""
        if key in self.choices:
            return self.choices[key]
        if _capturing_graph() or torch.compiler.is_compiling():
            return self.families.get(key if family is None else family, analytic)
        times = {}
        timer = self.timer or cuda_event_timer
        for name, run in runners().items():
            try:
                times[name] = float(timer(run))
            except Exception as exc:  # a failing candidate is dropped, never a crash
                warnings.warn(f"sbpet auto: backend {name!r} failed for {key} and is not a candidate: "
                              f"{type(exc).__name__}: {exc}", RuntimeWarning, stacklevel=3)
        choice = min(times, key=times.get) if times else analytic
        if _distributed_world():
            shared = [choice]
            torch.distributed.broadcast_object_list(shared, src=0)
            choice = shared[0]
        self.choices[key] = choice
        self.families[key if family is None else family] = choice
        self.timings[key] = times
        measured = ", ".join(f"{n} {t:.3f} ms" for n, t in sorted(times.items(), key=lambda x: x[1]))
        logger.info("sbpet auto chose %s for %s (%s)", choice, key, measured or "no timing: analytic choice")
        return choice


selector = Selector()


def _bucket(n: int) -> int:
    """Round a size up to a power of two (the shape bucket of a key)."""
    return 1 << max(0, int(n) - 1).bit_length()


def select(op: str, backend: str, device: torch.device, key: tuple, runners: Callable[[list[str]], dict],
           atomics: bool = True, padded: bool = False) -> Backend:
    """The :class:`Backend` that runs operation ``op`` ("loss", "parts" or "capture").

    ``key`` describes the call (dtype, precision, sizes, grad flags); sizes that vary between
    batches are bucketed here (and dropped under DDP). ``runners(names)`` builds, for the
    candidate names, callables that run the operation forward + backward on the call's inputs.
    ``atomics``: the call trains g or the tail (False for the capture, whose kernel has no
    atomics); under deterministic algorithms it leaves out :data:`ATOMIC_CANDIDATES`. ``padded``:
    the positions come at a fixed capacity (:mod:`sbpet.core.positions`; every backend takes them,
    the Triton kernels skipping the padding rows on the device): a key of its own, so that a
    capacity's timing never stands for exact positions."""
    name = resolve_backend(backend, device, atomics)
    if name != "auto":
        return get_backend(name)
    candidates = ["torch", "triton"] if op == "capture" else ["torch", *TRITON_CANDIDATES]
    candidates = _deterministic_candidates(candidates, atomics)
    full_key = (op, str(device), torch.cuda.get_device_name(device) if device.type == "cuda" else "", *key,
                atomics and torch.are_deterministic_algorithms_enabled(), padded)
    family = tuple(k for k in full_key if not isinstance(k, _Size))
    return get_backend(selector.choose(full_key, lambda: runners(candidates), family=family))


class _Size(int):
    """A size in a key (from :func:`shape_key`): an int that :func:`select` can leave out to name the
    key's family."""


def shape_key(*sizes: int) -> tuple:
    """Sizes that vary from batch to batch, as they enter a key: powers of two, or nothing under
    DDP (see the module docstring) and inside ``torch.compile`` (a size read there would specialise
    the graph on it: one recompile per size)."""
    if _distributed_world() or torch.compiler.is_compiling():
        return ()
    return tuple(_Size(_bucket(s)) for s in sizes)


def runners_for(call: Callable, tensors, extra=()) -> Callable[[list[str]], dict]:
    """The ``runners`` argument of :func:`select`: for each candidate name, a fwd+bwd runner of
    ``call(backend, detached)``, ``detached`` being ``tensors`` detached from the caller's graph
    (same ``requires_grad``); gradients are taken for them and for the ``extra`` leaves (g, tail)
    that need one."""

    def runners(names):
        detached = [t.detach().requires_grad_(t.requires_grad) for t in tensors]
        return {
            name: fwd_bwd_runner(lambda b=get_backend(name): call(b, detached), detached + list(extra))
            for name in names
        }

    return runners


def fwd_bwd_runner(forward: Callable[[], object], inputs: list[torch.Tensor]) -> Callable[[], None]:
    """A callable that runs ``forward()`` and, when ``inputs`` need gradients, its backward with
    ``torch.autograd.grad`` (upstream gradients of ones: the timing draws nothing from the RNG;
    nothing is accumulated into ``.grad``)."""

    def run():
        out = forward()
        outputs = [o for o in (out if isinstance(out, (tuple, list)) else (out,)) if o.requires_grad]
        wanted = [t for t in inputs if t.requires_grad]
        if outputs and wanted:
            grads = [torch.ones_like(o) for o in outputs]  # no RNG draw: timing must not shift seeds
            torch.autograd.grad(outputs, wanted, grads, allow_unused=True)

    return run
