"""Layer 6, the demo and the ``sbpet`` command: the offline few-shot demo (:mod:`.demo`), one
training run (:mod:`.experiment`), its saved run folders (:mod:`.runs`), the study (:mod:`.study`),
the plot (:mod:`.plot`) and the argument parser (:mod:`.main`). Everything heavy is imported when a
command runs."""

from .main import main

__all__ = ["main"]
