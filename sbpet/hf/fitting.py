"""Fitting g on plain text with the PLM frozen (docs/METHOD.md "Fitting g"), on accelerate's
``Accelerator``, in one process or several (``torchrun``, ``accelerate launch``) with the same
result: the batch is global, each process runs its share of it through the backbone, g's gradients
are summed over the processes weighted by their share of the regularised positions."""

from __future__ import annotations

import atexit
import contextlib
import logging
import math
import os
import time

import torch

from ..core.checks import check_deferred
from ..backends.dispatch import check_backend_name
from .capture import BridgeCapture, find_backbone_and_layers
from ..modules.regularizer import check_model_matches
from ..core.precision import check_precision
from ..core.fingerprint import embedding_fingerprint
from .checkpoint import (  # noqa: F401 - the checkpoint's names, reachable from here as before
    CHECKPOINT_DIR_FILES, CHECKPOINT_NAME, ENGINE_DIR, FIT_STATE_NAME, LEGACY_FIT_STATE_NAME, checkpoint_folders,
    checkpoint_lock, fit_signature, has_checkpoint, load_checkpoint, read_fit_state, recover_checkpoint,
    remove_checkpoint_folder)
from .checkpoint import save_checkpoint as _save_checkpoint  # a module global: tests stop a fit after a save
from .corpus import batch_indices, fitting_texts, make_fitting_batch, pack_fitting_batch, text_batches, tokenise_texts

__all__ = ["fit_mapping", "tokenise_texts", "make_fitting_batch", "read_fit_state", "CHECKPOINT_NAME",
           "FIT_STATE_NAME", "LEGACY_FIT_STATE_NAME", "CHECKPOINT_DIR_FILES"]

logger = logging.getLogger(__name__)
_AUTOCAST_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
_batch_indices = batch_indices  # the list path's order (kept under its old name)


def _schedule(warmup: int, total: int):
    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return max(0.0, (total - step) / max(1, total - warmup))

    return factor


class _HostCopies:
    """The batch's labels, mask and (packed rows) position ids on the host, where its positions and
    sequences are found for free. A plain object, so that DistributedDataParallel (which moves
    tensors, and tuples of them, to its device) passes it to the forward as it is."""

    def __init__(self, labels: torch.Tensor, attention_mask: torch.Tensor | None,
                 position_ids: torch.Tensor | None = None):
        self.labels, self.attention_mask, self.position_ids = labels, attention_mask, position_ids


class _FitStep(torch.nn.Module):
    """What the engine trains: R of one batch, with the regulariser (g, the only trainable part)
    as its one submodule. The frozen backbone is held outside the module's parameters, so the
    engine never replicates, reduces or checkpoints it (shard it beforehand for a PLM too large
    for one device: its forward is called as it is)."""

    def __init__(self, backbone, regularizer, capture, autocast_dtype):
        super().__init__()
        self.regularizer = regularizer
        self._backbone = (backbone,)  # a tuple: not a registered submodule
        self._capture, self._autocast_dtype = capture, autocast_dtype

    def forward(self, input_ids, attention_mask, labels, host: _HostCopies, position_ids=None):
        backbone, device = self._backbone[0], input_ids.device
        # Packed rows: the model and the regulariser get the positions (the latter the host copy).
        model_packing = {} if position_ids is None else {"position_ids": position_ids}
        packing = {} if host.position_ids is None else {"position_ids": host.position_ids}
        # no_grad, not inference_mode: the states the backbone yields feed g, which autograd records.
        # g runs at its own precision, whatever mixed precision the engine was configured with.
        with torch.autocast(device.type, enabled=False):
            if self._capture is not None:
                with torch.no_grad(), _autocast(device, self._autocast_dtype), \
                        self._capture.armed(host.labels, host.attention_mask, **packing):
                    backbone(input_ids=input_ids, attention_mask=attention_mask, **model_packing)
                return self._capture.loss()
            with torch.no_grad(), _autocast(device, self._autocast_dtype):
                hidden = backbone(input_ids=input_ids, attention_mask=attention_mask,
                                  output_hidden_states=True, **model_packing).hidden_states
            if self._autocast_dtype is not None:
                hidden = tuple(h.float() for h in hidden)
            return self.regularizer(hidden, labels, attention_mask, **packing)  # the SDE one


