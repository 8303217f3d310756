"""The torch backend's recompute (sbpet.backends.torch_recompute): g's activations recomputed in the
backward, a chunk of rows at a time, with the gradients of the reference, of an independent float64
formula and of the save-everything path, at chunk sizes that do not divide the row count."""

import pytest
import torch

import sbpet
from helpers import assert_close, float64_bridge_loss, loss_and_grads, make_case
from sbpet.backends import torch_recompute
from sbpet.backends.torch_recompute import RECOMPUTE_ENV, row_chunk


def _chunk_rows(monkeypatch, rows: int, mapping):
    """Make the recompute's chunks ``rows`` rows long for ``mapping``."""
    widest = max(mapping.hidden_size, *mapping.dims)
    monkeypatch.setattr(torch_recompute, "ROW_CHUNK_ELEMENTS", rows * widest)
    monkeypatch.setattr(torch_recompute, "MIN_CHUNK_ROWS", 1)
    monkeypatch.setattr(torch_recompute, "LAYER_FRACTION", 1)
    assert row_chunk(mapping.hidden_size, [layer.weight for layer in mapping.layers]) == rows


@pytest.mark.parametrize("rows", [1, 5, 7, 1000])
def test_chunked_recompute_matches_reference_and_float64(monkeypatch, rows):
    """24 regularised rows (odd sizes) in chunks of 1, 5 (last one 4 rows), 7 (last one 3) and all:
    loss and every gradient (states, g, tail) equal the reference's in float64."""
    case = make_case(num_states=4, batch=3, seq=11, hidden=13, dims=(17, 9, 5), positions_per_seq=8,
                     dtype=torch.float64, param_dtype=torch.float64, seed=7)
    states, labels, mask, mapping, tail = case
    num_rows = int((labels != -100).sum())
    assert num_rows % 5 and num_rows % 7 and num_rows > 7, num_rows
    mapping.requires_grad_(True)
    _chunk_rows(monkeypatch, rows, mapping)
    loss, grads = loss_and_grads("torch", *case, bridge="ou")
    ref_loss, ref_grads = loss_and_grads("reference", *case, bridge="ou")
    assert_close(loss, ref_loss, torch.float64, "loss")
    for name, ref in ref_grads.items():
        assert_close(grads[name], ref, torch.float64, f"{name} (chunks of {rows})")
    # The independent formula, loop by loop, with autograd through it.
    leaves = [h.detach().clone().requires_grad_(True) for h in states]
    want = float64_bridge_loss(leaves, labels, mask, mapping, tail, "ou")
    want.backward()
    assert_close(loss, want.detach(), torch.float64, "loss vs float64")
    for i, h in enumerate(leaves):
        assert_close(grads[f"hidden_states[{i}]"], h.grad, torch.float64, f"hidden_states[{i}] vs float64")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_recompute_equals_the_save_everything_path(monkeypatch, dtype):
    """Chunks of 5 rows against SBPET_TORCH_RECOMPUTE=0 (g's activations saved, all rows at once):
    the same loss and gradients, the 16-bit states' gradient rounded once (within one 16-bit ulp
    of the float32 sums' order)."""
    case = make_case(num_states=3, batch=2, seq=17, hidden=24, dims=(20, 6), positions_per_seq=9, dtype=dtype,
                     seed=11)
    mapping = case[3]
    mapping.requires_grad_(True)
    _chunk_rows(monkeypatch, 5, mapping)
    loss, grads = loss_and_grads("torch", *case, bridge="ou")
    monkeypatch.setenv(RECOMPUTE_ENV, "0")
    saved_loss, saved_grads = loss_and_grads("torch", *case, bridge="ou")
    tight = dict(rtol=1e-5, atol=1e-6)
    assert_close(loss, saved_loss, torch.float32, "loss", **tight)
    for name, want in saved_grads.items():
        extra = {} if name.startswith("hidden") and dtype != torch.float32 else tight
        assert_close(grads[name], want, want.dtype, name, **extra)
        assert grads[name].dtype == want.dtype


@pytest.mark.parametrize("max_positions", [9, 16])
def test_fixed_capacity_padding_rows_in_chunks(monkeypatch, max_positions):
    """A fixed capacity whose padding rows straddle a chunk boundary (chunks of 4): NaN at the
    padded positions the padding rows point at never reaches R, and the result equals the
    reference's with the same capacity."""
    case = make_case(num_states=3, batch=2, seq=9, hidden=12, dims=(10, 4), positions_per_seq=3, seed=2)
    states, labels, mask, mapping, tail = case
    states = [h.clone() for h in states]
    for h in states:
        h[mask == 0] = float("nan")
    mapping.requires_grad_(True)
    _chunk_rows(monkeypatch, 4, mapping)
    case = (states, labels, mask, mapping, tail)
    loss, grads = loss_and_grads("torch", *case, bridge="ou", max_positions=max_positions)
    ref_loss, ref_grads = loss_and_grads("reference", *case, bridge="ou", max_positions=max_positions)
    assert torch.isfinite(loss)
    assert_close(loss, ref_loss, torch.float32, "loss")
    for name, ref in ref_grads.items():
        got = grads[name]
        if name.startswith("hidden"):
            real = mask != 0
            got, ref = got[real], ref[real]
        assert_close(got, ref, torch.float32, name)


