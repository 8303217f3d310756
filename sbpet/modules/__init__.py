"""Layer 4, the user-facing ``nn.Module``s: :class:`BridgeRegularizer` (the PDF regulariser) and
:class:`SDEBridgeRegularizer` (the SDE one), with save/load. Both modules are imported here so that
``BridgeRegularizer.from_pretrained`` finds every saved kind."""

from .regularizer import BridgeRegularizer
from .sde import DriftNetwork, SDEBridgeRegularizer, sde_bridge_loss

__all__ = ["BridgeRegularizer", "DriftNetwork", "SDEBridgeRegularizer", "sde_bridge_loss"]
