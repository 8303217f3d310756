"""fit_mapping's checkpoint (docs/safety.md): what it holds, how it is saved (a complete copy at
every instant), recovered after a crash, read back without unpickling anything, checked against
the run that resumes it, and locked against a second fit into the same folder."""

from __future__ import annotations

import contextlib
import json
import os

import torch

from ..core.files import LockBusy, folder_lock, remove_owned, write_json
from ..core.fingerprint import embedding_fingerprint

__all__ = ["CHECKPOINT_NAME", "FIT_STATE_NAME", "LEGACY_FIT_STATE_NAME", "ENGINE_DIR", "CHECKPOINT_DIR_FILES",
           "read_fit_state", "save_checkpoint", "load_checkpoint", "recover_checkpoint", "remove_checkpoint_folder",
           "checkpoint_folders", "has_checkpoint", "fit_signature", "checkpoint_lock"]

CHECKPOINT_NAME = "checkpoint"
FIT_STATE_NAME = "fit_state.json"  # step, loss history, signature: JSON, never a pickle
LEGACY_FIT_STATE_NAME = "fit_state.pt"  # before: read with weights_only=True only
ENGINE_DIR = "engine"
OLD, PARTIAL = ".old", ".partial"  # the swap's two other names (see save_checkpoint)
# What a checkpoint folder holds: the regulariser's files, the fit state, accelerate's save_state
# of the engine, and the temporary files of an interrupted atomic write.
_CHECKPOINT_FILES = (
    "sbpet_config.json", "sbpet_model.safetensors", FIT_STATE_NAME, LEGACY_FIT_STATE_NAME, ".*.tmp",
    f"{ENGINE_DIR}/", *(f"{ENGINE_DIR}/{name}" for name in (
        "model*.safetensors", "pytorch_model*.bin", "optimizer*.bin", "scheduler*.bin", "random_states_*.pkl",
        "sampler*.bin", "scaler.pt", "dl_state_dict*.bin")),
)
# What fit_mapping writes into checkpoint_dir: the checkpoint under its three names and its lock.
CHECKPOINT_DIR_FILES = (f"{CHECKPOINT_NAME}.lock", *(
    f"{CHECKPOINT_NAME}{suffix}{part}" for suffix in ("", OLD, PARTIAL)
    for part in ("/", *(f"/{name}" for name in _CHECKPOINT_FILES))))


def remove_checkpoint_folder(path: str) -> None:
    """Delete one of the checkpoint's folders, only if it holds nothing but a checkpoint's files."""
    remove_owned(path, _CHECKPOINT_FILES, " (a fit_mapping checkpoint holds only its own files)")


def is_complete(path: str) -> bool:
    """Whether a checkpoint folder was written to the end (its fit state is written last)."""
    return os.path.isfile(os.path.join(path, "sbpet_model.safetensors")) and (
        os.path.isfile(os.path.join(path, FIT_STATE_NAME)) or os.path.isfile(os.path.join(path, LEGACY_FIT_STATE_NAME)))


def checkpoint_folders(directory) -> tuple[str, str, str]:
    final = os.path.join(os.fspath(directory), CHECKPOINT_NAME)
    return final, final + OLD, final + PARTIAL


def has_checkpoint(directory) -> bool:
    return any(os.path.lexists(p) for p in checkpoint_folders(directory))


def recover_checkpoint(directory) -> None:
    """Leave ``checkpoint/`` complete after an interrupted save (main process, under the lock):
    the swap always keeps one complete copy (checkpoint/, else the newer checkpoint.partial/, else
    checkpoint.old/), which takes the final name; the rest (only checkpoint files) is dropped.
    ValueError with the command that repairs it when no copy is complete."""
    final, old, partial = checkpoint_folders(directory)
    if not is_complete(final):
        source = next((p for p in (partial, old) if is_complete(p)), None)
        if source is None and not os.path.lexists(final):  # the first save was interrupted: nothing to resume
            for path in (old, partial):
                remove_checkpoint_folder(path)
            return
        if source is None:
            raise ValueError(
                f"the checkpoint in {directory} is half-written (none of {CHECKPOINT_NAME}/, {CHECKPOINT_NAME}{OLD}/ "
                f"and {CHECKPOINT_NAME}{PARTIAL}/ is complete): start the fit again with resume=False (sbpet fit "
                f"--force), which removes them, or delete {os.path.join(directory, CHECKPOINT_NAME)}* yourself")
        remove_checkpoint_folder(final)
        os.replace(source, final)
    for path in (old, partial):
        remove_checkpoint_folder(path)


def save_checkpoint(directory, accelerator, regularizer, step, history, signature):
    """``checkpoint/``: the regulariser's ``save_pretrained`` files, ``fit_state.json`` (step, loss
    history, signature) and ``engine/`` (accelerate's optimizer, scheduler and g state). Called
    on every process (the engine may write a shard on each); rank 0 writes the rest.

    Written as ``checkpoint.partial/`` (the fit state last), then swapped in keeping a complete
    copy at every instant: ``checkpoint/`` -> ``checkpoint.old/``, ``checkpoint.partial/`` ->
    ``checkpoint/``, ``checkpoint.old/`` dropped (:func:`recover_checkpoint` finishes an
    interrupted swap)."""
    final, old, partial = checkpoint_folders(directory)
    engine = os.path.join(partial, ENGINE_DIR)
    if accelerator.is_main_process:
        remove_checkpoint_folder(partial)
        os.makedirs(engine)
    accelerator.wait_for_everyone()  # every process writes into engine/ (its random state at least)
    accelerator.save_state(engine)
    accelerator.wait_for_everyone()  # ... before rank 0 moves the directory
    if accelerator.is_main_process:
        regularizer.save_pretrained(partial)
        write_json(os.path.join(partial, FIT_STATE_NAME), {"step": step, "history": history, "signature": signature})
        if os.path.lexists(final):
            remove_checkpoint_folder(old)  # a complete checkpoint/ is there: an old copy is not needed
            os.replace(final, old)
        os.replace(partial, final)
        remove_checkpoint_folder(old)
    accelerator.wait_for_everyone()


