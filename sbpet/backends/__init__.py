"""Layer 3, the backends and their dispatch: ``reference`` (the yardstick, reads like the method),
``torch`` (fused-in-PyTorch), ``triton`` (host side of :mod:`sbpet.kernels`, with the autograd
wiring), the dispatcher that picks one, and :func:`~sbpet.backends.api.bridge_loss`, the
functional entry point that validates once and dispatches. Imports only :mod:`sbpet.core` and
:mod:`sbpet.kernels`."""
