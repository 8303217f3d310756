"""BridgeTrainer: ``transformers.Trainer`` with the bridge regulariser as a running cost.

The regulariser's part of a trainer is written once, in :class:`BridgeTrainerMixin` (the loss, the
gradient-accumulation scaling, the logs, evaluation's R, the regulariser in checkpoints); a trainer
class is the mixin in front of a ``transformers.Trainer`` subclass: :class:`BridgeTrainer` here, TRL's
in :mod:`sbpet.hf.sft` (:class:`~sbpet.hf.sft.BridgeSFTTrainer`), a user's own the same way.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Mapping

import torch
from transformers import Trainer

from ..core.checks import check_deferred
from ..backends.dispatch import check_backend_name
from .batches import (
    BRIDGE_LABELS_KEY,
    HOST_KEY,
    POSITIONS_KEY,
    CountingCollator,
    HostCopies,
    backbone_states,
    regularised_positions,
)
from .capture import PACKING_KEYS, BridgeCapture, align_to_states, num_virtual_tokens, packing_arguments
from .models import check_shift_labels
from ..core.precision import check_precision
from ..modules.regularizer import check_fits_model

__all__ = ["BridgeTrainer", "BridgeTrainerMixin", "BRIDGE_LABELS_KEY", "POSITIONS_KEY", "REGULARIZER_DIR",
           "regularised_positions"]

REGULARIZER_DIR = "sbpet_regularizer"

logger = logging.getLogger(__name__)


class BridgeTrainerMixin:
    """The bridge regulariser for a ``transformers.Trainer`` subclass: put it first in the bases.

    ``class MyTrainer(BridgeTrainerMixin, SomeTrainer)`` trains on ``task_loss + bridge_weight * R``
    with everything :class:`BridgeTrainer` documents (its keyword arguments ``bridge``,
    ``bridge_weight``, ``capture``, ``backend``, ``precision``, the logs, gradient accumulation,
    evaluation's R, the regulariser in checkpoints), whatever ``SomeTrainer`` does with its task
    loss, as long as its ``compute_loss`` runs the model's forward once: the capture is armed around
    it, and R is taken from that forward (hooks, or the backbone's ``hidden_states``). The parent's
    ``compute_loss`` is asked for the model's outputs only when its caller asks for them.
    :class:`BridgeTrainer` is ``BridgeTrainerMixin`` + ``transformers.Trainer``;
    :class:`~sbpet.hf.sft.BridgeSFTTrainer` is ``BridgeTrainerMixin`` + ``trl.SFTTrainer``.

    Example:
        >>> class WeightedLossTrainer(Trainer):          # a user's Trainer with its own task loss
        ...     def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        ...         ...
        >>> class BridgeWeightedLossTrainer(BridgeTrainerMixin, WeightedLossTrainer):
        ...     pass
        >>> trainer = BridgeWeightedLossTrainer(model=model, args=args, train_dataset=train,
        ...                                     bridge=regularizer, bridge_weight=0.1)
    """

    #: Probe on the first training batch whether the model's loss divides by the Trainer's
    #: ``num_items_in_batch`` (:meth:`check_loss_uses_num_items`). A subclass whose
    #: ``compute_loss`` normalises the task loss itself (TRL's SFTTrainer) sets it to False.
    probe_loss_num_items = True

    def __init__(self, *args, bridge=None, bridge_weight: float = 0.1, capture: str | None = None,
                 backend: str | None = None, precision: str | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        if capture is None:
            # Hooks capture what the PDF regulariser needs; the SDE one needs the whole states.
            capture = "hooks" if getattr(bridge, "config", {}).get("kind", "pdf") == "pdf" else "hidden_states"
        if capture not in ("hooks", "hidden_states"):
            raise ValueError(f"capture must be 'hooks' or 'hidden_states', got {capture!r}")
        if not float(bridge_weight) >= 0 or not math.isfinite(float(bridge_weight)):  # NaN fails the first test
            raise ValueError(f"bridge_weight must be a finite number >= 0, got {bridge_weight}")
        if self.args.n_gpu > 1:
            raise ValueError(
                f"{type(self).__name__} does not support torch.nn.DataParallel (n_gpu > 1): launch with "
                "torchrun for DistributedDataParallel"
            )
        is_pdf = getattr(bridge, "config", {}).get("kind", "pdf") == "pdf"
        if (backend is not None or precision is not None) and not is_pdf:
            raise ValueError("backend= and precision= apply to the PDF regulariser (BridgeRegularizer) only")
        if backend is not None:
            check_backend_name(backend)
        if precision is not None:
            check_precision(precision)
        self._bridge_options = {k: v for k, v in (("backend", backend), ("precision", precision)) if v is not None}
        self.bridge = bridge
        self.bridge_weight = float(bridge_weight)
        self.capture_mode = capture
        self._bridge_capture = None
        if bridge is not None:
            bridge.to(self.args.device)
            bridge.requires_grad_(False)
            bridge.eval()
            if capture == "hooks":  # (the capture checks the model: sbpet.hf.models.check_model)
                self._bridge_capture = BridgeCapture(self.model, bridge, backend, precision)
            else:
                check_fits_model(bridge, self.model)
                check_shift_labels(self.model, bridge)
        self._bridge_sums = None
        self._bridge_last_logged = 0
        self._loss_kwargs_checked = False
        self._eval_bridge_sums = None
        self._host_inputs: dict = {}
        # The optimizer step's regularised positions: id(micro-batch) -> (its count, the step's).
        self._step_counts: dict = {}
        self._step_share = None

    def _prepare_inputs(self, inputs):
        """``Trainer._prepare_inputs``, keeping the host copies of the labels, mask and packed
        boundaries that the collator made (:class:`HostCopies`; else the batch's own CPU tensors):
        positions are found there, with no device read (:mod:`sbpet.core.positions`)."""
        copies = inputs.pop(HOST_KEY, None) if isinstance(inputs, Mapping) else None
        host = copies.tensors if isinstance(copies, HostCopies) else HostCopies.of(inputs).tensors
        prepared = super()._prepare_inputs(inputs)
        self._host_inputs = host
        return prepared

    def _get_dataloader(self, *args, **kwargs):
        """``Trainer._get_dataloader`` with the data collator wrapped to count each batch's
        regularised positions where it runs, on the host (:data:`POSITIONS_KEY`); ``data_collator``
        itself stays the one given (TRL checks its type)."""
        collator = self.data_collator
        if self.bridge is not None and collator is not None:
            self.data_collator = CountingCollator(collator, self.bridge.ignore_index,
                                                   bool(getattr(self.bridge, "shift_labels", False)),
                                                   num_virtual_tokens(self.model))
        try:
            return super()._get_dataloader(*args, **kwargs)
        finally:
            self.data_collator = collator

    def _on_host(self, tensor, key: str):
        """The host copy of the batch's ``key`` when ``tensor`` is its device copy, else ``tensor``."""
        host = self._host_inputs.get(key)
        if isinstance(tensor, torch.Tensor) and host is not None and host.shape == tensor.shape:
            return host
        return tensor

    # Keep the bridge labels through the Trainer's removal of unused columns.
    def _set_signature_columns_if_needed(self):
        super()._set_signature_columns_if_needed()
        if BRIDGE_LABELS_KEY not in self._signature_columns:
            self._signature_columns.append(BRIDGE_LABELS_KEY)

    def _loss_is_scaled_for_ga(self, num_items_in_batch) -> bool:
        if self.loss_is_scaled_for_ga is not None:
            return bool(self.loss_is_scaled_for_ga)
        return bool(
            (self.model_accepts_loss_kwargs and num_items_in_batch is not None)
            or self.compute_loss_func is not None
        )

    def _bridge_labels(self, inputs, bridge_labels, required=True):
        if bridge_labels is not None:
            return bridge_labels
        labels = inputs.get("labels")
        if isinstance(labels, torch.Tensor) and labels.dim() == 2:
            return labels
        if not required:
            return None
        raise ValueError(
            f"{type(self).__name__} needs '{BRIDGE_LABELS_KEY}' [B, S] in each batch (see "
            "sbpet.hf.classification_bridge_labels / masked_lm_bridge_labels) or [B, S] 'labels'"
        )

    def check_loss_uses_num_items(self, model, inputs, num_items_in_batch) -> None:
        """Tell the Trainer whether the model's loss divides by ``num_items_in_batch``.

        transformers' Trainer counts the labelled items of the whole accumulated batch, passes the
        count to every forward whose signature has ``**kwargs`` and then, taking the loss as
        normalised over that batch, skips its division by the gradient accumulation steps (and
        multiplies by the process count when ``average_tokens_across_devices``). Many heads take
        ``**kwargs`` but compute a plain per-batch mean (BERT's masked-LM head and the
        sequence-classification heads: transformers issue #47688), so their task gradient came out
        GA times too large while R, a per-batch mean, was divided by GA: the effective alpha was
        alpha / GA. Called on the first training batch: the forward runs twice without gradients
        in eval mode (no dropout, no RNG drawn) with ``num_items_in_batch`` n and 2n (the losses
        summed over the processes, so all ranks decide alike); a loss that does not halve ignores
        the count, and ``model_accepts_loss_kwargs`` is set to False before this step's loss is
        scaled, so from then on the Trainer divides the task loss by GA and R follows it. Skipped
        when the loss does not come from the model (``compute_loss_func``, label smoothing) or when
        ``loss_is_scaled_for_ga`` is set; a batch whose probe loss is zero decides nothing.
        """
        if (self._loss_kwargs_checked or num_items_in_batch is None or not self.model_accepts_loss_kwargs
                or self.compute_loss_func is not None or self.label_smoother is not None
                or self.loss_is_scaled_for_ga is not None):
            return
        was_training = model.training
        model.eval()
        try:
            with torch.no_grad():
                losses = []
                for count in (num_items_in_batch, 2 * num_items_in_batch):
                    outputs = model(**inputs, num_items_in_batch=count)
                    loss = outputs.get("loss") if isinstance(outputs, dict) else outputs[0]
                    if not isinstance(loss, torch.Tensor):
                        self._loss_kwargs_checked = True  # no loss from the model: nothing to decide
                        return
                    losses.append(loss.detach().float().reshape(()))
        finally:
            model.train(was_training)
        pair = torch.stack(losses).nan_to_num(0.0, 0.0, 0.0)
        if self.accelerator.num_processes > 1:
            pair = self.accelerator.reduce(pair, "sum")
        with_n, with_2n = pair.abs().tolist()
        if with_2n == 0.0:
            return  # nothing counted in this batch: decide on a later one
        self._loss_kwargs_checked = True
        if with_n < 1.5 * with_2n:
            logger.info(
                "%s's loss ignores num_items_in_batch: the Trainer divides it by the gradient "
                "accumulation steps", type(self.accelerator.unwrap_model(model)).__name__,
            )
            self.model_accepts_loss_kwargs = False

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        inputs = dict(inputs)
        bridge_labels = inputs.pop(BRIDGE_LABELS_KEY, None)
        inputs.pop(POSITIONS_KEY, None)
        if model.training and self.probe_loss_num_items:
            self.check_loss_uses_num_items(model, inputs, num_items_in_batch)
        if self.bridge is None or not model.training:
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        from_key = BRIDGE_LABELS_KEY if bridge_labels is not None else "labels"
        bridge_labels = self._on_host(self._bridge_labels(inputs, bridge_labels), from_key)
        attention_mask = self._on_host(inputs.get("attention_mask"), "attention_mask")
        packing = packing_arguments({key: self._on_host(inputs.get(key), key) for key in PACKING_KEYS})
        self._host_inputs = {}
        # The parent runs the forward once; its outputs are asked for only when our caller wants
        # them (TRL's SFTTrainer runs a second, full-logits forward to return them).
        if self._bridge_capture is not None:
            with self._bridge_capture.armed(bridge_labels, attention_mask, **packing):
                result = super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
            bridge_loss = self._bridge_capture.loss()
        else:
            inputs["output_hidden_states"] = True
            with backbone_states(model) as states:
                result = super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
            labels, mask = align_to_states(
                bridge_labels, attention_mask, num_virtual_tokens(model), self.bridge.ignore_index
            )
            with torch.autocast(states[0][0].device.type, enabled=False):
                bridge_loss = self.bridge(states[0], labels, mask, **packing, **self._bridge_options)
        task_loss, outputs = result if return_outputs else (result, None)
        # R's share of the optimizer step: its sum over this micro-batch's regularised positions
        # divided by the count of the whole accumulated batch (the Trainer's num_items_in_batch
        # for R), so the step's gradient is that of one batch of all its samples however the
        # positions fall into micro-batches. Without the step's counts (compute_loss called outside
        # the training loop): R's per-micro-batch mean / GA.
        steps = max(1, int(getattr(self, "current_gradient_accumulation_steps", 1) or 1))
        scaled = self._loss_is_scaled_for_ga(num_items_in_batch)
        share = self._step_share if self._step_share is not None else 1.0 / steps
        # The Trainer divides a loss it takes as a per-batch mean by the accumulation steps itself.
        bridge_term = self.bridge_weight * bridge_loss.to(task_loss.dtype) * (share if scaled else share * steps)
        loss = task_loss + bridge_term
        # Contributions to the per-optimizer-step logs, scaled the way the Trainer's tr_loss is.
        task_share = task_loss.detach().float() * (1.0 if scaled else 1.0 / steps)
        bridge_share = bridge_loss.detach().float() * share
        sums = torch.stack([task_share, bridge_share])
        self._bridge_sums = sums if self._bridge_sums is None else self._bridge_sums + sums
        return (loss, outputs) if return_outputs else loss

    def get_batch_samples(self, epoch_iterator, num_batches, device):
        """``Trainer.get_batch_samples`` (the micro-batches of one optimizer step) and each one's
        regularised positions, as the trainer's collator counted them on the host
        (:data:`POSITIONS_KEY`; no device read), so that :meth:`compute_loss` takes R's mean over
        the whole accumulated batch. Batches from another collator are counted here, from their
        tensors as they lie (no read when there are no packing boundaries on a device). The count
        is per process (under DDP each process's R is its own positions' mean, and DDP averages the
        processes' gradients)."""
        batch_samples, num_items_in_batch = super().get_batch_samples(epoch_iterator, num_batches, device)
        self._step_counts = {}
        if self.bridge is not None:
            counts = [self._batch_count(batch) for batch in batch_samples]
            if counts and all(count is not None for count in counts):
                total = sum(counts)
                self._step_counts = {id(batch): (count, total) for batch, count in zip(batch_samples, counts)}
        return batch_samples, num_items_in_batch

    def _batch_count(self, batch):
        """The regularised positions of one collated micro-batch: an int when counted on the host,
        a 0-dim tensor on the labels' device otherwise (never read), None without labels."""
        if not isinstance(batch, Mapping):
            return None
        if isinstance(batch.get(POSITIONS_KEY), int):
            return batch[POSITIONS_KEY]
        labels = self._bridge_labels(batch, batch.get(BRIDGE_LABELS_KEY), required=False)
        if labels is None:
            return None
        count = self._regularised_count(labels, batch.get("attention_mask"), packing_arguments(batch))
        return int(count) if count.device.type == "cpu" else count

    def training_step(self, model, inputs, *args, **kwargs):
        """``Trainer.training_step``, with this micro-batch's share of the optimizer step's
        regularised positions (see :meth:`get_batch_samples`) for :meth:`compute_loss`."""
        count, total = self._step_counts.pop(id(inputs), (None, None))
        if count is not None:
            if isinstance(total, int):
                self._step_share = count / max(total, 1)
            else:
                self._step_share = count / torch.as_tensor(total).clamp(min=1)
        try:
            return super().training_step(model, inputs, *args, **kwargs)
        finally:
            self._step_share = None

    def _regularised_count(self, labels: torch.Tensor, attention_mask=None, packing=None) -> torch.Tensor:
        """How many positions of ``labels`` [B, S] R averages over (:func:`regularised_positions`
        with this run's regulariser and model)."""
        reg = self.bridge
        return regularised_positions(labels, attention_mask, ignore_index=reg.ignore_index,
                                     shift_labels=bool(getattr(reg, "shift_labels", False)),
                                     num_virtual=num_virtual_tokens(self.model), **(packing or {}))

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
        """``Trainer.prediction_step`` without ``bridge_labels`` in the model's inputs; with a
        regulariser and regularised positions, R of the batch is added to the evaluation's sums."""
        inputs = dict(inputs)
        bridge_labels = self._bridge_labels(inputs, inputs.pop(BRIDGE_LABELS_KEY, None), required=False)
        counted = inputs.pop(POSITIONS_KEY, None)
        if self.bridge is None or bridge_labels is None:
            return super().prediction_step(model, inputs, prediction_loss_only, ignore_keys)
        mask = inputs.get("attention_mask")
        packing = packing_arguments(inputs)
        if self._bridge_capture is not None:
            with self._bridge_capture.armed(bridge_labels, mask, **packing):
                result = super().prediction_step(model, inputs, prediction_loss_only, ignore_keys)
            with torch.no_grad():
                bridge_loss = self._bridge_capture.loss()
        else:
            # The states come back in the model's output: read them with a hook and keep them out
            # of the gathered predictions.
            if ignore_keys is None:
                config = getattr(self.model, "config", None)
                ignore_keys = list(getattr(config, "keys_to_ignore_at_inference", ["past_key_values"]))
            ignore_keys = [*ignore_keys, "hidden_states"]
            with backbone_states(model) as states:
                result = super().prediction_step(model, {**inputs, "output_hidden_states": True},
                                                 prediction_loss_only, ignore_keys)
            device = states[0][0].device
            # labels and mask as the batch holds them (the host, in the Trainer's loop): no device read
            labels, mask = align_to_states(bridge_labels, mask, num_virtual_tokens(model), self.bridge.ignore_index)
            with torch.no_grad(), torch.autocast(device.type, enabled=False):
                bridge_loss = self.bridge(states[0], labels, mask, **packing, **self._bridge_options)
        if not isinstance(counted, int):
            counted = self._regularised_count(bridge_labels, inputs.get("attention_mask"), packing)
        count = torch.as_tensor(counted).to(bridge_loss.device).float()
        sums = torch.stack([bridge_loss.detach().float() * count, count])
        self._eval_bridge_sums = sums if self._eval_bridge_sums is None else self._eval_bridge_sums + sums
        return result

    def evaluation_loop(self, dataloader, description, prediction_loss_only=None, ignore_keys=None,
                        metric_key_prefix="eval"):
        """``Trainer.evaluation_loop`` plus ``<prefix>_bridge_loss`` (R over all the regularised
        positions of the set, summed over the processes) and ``<prefix>_task_loss``."""
        self._eval_bridge_sums = None
        output = super().evaluation_loop(dataloader, description, prediction_loss_only, ignore_keys, metric_key_prefix)
        if self.bridge is not None:
            sums = self._eval_bridge_sums
            if sums is None:
                sums = torch.zeros(2, device=self.args.device)
            if self.accelerator.num_processes > 1:
                sums = self.accelerator.reduce(sums.to(self.args.device), "sum")
            weighted, count = sums.tolist()
            if count > 0:
                output.metrics[f"{metric_key_prefix}_bridge_loss"] = weighted / count
                if f"{metric_key_prefix}_loss" in output.metrics:
                    output.metrics[f"{metric_key_prefix}_task_loss"] = output.metrics[f"{metric_key_prefix}_loss"]
        self._eval_bridge_sums = None
        return output

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
        """``Trainer.save_model`` (used for every checkpoint too), then the regulariser with
        ``save_pretrained`` into ``<output_dir>/sbpet_regularizer`` (main process only)."""
        super().save_model(output_dir, _internal_call)
        if self.bridge is not None and self.args.should_save:
            self.bridge.save_pretrained(os.path.join(output_dir or self.args.output_dir, REGULARIZER_DIR))

    def load_regularizer(self, checkpoint: str | os.PathLike) -> None:
        """Load the regulariser saved in ``checkpoint`` (a Trainer checkpoint or ``save_model``
        folder) into ``bridge`` in place, so a resumed run goes on with the g it was trained with.
        While g is frozen (always, in BridgeTrainer) that is the same g; a different one given to
        the resumed run is replaced, with a warning. A checkpoint without a regulariser keeps
        ``bridge`` (warning); one of another kind or shape raises ValueError."""
        from ..modules.regularizer import BridgeRegularizer

        path = os.path.join(checkpoint, REGULARIZER_DIR)
        if not os.path.isdir(path):
            logger.warning("%s holds no %s: the run resumes with the regulariser it was given",
                           checkpoint, REGULARIZER_DIR)
            return
        saved = BridgeRegularizer.from_pretrained(path)
        if type(saved) is not type(self.bridge):
            raise ValueError(f"{path} holds a {type(saved).__name__}, but this run's regulariser is a "
                             f"{type(self.bridge).__name__}")
        state = self.bridge.state_dict()
        try:
            differs = any(not torch.equal(value.cpu(), state[key].cpu()) for key, value in saved.state_dict().items())
            self.bridge.load_state_dict(saved.state_dict())
        except (KeyError, RuntimeError) as exc:
            raise ValueError(f"the regulariser in {path} does not match this run's: {exc}") from exc
        if differs:
            logger.warning("the regulariser in %s differs from the one given: the resumed run uses the "
                           "checkpoint's", path)

    def train(self, resume_from_checkpoint=None, trial=None, ignore_keys_for_eval=None, **kwargs):
        """``Trainer.train``; resuming from a checkpoint also loads its regulariser
        (:meth:`load_regularizer`)."""
        if self.bridge is not None and resume_from_checkpoint:
            checkpoint = resume_from_checkpoint
            if isinstance(checkpoint, bool):
                from transformers.trainer_utils import get_last_checkpoint

                checkpoint = get_last_checkpoint(self.args.output_dir)
            if checkpoint is not None:  # None: the Trainer raises its own error
                self.load_regularizer(checkpoint)
        return super().train(resume_from_checkpoint, trial, ignore_keys_for_eval, **kwargs)

    def log(self, logs, start_time=None):
        if "loss" in logs:
            check_deferred()  # the value checks deferred since the last log (sbpet.core.checks): one read
        if "loss" in logs and self._bridge_sums is not None:
            steps = max(1, self.state.global_step - self._bridge_last_logged)
            sums = self._bridge_sums
            if self.accelerator.num_processes > 1:
                sums = self.accelerator.reduce(sums, "mean")
            task, bridge = (sums / steps).tolist()
            logs["task_loss"] = round(task, 6)
            logs["bridge_loss"] = round(bridge, 6)
            self._bridge_sums = None
            self._bridge_last_logged = self.state.global_step
        return super().log(logs, start_time)


class BridgeTrainer(BridgeTrainerMixin, Trainer):
    """A drop-in ``transformers.Trainer`` that trains on ``task_loss + bridge_weight * R``.

    Args:
        bridge: a fitted :class:`~sbpet.BridgeRegularizer` (None: a plain Trainer, with the
            gradient-accumulation check of the task loss below). It is moved
            to the training device, frozen (``requires_grad_(False)``, eval mode) and never
            handed to the optimizer: only the PET parameters train.
        bridge_weight: alpha.
        backend: ``"auto"``, ``"reference"``, ``"torch"`` or ``"triton"`` for R (None: the
            regulariser's ``backend``; see :mod:`sbpet.backends.dispatch`).
        precision: ``"fp32"``, ``"tf32"`` or ``"bf16"`` for g's products (None: the
            regulariser's ``precision``, "fp32" unless set; docs/precision.md).
        capture: ``"hooks"`` (:class:`~sbpet.hf.BridgeCapture`, only the contexts and the
            regularised rows are kept) or ``"hidden_states"`` (``output_hidden_states=True``;
            needed for regularisers other than the PDF one). Default: hooks for the PDF
            regulariser, hidden_states for the SDE one.
        *args, **kwargs: as ``transformers.Trainer``.

    Regularised positions: each batch may carry ``bridge_labels`` [B, S] (built with
    :func:`~sbpet.hf.masked_lm_bridge_labels`, :func:`~sbpet.hf.classification_bridge_labels`
    or :func:`~sbpet.hf.causal_lm_bridge_labels`); it is removed before the model's forward.
    Without it, a [B, S] ``labels`` (masked or causal LM) is used. Virtual tokens of prompt
    tuning are aligned automatically.

    Logs ``task_loss`` and ``bridge_loss`` (R, unweighted; both per optimizer step's batch)
    next to the Trainer's ``loss`` (= task_loss + alpha * bridge_loss). Gradient accumulation: an
    optimizer step over GA micro-batches accumulates the same gradient of task + alpha * R as one
    batch of the same samples, whatever number of regularised positions each micro-batch holds. R
    is the mean over all the regularised positions of the accumulated batch, as transformers takes
    the task loss over its ``num_items_in_batch``: the positions of every micro-batch of the step
    are counted from the collated labels on the host before the step (:meth:`get_batch_samples`),
    and each micro-batch's R enters as its sum over its positions divided by the step's count. The
    task loss is the Trainer's: divided by GA unless the model's loss really divides by the
    Trainer's ``num_items_in_batch``, which is checked on the first training batch (see
    :meth:`check_loss_uses_num_items`; transformers assumes it for any forward with ``**kwargs``,
    but BERT's heads and the sequence-classification heads ignore it). Under DDP the count is per
    process: R is each process's mean, averaged over the processes with the gradients. Mixed
    precision: R is computed in float32 with autocast off.

    Evaluation (``evaluate`` / ``predict``): ``eval_loss`` stays the task loss, as the Trainer
    computes it; with a regulariser, batches that carry ``bridge_labels`` (or [B, S] ``labels``)
    also give ``eval_bridge_loss``, R of the whole eval set with the same regulariser (the mean
    over all its regularised positions), and ``eval_task_loss`` (= ``eval_loss``).

    Checkpoints: :meth:`save_model` (so every checkpoint the Trainer writes, and
    ``trainer.save_model()``) also writes the regulariser with ``save_pretrained`` into
    ``<output_dir>/sbpet_regularizer`` (:data:`REGULARIZER_DIR`); ``train(resume_from_checkpoint=...)``
    loads it back into ``bridge`` (see :meth:`load_regularizer`).

    Example:
        >>> trainer = BridgeTrainer(model=peft_model, args=TrainingArguments("out"),
        ...                         train_dataset=train, data_collator=collate,
        ...                         bridge=BridgeRegularizer.from_pretrained(g_dir, model=peft_model),
        ...                         bridge_weight=0.1)
        >>> trainer.train()
    """