_PACKING_ATTENTION = ("flash_attention_2", "flash_attention_3")


def _check_packing(backbone) -> None:
    """``packing`` needs attention that keeps packed sequences apart from ``position_ids`` alone."""
    implementation = str(getattr(backbone.config, "_attn_implementation", None))
    if implementation not in _PACKING_ATTENTION and "flash" not in implementation:
        raise ValueError(
            f"packing=True: {type(backbone).__name__} runs attn_implementation={implementation!r}, which does not "
            "keep packed sequences apart from position_ids alone (its states would mix the texts); load the model "
            "with attn_implementation='flash_attention_2' (or 'flash_attention_3'), or fit without packing")


def _engine(device: torch.device):
    """accelerate's ``Accelerator`` for the fit: it joins the process group the launcher
    (``torchrun``, ``accelerate launch``) described (or one the caller started), wraps g for it,
    steps the optimizer and scheduler, clips and saves the engine state. The batch is global
    (``split_batches``: the scheduler steps once per step whatever the process count); the model
    stays where the caller put it."""
    from accelerate import Accelerator
    from accelerate.utils import DataLoaderConfiguration

    _, started = _process_group()
    several = max(started, int(os.environ.get("WORLD_SIZE", "1"))) > 1
    accelerator = Accelerator(cpu=device.type == "cpu" and several, device_placement=False,
                              dataloader_config=DataLoaderConfiguration(split_batches=True))
    world = _process_group()[1]
    if started == 1 and world > 1:
        _close_group_at_exit()
    if accelerator.num_processes != world:
        raise ValueError(
            f"torch.distributed has {started} processes but the environment describes "
            f"{accelerator.num_processes}: launch with torchrun or accelerate launch (they set RANK, "
            "WORLD_SIZE and LOCAL_RANK)"
        )
    kind = accelerator.distributed_type.value
    if kind in ("FSDP", "DEEPSPEED", "MEGATRON_LM"):
        raise ValueError(
            f"fit_mapping replicates g (it is small) and does not run under {kind}: launch it without "
            "that option; to spread a large frozen PLM over the processes, shard its backbone yourself "
            "before calling (torch.distributed.fsdp.fully_shard on each layer, then on the backbone)"
        )
    return accelerator


_GROUP_CLOSED_AT_EXIT = []  # one entry once the engine has started a group and registered its closing


def _close_group_at_exit() -> None:
    """The engine started the process group (the caller did not): destroy it when the program
    exits, while the interpreter is still whole. A gloo group left to the interpreter's
    finalisation can abort the process ("terminate called without an active exception",
    pytorch/pytorch#190489), as a torchrun'd script that never called init_process_group would;
    the group stays usable until then."""
    if not _GROUP_CLOSED_AT_EXIT:
        _GROUP_CLOSED_AT_EXIT.append(True)
        atexit.register(_destroy_group)


def _destroy_group() -> None:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()

def _process_group() -> tuple[int, int]:
    """(rank, world size) of the default process group; (0, 1) without one."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


def _autocast_dtype(backbone_dtype, device: torch.device):
    """The dtype the frozen backbone runs in under autocast (None: no autocast)."""
    if backbone_dtype == "auto":
        use_bf16 = device.type == "cuda" and torch.cuda.is_bf16_supported()
        return torch.bfloat16 if use_bf16 else None
    if backbone_dtype in (None, "fp32"):
        return None
    if backbone_dtype not in _AUTOCAST_DTYPES:
        raise ValueError(f"backbone_dtype must be 'auto', 'bf16', 'fp16', 'fp32' or None, got {backbone_dtype!r}")
    return _AUTOCAST_DTYPES[backbone_dtype]


def _autocast(device: torch.device, dtype):
    return contextlib.nullcontext() if dtype is None else torch.autocast(device.type, dtype=dtype)


def _regularised_count(labels: torch.Tensor, causal: bool, ignore: int) -> int:
    """R's positions in ``labels`` [B, S] (host): the labels kept after the causal shift."""
    return int((labels[:, 1:] if causal else labels).ne(ignore).sum())


