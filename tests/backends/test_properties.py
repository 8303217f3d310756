"""Property tests: every backend against the reference and the float64 formula, on random cases.

Hypothesis draws the whole case: odd sizes (L+1 states, B, S, H, g's widths and depth, V), the
states' dtype, a mask with padded tails (and a padded value of any kind there: noise, 0, NaN, inf),
the mask's dtype and values (any nonzero value is a real token), 0..S regularised positions per
sequence (real positions only), both bridges, shift_labels, ignore_index, full_nll, and which of
the states / g / tail need a gradient. Each backend must give the reference's loss and every
gradient within BACKEND_TOLERANCES (tests/helpers.py), and the float64 formula's too; a batch with
no regularised position gives exactly 0 with exactly-zero gradients. Runs are reproducible
(``derandomize``, no example database) and bounded: the triton backend runs under the CPU
interpreter without CUDA, so its cases are tiny and few.
"""

import copy
import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

import sbpet  # noqa: E402
from helpers import assert_close, backend_tolerance, float64_bridge_loss  # noqa: E402
from sbpet.core.seeding import seeded_init  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
ON_GPU = DEVICE == "cuda"
PADDING = ("noise", "zero", "nan", "inf", "mixed")


def _settings(max_examples):
    return settings(max_examples=max_examples, deadline=None, derandomize=True, database=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


def _triton_or_skip():
    pytest.importorskip("triton")
    from sbpet.backends.triton_backend import triton_is_usable

    if not triton_is_usable(torch.device(DEVICE)):
        pytest.skip("triton needs CUDA or TRITON_INTERPRET=1")


@st.composite
def cases(draw, max_states, max_batch, max_seq, max_hidden, max_width, max_depth, max_vocab, dtypes,
          no_positions=False):
    """One case as a dict: the sizes and flags drawn by hypothesis, the tensors from a drawn seed."""
    num_states = draw(st.integers(1, max_states))
    batch, seq = draw(st.integers(1, max_batch)), draw(st.integers(1, max_seq))
    hidden, vocab = draw(st.integers(1, max_hidden)), draw(st.integers(1, max_vocab))
    dims = tuple(draw(st.lists(st.integers(1, max_width), min_size=1, max_size=max_depth)))
    shift = draw(st.booleans())
    lengths = [draw(st.integers(1, seq)) for _ in range(batch)]  # real tokens first, padding after
    positions = []  # regularised positions, in the states' coordinates: real tokens only
    for length in lengths:
        usable = min(length, seq - 1) if shift else length  # shifted: the last position has no label
        positions.append([] if no_positions or usable == 0 else
                         sorted(draw(st.sets(st.integers(0, usable - 1), max_size=usable))))
    if not no_positions and not any(positions):  # N = 0 has its own test: here take one if any
        first = next((b for b, length in enumerate(lengths) if (min(length, seq - 1) if shift else length)), None)
        if first is not None:
            positions[first] = [0]
    return dict(
        num_states=num_states, batch=batch, seq=seq, hidden=hidden, vocab=vocab, dims=dims,
        dtype=draw(st.sampled_from(dtypes)), lengths=lengths, positions=positions, shift_labels=shift,
        bridge=draw(st.sampled_from(["brownian", "ou"])),
        ignore_index=draw(st.sampled_from([-100, -1])),
        full_nll=draw(st.booleans()),
        padding=draw(st.sampled_from(PADDING)),
        mask_dtype=draw(st.sampled_from([torch.long, torch.bool, torch.int32, torch.float32, torch.float64])),
        mask_values=draw(st.sampled_from(["ones", "any nonzero"])),
        states_grad=[draw(st.booleans()) for _ in range(num_states)],
        train_mapping=draw(st.booleans()),
        train_tail=draw(st.booleans()),
        scale=draw(st.sampled_from([0.5, 1.0, 3.0])),
        seed=draw(st.integers(0, 2**16)),
    )


def build(case, device=DEVICE):
    """The tensors of a drawn case: (states, labels, mask, mapping, tail) plus the labels in the
    states' coordinates (what shift_labels makes of ``labels``) for the float64 formula."""
    gen = torch.Generator().manual_seed(case["seed"])
    batch, seq, hidden, dtype = case["batch"], case["seq"], case["hidden"], case["dtype"]
    real = torch.zeros(batch, seq, dtype=torch.bool)
    for b, length in enumerate(case["lengths"]):
        real[b, :length] = True
    states = []
    for _ in range(case["num_states"]):
        h = torch.randn(batch, seq, hidden, generator=gen, dtype=torch.float64) * case["scale"] + 0.5
        fill = case["padding"]
        if fill == "mixed":
            specials = torch.tensor([0.0, float("nan"), float("inf"), -float("inf"), 1e30])
            pad = specials[torch.randint(0, len(specials), h.shape, generator=gen)].double()
        else:
            pad = {"noise": h * 1e3, "zero": torch.zeros_like(h), "nan": torch.full_like(h, float("nan")),
                   "inf": torch.full_like(h, float("inf"))}[fill]
        states.append(torch.where(real[..., None], h, pad).to(dtype))
    mask = real.long()
    if case["mask_values"] == "any nonzero":
        mask = mask * torch.randint(1, 4, (batch, seq), generator=gen)
    mask = mask.to(case["mask_dtype"])

    ignore = case["ignore_index"]
    vocab = case["vocab"]
    targets = torch.full((batch, seq), ignore, dtype=torch.long)  # states' coordinates
    for b, pos in enumerate(case["positions"]):
        if pos:
            targets[b, pos] = torch.randint(0, vocab, (len(pos),), generator=gen)
    if case["shift_labels"]:
        labels = torch.full_like(targets, ignore)
        labels[:, 1:] = targets[:, :-1]  # the state at s predicts the label at s+1
        labels[:, 0] = torch.randint(0, vocab, (batch,), generator=gen)  # dropped by the shift
    else:
        labels = targets
    dims = case["dims"]
    param_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    with seeded_init(case["seed"]):
        mapping = sbpet.BridgeMapping(hidden, dims)
    tail = torch.randn(vocab, dims[-1], generator=gen)
    tail = tail / tail.norm(dim=1, keepdim=True).clamp_min(1e-12)
    return ([h.to(device) for h in states], labels.to(device), mask.to(device), mapping.to(device, param_dtype),
            tail.to(device, param_dtype), targets)


def run(case, tensors, backend):
    """Loss and every gradient (None where the leaf needs none) of one backend on fresh leaves."""
    states, labels, mask, mapping, tail, targets = tensors
    mapping = copy.deepcopy(mapping).requires_grad_(case["train_mapping"])
    leaves = [h.detach().clone().requires_grad_(g) for h, g in zip(states, case["states_grad"])]
    tail = tail.detach().clone().requires_grad_(case["train_tail"])
    if backend == "float64":
        loss = float64_bridge_loss([h.cpu() for h in leaves], targets, mask.cpu(), mapping.cpu(), tail.cpu(),
                                   case["bridge"], ignore_index=case["ignore_index"], full_nll=case["full_nll"])
    else:
        loss = sbpet.bridge_loss(leaves, labels, mask, mapping, tail, case["bridge"], backend=backend,
                                 ignore_index=case["ignore_index"], shift_labels=case["shift_labels"],
                                 full_nll=case["full_nll"], precision="fp32")
    if loss.requires_grad:
        loss.backward()
    named = {f"hidden_states[{i}]": h for i, h in enumerate(leaves)}
    named["tail"] = tail
    named.update(mapping.named_parameters())
    grads = {name: leaf.grad for name, leaf in named.items()}
    if backend == "float64":  # the loop formula never touches what no pair uses: its gradient is 0
        grads = {name: torch.zeros_like(named[name]) if g is None and named[name].requires_grad else g
                 for name, g in grads.items()}
    return loss.detach(), grads


def check_backend(case, backend):
    tensors = build(case)
    num_positions = sum(len(p) for p in case["positions"])
    dtype = case["dtype"]
    loss_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    on_gpu = ON_GPU and backend == "triton"
    loss, grads = run(case, tensors, backend)
    assert loss.dim() == 0 and loss.dtype == loss_dtype, (loss.shape, loss.dtype)
    padded = tensors[2] == 0
    for i in range(case["num_states"]):  # padding never reaches R: its gradient is exactly 0
        grad = grads[f"hidden_states[{i}]"]
        assert grad is None or torch.count_nonzero(grad[padded]) == 0, f"hidden_states[{i}] at padding"
    if num_positions == 0:
        assert loss.item() == 0.0, f"N = 0: loss {loss.item()!r}, not exactly 0"
    for reference in ("reference", "float64"):
        ref_loss, ref_grads = run(case, tensors, reference)
        assert_close(loss, ref_loss.to(loss_dtype), loss_dtype, f"loss vs {reference}",
                     **backend_tolerance(ref_loss, loss_dtype, on_gpu))
        for name, ref in ref_grads.items():
            grad = grads[name]
            if ref is None:
                assert grad is None, f"{name}: a gradient where {reference} has none"
                continue
            assert grad is not None, f"{name}: no gradient ({reference} has one)"
            assert grad.dtype == ref.dtype, f"{name}: {grad.dtype} != {ref.dtype}"
            if num_positions == 0:
                assert torch.count_nonzero(grad) == 0, f"N = 0: {name} is not exactly zero"
            assert_close(grad, ref, ref.dtype, f"{name} vs {reference}",
                         **backend_tolerance(ref, ref.dtype, on_gpu))
    return loss, grads


# torch: moderate odd sizes, every states dtype it takes (float64 with a float64 g and tail).
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
@_settings(max_examples=25)
@given(data=st.data())
def test_torch_matches_reference_and_float64(dtype, data):
    case = data.draw(cases(max_states=5, max_batch=4, max_seq=11, max_hidden=13, max_width=11, max_depth=4,
                           max_vocab=17, dtypes=[dtype]), label="case")
    check_backend(case, "torch")


# triton: tiny cases (without CUDA the interpreter runs every program in turn), 32- and 16-bit states.
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@_settings(max_examples=12)
@given(data=st.data())
def test_triton_matches_reference_and_float64(dtype, data):
    _triton_or_skip()
    case = data.draw(cases(max_states=3, max_batch=2, max_seq=6, max_hidden=12, max_width=8, max_depth=4,
                           max_vocab=9, dtypes=[dtype]), label="case")
    check_backend(case, "triton")


@_settings(max_examples=12)
@given(case=cases(max_states=3, max_batch=2, max_seq=6, max_hidden=9, max_width=7, max_depth=4, max_vocab=9,
                  dtypes=[torch.float32, torch.bfloat16, torch.float16], no_positions=True),
       backend=st.sampled_from(["reference", "torch", "triton"]))
def test_no_regularised_position_is_exactly_zero(case, backend):
    """N = 0 (labels all ignore_index, or only where the shift drops them): R is exactly 0.0 and
    every gradient exists and is exactly zero, whatever the padding holds."""
    if backend == "triton":
        _triton_or_skip()
    states, labels, mask, mapping, tail, _ = build(case)
    case = dict(case, states_grad=[True] * case["num_states"], train_mapping=True, train_tail=True)
    loss, grads = run(case, (states, labels, mask, mapping, tail, None), backend)
    assert loss.item() == 0.0, f"loss {loss.item()!r}"
    for name, grad in grads.items():
        assert grad is not None, f"{name}: no gradient"
        assert torch.count_nonzero(grad) == 0, f"{name}: not exactly zero"
