"""``sbpet study``: the paper's claim tested on a seeded grid the user can rerun.

The grid is protocol x PET x shots x regulariser x g's fitting budget x regularised positions x
alpha x seed (:mod:`.grid`); "none" (the vanilla PET) runs once per protocol, PET, shots and seed.
The design:

- **Paired.** For a seed, every regulariser, budget, positions and alpha trains on the same
  few-shot sample, from the same PET initialisation, with the same data order
  (:func:`~sbpet.cli.experiment.train_few_shot` seeds everything with the run's seed), under the
  same protocol, so the difference to the vanilla run of the same seed is the regulariser's effect.
- **One test split** for the whole study (:data:`~sbpet.cli.experiment.TEST_SPLIT_SEED`), never used
  for choosing anything; g is fitted once per regulariser kind, bridge and budget on the rest of
  the corpus (unlabelled) and cached with its fitting curve. Each seed draws its own validation
  split from the training pool; alpha is chosen per cell by mean validation accuracy, and the
  paper protocol's best step on the same split.
- **Cached by configuration.** Every run is a JSON file ``<out>/runs/<hash>.json`` named by a hash
  of everything it depends on (model and data folders, g's configuration, protocol, seed, device,
  backend, library versions): an interrupted study resumes, a changed setting reruns only the
  runs it changes, and an unreadable or inconsistent file is rerun with a warning.
- **Statistics** (:mod:`.stats`): per cell the paired difference with its 95% t interval, the
  exact sign test, wins / ties / losses and the smallest effect the design can detect.
- **The paper's analysis.** Each g's true / shuffled endpoint R ratio on the untuned PLM, and the
  vanilla runs' test paths scored the same way: a ratio well below 1 says the paths already end
  where the bridge would send them.

Outputs in ``--out``: ``runs.json`` / ``runs.csv`` (every run), ``table.md``, ``study.png`` (the
dose-response: accuracy difference against g's budget) and ``fit_curves.png``.
"""

from .grid import QUICK, REGULARIZERS, Run, add_study_arguments, parse_grid, plan_runs
from .report import summarize, write_outputs
from .runner import run_study
from .stats import paired_summary, sign_test, t_quantile

__all__ = ["run_study", "parse_grid", "plan_runs", "summarize", "write_outputs", "add_study_arguments", "Run",
           "REGULARIZERS", "QUICK", "paired_summary", "sign_test", "t_quantile"]