class _FitLog:
    """R per step, kept on the device and read back in one copy every ``every`` steps, at every
    checkpoint step (a checkpoint holds the whole history) and at the end; tokens per second over
    the steps since the last read."""

    def __init__(self, history: list, every: int, save_every: int):
        self.history, self.every, self.save_every, self.pending = history, every, save_every, []
        self.tokens, self.tokens_per_second, self._began = 0, 0.0, time.perf_counter()

    def add(self, value: torch.Tensor) -> None:
        self.pending.append(value.reshape(()))

    def due(self, done: int, steps: int) -> bool:
        return done % self.every == 0 or done % self.save_every == 0 or done == steps

    def flush(self, done: int) -> int:
        """Read the pending values (a non-finite one is an error naming its step); returns how many."""
        values = torch.stack(self.pending).float().cpu().tolist()
        for i, value in enumerate(values):
            if not math.isfinite(value):
                step = done - len(values) + i
                raise FloatingPointError(f"R became {value} at step {step}: lower the learning rate")
        self.history.extend(values)
        now = time.perf_counter()
        self.tokens_per_second = self.tokens / max(now - self._began, 1e-9)
        logger.info("fitting g: step %d, R %.4f, %.0f tokens/s", done, values[-1], self.tokens_per_second)
        self.pending, self.tokens, self._began = [], 0, now
        return len(values)


