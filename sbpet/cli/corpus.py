"""``sbpet fit --text-files GLOB``: fit g on the lines of text files instead of the dataset's
corpus; the g is saved to ``--out`` (with its resumable fitting checkpoint in ``<out>/fit``),
not to the cache, whose keys name the dataset corpus."""

from __future__ import annotations

import os


def fit_on_text_files(args) -> int:
    """Fit the g of ``args.regularizer`` and ``args.bridge`` on the non-empty lines of the files
    ``args.text_files`` (globs, repeated or comma-separated), read as a stream in file order and
    cycled, with the fitting options of ``args`` (steps, batch size, lr, seed, max length,
    backend); save it to ``args.out``. An interrupted fit resumes from ``<out>/fit`` (``--force``
    starts again). Returns the exit status 0.

    Raises:
        ValueError: naming ``--out`` when it is not given, ``--text-files`` when a glob matches
            no file (both before anything slow).
    """
    from ..hf.corpus import TextFiles
    from ..hf.fitting import fit_mapping
    from .experiment import Setup, deterministic_algorithms

    if not args.out:
        raise ValueError("--text-files needs --out: a g fitted on your files is saved there, not in the cache")
    try:
        files = TextFiles(args.text_files)
    except ValueError as exc:
        raise ValueError(f"--text-files: {exc}") from None
    setup = Setup(args)
    encoder = setup.encoder()
    reg = setup.new_regularizer(args.bridge, args.regularizer, encoder)
    checkpoint = os.path.join(args.out, "fit")
    if args.force:
        import shutil

        shutil.rmtree(checkpoint, ignore_errors=True)
    print(f"fitting the {args.regularizer} g ({args.bridge} bridge; {args.fit_steps} steps) on the lines of "
          f"{len(files.paths)} file(s) -> {args.out}")
    with deterministic_algorithms():
        history = fit_mapping(
            encoder, setup.tokenizer, files, reg, steps=args.fit_steps, batch_size=args.fit_batch_size,
            max_length=args.max_length, learning_rate=args.fit_lr, checkpoint_dir=checkpoint, save_every=50,
            seed=args.fit_seed, progress=setup.progress,
            backend=args.backend if args.regularizer == "pdf" else None,
        )
    losses = history["loss"]
    print(f"g fitted: R {losses[0]:.4f} -> {sum(losses[-10:]) / len(losses[-10:]):.4f} (mean of the last 10 steps)")
    reg.save_pretrained(args.out)
    print(f"saved g to {args.out}")
    return 0
