import json
import os

import pytest
import torch
from torch import nn

import sbpet
from helpers import make_case


def test_regularizer_module_api():
    emb = torch.randn(30, 8)
    reg = sbpet.BridgeRegularizer(8, num_layers=2, dims=(6, 3), bridge="ou", word_embeddings=emb)
    assert isinstance(reg.mapping, sbpet.BridgeMapping)
    assert reg.tail.shape == (30, 3) and "tail" in dict(reg.named_buffers())
    assert torch.allclose(reg.tail, sbpet.tail_from_embeddings(emb, 3))
    trainable = sbpet.BridgeRegularizer(8, 2, dims=(6, 3), tail=torch.randn(30, 3), train_tail=True)
    assert isinstance(trainable.tail, nn.Parameter)


def test_regularizer_equals_function():
    states, labels, mask, mapping, tail = make_case(num_states=3, hidden=8, dims=(6, 3), vocab=20)
    reg = sbpet.BridgeRegularizer(8, 2, dims=(6, 3), tail=tail, bridge="ou", backend="torch")
    reg.mapping.load_state_dict(mapping.state_dict())
    want = sbpet.bridge_loss(states, labels, mask, mapping, tail, "ou", backend="reference")
    torch.testing.assert_close(reg(tuple(states), labels, mask), want)


def test_exactly_one_of_tail_and_embeddings():
    with pytest.raises(ValueError, match="exactly one"):
        sbpet.BridgeRegularizer(8, 2, dims=(6, 3))
    with pytest.raises(ValueError, match="exactly one"):
        sbpet.BridgeRegularizer(8, 2, dims=(6, 3), tail=torch.randn(5, 3), word_embeddings=torch.randn(5, 8))
    with pytest.raises(ValueError, match="tail"):
        sbpet.BridgeRegularizer(8, 2, dims=(6, 3), tail=torch.randn(5, 4))
    with pytest.raises(ValueError, match="backend"):
        sbpet.BridgeRegularizer(8, 2, dims=(6, 3), tail=torch.randn(5, 3), backend="fast")


def test_save_load_round_trip(tmp_path):
    states, labels, mask, _, tail = make_case(num_states=3, hidden=8, dims=(6, 3), vocab=20)
    reg = sbpet.BridgeRegularizer(8, 2, dims=(6, 3), tail=tail, bridge="ou", train_tail=True, name_or_path="tiny")
    reg.save_pretrained(tmp_path)
    loaded = sbpet.BridgeRegularizer.from_pretrained(tmp_path)
    assert loaded.config == reg.config and isinstance(loaded.tail, nn.Parameter)
    torch.testing.assert_close(loaded(states, labels, mask), reg(states, labels, mask), rtol=0, atol=0)


@pytest.mark.parametrize("kind", ["pdf", "sde"])
def test_from_pretrained_is_frozen_and_in_eval_mode(kind, tmp_path):
    """Loaded like a transformers model (eval mode) and frozen, g and a trainable tail alike;
    trainable=True gives the module as built."""
    from sbpet.modules.sde import SDEBridgeRegularizer

    tail = torch.randn(20, 3)
    reg = (sbpet.BridgeRegularizer(8, 2, dims=(6, 3), tail=tail, train_tail=True) if kind == "pdf"
           else SDEBridgeRegularizer(8, 2, latent_size=3, width=5, tail=tail, train_tail=True))
    reg.save_pretrained(tmp_path)
    loaded = sbpet.BridgeRegularizer.from_pretrained(tmp_path)
    assert type(loaded) is type(reg)
    assert not loaded.training and not any(m.training for m in loaded.modules())
    assert isinstance(loaded.tail, nn.Parameter)
    assert not any(p.requires_grad for p in loaded.parameters())
    as_built = sbpet.BridgeRegularizer.from_pretrained(tmp_path, trainable=True)
    assert as_built.training and all(p.requires_grad for p in as_built.parameters())


