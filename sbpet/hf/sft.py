"""BridgeSFTTrainer: TRL's ``SFTTrainer`` with the bridge regulariser (``pip install "sbpet[trl]"``).

Imported on first use (``sbpet.BridgeSFTTrainer``, ``sbpet.hf.BridgeSFTTrainer``); without TRL the
import raises an ImportError that says what to install.
"""

from __future__ import annotations

try:
    from trl import SFTTrainer
except ImportError as exc:  # trl is an optional extra
    raise ImportError(
        'BridgeSFTTrainer needs TRL, an optional extra of sbpet: pip install "sbpet[trl]" '
        '(or pip install -e ".[trl]" in a checkout)'
    ) from exc

from .trainer import BridgeTrainerMixin

__all__ = ["BridgeSFTTrainer"]


class BridgeSFTTrainer(BridgeTrainerMixin, SFTTrainer):
    """TRL's ``SFTTrainer`` training on ``task_loss + bridge_weight * R``, as
    :class:`~sbpet.hf.BridgeTrainer` is the ``Trainer``'s.

    Args:
        bridge, bridge_weight, capture, backend, precision: as :class:`~sbpet.hf.BridgeTrainer`.
            For a causal LM the regulariser must be built (and g fitted) with
            ``shift_labels=True``: the state at s is paired with token s+1, the one it predicts
            (a regulariser without it is said: :func:`sbpet.hf.models.check_shift_labels`).
        *args, **kwargs: as ``trl.SFTTrainer`` (``model``, ``args=SFTConfig(...)``,
            ``train_dataset``, ``peft_config``, ``processing_class``, ...).

    Regularised positions: every token TRL trains on, i.e. the ``labels`` its collator builds
    (-100 on padding, and on the prompt with ``completion_only_loss`` / ``assistant_only_loss``),
    each state paired with the next token by the regulariser's causal shift. A ``data_collator``
    of your own that adds ``bridge_labels`` [B, S] to the batch overrides them (TRL's collators
    build ``labels`` only).

    What TRL does stays TRL's: the completion-only loss, ``padding_free``, ``packing``,
    ``peft_config`` (the model is wrapped before the capture's hooks are placed), its metrics. One
    model forward per training step: TRL's ``compute_loss`` is asked for the model's outputs only
    when its caller asks for them (with ``return_outputs=True`` TRL runs a second forward with
    the full logits and warns that it is deprecated), and the task loss is TRL's own, normalised by
    the Trainer's ``num_items_in_batch`` (so the first batch's probe of
    :meth:`~sbpet.hf.BridgeTrainer.check_loss_uses_num_items` is not run). Logs
    ``task_loss`` and ``bridge_loss`` next to TRL's, ``eval_bridge_loss`` on evaluation; the
    regulariser is saved with every checkpoint and loaded back on resuming.

    Example:
        >>> from peft import LoraConfig
        >>> from trl import SFTConfig
        >>> reg = BridgeRegularizer.from_pretrained("g_dir", model=model)     # shift_labels=True
        >>> trainer = BridgeSFTTrainer(
        ...     model=model, args=SFTConfig("out", padding_free=True), train_dataset=train,
        ...     processing_class=tokenizer, peft_config=LoraConfig(r=16, target_modules=["q_proj", "v_proj"]),
        ...     bridge=reg, bridge_weight=0.1)
        >>> trainer.train()
    """

    # TRL's compute_loss normalises its loss by num_items_in_batch itself: nothing to probe.
    probe_loss_num_items = False
