"""The process environment a command runs in, set for the command only and restored after: the
CLI never changes the environment of a program that imports it."""

from __future__ import annotations

import contextlib
import os
import sys

__all__ = ["offline_hub"]


@contextlib.contextmanager
def offline_hub():
    """Run the block with the Hugging Face hub off (``HF_HUB_OFFLINE=1``, unless the user set the
    variable): a command never reaches the network, everything it loads is local. The variable,
    and huggingface_hub's reading of it when that module is loaded, are restored afterwards, so
    importing or calling sbpet's CLI from Python leaves the rest of the process as it was."""
    previous = os.environ.get("HF_HUB_OFFLINE")
    was_loaded = "huggingface_hub.constants" in sys.modules
    before = getattr(sys.modules.get("huggingface_hub.constants"), "HF_HUB_OFFLINE", None)
    if previous is None:
        os.environ["HF_HUB_OFFLINE"] = "1"
        if was_loaded:
            sys.modules["huggingface_hub.constants"].HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        if previous is None:
            os.environ.pop("HF_HUB_OFFLINE", None)
            constants = sys.modules.get("huggingface_hub.constants")
            if constants is not None:  # loaded in the block, it read the variable the block set
                constants.HF_HUB_OFFLINE = before if was_loaded else bool(os.environ.get("TRANSFORMERS_OFFLINE", "")
                                                                          .upper() in ("1", "ON", "YES", "TRUE"))
