import os
import sys

import torch

# Triton reads TRITON_INTERPRET when @triton.jit decorates, so set it before any test imports the
# kernels: without CUDA the triton backend runs on CPU tensors under the interpreter.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

sys.path.insert(0, os.path.dirname(__file__))

import pytest  # noqa: E402

# Triton's interpreter patches triton.language with its numpy versions while a kernel runs and does
# not always put everything back (a @triton.jit helper called from a kernel patches the language of
# its own module and never restores it: tl.core.program_id, arange, ... stay interpreter-only).
# After any interpreted kernel, a real compile in the same process then fails with "'ir.value' has
# no attribute 'dtype'". Snapshot the language before any test runs; tests that compile for a GPU
# target in this process take the `real_triton_language` fixture, which restores it.
try:
    import triton.language as _tl
except ImportError:  # pragma: no cover - machines without triton
    _tl = None
_LANGUAGE = [] if _tl is None else [_tl, _tl.core, _tl.math, _tl.tensor]
_SNAPSHOT = {id(obj): dict(vars(obj)) for obj in _LANGUAGE}


@pytest.fixture
def real_triton_language():
    for obj in _LANGUAGE:
        for name, value in _SNAPSHOT[id(obj)].items():
            if name.startswith("__") or vars(obj).get(name) is value:
                continue
            setattr(obj, name, value)
    yield