def fit_mapping(
    model,
    tokenizer,
    texts,
    regularizer,
    *,
    steps: int = 500,
    batch_size: int = 16,
    max_length: int = 128,
    learning_rate: float = 1e-3,
    weight_decay: float = 0.01,
    warmup_ratio: float = 0.1,
    max_grad_norm: float = 1.0,
    mask_probability: float = 0.15,
    corrupt_inputs: bool = True,
    checkpoint_dir: str | os.PathLike | None = None,
    save_every: int = 100,
    resume: bool = True,
    seed: int = 0,
    progress: bool = True,
    backend: str | None = None,
    precision: str = "fp32",
    text_column: str = "text",
    backbone_dtype: str | None = "auto",
    log_every: int = 10,
    packing: bool = False,
) -> dict:
    """Fit the regulariser's mapping g (and a trainable tail) on ``texts`` with the PLM frozen.

    Each step takes ``batch_size`` texts (tokenised as they are needed, truncated to
    ``max_length``), picks about ``mask_probability`` of the ordinary tokens as targets (their own
    ids become the labels; with ``corrupt_inputs`` the inputs are corrupted as in masked-LM
    training: 80% [MASK], 10% random, 10% kept; never for a causal regulariser,
    ``shift_labels=True``), runs the PLM's backbone frozen, in eval mode and without autograd, and
    takes one AdamW step on R (linear warmup over ``warmup_ratio * steps``, then linear decay;
    gradient-norm clipping). The hidden states are captured with :class:`~sbpet.hf.BridgeCapture`.

    Which texts a step takes:
        - a list (any ``Sequence``) of strings, blank ones dropped: an epoch-wise shuffle seeded by
          ``seed`` (:func:`~sbpet.hf.corpus.batch_indices`);
        - a map-style ``datasets.Dataset``: its ``text_column``, shuffled alike, read row by row;
        - any other iterable (a generator, an endless stream, a ``datasets.IterableDataset`` whose
          rows hold ``text_column``, :class:`~sbpet.hf.corpus.TextFiles`): consecutive chunks of
          ``batch_size`` non-blank texts in stream order; training starts at once, the stream is
          never held whole. A re-iterable one starts again when it ends; a one-shot iterator that
          ends before the last step is an error. Resuming skips the ``step * batch_size`` texts
          already used.

    The engine is accelerate's ``Accelerator``: it wraps g for the process group that ``torchrun``
    or ``accelerate launch`` started (DistributedDataParallel; gloo on CPU, nccl on CUDA), steps
    the optimizer and scheduler, clips, and saves and restores their state. ``batch_size`` is the
    global batch: every process reads the same texts and builds the same batch, runs rows
    ``rank::N`` of it through the backbone, and g's gradients and R are summed over the processes,
    each weighted by its share of the batch's regularised positions, so the loss history and g
    are those of one process (up to float rounding). Every process starts from rank 0's g. The
    frozen backbone is not the engine's: it runs as given on each process (a PLM too large for
    one device can be sharded beforehand, e.g. with ``fully_shard``; its forward is called alike
    on every process). Put each process's model on its own device (``cuda:LOCAL_RANK``).

    Args:
        model: the PLM (``PreTrainedModel``); it is not changed.
        tokenizer: its tokenizer. texts: the corpus, as above.
        regularizer: the :class:`~sbpet.BridgeRegularizer` to fit, trained in place on the
            model's device; frozen again when done.
        checkpoint_dir: where ``checkpoint/`` (``save_pretrained`` files, ``fit_state.json``: step,
            loss ``history`` and settings, and ``engine/``: accelerate's ``save_state`` of the
            optimizer, scheduler and g) is written every ``save_every`` steps and at the end,
            swapped in so that a complete copy exists at every instant (docs/safety.md). With
            ``resume`` an existing checkpoint there is loaded and the run continues from its step
            with the same data; one from other settings (any fitting hyperparameter, the
            regulariser's configuration, another model) is an error naming what differs. Nothing
            there is unpickled. ``resume=False`` removes an earlier checkpoint only when it holds
            nothing but a checkpoint's files (else a ValueError naming the foreign file). One fit at
            a time: a second fit into the same ``checkpoint_dir`` is refused (``checkpoint.lock``).
        backend: ``"auto"``, ``"reference"``, ``"torch"`` or ``"triton"`` (None: the
            regulariser's ``backend``; see :mod:`sbpet.backends.dispatch`).
        precision: g's products while fitting; ``"fp32"`` by default whatever the regulariser's
            own setting, because R of a fitted g is a cancelling difference (docs/precision.md).
        text_column: the column of a ``datasets`` dataset (or the key of mapping rows) holding the text.
        backbone_dtype: the frozen backbone's autocast dtype: ``"auto"`` (bf16 on a CUDA device
            that has it, none elsewhere), ``"bf16"``, ``"fp16"``, or ``"fp32"``/None (no
            autocast). g's own products stay at ``precision``, whatever mixed precision the
            engine was launched with.
        log_every: R is read back from the device every ``log_every`` steps (and at each
            checkpoint), not every step; the progress bar and the ``sbpet.hf.fitting`` logger then
            show R and tokens per second. A non-finite R is reported (FloatingPointError) then.
        packing: each process's rows of a step are packed into one row of real tokens (no
            padding is computed; ``position_ids`` restart at 0 for each text), as transformers'
            ``DataCollatorWithFlattening`` packs: the way a large corpus is read fast. The same
            texts, targets and R as unpacked (one context per text). The backbone must keep packed
            sequences apart from ``position_ids`` alone: a flash-attention implementation
            (``attn_implementation="flash_attention_2"``, ``"flash_attention_3"`` or a hub flash
            kernel); any other raises ValueError.

    Returns:
        ``{"loss": [R per step], "steps": steps, "resumed_from": step or 0}``.

    Example:
        >>> reg = BridgeRegularizer(384, 6, dims=(256, 64), word_embeddings=model.get_input_embeddings().weight)
        >>> history = fit_mapping(model, tokenizer, texts, reg, steps=300, checkpoint_dir="g")
        >>> reg.save_pretrained("g_final")
    """
    from tqdm.auto import tqdm

    if steps < 1 or batch_size < 1:
        raise ValueError(f"steps and batch_size must be >= 1, got {steps} and {batch_size}")
    check_precision(precision)
    if backend is not None:
        check_backend_name(backend)
    if not 0 < mask_probability <= 1:
        raise ValueError(f"mask_probability must be in (0, 1], got {mask_probability}")
    texts = fitting_texts(texts, text_column)
    backbone, _ = find_backbone_and_layers(model)
    device = next(backbone.parameters()).device
    accelerator = _engine(device)
    rank, world = accelerator.process_index, accelerator.num_processes
    if batch_size < world:
        raise ValueError(f"batch_size ({batch_size}) is the global batch: it must be >= the {world} processes")
    if packing:
        _check_packing(backbone)
    autocast_dtype = _autocast_dtype(backbone_dtype, device)
    # g is for this model: its sizes and word embeddings (a g built for another model is an error)
    check_model_matches(regularizer.config, model, "the regulariser")
    fingerprint = embedding_fingerprint(model.get_input_embeddings()) if hasattr(model, "get_input_embeddings") else None
    if fingerprint is not None:
        regularizer.config["model_fingerprint"] = fingerprint  # saved with g: which PLM it was fitted for
    signature = fit_signature(
        regularizer, model, steps=steps, batch_size=batch_size, max_length=max_length, seed=seed,
        learning_rate=learning_rate, weight_decay=weight_decay, warmup_ratio=warmup_ratio,
        max_grad_norm=max_grad_norm, mask_probability=mask_probability, corrupt_inputs=bool(corrupt_inputs),
        precision=precision, backbone_dtype=None if autocast_dtype is None else str(autocast_dtype).removeprefix("torch."),
        texts=len(texts) if hasattr(texts, "__getitem__") and hasattr(texts, "__len__") else "stream",
        packing=bool(packing))
    was_training = model.training
    grad_flags = [(p, p.requires_grad) for p in model.parameters()]
    with checkpoint_lock(checkpoint_dir, accelerator):
        problem = None
        if checkpoint_dir is not None and accelerator.is_main_process and has_checkpoint(checkpoint_dir):
            try:
                if resume:
                    recover_checkpoint(checkpoint_dir)  # an interrupted save's complete copy takes the final name
                else:  # start again: only a checkpoint's own files are removed (else a ValueError naming one)
                    for path in checkpoint_folders(checkpoint_dir):
                        remove_checkpoint_folder(path)
            except ValueError as exc:
                problem = str(exc)
        if world > 1:  # every process stops alike (none waits for rank 0 at the first save)
            from accelerate.utils import broadcast_object_list

            problem = broadcast_object_list([problem])[0]
        if problem is not None:
            raise ValueError(problem)
        return _fit(model, tokenizer, texts, regularizer, accelerator, backbone, device, autocast_dtype, signature,
                    was_training, grad_flags, steps=steps, batch_size=batch_size, max_length=max_length,
                    learning_rate=learning_rate, weight_decay=weight_decay, warmup_ratio=warmup_ratio,
                    max_grad_norm=max_grad_norm, mask_probability=mask_probability, corrupt_inputs=corrupt_inputs,
                    checkpoint_dir=checkpoint_dir, save_every=save_every, resume=resume, seed=seed,
                    progress=progress, backend=backend, precision=precision, log_every=log_every,
                    text_column=text_column, packing=packing)


