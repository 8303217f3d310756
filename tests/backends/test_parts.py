"""The parts interface (sbpet.backends.dispatch.Backend): per-layer capture and the loss from the parts, for
every backend, and the training routes (BridgeTrainer, fit_mapping) on the Triton kernels.

Without CUDA the triton backend runs under TRITON_INTERPRET=1 (tests/conftest.py). A spy on the
Triton entry points proves which path ran: a route that silently fell back to torch fails here.
"""

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

pytest.importorskip("triton")

import sbpet  # noqa: E402
from helpers import assert_close, make_case  # noqa: E402
from sbpet.backends import dispatch  # noqa: E402
from sbpet.backends import triton_backend  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
SLACK = dict(rtol=2e-4, atol=1e-5) if DEVICE == "cuda" else {}


@pytest.fixture
def triton_spy(monkeypatch):
    """Counts calls of the Triton backend's parts functions (and its whole-states loss), and of the
    GEMM strategy's forward and backward (kernel 2's default strategy: a route that reached Triton
    but not that strategy fails too)."""
    from sbpet.backends import triton_gemm

    calls = {"capture_layer": 0, "loss_from_parts": 0, "loss": 0}
    originals = {
        "capture_layer": triton_backend.triton_capture_layer,
        "loss_from_parts": triton_backend.triton_loss_from_parts,
        "loss": triton_backend.triton_bridge_loss,
    }

    def wrap(name):
        def spy(*args, **kwargs):
            calls[name] += 1
            return originals[name](*args, **kwargs)

        return spy

    monkeypatch.setattr(triton_backend, "triton_capture_layer", wrap("capture_layer"))
    monkeypatch.setattr(triton_backend, "triton_loss_from_parts", wrap("loss_from_parts"))
    monkeypatch.setattr(triton_backend, "triton_bridge_loss", wrap("loss"))
    for name in ("gemm_forward", "gemm_backward"):
        originals[name] = getattr(triton_gemm, name)
        calls[name] = 0
        monkeypatch.setattr(triton_gemm, name, wrap(name))
    return calls


def _parts(backend_name, states, labels, mask):
    backend = dispatch.get_backend(backend_name)
    batch_index, seq_index = (labels != -100).nonzero(as_tuple=True)
    leaves = [h.detach().clone().requires_grad_(True) for h in states]
    parts = [backend.capture_layer(h, mask, batch_index, seq_index) for h in leaves]
    return leaves, parts, batch_index, labels[batch_index, seq_index]


@pytest.mark.parametrize("backend", ["triton", "reference"])
def test_capture_layer_matches_torch(backend):
    """Context and rows of one layer, strided, with a regularised position on a padded token (read
    although padding is skipped for the context), and the layer's gradient."""
    states, labels, mask, _, _ = make_case(num_states=2, batch=3, seq=13, hidden=37, seed=4, device=DEVICE)
    labels[2, 12] = 7  # sequence 2 is padded at the end: a regularised padded position
    assert mask[2, 12] == 0
    strided = [states[0].transpose(0, 1).contiguous().transpose(0, 1), states[1]]
    outs = {}
    for name in ("torch", backend):
        leaves, parts, _, _ = _parts(name, strided, labels, mask)
        gc = torch.linspace(-1, 1, parts[0][0].numel(), device=DEVICE).reshape(parts[0][0].shape)
        gt = torch.linspace(2, -1, parts[0][1].numel(), device=DEVICE).reshape(parts[0][1].shape)
        torch.autograd.backward([parts[0][0], parts[0][1]], [gc, gt])
        outs[name] = (parts[0][0].detach(), parts[0][1].detach(), leaves[0].grad)
    for what, a, e in zip(("context", "rows", "grad"), outs[backend], outs["torch"]):
        assert a.dtype == e.dtype or what == "rows", what
        assert_close(a, e, torch.float32, f"{backend} {what}", **SLACK)


@pytest.mark.parametrize("dims", [(16,), (24, 7), (20, 9, 5)])
@pytest.mark.parametrize("backend", [*dispatch.TRITON_CANDIDATES, "reference"])
def test_loss_from_parts_matches_torch(backend, dims):
    """R and every gradient (contexts, rows, g, tail) from the parts: the token rows are separate
    per-layer tensors that kernel 2 reads where they lie."""
    states, labels, mask, mapping, tail = make_case(dims=dims, seed=6, device=DEVICE)
    mean_coef, variance = sbpet.get_bridge("ou").marginals(len(states))
    results = {}
    for name in ("torch", backend):
        _, parts, batch_index, targets = _parts("torch", states, labels, mask)
        contexts = [c.detach().requires_grad_(True) for c, _ in parts]
        tokens = [t.detach().requires_grad_(True) for _, t in parts]
        t = tail.detach().clone().requires_grad_(True)
        mapping.zero_grad(set_to_none=True)
        loss = dispatch.get_backend(name).loss_from_parts(
            contexts, tokens, batch_index, targets, mapping, t, mean_coef, variance, "fp32")
        loss.backward()
        results[name] = [loss.detach(), t.grad, *(c.grad for c in contexts), *(x.grad for x in tokens),
                         *(p.grad.clone() for p in mapping.parameters())]
    for i, (a, e) in enumerate(zip(results[backend], results["torch"])):
        assert_close(a, e, torch.float32, f"{backend} output {i}", **SLACK)


