"""The study's grid: its options, their checks and the runs they plan.

Axes: protocol x PET x shots x regulariser x g's fitting budget x regularised positions x alpha x
seed. The vanilla PET ("none") runs once per protocol, PET, shots and seed: it has no g, no
positions and no alpha, and every regularised run of its seed is paired with it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from ..protocol import PROTOCOLS, Protocol, resolve

__all__ = ["Run", "REGULARIZERS", "DEFAULT_GRID", "QUICK", "POSITION_SETS", "add_study_arguments",
           "resolve_options", "parse_grid", "plan_runs", "run_protocol"]

REGULARIZERS = ("none", "pdf-brownian", "pdf-ou", "sde-brownian", "sde-ou")
POSITION_SETS = ("mask", "all")
DEFAULT_GRID = {"pets": "lora,prompt,bitfit", "regularizers": "none,pdf-brownian,pdf-ou", "shots": "4,16",
                "alphas": "0.1,0.5", "seeds": 5, "protocols": "ours", "positions": "mask",
                "extra_positions_at": "every"}
# CI's grid: both protocols, tiny. The paper protocol's 1000 steps become 4, evaluated every 2.
QUICK = {"pets": "lora", "regularizers": "none,pdf-brownian", "shots": "4", "alphas": "0.1", "seeds": 2,
         "epochs": 1.0, "fit_steps": "20", "test_per_class": 20, "val_per_class": 4, "protocols": "ours,paper",
         "steps": 4, "eval_every": 2}


@dataclass(frozen=True)
class Run:
    """One cell of the grid for one seed. The vanilla PET has ``alpha``, ``fit_steps`` and
    ``positions`` None."""

    pet: str
    regularizer: str
    alpha: float | None
    shots: int
    seed: int
    protocol: str = "ours"
    fit_steps: int | None = None
    positions: str | None = None

    @property
    def kind_and_bridge(self) -> tuple[str, str] | None:
        return None if self.regularizer == "none" else tuple(self.regularizer.split("-"))

    @property
    def g_key(self) -> tuple[str, str, int] | None:
        """(kind, bridge, fitting steps) of the run's g; None for the vanilla PET."""
        return None if self.kind_and_bridge is None else (*self.kind_and_bridge, self.fit_steps)


def add_study_arguments(parser, pets) -> None:
    """The options only ``sbpet study`` has (its grid's axes and the paper protocol's length);
    ``pets`` the PET names (given, not imported: ``sbpet --help`` does not load torch)."""
    parser.add_argument("--pets", help="comma list of " + ",".join(pets) + " (default: lora,prompt,bitfit)")
    parser.add_argument("--regularizers", help="comma list of " + ", ".join(REGULARIZERS)
                        + " (default: none,pdf-brownian,pdf-ou)")
    parser.add_argument("--shots", help="comma list of few-shot examples per class (default: 4,16)")
    parser.add_argument("--alphas",
                        help="comma list of bridge-loss weights for the regularised runs (default: 0.1,0.5)")
    parser.add_argument("--seeds", type=int, help="number of seeds, 0..n-1 (default: 5)")
    parser.add_argument("--protocols", help="comma list of " + ",".join(PROTOCOLS) + " (sbpet.cli.protocol; "
                        "--epochs, --lr and --batch-size set ours, --steps and --eval-every the paper's) "
                        "(default: ours; --quick: ours,paper)")
    parser.add_argument("--positions", help="comma list of " + ",".join(POSITION_SETS) + ": the tokens R "
                        "regularises, as sbpet train --positions (default: mask)")
    parser.add_argument("--extra-positions-at", choices=("every", "longest"), default=None,
                        help="the position sets after the first in --positions run at every g budget (every) or "
                        "only at the longest (longest: the dose-response is measured on the first) (default: every)")
    parser.add_argument("--steps", type=int, default=None,
                        help="optimizer steps of the paper protocol (default: its 1000; --quick: 4)")
    parser.add_argument("--eval-every", type=int, default=None,
                        help="validation every N steps under the paper protocol (default: its 50; --quick: 2)")
    parser.add_argument("--jobs", type=int, default=1,
                        help="runs trained at once, each in its own process with 1/N of the CPU threads (CPU only; "
                        "a run records its thread count) (default: 1)")