def _fit(model, tokenizer, texts, regularizer, accelerator, backbone, device, autocast_dtype, signature, was_training,
         grad_flags, *, steps, batch_size, max_length, learning_rate, weight_decay, warmup_ratio, max_grad_norm,
         mask_probability, corrupt_inputs, checkpoint_dir, save_every, resume, seed, progress, backend, precision,
         log_every, text_column, packing):
    from tqdm.auto import tqdm

    rank, world = accelerator.process_index, accelerator.num_processes
    capture, bar = None, None
    try:
        model.eval()
        model.requires_grad_(False)
        regularizer.to(device)
        regularizer.train()
        regularizer.mapping.requires_grad_(True)
        if isinstance(regularizer.tail, torch.nn.Parameter):
            regularizer.tail.requires_grad_(True)
        # The PDF regulariser needs only each layer's context and regularised rows (hooks); the SDE
        # regulariser reads whole token paths, so it takes the model's hidden states.
        is_pdf = regularizer.config.get("kind", "pdf") == "pdf"
        capture = BridgeCapture(backbone, regularizer, backend, precision) if is_pdf else None
        params = [p for p in regularizer.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(params, lr=learning_rate, weight_decay=weight_decay)
        warmup = int(round(warmup_ratio * steps))
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, _schedule(warmup, steps))
        # Under a process group the engine wraps g for data parallelism (DDP broadcasts rank 0's g
        # to every process, as a seeded init may differ by rank) and averages its gradients.
        step_module, optimizer, scheduler = accelerator.prepare(
            _FitStep(backbone, regularizer, capture, autocast_dtype), optimizer, scheduler)

        start, history = 0, []
        if checkpoint_dir is not None and resume and os.path.isdir(os.path.join(checkpoint_dir, CHECKPOINT_NAME)):
            start, history = load_checkpoint(checkpoint_dir, model, regularizer, accelerator, optimizer,
                                              scheduler, signature)
        resumed_from = start
        batches = text_batches(texts, batch_size, seed, start, text_column)
        pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        causal, ignore = regularizer.shift_labels, regularizer.ignore_index
        log = _FitLog(history, max(1, log_every), max(1, save_every))
        bar = tqdm(total=steps, initial=start, desc="fitting g", disable=not progress or rank != 0,
                   dynamic_ncols=True)
        for step in range(start, steps):
            gen = torch.Generator().manual_seed(seed * 1_000_003 + step)
            rows = tokenise_texts(tokenizer, next(batches), max_length)
            input_ids, attention_mask, labels = make_fitting_batch(
                rows, range(len(rows)), pad_id, tokenizer.mask_token_id, len(tokenizer), mask_probability,
                corrupt_inputs, causal, ignore, gen,
            )
            log.tokens += int(attention_mask.sum())  # the global batch's, counted on the host
            weight = 1.0
            if world > 1:  # this process's share of the global batch, weighted by its positions
                mine = slice(rank, None, world)
                weight = _regularised_count(labels[mine], causal, ignore) / max(
                    1, _regularised_count(labels, causal, ignore))
                input_ids, attention_mask, labels = input_ids[mine], attention_mask[mine], labels[mine]
            if packing:  # one row of real tokens per process: no mask, positions restart per text
                input_ids, labels, position_ids = pack_fitting_batch(input_ids, attention_mask, labels)
                host = _HostCopies(labels, None, position_ids)  # positions and sequences found on the host
                loss = step_module(input_ids.to(device), None, labels.to(device), host, position_ids.to(device))
            else:
                host = _HostCopies(labels, attention_mask)  # positions found on the host: no device read
                loss = step_module(input_ids.to(device), attention_mask.to(device), labels.to(device), host)
            # The engine averages g's gradients over the processes: scaled by the process count,
            # each share counts by its positions, and the sum is the global batch's R.
            accelerator.backward(loss * (weight * world))
            if max_grad_norm and max_grad_norm > 0:
                accelerator.clip_grad_norm_(params, max_grad_norm)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            value = loss.detach() * weight
            log.add(accelerator.reduce(value, "sum") if world > 1 else value)
            done = step + 1
            if log.due(done, steps):  # R is read back here, not every step
                bar.update(log.flush(done))
                bar.set_postfix(R=f"{history[-1]:.4f}", tok_s=f"{log.tokens_per_second:.0f}",
                                lr=f"{scheduler.get_last_lr()[0]:.2e}")
            if done % max(1, save_every) == 0 or done == steps:
                check_deferred()  # the input checks deferred since the last one (sbpet.core.checks)
                if checkpoint_dir is not None:
                    _save_checkpoint(checkpoint_dir, accelerator, regularizer, done, history, signature)
    finally:
        if bar is not None:
            bar.close()
        if capture is not None:
            capture.remove()
        regularizer.requires_grad_(False)
        regularizer.eval()
        for p, flag in grad_flags:
            p.requires_grad_(flag)
        model.train(was_training)
    return {"loss": history, "steps": steps, "resumed_from": resumed_from}