def test_loss_from_parts_without_rows_is_exact_zero():
    states, labels, mask, mapping, tail = make_case(dims=(12, 5), seed=2, device=DEVICE)
    labels = torch.full_like(labels, -100)
    mean_coef, variance = sbpet.get_bridge("brownian").marginals(len(states))
    _, parts, batch_index, targets = _parts("triton", states, labels, mask)
    contexts = [c for c, _ in parts]
    loss = triton_backend.triton_loss_from_parts(contexts, [t for _, t in parts], batch_index, targets, mapping,
                                                 tail, mean_coef, variance)
    assert loss.item() == 0.0
    loss.backward()
    assert all(torch.count_nonzero(p.grad) == 0 for p in mapping.parameters())


def _trainer_step(backend, tmp_path):
    """One BridgeTrainer step (LoRA on a tiny BERT): loss, task/bridge split, LoRA gradients."""
    from hf_helpers import classification_data, collate, pet_model, trainer_args

    from sbpet.hf.trainer import BridgeTrainer

    model, base = pet_model("lora")
    from hf_helpers import tiny_regularizer

    reg = tiny_regularizer(base, dims=(24, 9, 6))
    trainer = BridgeTrainer(model=model, args=trainer_args(tmp_path), train_dataset=classification_data(),
                            data_collator=collate, bridge=reg, bridge_weight=0.5, backend=backend)
    batch = collate(classification_data()[:4])
    model.train()
    model.zero_grad(set_to_none=True)
    loss = trainer.compute_loss(model, batch)
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    return loss.detach(), trainer._bridge_sums[1].clone(), grads


def test_bridge_trainer_step_on_triton_equals_torch(tmp_path, triton_spy):
    pytest.importorskip("peft")
    loss_t, bridge_t, grads_t = _trainer_step("torch", tmp_path / "t")
    assert set(triton_spy.values()) == {0}
    loss_k, bridge_k, grads_k = _trainer_step("triton", tmp_path / "k")
    # 4 hidden states (3 layers + embeddings) captured by kernel 1, one loss from kernel 2.
    assert triton_spy == {"capture_layer": 4, "loss_from_parts": 1, "loss": 0, "gemm_forward": 1,
                          "gemm_backward": 1}
    assert_close(bridge_k, bridge_t, torch.float32, "bridge loss", **SLACK)
    assert_close(loss_k, loss_t, torch.float32, "training loss", **SLACK)
    assert grads_t and grads_k.keys() == grads_t.keys()
    assert any("lora" in n for n in grads_t)
    for name in grads_t:
        assert_close(grads_k[name], grads_t[name], torch.float32, name, **SLACK)


def _fit_two_steps(backend, tmp_path, monkeypatch):
    """Two fit_mapping steps (tiny BERT, g of three Linear layers): R and g's gradients per step,
    read where fit_mapping clips them (before the optimizer step)."""
    from transformers import BertForMaskedLM

    from hf_helpers import tiny_bert_config, tiny_regularizer, tiny_texts, tiny_tokenizer
    from sbpet.hf.fitting import fit_mapping

    torch.manual_seed(0)
    model = BertForMaskedLM(tiny_bert_config())
    reg = tiny_regularizer(model, dims=(24, 9, 6))
    seen = []

    from accelerate import Accelerator

    clip = getattr(Accelerator.clip_grad_norm_, "unspied", Accelerator.clip_grad_norm_)

    def spy(self, params, max_norm, *args, **kwargs):  # fit_mapping's engine clips here
        params = list(params)
        seen.append([p.grad.clone() for p in params])
        return clip(self, params, max_norm, *args, **kwargs)

    spy.unspied = clip
    monkeypatch.setattr(Accelerator, "clip_grad_norm_", spy)
    history = fit_mapping(model, tiny_tokenizer(tmp_path), tiny_texts(), reg, steps=2, batch_size=4,
                          learning_rate=1e-2, progress=False, backend=backend)
    return history["loss"], seen


def test_fit_mapping_steps_on_triton_equal_torch(tmp_path, triton_spy, monkeypatch):
    losses_t, grads_t = _fit_two_steps("torch", tmp_path / "t", monkeypatch)
    losses_k, grads_k = _fit_two_steps("triton", tmp_path / "k", monkeypatch)
    assert triton_spy["capture_layer"] == 2 * 4 and triton_spy["loss_from_parts"] == 2
    assert triton_spy["gemm_forward"] == triton_spy["gemm_backward"] == 2
    assert len(grads_t) == len(grads_k) == 2 and len(grads_t[0]) == 6  # 3 weights + 3 biases
    for a, e in zip(losses_k, losses_t):
        assert abs(a - e) <= 1e-5 * abs(e) + 1e-6, (losses_k, losses_t)
    for step, (gk, gt) in enumerate(zip(grads_k, grads_t)):
        for i, (a, e) in enumerate(zip(gk, gt)):
            assert_close(a, e, torch.float32, f"step {step} g param {i}", **SLACK)


def test_regularizer_forward_and_function_reach_triton(triton_spy):
    states, labels, mask, mapping, tail = make_case(dims=(12, 5), seed=3, device=DEVICE)
    reg = sbpet.BridgeRegularizer(states[0].shape[-1], len(states) - 1, dims=(12, 5), tail=tail, backend="triton")
    reg(states, labels, mask)
    sbpet.bridge_loss(states, labels, mask, mapping, tail, backend="triton")
    assert triton_spy["loss"] == triton_spy["gemm_forward"] == 2
