import pytest
import torch
from torch import nn

import sbpet


def test_mapping_structure():
    g = sbpet.BridgeMapping(40, dims=(24, 7))
    assert isinstance(g.layers, nn.ModuleList)
    assert [l.in_features for l in g.layers] == [80, 24]
    assert [l.out_features for l in g.layers] == [24, 7]
    assert g.latent_size == 7
    x = torch.randn(3, 80)
    manual = g.layers[1](torch.nn.functional.gelu(g.layers[0](x)))
    assert torch.equal(g(x), manual)


def test_mapping_rejects_bad_dims():
    with pytest.raises(ValueError, match="dims"):
        sbpet.BridgeMapping(8, dims=())
    with pytest.raises(ValueError, match="hidden_size"):
        sbpet.BridgeMapping(0, dims=(4,))


def test_tail_is_unit_norm_pca_projection():
    gen = torch.Generator().manual_seed(0)
    emb = torch.randn(60, 12, generator=gen, dtype=torch.float64) * torch.linspace(0.1, 3, 12, dtype=torch.float64)
    tail = sbpet.tail_from_embeddings(emb, 3)
    assert tail.shape == (60, 3)
    assert torch.allclose(tail.norm(dim=1), torch.ones(60), atol=1e-5)
    # Independent check: eigenvectors of the covariance, same sign convention, same rows.
    centered = emb - emb.mean(0)
    _, vecs = torch.linalg.eigh(centered.T @ centered)
    comps = vecs[:, -3:].flip(1).T
    comps = comps * torch.sign(comps.gather(1, comps.abs().argmax(1, keepdim=True)))
    proj = centered @ comps.T
    want = proj / proj.norm(dim=1, keepdim=True)
    assert torch.allclose(tail.double(), want, atol=1e-4)


def test_tail_rejects_bad_input():
    with pytest.raises(ValueError, match="dim"):
        sbpet.tail_from_embeddings(torch.randn(10, 4), 5)
    with pytest.raises(ValueError, match="word_embeddings"):
        sbpet.tail_from_embeddings(torch.randn(10), 2)
