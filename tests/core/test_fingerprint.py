"""sbpet.core.fingerprint: which model a g belongs to (issue 34, finding 7)."""

import pytest
import torch

from sbpet.core.fingerprint import compare_fingerprints, embedding_fingerprint


def test_the_rule():
    torch.manual_seed(0)
    emb = torch.randn(101, 12)
    saved = embedding_fingerprint(emb)
    compare_fingerprints(saved, embedding_fingerprint(emb.clone()), "g", "model")  # the same matrix
    compare_fingerprints(saved, embedding_fingerprint(torch.nn.Embedding.from_pretrained(emb)), "g", "model")
    with pytest.raises(ValueError, match=r"g was fitted for another model: model's word embeddings differ"):
        compare_fingerprints(saved, embedding_fingerprint(emb[torch.randperm(101)]), "g", "model")  # another vocab order
    with pytest.raises(ValueError, match="another model"):
        compare_fingerprints(saved, embedding_fingerprint(torch.randn(101, 12)), "g", "model")
    with pytest.raises(ValueError, match=r"\(101, 12\).*\(102, 12\)"):
        compare_fingerprints(saved, embedding_fingerprint(torch.randn(102, 12)), "g", "model")
    with pytest.warns(UserWarning, match="fine-tuned from the same base"):
        compare_fingerprints(saved, embedding_fingerprint(emb + 0.01 * torch.randn(101, 12)), "g", "model")
    compare_fingerprints(None, saved, "g", "model")  # nothing saved: nothing to check
    assert embedding_fingerprint(torch.empty(5, 3, device="meta")) is None


def test_a_bf16_copy_is_a_fine_tuned_relative_not_an_error():
    emb = torch.randn(64, 8)
    with pytest.warns(UserWarning):
        compare_fingerprints(embedding_fingerprint(emb), embedding_fingerprint(emb.bfloat16()), "g", "model")