def test_no_rows_gives_zero_and_zero_gradients():
    case = make_case(num_states=2, batch=2, seq=5, hidden=8, dims=(6, 3), positions_per_seq=0, seed=1)
    case[3].requires_grad_(True)
    loss, grads = loss_and_grads("torch", *case, bridge="ou")
    assert loss.item() == 0.0
    for name, g in grads.items():
        assert g is not None and not g.any(), name


def test_layer_loss_node_keeps_references_not_copies():
    """What one layer's node saves: the states themselves (same storage), the rows' tail ends
    (same storage), the context [B, H], g's weights and per-row integers; no float tensor with a
    row dimension of its own."""
    from sbpet.backends.torch_recompute import layer_loss

    g = sbpet.BridgeMapping(16, dims=(32, 4))
    states = torch.randn(2, 9, 16, requires_grad=True)
    ends = torch.randn(18, 4)
    b, s = torch.arange(18) // 9, torch.arange(18) % 9
    share = layer_loss(states, torch.ones(2, 9), b, s, ends, torch.tensor(0.5), torch.tensor(0.25), g)
    saved = share.grad_fn.saved_tensors
    pointers = {t.untyped_storage().data_ptr() for t in saved}
    assert states.untyped_storage().data_ptr() in pointers and ends.untyped_storage().data_ptr() in pointers
    params = {p.untyped_storage().data_ptr() for p in g.parameters()}
    own = [t for t in saved if t.untyped_storage().data_ptr() not in params | {states.untyped_storage().data_ptr(),
                                                                               ends.untyped_storage().data_ptr()}]
    float_bytes = sum(t.numel() * t.element_size() for t in own if t.is_floating_point())
    # mask weights [2, 9], context [2, 16], the two 0-d marginals
    assert float_bytes <= 2 * 9 * 4 + 2 * 16 * 4 + 2 * 4, [(t.shape, t.dtype) for t in own]


def test_hooks_route_recompute_equals_save_path(monkeypatch):
    """BridgeCapture with the recompute (one node per layer, made in the hooks) against the parts
    route of SBPET_TORCH_RECOMPUTE=0, under gradient checkpointing, chunks of 3 rows: the same R
    and the same LoRA gradients."""
    pytest.importorskip("peft")
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    def run():
        torch.manual_seed(0)
        base = LlamaForCausalLM(LlamaConfig(vocab_size=61, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                            num_key_value_heads=4, intermediate_size=40, max_position_embeddings=64))
        base.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        model = get_peft_model(base, LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
        model.train()
        reg = sbpet.BridgeRegularizer(32, 2, dims=(24, 5), word_embeddings=base.get_input_embeddings().weight,
                                      shift_labels=True, backend="torch", seed=0).requires_grad_(False)
        capture = sbpet.BridgeCapture(model, reg)
        ids = torch.randint(3, 61, (2, 11), generator=torch.Generator().manual_seed(1))
        mask = torch.ones_like(ids)
        mask[1, 8:] = 0
        with capture.armed(sbpet.causal_lm_bridge_labels(ids, mask), mask):
            model(input_ids=ids, attention_mask=mask)
        loss = capture.loss()
        loss.backward()
        return loss.detach(), {n: p.grad for n, p in model.named_parameters() if p.requires_grad}

    _chunk_rows(monkeypatch, 3, sbpet.BridgeMapping(32, dims=(24, 5)))
    loss, grads = run()
    monkeypatch.setenv(RECOMPUTE_ENV, "0")
    want_loss, want_grads = run()
    assert_close(loss, want_loss, torch.float32, "R", rtol=1e-5, atol=1e-6)
    assert any(g.abs().sum() > 0 for g in grads.values())
    for name, want in want_grads.items():
        assert_close(grads[name], want, torch.float32, name, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
def test_packed_rows_in_chunks_match_reference(monkeypatch, dtype):
    """Packed rows (position_ids restarting: three sequences in row 0, two in row 1) in chunks of 4
    rows: one context per sequence, the context share of each column gathered from its sequence;
    loss and gradients equal the reference's."""
    case = make_case(num_states=3, batch=2, seq=13, hidden=11, dims=(14, 6), positions_per_seq=9, dtype=dtype,
                     param_dtype=torch.float64 if dtype == torch.float64 else torch.float32, seed=4, padding=False)
    states, labels, mask, mapping, tail = case
    position_ids = torch.tensor([[0, 1, 2, 3, 0, 1, 2, 0, 1, 2, 3, 4, 5], [0, 1, 2, 3, 4, 5, 0, 1, 2, 3, 4, 5, 6]])
    mapping.requires_grad_(True)
    _chunk_rows(monkeypatch, 4, mapping)
    loss, grads = loss_and_grads("torch", *case, bridge="ou", shift_labels=True, position_ids=position_ids)
    ref_loss, ref_grads = loss_and_grads("reference", *case, bridge="ou", shift_labels=True, position_ids=position_ids)
    assert_close(loss, ref_loss, torch.float64 if dtype == torch.float64 else torch.float32, "loss")
    for name, ref in ref_grads.items():
        assert_close(grads[name], ref, ref.dtype, f"{name} (packed, chunks of 4)")
