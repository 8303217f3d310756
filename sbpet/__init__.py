"""sbpet: the stochastic-bridge regulariser for parameter-efficient tuning, as a fast fused loss.

Layers, bottom up: :mod:`sbpet.bridges` (times and marginals), :mod:`sbpet.mapping` (g and the
tail), :mod:`sbpet.reference` / :mod:`sbpet.torch_backend` / :mod:`sbpet.triton_backend`
(backends with one contract), :mod:`sbpet.api` (validation + dispatch), :mod:`sbpet.regularizer`
(the module).
"""

from .api import bridge_loss
from .bridges import BRIDGES, Bridge, BrownianBridge, OUBridge, get_bridge, layer_times
from .mapping import BridgeMapping, tail_from_embeddings
from .regularizer import BridgeRegularizer

__version__ = "0.1.0"

__all__ = [
    "BRIDGES",
    "Bridge",
    "BridgeMapping",
    "BridgeRegularizer",
    "BrownianBridge",
    "OUBridge",
    "bridge_loss",
    "get_bridge",
    "layer_times",
    "tail_from_embeddings",
]
