"""Triton kernels of sbpet, installed as the subpackage sbpet.kernels.

- :mod:`.context`: kernel 1, the masked-mean context of every layer (METHOD.md step 1) and its
  one-pass backward into every layer's gradient;
- :mod:`.fused_bridge`: kernel 2, projection + bridge log-density (METHOD.md steps 2-7), forward and a
  recomputing backward (the "fused" strategy, or on the saved a1 for the "gemm" one), with its
  on-chip pieces in :mod:`.bridge_chain` and its blocks in :mod:`.chain_config`;
- :mod:`.layer_gemm`: the "gemm" strategy's layer-1 GEMM and token-gradient GEMM;
- :mod:`.segments`: the ordered per-segment sums (the context half per sequence, the tail per label);
- :mod:`.compile_check`: compiles every configuration the launchers can choose
  (:mod:`.check_configs`) for sm_80 / sm_90a.

Importing this package never needs triton; the submodules define their kernels only when it is
installed (``HAS_TRITON``).
"""

import os
import sys


def _step_aside_for_hugging_face_kernels() -> bool:
    """Imported as a top-level ``kernels`` (the repository root is on ``sys.path``, as under
    ``python -m pytest`` in a checkout): Hugging Face's ``kernels`` package, which transformers
    >= 5.25 imports when it is installed, must win. Load it in our place and return True; False
    when it is not installed (then this package stands, as before)."""
    import importlib.machinery
    import importlib.util

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    elsewhere = [p for p in sys.path if os.path.abspath(p or os.curdir) != root]
    spec = importlib.machinery.PathFinder.find_spec(__name__, elsewhere)
    if spec is None or spec.loader is None:
        return False
    module = importlib.util.module_from_spec(spec)
    sys.modules[__name__] = module  # what `import kernels` returns once this file has run
    spec.loader.exec_module(module)
    return True


if __name__ == "kernels":
    # The rest of this file then fills a module that nothing refers to; it imports no submodule.
    _step_aside_for_hugging_face_kernels()

try:
    import triton  # noqa: F401

    HAS_TRITON = True
except ImportError:  # pragma: no cover - machines without triton
    HAS_TRITON = False


def _patch_interpreter_scalar_index() -> None:
    """Let the Triton interpreter run ``range(0, n, BLOCK)`` with a runtime ``n`` under numpy >= 2.4.

    The interpreter holds scalar arguments as 1-element arrays and converts them with ``int(array)``,
    which numpy 2.4 rejects for arrays with ndim > 0. Only the interpreter's own temporary patch
    of ``tl.tensor.__index__`` is wrapped; compiled kernels are untouched.
    """
    try:
        from triton.runtime import interpreter
    except ImportError:  # pragma: no cover
        return
    original = getattr(interpreter, "_patch_lang_tensor", None)
    if original is None or getattr(original, "_sbpet_wrapped", False):
        return

    def patched(tensor, scope):
        original(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.reshape(-1)[0]))

    patched._sbpet_wrapped = True
    interpreter._patch_lang_tensor = patched


if HAS_TRITON and os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
    _patch_interpreter_scalar_index()

__all__ = ["HAS_TRITON"]
