import os
import sys

import torch

# Triton reads TRITON_INTERPRET when @triton.jit decorates, so set it before any test imports the
# kernels: without CUDA the triton backend runs on CPU tensors under the interpreter.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

sys.path.insert(0, os.path.dirname(__file__))