def read_fit_state(path: str) -> dict:
    """The fit state of a checkpoint folder ``path``: ``{"step", "history", "signature"}`` from its
    ``fit_state.json``, or from a ``fit_state.pt`` of an earlier version read with
    ``weights_only=True`` (never unpickled). ValueError naming the file and the repair otherwise.

    Example:
        >>> read_fit_state("g/fit/checkpoint")["history"][:2]  # doctest: +SKIP
        [3.21, 3.02]
    """
    repair = (f"delete {path} (or rerun with resume=False; sbpet fit --force) to start the fit again")
    json_path, legacy = os.path.join(path, FIT_STATE_NAME), os.path.join(path, LEGACY_FIT_STATE_NAME)
    if os.path.isfile(json_path):
        try:
            with open(json_path, encoding="utf-8") as f:
                state = json.load(f)
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise ValueError(f"{json_path} is damaged ({exc}): {repair}") from None
    elif os.path.isfile(legacy):
        try:
            state = torch.load(legacy, map_location="cpu", weights_only=True)
        except Exception as exc:  # noqa: BLE001 - torch raises several kinds for a damaged or unsafe file
            first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
            raise ValueError(f"{legacy} cannot be read safely (it is damaged, or holds objects that would have to be "
                             f"unpickled; sbpet never does: {first}): {repair}") from None
    else:
        raise ValueError(f"{path} holds no {FIT_STATE_NAME}: not a fit_mapping checkpoint; {repair}")
    ok = isinstance(state, dict) and isinstance(state.get("step"), int) and isinstance(state.get("history"), list)
    if not ok:
        raise ValueError(f"the fit state in {path} is damaged (no step and history): {repair}")
    return state


def load_checkpoint(directory, model, regularizer, accelerator, optimizer, scheduler, signature):
    from ..modules.regularizer import BridgeRegularizer

    path = os.path.join(directory, CHECKPOINT_NAME)
    state = read_fit_state(path)
    saved_signature = state.get("signature")
    if saved_signature != signature:
        changed = sorted(k for k in set(signature) | set(saved_signature or {})
                         if (saved_signature or {}).get(k) != signature.get(k))
        raise ValueError(
            f"the checkpoint in {path} was made with other settings ({', '.join(changed)} differ: "
            f"{ {k: (saved_signature or {}).get(k) for k in changed} } there, "
            f"{ {k: signature.get(k) for k in changed} } now): resume with the same settings, rerun with "
            "resume=False (sbpet fit --force) to start again, or use another checkpoint_dir"
        )
    saved = BridgeRegularizer.from_pretrained(path, model=model)
    try:
        regularizer.load_state_dict(saved.state_dict())
    except RuntimeError as exc:
        raise ValueError(f"the checkpoint in {path} does not match this regulariser: {exc}") from exc
    if "optimizer" in state:  # written before accelerate held the engine state (read weights_only)
        optimizer.optimizer.load_state_dict(state["optimizer"])
        scheduler.scheduler.load_state_dict(state["scheduler"])
    else:
        try:
            # accelerate reads optimizer.bin / scheduler.bin / random_states_*.pkl with torch.load; say
            # weights_only=True here, whatever its default becomes.
            accelerator.load_state(os.path.join(path, ENGINE_DIR), load_kwargs={"weights_only": True})
        except Exception as exc:  # noqa: BLE001 - torch raises several kinds for a damaged or unsafe file
            first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
            raise ValueError(f"the engine state in {os.path.join(path, ENGINE_DIR)} cannot be read safely (damaged, "
                             f"or holding objects that would have to be unpickled: {first}): rerun with resume=False "
                             "(sbpet fit --force) to start again, or delete the checkpoint folder") from None
    return int(state["step"]), [float(v) for v in state["history"]]


def fit_signature(regularizer, model, **settings) -> dict:
    """Everything a resumed fit must share with the checkpoint: the settings (every fitting
    hyperparameter), the regulariser's configuration (what shapes g and its target) and the model's
    fingerprint; JSON-round-tripped, as it is stored."""
    skip = ("backend", "precision", "name_or_path", "seed", "model_fingerprint", "weights_sha256")
    config = {k: v for k, v in regularizer.config.items() if k not in skip}
    embeddings = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    fingerprint = embedding_fingerprint(embeddings) if embeddings is not None else None
    value = {**settings, "regularizer": config, "model": None if fingerprint is None else fingerprint["sha256"]}
    return json.loads(json.dumps(value))


@contextlib.contextmanager
def checkpoint_lock(checkpoint_dir, accelerator):
    """One fit at a time into ``checkpoint_dir`` (its ``checkpoint.lock``, held by rank 0): a second
    one is refused at once with a ValueError saying so (every process of it stops)."""
    if checkpoint_dir is None:
        yield
        return
    with contextlib.ExitStack() as stack:
        busy = None
        if accelerator.is_main_process:
            try:
                stack.enter_context(folder_lock(os.path.join(checkpoint_dir, CHECKPOINT_NAME), wait=False))
            except LockBusy as exc:
                busy = str(exc)
        if accelerator.num_processes > 1:
            from accelerate.utils import broadcast_object_list

            busy = broadcast_object_list([busy])[0]
        if busy is not None:
            raise ValueError(f"checkpoint_dir {checkpoint_dir}: another fit is writing there ({busy}): wait for it to "
                             "end, or use another checkpoint_dir")
        yield
