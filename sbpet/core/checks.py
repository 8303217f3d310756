"""When the checks that read values run: the sync policy of both routes (docs/host-syncs.md).

Shape, dtype and device checks read no data and always run. The checks that read values (a
sequence with no real token, labels outside ``[0, V)``, a NaN or inf at a real token) would each
stall the host if the data lies on an accelerator. They run:

- ``"eager"``, raising the error that names the argument at once, when reading costs nothing (the
  tensors lie on the CPU), on the first call of a route on a device, and on every call under
  ``SBPET_DEBUG=1``;
- ``"deferred"`` otherwise: each check adds its count of bad items to a small device tensor, no
  host read; :func:`check_deferred` (one host read) raises an error naming the check and the
  count. :class:`sbpet.hf.BridgeTrainer` and ``fit_mapping`` call it at every logging step, where
  they read the loss anyway; call it yourself in a loop of your own;
- ``"skip"`` where no value can be read: tensors on the ``meta`` device and inside
  ``torch.compile`` (a compiled region carries no check; run one step eagerly, which checks, or
  set ``SBPET_DEBUG=1``, which keeps the checks and their graph breaks).
"""

from __future__ import annotations

import os

import torch

__all__ = ["DEBUG_ENV_VAR", "check_deferred", "check_mode", "debug_checks", "defer", "reads_are_free", "reset_checks"]

DEBUG_ENV_VAR = "SBPET_DEBUG"

# What each deferred slot counts, for the error of check_deferred.
_SLOTS = {
    "empty_rows": "attention_mask had {n} sequence(s) with no real token (all zero): their context mean is undefined",
    "labels": "labels had {n} regularised position(s) outside [0, vocab_size) (and not ignore_index)",
    "capacity": "labels had {n} regularised position(s) more than max_positions (left out of R): raise max_positions",
    "nonfinite": "R was not finite in {n} call(s): a NaN or inf in hidden_states at a real token (attention_mask "
                 "nonzero), or g overflowed",
}
_ORDER = tuple(_SLOTS)

_seen_routes: set = set()
_pending: dict[tuple[str, str], torch.Tensor] = {}  # (device, slot) -> 0-d int64 count on that device


def debug_checks() -> bool:
    """``SBPET_DEBUG=1``: every check eager, on every call."""
    return os.environ.get(DEBUG_ENV_VAR, "").strip() not in ("", "0", "false", "False")


def _compiling() -> bool:
    """Inside torch.compile's tracing or a CUDA-graph capture: no value can be read."""
    if torch.compiler.is_compiling():
        return True
    return torch.cuda.is_available() and torch.cuda.is_current_stream_capturing()


def reads_are_free(device: torch.device) -> bool:
    """Reading a value of a tensor on ``device`` costs no sync (the CPU)."""
    return torch.device(device).type == "cpu"


def check_mode(route: str, device: torch.device) -> str:
    """``"eager"``, ``"deferred"`` or ``"skip"`` for the value checks of a call of ``route``
    (``"loss"`` for whole states, ``"capture"`` for the hooks) whose data lies on ``device``; see
    the module docstring. The first call per (route, device) is eager."""
    device = torch.device(device)
    if device.type == "meta":
        return "skip"
    if _compiling():
        return "eager" if debug_checks() else "skip"
    if reads_are_free(device) or debug_checks():
        return "eager"
    key = (route, str(device))
    if key not in _seen_routes:
        _seen_routes.add(key)
        return "eager"
    return "deferred"


def defer(slot: str, bad_count: torch.Tensor) -> None:
    """Add ``bad_count`` (a 0-d integer tensor on the data's device) to the pending count of
    ``slot`` ("empty_rows", "labels", "capacity" or "nonfinite"): a device operation, no host read."""
    if slot not in _SLOTS:
        raise ValueError(f"slot must be one of {_ORDER}, got {slot!r}")
    key = (str(bad_count.device), slot)
    count = bad_count.detach().reshape(()).long()
    previous = _pending.get(key)
    _pending[key] = count if previous is None else previous + count  # on the device: nothing is copied


def check_deferred() -> None:
    """Raise ValueError for the deferred checks that found something since the last call (one host
    read per device with pending checks; nothing to read: no sync). The counts are cleared."""
    pending = sorted(_pending.items(), key=lambda item: (item[0][0], _ORDER.index(item[0][1])))
    _pending.clear()
    by_device: dict[str, list] = {}
    for (device, slot), count in pending:
        by_device.setdefault(device, []).append((slot, count))
    problems = []
    for device, items in by_device.items():
        counts = torch.stack([count for _, count in items]).tolist()  # one read per device
        problems += [f"{_SLOTS[slot].format(n=n)} (on {device})" for (slot, _), n in zip(items, counts) if n]
    if problems:
        raise ValueError(
            "sbpet's deferred input checks failed since the last check: " + "; ".join(problems)
            + f". Rerun with {DEBUG_ENV_VAR}=1 to stop at the first bad call with the argument named."
        )


def reset_checks() -> None:
    """Forget the pending counts and which routes have had their eager first call (tests)."""
    _pending.clear()
    _seen_routes.clear()
