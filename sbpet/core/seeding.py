"""Seeded construction: modules whose initial weights do not depend on the global RNG."""

from __future__ import annotations

import contextlib

import torch

__all__ = ["check_seed", "seeded_init"]


def check_seed(seed) -> int | None:
    """``seed`` if it is None or an int (not a bool), else ValueError naming it."""
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
        raise ValueError(f"seed must be None or an int, got {seed!r}")
    return seed


@contextlib.contextmanager
def seeded_init(seed: int | None):
    """Build modules inside this block to draw their initial weights from the CPU generator
    seeded with ``seed``, with the global RNG's state restored afterwards (None: a no-op, the
    global RNG draws them). The weights are then the same on every run whatever the global RNG
    holds, and building a seeded module does not shift later random draws (e.g. a PET's init).

    Example:
        >>> with seeded_init(0):
        ...     a = torch.nn.Linear(4, 3)
        >>> with seeded_init(0):
        ...     b = torch.nn.Linear(4, 3)
        >>> bool(torch.equal(a.weight, b.weight))
        True
    """
    if check_seed(seed) is None:
        yield
        return
    with torch.random.fork_rng(devices=[]):  # CPU state only: modules are built on the CPU
        torch.default_generator.manual_seed(seed)
        yield
