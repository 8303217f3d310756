"""Fitting g on plain text with the PLM frozen (docs/METHOD.md "Fitting g")."""

from __future__ import annotations

import math
import os
import shutil
from collections.abc import Sequence

import torch

from ..backends.dispatch import check_backend_name
from .capture import BridgeCapture, find_backbone_and_layers
from ..core.precision import check_precision

__all__ = ["fit_mapping", "tokenise_texts", "make_fitting_batch", "CHECKPOINT_NAME", "FIT_STATE_NAME"]

CHECKPOINT_NAME = "checkpoint"
FIT_STATE_NAME = "fit_state.pt"


def _schedule(warmup: int, total: int):
    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return max(0.0, (total - step) / max(1, total - warmup))

    return factor


def tokenise_texts(tokenizer, texts: Sequence[str], max_length: int):
    """Tokenise ``texts`` (truncated to ``max_length``) as :func:`fit_mapping` does: one
    (input ids [S] long, special-token mask [S] bool) pair per text."""
    encoded = tokenizer(list(texts), truncation=True, max_length=max_length)
    rows = []
    for ids in encoded["input_ids"]:
        special = tokenizer.get_special_tokens_mask(ids, already_has_special_tokens=True)
        rows.append((torch.tensor(ids, dtype=torch.long), torch.tensor(special, dtype=torch.bool)))
    return rows


def _batch_indices(step: int, batch_size: int, count: int, seed: int) -> list[int]:
    """Deterministic in (seed, step): an epoch-wise shuffle, so a resumed run sees the same data."""
    out = []
    for k in range(step * batch_size, (step + 1) * batch_size):
        epoch, offset = divmod(k, count)
        perm = torch.randperm(count, generator=torch.Generator().manual_seed(seed * 7919 + epoch))
        out.append(int(perm[offset]))
    return out


def make_fitting_batch(rows, indices, pad_id, mask_id, vocab, probability, corrupt, causal, ignore, gen):
    """One of :func:`fit_mapping`'s batches from :func:`tokenise_texts`'s ``rows``: pad, choose ~``probability`` of the ordinary tokens as targets (at least one per
    sequence), and corrupt the inputs as in masked-LM training (80% [MASK], 10% random, 10%
    kept) unless the model is causal. Returns input_ids, attention_mask, labels [B, S]."""
    length = max(rows[i][0].numel() for i in indices)
    batch = len(indices)
    input_ids = torch.full((batch, length), pad_id, dtype=torch.long)
    attention_mask = torch.zeros(batch, length, dtype=torch.long)
    labels = torch.full((batch, length), ignore, dtype=torch.long)
    for b, i in enumerate(indices):
        ids, special = rows[i]
        n = ids.numel()
        input_ids[b, :n] = ids
        attention_mask[b, :n] = 1
        candidates = (~special).nonzero().squeeze(1)
        if causal:
            candidates = candidates[candidates >= 1]  # the first token has no predecessor state
        if candidates.numel() == 0:
            continue
        chosen = candidates[torch.rand(candidates.numel(), generator=gen) < probability]
        if chosen.numel() == 0:
            chosen = candidates[torch.randint(candidates.numel(), (1,), generator=gen)]
        labels[b, chosen] = ids[chosen]
        if corrupt and not causal and mask_id is not None:
            draw = torch.rand(chosen.numel(), generator=gen)
            masked, randomised = chosen[draw < 0.8], chosen[(draw >= 0.8) & (draw < 0.9)]
            input_ids[b, masked] = mask_id
            input_ids[b, randomised] = torch.randint(vocab, (randomised.numel(),), generator=gen)
    return input_ids, attention_mask, labels


def _save_checkpoint(directory, regularizer, optimizer, scheduler, step, history, signature):
    final = os.path.join(directory, CHECKPOINT_NAME)
    partial = final + ".partial"
    shutil.rmtree(partial, ignore_errors=True)
    regularizer.save_pretrained(partial)
    torch.save(
        {"step": step, "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
         "history": history, "signature": signature},
        os.path.join(partial, FIT_STATE_NAME),
    )
    # Swap in the finished checkpoint only once it is complete: an interrupted save never
    # replaces a good one.
    shutil.rmtree(final, ignore_errors=True)
    os.replace(partial, final)


def _load_checkpoint(directory, model, regularizer, optimizer, scheduler, signature):
    from ..modules.regularizer import BridgeRegularizer

    path = os.path.join(directory, CHECKPOINT_NAME)
    state_path = os.path.join(path, FIT_STATE_NAME)
    if not os.path.isfile(state_path):
        raise ValueError(f"{state_path} does not exist: not a fit_mapping checkpoint")
    saved = BridgeRegularizer.from_pretrained(path, model=model)
    try:
        regularizer.load_state_dict(saved.state_dict())
    except RuntimeError as exc:
        raise ValueError(f"the checkpoint in {path} does not match this regulariser: {exc}") from exc
    try:
        state = torch.load(state_path, map_location="cpu", weights_only=False)
    except Exception as exc:  # torch raises several kinds for a damaged file
        raise ValueError(f"{state_path} is damaged: {exc}") from exc
    if state.get("signature") != signature:
        raise ValueError(
            f"the checkpoint in {path} was made with {state.get('signature')} but this run uses "
            f"{signature}: remove it or use another checkpoint_dir"
        )
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    return int(state["step"]), list(state["history"])


