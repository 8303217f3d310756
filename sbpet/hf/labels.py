"""Bridge labels [B, S] for the three setups (prompt-based masked LM, sequence classification,
causal LM), and labels that regularise every real token, not only the prediction position.

Build them in the data collator, on the CPU: their checks read values, free on the host, and the
regulariser then finds its positions there too (docs/host-syncs.md).

The released BERT runs of the paper (by an accident of its ignore index) put every position into R;
the sound version of "every position" is what fitting g does for ordinary text: each real,
non-special token is regularised towards its own id, while the prediction position keeps its label
(in prompt-based tuning, the [MASK] towards its class's label word).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

__all__ = [
    "causal_lm_bridge_labels", "classification_bridge_labels", "every_token_bridge_labels", "masked_lm_bridge_labels",
]


def every_token_bridge_labels(
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    bridge_labels: torch.Tensor,
    special_token_ids: Sequence[int],
    ignore_index: int = -100,
) -> torch.Tensor:
    """``bridge_labels`` [B, S] with every real token that it leaves out (``ignore_index``) and that
    is not a special token regularised towards its own id.

    Args:
        input_ids, attention_mask: [B, S] (a position counts as real where the mask is nonzero).
        bridge_labels: the labels of the prediction positions, e.g. from
            :func:`~sbpet.hf.masked_lm_bridge_labels`; they are kept as they are.
        special_token_ids: ids never regularised towards themselves ([CLS], [SEP], [PAD], [MASK],
            ...: ``tokenizer.all_special_ids``).

    Returns:
        a new [B, S] long tensor.

    Example:
        >>> ids = torch.tensor([[101, 7, 103, 102, 0]])
        >>> mask = torch.tensor([[1, 1, 1, 1, 0]])
        >>> every_token_bridge_labels(ids, mask, torch.tensor([[-100, -100, 3000, -100, -100]]), [0, 101, 102, 103])
        tensor([[-100,    7, 3000, -100, -100]])
    """
    if not (input_ids.shape == attention_mask.shape == bridge_labels.shape):
        raise ValueError(
            f"input_ids, attention_mask and bridge_labels must have one shape, got {tuple(input_ids.shape)}, "
            f"{tuple(attention_mask.shape)} and {tuple(bridge_labels.shape)}"
        )
    special = torch.isin(input_ids, torch.as_tensor(list(special_token_ids), dtype=input_ids.dtype,
                                                    device=input_ids.device))
    own = (attention_mask != 0) & ~special & (bridge_labels == ignore_index)
    return torch.where(own, input_ids.long(), bridge_labels.long())


def _check_class_labels(class_labels: torch.Tensor, label_word_ids: Sequence[int], batch: int):
    if not isinstance(class_labels, torch.Tensor) or class_labels.shape != (batch,):
        raise ValueError(
            f"class_labels must be a [B] = [{batch}] tensor, got "
            f"{getattr(class_labels, 'shape', type(class_labels).__name__)}"
        )
    words = torch.as_tensor(list(label_word_ids), dtype=torch.long, device=class_labels.device)
    if words.dim() != 1 or words.numel() == 0:
        raise ValueError("label_word_ids must be a non-empty list of token ids, one per class")
    if bool(((class_labels < 0) | (class_labels >= words.numel())).any()):
        raise ValueError(f"class_labels must be in [0, {words.numel()}) (one label word per class)")
    return words[class_labels.long()]


def masked_lm_bridge_labels(
    input_ids: torch.Tensor,
    class_labels: torch.Tensor,
    mask_token_id: int,
    label_word_ids: Sequence[int],
    ignore_index: int = -100,
) -> torch.Tensor:
    """Prompt-based masked LM (the paper's setup): each sequence's [MASK] token is regularised
    towards its class's verbalizer word.

    Args:
        input_ids: [B, S] with exactly one ``mask_token_id`` per sequence.
        class_labels: [B] class indices; label_word_ids: the verbalizer's token id per class.

    Returns:
        [B, S] long: the label word id at the [MASK], ``ignore_index`` elsewhere.

    Example:
        >>> ids = torch.tensor([[101, 5, 103, 102], [101, 103, 7, 102]])
        >>> masked_lm_bridge_labels(ids, torch.tensor([1, 0]), 103, [2000, 3000])
        tensor([[-100, -100, 3000, -100],
                [-100, 2000, -100, -100]])
    """
    is_mask = input_ids == mask_token_id
    counts = is_mask.sum(1)
    if bool((counts != 1).any()):
        raise ValueError(
            f"every sequence needs exactly one mask token (id {mask_token_id}); counts "
            f"{counts.tolist()}"
        )
    words = _check_class_labels(class_labels, label_word_ids, input_ids.shape[0])
    labels = torch.full_like(input_ids, ignore_index, dtype=torch.long)
    labels[is_mask] = words
    return labels


def classification_bridge_labels(
    attention_mask: torch.Tensor,
    class_labels: torch.Tensor,
    label_word_ids: Sequence[int],
    position: str | int = "first",
    ignore_index: int = -100,
) -> torch.Tensor:
    """Sequence classification: one chosen position per sequence, regularised towards its class's
    label word.

    Args:
        attention_mask: [B, S] (1 for real tokens; padding on either side).
        class_labels: [B] class indices; label_word_ids: a token id per class.
        position: ``"first"`` (the first real token, e.g. BERT's [CLS]), ``"last"`` (the last
            real token, where a causal LM classifier reads its logits) or an int index.

    Returns:
        [B, S] long labels, ``ignore_index`` except at the chosen positions.

    Example:
        >>> mask = torch.tensor([[1, 1, 1, 0], [1, 1, 1, 1]])
        >>> classification_bridge_labels(mask, torch.tensor([0, 1]), [11, 12], "last")
        tensor([[-100, -100,   11, -100],
                [-100, -100, -100,   12]])
    """
    batch, seq = attention_mask.shape
    words = _check_class_labels(class_labels, label_word_ids, batch)
    real = attention_mask != 0
    steps = torch.arange(seq, device=attention_mask.device).expand(batch, seq)
    if position == "first":
        index = torch.where(real, steps, seq).min(1).values
    elif position == "last":
        index = torch.where(real, steps, -1).max(1).values
    elif isinstance(position, int) and -seq <= position < seq:
        index = torch.full((batch,), position % seq, device=attention_mask.device)
    else:
        raise ValueError(f"position must be 'first', 'last' or an int in [-{seq}, {seq}), got {position!r}")
    if bool(((index < 0) | (index >= seq)).any()):
        raise ValueError("attention_mask has a sequence with no real token")
    labels = torch.full((batch, seq), ignore_index, dtype=torch.long, device=attention_mask.device)
    labels[torch.arange(batch, device=labels.device), index] = words
    return labels


def causal_lm_bridge_labels(
    input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, ignore_index: int = -100
) -> torch.Tensor:
    """Causal LM: the Hugging Face labels (input ids, padding ignored), to be used with a
    regulariser built with ``shift_labels=True`` so that the state at s predicts token s+1.

    Example:
        >>> causal_lm_bridge_labels(torch.tensor([[5, 6, 0]]), torch.tensor([[1, 1, 0]]))
        tensor([[   5,    6, -100]])
    """
    labels = input_ids.clone().long()
    if attention_mask is not None:
        labels[attention_mask == 0] = ignore_index
    return labels