def resolve_options(args, defaults: dict) -> None:
    """Fill the options left unset (None): from :data:`QUICK` with ``--quick``, else from the
    default grid and ``defaults`` (the values ``sbpet train`` uses)."""
    for name, value in {**defaults, **DEFAULT_GRID, **(QUICK if args.quick else {})}.items():
        if getattr(args, name, None) is None:
            setattr(args, name, value)


def _items(value, option: str, what: str) -> list[str]:
    items = [v.strip() for v in str(value).split(",") if v.strip()]
    if not items:
        raise ValueError(f"{option} is empty: the grid needs at least one {what}")
    return list(dict.fromkeys(items))


def _names(value, option: str, allowed) -> list[str]:
    items = _items(value, option, "name")
    for item in items:
        if item not in allowed:
            raise ValueError(f"{option}: unknown name {item!r} (choose from {', '.join(allowed)})")
    return items


def _positive(value, option: str, cast) -> list:
    numbers = []
    for item in _items(value, option, "value"):
        try:
            number = cast(item)
        except ValueError:
            raise ValueError(f"{option}: {item!r} is not a {'whole ' if cast is int else ''}number") from None
        if not (math.isfinite(number) and number > 0):
            raise ValueError(f"{option} must hold positive numbers, got {item}")
        numbers.append(number)
    return sorted(set(numbers))


def parse_grid(args) -> dict:
    """The grid from the (resolved) options: ``{"pets", "regularizers", "shots", "alphas",
    "seeds", "protocols", "fit_steps", "positions", "extra_positions_at"}``, lists but the last.
    Raises ValueError naming the option for unknown names, empty lists, non-positive numbers and
    an empty grid."""
    from ..demo import PET_METHODS

    if args.seeds is None or args.seeds < 1:
        raise ValueError(f"--seeds must be >= 1 (the grid is empty), got {args.seeds}")
    for option, value in (("--epochs", args.epochs), ("--lr", args.lr), ("--batch-size", args.batch_size),
                          ("--fit-batch-size", args.fit_batch_size)):
        if not value > 0:
            raise ValueError(f"{option} must be positive, got {value}")
    for option, value in (("--steps", args.steps), ("--eval-every", args.eval_every)):
        if value is not None and value < 1:
            raise ValueError(f"{option} must be >= 1, got {value}")
    return {
        "pets": _names(args.pets, "--pets", PET_METHODS),
        "regularizers": _names(args.regularizers, "--regularizers", REGULARIZERS),
        "shots": _positive(args.shots, "--shots", int),
        "alphas": _positive(args.alphas, "--alphas", float),
        "seeds": list(range(args.seeds)),
        "protocols": _names(args.protocols, "--protocols", PROTOCOLS),
        "fit_steps": _positive(args.fit_steps, "--fit-steps", int),
        "positions": _names(args.positions, "--positions", POSITION_SETS),
        "extra_positions_at": args.extra_positions_at,
    }


def plan_runs(grid: dict) -> list[Run]:
    """Every run of the grid, seed by seed (a stopped study has whole seeds done first), the
    cheaper protocol first within a seed."""
    longest = max(grid.get("fit_steps") or [None], key=lambda s: -1 if s is None else s)
    positions = grid.get("positions") or ["mask"]
    runs = []
    for seed in grid["seeds"]:
        for protocol in grid.get("protocols") or ["ours"]:
            for shots in grid["shots"]:
                for pet in grid["pets"]:
                    for reg in grid["regularizers"]:
                        if reg == "none":
                            runs.append(Run(pet, reg, None, shots, seed, protocol))
                            continue
                        for steps in grid.get("fit_steps") or [None]:
                            for k, where in enumerate(positions):
                                if k and grid.get("extra_positions_at") == "longest" and steps != longest:
                                    continue
                                for alpha in grid["alphas"]:
                                    runs.append(Run(pet, reg, alpha, shots, seed, protocol, steps, where))
    return runs


def run_protocol(args, name: str) -> Protocol:
    """The protocol ``name`` as the study trains it: ours with ``--epochs``, ``--batch-size`` and
    ``--lr``; the paper's preset with ``--steps`` and ``--eval-every`` where given."""
    if name == "ours":
        return resolve("ours", epochs=args.epochs, batch_size=args.batch_size, lr=args.lr)
    return resolve(name, steps=args.steps, eval_every=args.eval_every)
