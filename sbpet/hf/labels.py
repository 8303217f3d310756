"""Bridge labels that regularise every real token, not only the prediction position.

The released BERT runs of the paper (by an accident of its ignore index) put every position into R;
the sound version of "every position" is what fitting g does for ordinary text: each real,
non-special token is regularised towards its own id, while the prediction position keeps its label
(in prompt-based tuning, the [MASK] towards its class's label word).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

__all__ = ["every_token_bridge_labels"]


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