def fit_mapping(
    model,
    tokenizer,
    texts: Sequence[str],
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
) -> dict:
    """Fit the regulariser's mapping g (and a trainable tail) on ``texts`` with the PLM frozen.

    Each step takes ``batch_size`` texts (tokenised, truncated to ``max_length``), picks about
    ``mask_probability`` of the ordinary tokens as targets (their own ids become the labels; with
    ``corrupt_inputs`` the inputs are corrupted as in masked-LM training: 80% [MASK], 10% random,
    10% kept; never for a causal regulariser, ``shift_labels=True``), runs the PLM's backbone
    frozen, in eval mode and without autograd, and takes one AdamW step on R (linear warmup over
    ``warmup_ratio * steps``, then linear decay; gradient-norm clipping). The hidden states are
    captured with :class:`~sbpet.hf.BridgeCapture`.

    Args:
        model: the PLM (``PreTrainedModel``); it is not changed.
        tokenizer: its tokenizer. texts: the corpus (strings).
        regularizer: the :class:`~sbpet.BridgeRegularizer` to fit, trained in place on the
            model's device; frozen again when done.
        checkpoint_dir: where ``checkpoint/`` (``save_pretrained`` files plus optimizer,
            scheduler, step and loss history) is written every ``save_every`` steps and at the end.
            With ``resume`` an existing checkpoint there is loaded and the run continues from
            its step with the same data order; a checkpoint from different settings is an error.
        backend: ``"auto"``, ``"reference"``, ``"torch"`` or ``"triton"`` (None: the
            regulariser's ``backend``; see :mod:`sbpet.backends.dispatch`).
        precision: g's products while fitting; ``"fp32"`` by default whatever the regulariser's
            own setting, because R of a fitted g is a cancelling difference (README "Precision").

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
    texts = [t for t in texts if isinstance(t, str) and t.strip()]
    if not texts:
        raise ValueError("texts is empty: fit_mapping needs some text")
    backbone, _ = find_backbone_and_layers(model)
    device = next(backbone.parameters()).device
    was_training = model.training
    grad_flags = [(p, p.requires_grad) for p in model.parameters()]
    model.eval()
    model.requires_grad_(False)
    regularizer.to(device)
    regularizer.train()
    regularizer.mapping.requires_grad_(True)
    if isinstance(regularizer.tail, torch.nn.Parameter):
        regularizer.tail.requires_grad_(True)
    params = [p for p in regularizer.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=learning_rate, weight_decay=weight_decay)
    warmup = int(round(warmup_ratio * steps))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, _schedule(warmup, steps))
    signature = {"steps": steps, "batch_size": batch_size, "max_length": max_length,
                 "seed": seed, "mask_probability": mask_probability, "texts": len(texts)}

    start, history = 0, []
    if checkpoint_dir is not None and resume and os.path.isdir(os.path.join(checkpoint_dir, CHECKPOINT_NAME)):
        start, history = _load_checkpoint(checkpoint_dir, model, regularizer, optimizer, scheduler, signature)
    resumed_from = start

    rows = tokenise_texts(tokenizer, texts, max_length)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    causal = regularizer.shift_labels
    # The PDF regulariser needs only each layer's context and regularised rows (hooks); the SDE
    # regulariser reads whole token paths, so it takes the model's hidden states.
    is_pdf = regularizer.config.get("kind", "pdf") == "pdf"
    capture = BridgeCapture(backbone, regularizer, backend, precision) if is_pdf else None
    bar = tqdm(total=steps, initial=start, desc="fitting g", disable=not progress, dynamic_ncols=True)
    try:
        for step in range(start, steps):
            gen = torch.Generator().manual_seed(seed * 1_000_003 + step)
            indices = _batch_indices(step, batch_size, len(rows), seed)
            input_ids, attention_mask, labels = make_fitting_batch(
                rows, indices, pad_id, tokenizer.mask_token_id, len(tokenizer), mask_probability,
                corrupt_inputs, causal, regularizer.ignore_index, gen,
            )
            input_ids, attention_mask = input_ids.to(device), attention_mask.to(device)
            if capture is not None:
                with torch.no_grad(), capture.armed(labels.to(device), attention_mask):
                    backbone(input_ids=input_ids, attention_mask=attention_mask)
                loss = capture.loss()
            else:
                with torch.no_grad():
                    outputs = backbone(
                        input_ids=input_ids, attention_mask=attention_mask, output_hidden_states=True
                    )
                loss = regularizer(outputs.hidden_states, labels.to(device), attention_mask)  # the SDE one
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if max_grad_norm and max_grad_norm > 0:
                torch.nn.utils.clip_grad_norm_(params, max_grad_norm)
            optimizer.step()
            scheduler.step()
            value = float(loss.detach())
            if not math.isfinite(value):
                raise FloatingPointError(f"R became {value} at step {step}: lower the learning rate")
            history.append(value)
            bar.update(1)
            bar.set_postfix(R=f"{value:.4f}", lr=f"{scheduler.get_last_lr()[0]:.2e}")
            done = step + 1
            if checkpoint_dir is not None and (done % max(1, save_every) == 0 or done == steps):
                _save_checkpoint(checkpoint_dir, regularizer, optimizer, scheduler, done, history, signature)
    finally:
        bar.close()
        if capture is not None:
            capture.remove()
        regularizer.requires_grad_(False)
        regularizer.eval()
        for p, flag in grad_flags:
            p.requires_grad_(flag)
        model.train(was_training)
    return {"loss": history, "steps": steps, "resumed_from": resumed_from}
