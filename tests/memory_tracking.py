"""Peak memory of a block of torch work on the CPU, from its allocations (the test of issue 11's
memory bound without a GPU; on CUDA the benchmarks read ``torch.cuda.max_memory_allocated``).

:class:`AllocationTracker` is a ``TorchDispatchMode``: it sees every storage a dispatched op creates
while it is on, and learns of its release through a ``weakref.finalize`` on the storage's Python
object (PyTorch keeps that object alive exactly as long as the storage lives, views included).
sbpet's custom ops are entered: their Python bodies run under the mode, so the buffers the Triton
host code allocates are seen (the interpreter's own numpy copies are not device memory and are not
counted). torch's profiler memory events proved unreliable for this (they missed frees and whole
buffers: benchmarks/NOTES.md, issue 11 step 4), hence this.
"""

from __future__ import annotations

import weakref

import torch
from torch._library import custom_ops
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

__all__ = ["AllocationTracker"]


class AllocationTracker(TorchDispatchMode):
    """Records (+bytes / -bytes, storage serial) for every storage created under the mode."""

    def __init__(self, namespace: str = "sbpet"):
        super().__init__()
        self.namespace = namespace
        self.events: list[tuple[int, int]] = []
        self._live: dict[int, int] = {}  # id(storage) -> serial, while it lives (ids are reused)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        opdef = custom_ops._maybe_get_opdef(func) if func.namespace == self.namespace else None
        if opdef is not None:
            with self:  # run the op's Python body with the mode on: its allocations count
                out = opdef._init_fn(*args, **kwargs)
        else:
            out = func(*args, **kwargs)
        inputs = {t.untyped_storage().data_ptr() for t in tree_flatten((args, kwargs))[0]
                  if isinstance(t, torch.Tensor)}
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor):
                self._record(t.untyped_storage(), inputs)
        return out

    def _record(self, storage, inputs) -> None:
        if storage.nbytes() == 0 or storage.data_ptr() in inputs or id(storage) in self._live:
            return  # nothing, a view or in-place result of an input, or already counted
        serial = len(self.events)
        self._live[id(storage)] = serial
        self.events.append((storage.nbytes(), serial))
        weakref.finalize(storage, self._free, storage.nbytes(), id(storage), serial)

    def _free(self, nbytes: int, key: int, serial: int) -> None:
        self.events.append((-nbytes, serial))
        if self._live.get(key) == serial:
            del self._live[key]

    def peak(self, leave_out=()) -> int:
        """Largest total of live bytes over the recorded events, without the storages of the
        still-alive tensors ``leave_out`` (the returned gradients)."""
        skip = {self._live.get(id(t.untyped_storage())) for t in leave_out} - {None}
        live = peak = 0
        for nbytes, serial in self.events:
            if serial not in skip:
                live += nbytes
                peak = max(peak, live)
        return peak
