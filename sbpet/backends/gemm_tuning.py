"""Opt-in autotuning of the GEMM strategy's layer-1 kernels (``SBPET_AUTOTUNE=1``).

By default :func:`sbpet.kernels.layer_gemm.first_layer` and ``token_grads`` run with a fixed tile per
(rows class, operand width): the same command gives the same bits run to run. With
``SBPET_AUTOTUNE=1`` the first launch for a new key -- (kernel, H, d1, states and operand dtypes,
precision, rows per layer rounded up to a power of two, the kernel's variant, device) -- times every tile of
:func:`sbpet.kernels.layer_gemm.gemm_candidates` (each one compile_check builds spill-free for
sm_80 and sm_90a) on the call's own tensors and keeps the fastest for the process; the choice is
logged at INFO (logger ``sbpet.autotune``).

Why it is a switch: a tile fixes the order in which a K-reduction is summed, so a timed choice, which
can differ between two processes on a noisy machine, can change the last bits of a1 and of the
states' gradient. Under ``torch.use_deterministic_algorithms(True)`` the switch is ignored (logged
once) and the fixed tiles run; during CUDA-graph capture a recorded choice, else the fixed one, is
used: never a timing. Trials are harmless: both kernels write every output element (no atomics, no
accumulation into a buffer), so a trial leaves nothing behind that the chosen tile's launch does
not overwrite.
"""

from __future__ import annotations

import logging
import os
import time
import warnings
from collections.abc import Callable

import torch

__all__ = ["AUTOTUNE_ENV", "REPEATS", "autotune_enabled", "choices", "clear", "choose", "tuning_key"]

logger = logging.getLogger("sbpet.autotune")

AUTOTUNE_ENV = "SBPET_AUTOTUNE"
REPEATS = 5  # timed launches per tile, after one warm-up launch (which compiles it)
_ON = ("1", "true", "yes", "on")
_OFF = ("", "0", "false", "no", "off")

_CHOICES: dict[tuple, dict] = {}
_LOGGED: set = set()


def autotune_enabled() -> bool:
    """True when ``SBPET_AUTOTUNE`` asks for tuning and deterministic algorithms are off."""
    value = os.environ.get(AUTOTUNE_ENV, "").strip().lower()
    if value in _OFF:
        return False
    if value not in _ON:
        raise ValueError(f"the environment variable {AUTOTUNE_ENV} must be one of {_ON + _OFF[1:]}, got {value!r}")
    if torch.are_deterministic_algorithms_enabled():
        if "deterministic" not in _LOGGED:
            _LOGGED.add("deterministic")
            logger.info("%s=%s ignored under torch.use_deterministic_algorithms(True): the GEMM kernels run "
                        "their fixed tiles (a timed tile choice can change the last bits)", AUTOTUNE_ENV, value)
        return False
    return True


def tuning_key(kernel: str, hidden: int, width: int, states_dtype: torch.dtype, operand: torch.dtype,
               precision: str, rows: int, variant: bool, device: torch.device) -> tuple:
    """The key a choice is kept under: rows per layer rounded up to a power of two; ``variant``: H
    contiguous (layer 1) or the context share added (the token gradient)."""
    return (kernel, hidden, width, states_dtype, operand, precision, 1 << max(0, rows - 1).bit_length(),
            variant, str(device))


def choices() -> dict[tuple, dict]:
    """The choices made so far in this process: key -> the chosen tile (a copy)."""
    return {key: dict(cfg) for key, cfg in _CHOICES.items()}


def clear() -> None:
    """Forget every choice (the next launch of each key times its tiles again)."""
    _CHOICES.clear()


def choose(make_key: Callable[[], tuple], candidates: list[dict], run: Callable[[dict], object],
           device: torch.device) -> dict:
    """The tile to launch with: ``candidates[0]`` (the fixed choice) unless tuning is on; then the
    recorded choice for ``make_key()`` (built only then: this runs on every launch), else the
    fastest candidate of ``run(cfg)`` (each launched once to compile, then :data:`REPEATS` times
    under the clock). A candidate that fails to launch (a GPU
    with less shared memory than sm_80 / sm_90a, say) is dropped with a warning."""
    if len(candidates) == 1 or not autotune_enabled():
        return candidates[0]
    key = make_key()
    if key in _CHOICES:
        return _CHOICES[key]
    if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
        return candidates[0]
    times = []
    for cfg in candidates:
        try:
            times.append((_time(run, cfg, device), cfg))
        except Exception as exc:  # noqa: BLE001 - reported; the others still compete
            warnings.warn(f"sbpet autotune: {key[0]} tile {_describe(cfg)} failed ({type(exc).__name__}: "
                          f"{str(exc)[:200]}); left out", RuntimeWarning, stacklevel=2)
    if not times:
        raise RuntimeError(f"sbpet autotune: no tile of {key[0]} could run for {key}")
    best_time, best = min(times, key=lambda pair: pair[0])
    _CHOICES[key] = best
    logger.info("autotune %s: %s (%.3f ms; %s)", key, _describe(best), best_time * 1e3,
                ", ".join(f"{_describe(cfg)} {seconds * 1e3:.3f} ms" for seconds, cfg in times))
    return best


def _describe(cfg: dict) -> str:
    return (f"{cfg['BLOCK_M']}x{cfg['BLOCK_N']}x{cfg['BLOCK_K']} group {cfg['GROUP_M']} "
            f"w{cfg['num_warps']}s{cfg['num_stages']}")


def _time(run: Callable[[dict], object], cfg: dict, device: torch.device) -> float:
    """Seconds per launch of ``run(cfg)``, after one warm-up launch (one timed launch off CUDA: the
    interpreter's times only serve the tests)."""
    run(cfg)
    if device.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(REPEATS):
            run(cfg)
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / 1e3 / REPEATS
    start_s = time.perf_counter()
    run(cfg)
    return time.perf_counter() - start_s