def test_load_errors(tmp_path):
    tail = torch.randn(20, 3)
    reg = sbpet.BridgeRegularizer(8, 2, dims=(6, 3), tail=tail)
    reg.save_pretrained(tmp_path)

    class Config:
        hidden_size, num_hidden_layers, vocab_size = 8, 2, 20

    sbpet.BridgeRegularizer.from_pretrained(tmp_path, model=Config())
    for field, value in (("hidden_size", 16), ("num_hidden_layers", 4), ("vocab_size", 21)):
        bad = Config()
        setattr(bad, field, value)
        with pytest.raises(ValueError, match=field.replace("num_hidden_layers", "num_layers")):
            sbpet.BridgeRegularizer.from_pretrained(tmp_path, model=bad)
    with pytest.raises(ValueError, match="does not exist"):
        sbpet.BridgeRegularizer.from_pretrained(tmp_path / "nowhere")
    weights = tmp_path / "sbpet_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:40])
    with pytest.raises(ValueError, match="damaged"):
        sbpet.BridgeRegularizer.from_pretrained(tmp_path)
    reg.save_pretrained(tmp_path)
    (tmp_path / "sbpet_config.json").write_text("{not json")
    with pytest.raises(ValueError, match="damaged"):
        sbpet.BridgeRegularizer.from_pretrained(tmp_path)
    config = reg.config | {"dims": [6, 4]}
    (tmp_path / "sbpet_config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError):
        sbpet.BridgeRegularizer.from_pretrained(tmp_path)


def test_seed_gives_the_same_g_and_leaves_the_global_rng_alone(tmp_path):
    from sbpet.modules.sde import SDEBridgeRegularizer

    emb = torch.randn(30, 8)
    for build in (lambda seed: sbpet.BridgeRegularizer(8, 2, dims=(6, 3), word_embeddings=emb, seed=seed),
                  lambda seed: SDEBridgeRegularizer(8, 2, latent_size=3, width=5, word_embeddings=emb, seed=seed)):
        torch.manual_seed(0)
        state = torch.get_rng_state()
        a = build(7)
        assert torch.equal(torch.get_rng_state(), state), "seed= must not draw from the global RNG"
        torch.manual_seed(123)
        b, c = build(7), build(8)
        for (name, p), q, r in zip(a.mapping.named_parameters(), b.mapping.parameters(), c.mapping.parameters()):
            assert torch.equal(p, q), name
            assert not torch.equal(p, r) or not p.any(), name  # zero biases are equal for every seed
        assert a.config["seed"] == 7
        a.save_pretrained(tmp_path / type(a).__name__)
        loaded = sbpet.BridgeRegularizer.from_pretrained(tmp_path / type(a).__name__)
        assert loaded.config == a.config
    unseeded = sbpet.BridgeRegularizer(8, 2, dims=(6, 3), word_embeddings=emb)
    assert unseeded.config["seed"] is None
    for bad in (1.5, True, "0"):
        with pytest.raises(ValueError, match="seed"):
            sbpet.BridgeRegularizer(8, 2, dims=(6, 3), word_embeddings=emb, seed=bad)


def test_seeded_init_matches_the_default_init():
    """seeded_init draws what the default init draws after torch.manual_seed."""
    from sbpet.core.seeding import seeded_init

    torch.manual_seed(5)
    want = sbpet.BridgeMapping(8, dims=(6, 3))
    with seeded_init(5):
        got = sbpet.BridgeMapping(8, dims=(6, 3))
    for p, q in zip(want.parameters(), got.parameters()):
        assert torch.equal(p, q)


# -- files (issue 34) ----------------------------------------------------------------------------


def _saved(tmp_path):
    reg = sbpet.BridgeRegularizer(8, num_layers=2, dims=(6, 3), word_embeddings=torch.randn(11, 8), seed=0)
    reg.save_pretrained(tmp_path / "g")
    return reg, tmp_path / "g"


def test_a_huge_config_fails_before_any_allocation(tmp_path, monkeypatch):
    """dims of 2e9 in sbpet_config.json: a ValueError naming the entry, checked against the
    safetensors header on the meta device, before a byte is allocated (finding 2)."""
    import json

    _, path = _saved(tmp_path)
    config = json.loads((path / "sbpet_config.json").read_text())
    config["dims"] = [2_000_000_000, 3]
    (path / "sbpet_config.json").write_text(json.dumps(config))
    real_empty = torch.empty

    def guarded_empty(*size, **kw):  # what nn.Linear allocates its weight with
        shape = size[0] if len(size) == 1 and isinstance(size[0], (tuple, list, torch.Size)) else size
        device = kw.get("device") or torch.get_default_device()
        if torch.device(device).type != "meta" and torch.Size(shape).numel() > 10**8:
            raise MemoryError(f"tried to allocate {tuple(shape)}")
        return real_empty(*size, **kw)

    monkeypatch.setattr(torch, "empty", guarded_empty)
    with pytest.raises(ValueError, match=r"mapping\.layers\.0\.bias. the shape \[2000000000\].*holds \[6\].*dims"):
        sbpet.BridgeRegularizer.from_pretrained(path)
    config["dims"], config["hidden_size"] = [6, 3], 9
    (path / "sbpet_config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="hidden_size"):
        sbpet.BridgeRegularizer.from_pretrained(path)


def test_a_reader_never_gets_half_a_g(tmp_path, monkeypatch):
    """save_pretrained: a new folder appears whole or not at all; in an existing one the config
    records the weights' SHA-256, so a pair from two saves is an error, never a silent mix
    (finding 4)."""
    reg, path = _saved(tmp_path)
    other = sbpet.BridgeRegularizer(8, num_layers=2, dims=(6, 3), word_embeddings=torch.randn(11, 8), seed=1)
    real_replace, calls = os.replace, []

    def crash_at_the_config(src, dst):
        calls.append(dst)
        if str(dst).endswith("sbpet_config.json"):
            raise OSError("crash between the weights and the config")
        return real_replace(src, dst)

    monkeypatch.setattr(os, "replace", crash_at_the_config)
    with pytest.raises(OSError, match="crash"):
        other.save_pretrained(path)
    monkeypatch.setattr(os, "replace", real_replace)
    assert calls, "save_pretrained wrote in place"
    with pytest.raises(ValueError, match="SHA-256 differs"):
        sbpet.BridgeRegularizer.from_pretrained(path)
    other.save_pretrained(path)  # saved again: whole
    loaded = sbpet.BridgeRegularizer.from_pretrained(path)
    assert torch.equal(loaded.mapping.layers[0].weight, other.mapping.layers[0].weight)
    assert sorted(p.name for p in path.iterdir()) == ["sbpet_config.json", "sbpet_model.safetensors"]

    def crash(src, dst):
        raise OSError("crash before the folder is renamed into place")

    monkeypatch.setattr(os, "rename", crash)
    with pytest.raises(OSError):
        reg.save_pretrained(tmp_path / "new")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["g"]  # no half folder, no temporary one


def test_the_saved_g_records_its_model(tmp_path):
    reg, path = _saved(tmp_path)
    loaded = sbpet.BridgeRegularizer.from_pretrained(path)
    assert loaded.config["model_fingerprint"] == reg.config["model_fingerprint"]
    assert loaded.config["model_fingerprint"]["vocab_size"] == 11
