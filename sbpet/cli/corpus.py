"""``sbpet fit --text-files GLOB``: fit g on the lines of text files instead of the dataset's
corpus; the g is saved to ``--out`` (with its resumable fitting checkpoint in ``<out>/fit``),
not to the cache, whose keys name the dataset corpus."""

from __future__ import annotations

import contextlib
import os

import torch


def fit_on_text_files(args) -> int:
    """Fit the g of ``args.regularizer`` and ``args.bridge`` on the non-empty lines of the files
    ``args.text_files`` (globs, repeated or comma-separated), read as a stream in file order and
    cycled, with the fitting options of ``args`` (steps, batch size, lr, seed, max length,
    backend); save it to ``args.out``. An interrupted fit resumes from ``<out>/fit`` (``--force``
    starts again). Under ``torchrun`` the processes share the global batch
    (:func:`launched_process_group`); rank 0 writes. Returns the exit status 0.

    Raises:
        ValueError: naming ``--out`` when it is not given, ``--text-files`` when a glob matches
            no file (both before anything slow).
    """
    from ..hf.corpus import TextFiles

    if not args.out:
        raise ValueError("--text-files needs --out: a g fitted on your files is saved there, not in the cache")
    try:
        files = TextFiles(args.text_files)
    except ValueError as exc:
        raise ValueError(f"--text-files: {exc}") from None
    with launched_process_group(args) as rank:
        return _fit(args, files, rank)


@contextlib.contextmanager
def _out_lock(out: str, rank: int):
    """One ``sbpet fit --out`` at a time into a folder (``<out>.lock``, held by rank 0): a second
    one is refused with a ValueError naming ``--out``."""
    from ..core.files import LockBusy, folder_lock

    if rank != 0:
        yield
        return
    try:
        with folder_lock(os.path.abspath(out), wait=False):
            yield
    except LockBusy as exc:
        raise ValueError(f"--out: {exc}: wait for that `sbpet fit` to end, or choose another --out") from None


@contextlib.contextmanager
def launched_process_group(args):
    """Under ``torchrun`` (``WORLD_SIZE`` > 1 in the environment) join the launcher's process group
    for the fit and leave it after: gloo on the CPU, nccl on CUDA with each process on
    ``cuda:LOCAL_RANK`` (``args.device`` is set so). Yields this process's rank (0 alone)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1 or not torch.distributed.is_available() or torch.distributed.is_initialized():
        yield torch.distributed.get_rank() if world > 1 and torch.distributed.is_initialized() else 0
        return
    cuda = torch.cuda.is_available() and (args.device or "cuda").startswith("cuda")
    if cuda:
        local = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local)
        args.device = f"cuda:{local}"
    torch.distributed.init_process_group("nccl" if cuda else "gloo")
    try:
        yield torch.distributed.get_rank()
    finally:
        torch.distributed.destroy_process_group()


def _fit(args, files, rank: int) -> int:
    from .experiment import Setup

    setup = Setup(args)
    encoder = setup.encoder()
    reg = setup.new_regularizer(args.bridge, args.regularizer, encoder)
    checkpoint = os.path.join(args.out, "fit")
    with _out_lock(args.out, rank):
        return _fit_locked(args, files, rank, setup, encoder, reg, checkpoint)


def _fit_locked(args, files, rank, setup, encoder, reg, checkpoint) -> int:
    from ..core.files import remove_owned
    from ..hf.fitting import CHECKPOINT_DIR_FILES, fit_mapping
    from .experiment import deterministic_algorithms

    if args.force and rank == 0:  # only the checkpoint sbpet wrote; anything else is named and kept
        remove_owned(checkpoint, CHECKPOINT_DIR_FILES, " (--force removes only the fitting checkpoint sbpet wrote)")
    if torch.distributed.is_initialized():
        torch.distributed.barrier()  # every process starts from the same checkpoint folder
    say = print if rank == 0 else (lambda *a, **k: None)
    world = torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1
    say(f"fitting the {args.regularizer} g ({args.bridge} bridge; {args.fit_steps} steps) on the lines of "
        f"{len(files.paths)} file(s) -> {args.out}" + (f" ({world} processes share each batch)" if world > 1 else ""))
    with deterministic_algorithms():
        history = fit_mapping(
            encoder, setup.tokenizer, files, reg, steps=args.fit_steps, batch_size=args.fit_batch_size,
            max_length=args.max_length, learning_rate=args.fit_lr, checkpoint_dir=checkpoint, save_every=50,
            seed=args.fit_seed, progress=setup.progress,
            backend=args.backend if args.regularizer == "pdf" else None,
        )
    losses = history["loss"]
    say(f"g fitted: R {losses[0]:.4f} -> {sum(losses[-10:]) / len(losses[-10:]):.4f} (mean of the last 10 steps)")
    if rank == 0:
        reg.save_pretrained(args.out)
    say(f"saved g to {args.out}")
    return 0
