"""The run folders of ``sbpet train``: named by the run's whole configuration, never replaced
unasked, and found again by ``sbpet plot``.

A run's default folder is ``<cache>/runs/<name>``, the name being
``<pet>-<regularizer>-<bridge>-a<alpha>-<shots>shot-seed<seed>-<hash>`` (the vanilla PET:
``<pet>-none-<shots>shot-seed<seed>-<hash>``). The readable part holds what people vary between
runs they compare; the hash covers everything else the result depends on (budgets, model, corpus,
g's configuration, device, backend, precision; the model and corpus by content, not by path). So
runs that differ in any setting never share a folder, and a folder that already holds a run holds
one of exactly this configuration: ``sbpet train`` then prints the stored run (training it again
would give the same numbers on this machine) and replaces it only with ``--overwrite``.
"""

from __future__ import annotations

import json
import os

from .experiment import TEST_SPLIT_SEED, config_digest

__all__ = ["run_config", "run_name", "existing_run", "saved_runs", "read_run", "same_run", "stored_run_line", "run_folder"]

RUN_FILES = ("run.json", "pet.safetensors")


def run_config(setup, args, protocol=None) -> dict:
    """Everything a ``sbpet train`` run's result depends on, from its resolved options (``args.bridge``
    the trained bridge or "none", ``args.measure_bridge`` the bridge whose g scores it) and its
    :class:`~sbpet.cli.protocol.Protocol` (the parts that differ from ours; epochs, batch size and
    lr are keys of their own)."""
    a = args
    parts = {} if protocol is None else {k: v for k, v in protocol.key().items()
                                         if k not in ("epochs", "batch_size", "lr")}
    vanilla = a.bridge == "none"
    return {
        "pet": a.pet, "regularizer": "none" if vanilla else a.regularizer, "bridge": a.bridge,
        # A vanilla run trains the same whatever alpha is; its bridge loss is scored by this g.
        "alpha": None if vanilla else float(a.alpha), "shots": int(a.shots), "seed": int(a.seed),
        "epochs": float(a.epochs), "batch_size": int(a.batch_size), "lr": float(a.lr),
        "max_length": int(a.max_length), "val_per_class": int(a.val_per_class),
        "test_per_class": int(a.test_per_class), "test_split_seed": TEST_SPLIT_SEED,
        # The model and corpus by content, not by path (a moved copy is the same run).
        "model": setup.model_key, "data": setup.data_key,
        "g": setup.g_config(a.measure_bridge, a.regularizer),
        "device": setup.device.type, "backend": a.backend, "precision": a.precision,
        # Only where it is not the default, so the runs made before the option keep their names.
        **({"positions": a.positions} if not vanilla and getattr(a, "positions", "mask") != "mask" else {}),
        **({"protocol": parts} if parts else {}),
    }


def run_name(config: dict) -> str:
    """The folder name of a run configuration (see the module docstring).

    Example:
        >>> run_name({"pet": "lora", "regularizer": "pdf", "bridge": "ou", "alpha": 0.1, "shots": 16,
        ...           "seed": 0})[:30]
        'lora-pdf-ou-a0.1-16shot-seed0-'
    """
    c = config
    if c["bridge"] == "none":
        readable = f"{c['pet']}-none"
    else:
        readable = f"{c['pet']}-{c['regularizer']}-{c['bridge']}-a{c['alpha']:g}"
    return f"{readable}-{c['shots']}shot-seed{c['seed']}-{config_digest(c, 8)}"


def existing_run(path: str) -> dict | None:
    """What ``path`` holds of a saved run: None when no run file is there, else the run's
    ``run.json`` (``{}`` when it cannot be read). ValueError when ``path`` exists and is not a
    folder."""
    if os.path.exists(path) and not os.path.isdir(path):
        raise ValueError(f"{path} exists and is not a folder")
    if not any(os.path.exists(os.path.join(path, name)) for name in RUN_FILES):
        return None
    try:
        with open(os.path.join(path, "run.json"), encoding="utf-8") as f:
            meta = json.load(f)
    except (OSError, ValueError):
        return {}
    return meta if isinstance(meta, dict) else {}


def read_run(path: str) -> dict:
    """The ``run.json`` of a run folder written by ``sbpet train``; ValueError naming ``--runs``
    when ``path`` is not one (checked before anything is loaded)."""
    if not all(os.path.isfile(os.path.join(path, name)) for name in RUN_FILES):
        raise ValueError(f"--runs: {path} is not a run folder of `sbpet train` (it needs {' and '.join(RUN_FILES)})")
    meta = existing_run(path)
    if not meta or "pet" not in meta:
        raise ValueError(f"--runs: {path}/run.json is unreadable or not a run's description")
    return meta


def saved_runs(cache: str) -> list[str]:
    """The run folders under ``<cache>/runs`` (every one holding both run files), sorted by name."""
    root = os.path.join(cache, "runs")
    if not os.path.isdir(root):
        return []
    folders = (os.path.join(root, name) for name in sorted(os.listdir(root)))
    return [f for f in folders if all(os.path.isfile(os.path.join(f, name)) for name in RUN_FILES)]


def same_run(meta: dict, config: dict) -> bool:
    """Whether a stored ``run.json`` is a run of exactly ``config`` (compared as JSON stores it),
    with its metrics."""
    return meta.get("config") == json.loads(json.dumps(config)) and isinstance(meta.get("metrics"), dict)


def stored_run_line(out: str, meta: dict) -> str:
    """``sbpet train``'s result line for a run already stored in ``out``, said to be the stored one."""
    metrics, validation = meta["metrics"], meta.get("validation") or {}

    def number(value) -> str:
        return f"{value:.4f}" if isinstance(value, (int, float)) else "n/a"

    return (f"validation accuracy {number(validation.get('accuracy'))}  test accuracy "
            f"{number(metrics.get('accuracy'))}  task loss {number(metrics.get('task_loss'))}  bridge loss "
            f"{number(metrics.get('bridge_loss'))}  (stored run, not retrained: the same configuration is in {out}; "
            "runs are deterministic, so this is its result; pass --overwrite to train it again)")


def run_folder(cache: str, args, config: dict) -> tuple[str, dict | None]:
    """``sbpet train``'s run folder (``args.out``, else one under ``<cache>/runs``), and the run it
    holds when that is this very run (runs are deterministic: the stored run is the answer) and
    --overwrite is not given. ValueError (before anything slow) when it holds another run, or an
    unreadable one, and --overwrite is not given."""
    out = args.out or os.path.join(cache, "runs", run_name(config))
    try:
        existing = existing_run(out)
    except ValueError as exc:
        raise ValueError(f"--out: {exc}") from None
    if existing is None or args.overwrite:
        return out, None
    if same_run(existing, config):
        return out, existing
    accuracy = (existing.get("metrics") or {}).get("accuracy")
    about = f" (test accuracy {accuracy:.4f})" if isinstance(accuracy, (int, float)) else ""
    if args.out:
        raise ValueError(f"--out: {out} already holds another run{about}; pass --overwrite to replace it, or "
                         "choose another --out")
    raise ValueError(f"{out} already holds a run of another or unreadable configuration{about}; pass --overwrite "
                     "to train this one and replace it")
