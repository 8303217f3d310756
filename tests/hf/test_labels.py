"""sbpet.hf.labels: regularising every real token (towards its own id) besides the prediction
position (which keeps its label)."""

import pytest
import torch

from hf_helpers import LABEL_WORDS, MASK_ID, classification_batch
from sbpet.hf import every_token_bridge_labels, masked_lm_bridge_labels

SPECIAL = [0, 1, 2, MASK_ID]  # pad, cls, sep, mask of the tiny vocabulary


def test_every_real_token_towards_itself_and_the_mask_towards_its_word():
    ids, mask, y = classification_batch()
    ids[:, 0] = 1  # a [CLS] in front: special, never regularised towards itself
    base = masked_lm_bridge_labels(ids, y, MASK_ID, LABEL_WORDS)
    labels = every_token_bridge_labels(ids, mask, base, SPECIAL)
    for b in range(ids.shape[0]):
        for s in range(ids.shape[1]):
            token, real = int(ids[b, s]), bool(mask[b, s])
            if token == MASK_ID:
                expected = LABEL_WORDS[int(y[b])]
            elif real and token not in SPECIAL:
                expected = token
            else:
                expected = -100
            assert int(labels[b, s]) == expected, (b, s, token, real)
    assert int((labels != -100).sum()) > int((base != -100).sum())
    assert torch.equal(base, masked_lm_bridge_labels(ids, y, MASK_ID, LABEL_WORDS))  # input left as it was


def test_shapes_must_agree():
    ids = torch.ones(2, 3, dtype=torch.long)
    with pytest.raises(ValueError, match="one shape"):
        every_token_bridge_labels(ids, torch.ones(2, 4), torch.full((2, 3), -100), SPECIAL)
