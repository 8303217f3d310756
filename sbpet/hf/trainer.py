"""BridgeTrainer: ``transformers.Trainer`` with the bridge regulariser as a running cost."""

from __future__ import annotations

import torch
from transformers import Trainer

from ..backends.dispatch import check_backend_name
from .capture import BridgeCapture
from ..core.precision import check_precision

__all__ = ["BridgeTrainer", "BRIDGE_LABELS_KEY"]

BRIDGE_LABELS_KEY = "bridge_labels"


class BridgeTrainer(Trainer):
    """A drop-in ``transformers.Trainer`` that trains on ``task_loss + bridge_weight * R``.

    Args:
        bridge: a fitted :class:`~sbpet.BridgeRegularizer` (None: a plain Trainer). It is moved
            to the training device, frozen (``requires_grad_(False)``, eval mode) and never
            handed to the optimizer: only the PET parameters train.
        bridge_weight: alpha.
        backend: ``"auto"``, ``"reference"``, ``"torch"`` or ``"triton"`` for R (None: the
            regulariser's ``backend``; see :mod:`sbpet.dispatch`).
        precision: ``"fp32"``, ``"tf32"`` or ``"bf16"`` for g's products (None: the
            regulariser's ``precision``, "fp32" unless set; README "Precision").
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

    Logs ``task_loss`` and ``bridge_loss`` (R, unweighted) next to the Trainer's ``loss``
    (= task_loss + alpha * bridge_loss). Gradient accumulation: R is a per-micro-batch mean and is
    scaled exactly as the Trainer scales the task loss. Mixed precision: R is computed in float32
    with autocast off. Evaluation reports the task loss.

    Example:
        >>> trainer = BridgeTrainer(model=peft_model, args=TrainingArguments("out"),
        ...                         train_dataset=train, data_collator=collate,
        ...                         bridge=BridgeRegularizer.from_pretrained(g_dir, model=peft_model),
        ...                         bridge_weight=0.1)
        >>> trainer.train()
    """

    def __init__(self, *args, bridge=None, bridge_weight: float = 0.1, capture: str | None = None,
                 backend: str | None = None, precision: str | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        if capture is None:
            # Hooks capture what the PDF regulariser needs; the SDE one needs the whole states.
            capture = "hooks" if getattr(bridge, "config", {}).get("kind", "pdf") == "pdf" else "hidden_states"
        if capture not in ("hooks", "hidden_states"):
            raise ValueError(f"capture must be 'hooks' or 'hidden_states', got {capture!r}")
        if float(bridge_weight) < 0:
            raise ValueError(f"bridge_weight must be >= 0, got {bridge_weight}")
        if self.args.n_gpu > 1:
            raise ValueError(
                "BridgeTrainer does not support torch.nn.DataParallel (n_gpu > 1): launch with "
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
            if capture == "hooks":
                self._bridge_capture = BridgeCapture(self.model, bridge, backend, precision)
        self._bridge_sums = None
        self._bridge_last_logged = 0

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

    def _bridge_labels(self, inputs, bridge_labels):
        if bridge_labels is not None:
            return bridge_labels
        labels = inputs.get("labels")
        if isinstance(labels, torch.Tensor) and labels.dim() == 2:
            return labels
        raise ValueError(
            f"BridgeTrainer needs '{BRIDGE_LABELS_KEY}' [B, S] in each batch (see "
            "sbpet.hf.classification_bridge_labels / masked_lm_bridge_labels) or [B, S] 'labels'"
        )

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        inputs = dict(inputs)
        bridge_labels = inputs.pop(BRIDGE_LABELS_KEY, None)
        if self.bridge is None or not model.training:
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        bridge_labels = self._bridge_labels(inputs, bridge_labels)
        attention_mask = inputs.get("attention_mask")
        if self._bridge_capture is not None:
            with self._bridge_capture.armed(bridge_labels, attention_mask):
                task_loss, outputs = super().compute_loss(model, inputs, True, num_items_in_batch)
            bridge_loss = self._bridge_capture.loss()
        else:
            from .capture import align_to_states, num_virtual_tokens

            inputs["output_hidden_states"] = True
            task_loss, outputs = super().compute_loss(model, inputs, True, num_items_in_batch)
            labels, mask = align_to_states(
                bridge_labels, attention_mask, num_virtual_tokens(model), self.bridge.ignore_index
            )
            with torch.autocast(task_loss.device.type, enabled=False):
                bridge_loss = self.bridge(outputs.hidden_states, labels, mask, **self._bridge_options)
        # The Trainer divides a per-batch-mean loss by the accumulation steps itself; when the task
        # loss is already normalised over the accumulated batch, R (a per-batch mean) is scaled here.
        steps = max(1, int(getattr(self, "current_gradient_accumulation_steps", 1) or 1))
        scaled = self._loss_is_scaled_for_ga(num_items_in_batch)
        bridge_term = self.bridge_weight * bridge_loss.to(task_loss.dtype)
        if scaled:
            bridge_term = bridge_term / steps
        loss = task_loss + bridge_term
        # Contributions to the per-optimizer-step logs, scaled the way the Trainer's tr_loss is.
        share = 1.0 if scaled else 1.0 / steps
        task_share = task_loss.detach().float() * share
        bridge_share = bridge_loss.detach().float() / steps
        sums = torch.stack([task_share, bridge_share])
        self._bridge_sums = sums if self._bridge_sums is None else self._bridge_sums + sums
        return (loss, outputs) if return_outputs else loss

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
        inputs = {k: v for k, v in inputs.items() if k != BRIDGE_LABELS_KEY}
        return super().prediction_step(model, inputs, prediction_loss_only, ignore_keys)

    def log(self, logs, start_time=None):
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
