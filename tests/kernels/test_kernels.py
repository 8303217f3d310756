"""The Triton kernels (sbpet.kernels) and the triton backend against the reference.

Without CUDA the kernels run under TRITON_INTERPRET=1 on CPU tensors (tests/conftest.py sets the
flag before anything imports triton; it is set here too for a lone run of this file). Shapes are
tiny and odd so every masked edge and every chunk loop runs; the interpreter launches each program
in turn. With CUDA the same tests run on the GPU (tf32x3 dots: tolerances a little wider).
At the default ``precision="fp32"`` float16 / bfloat16 states are read as they are and widened on
chip, so they meet the float32 tolerances against the reference (which upcasts them too); the
lower precisions are tested against float64 in tests/core/test_precision.py.
"""

import copy
import os
import subprocess
import sys

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

triton = pytest.importorskip("triton")

import sbpet  # noqa: E402
from helpers import TOLERANCES, assert_close, float64_bridge_loss, make_case  # noqa: E402
from sbpet.backends import triton_backend, triton_gemm  # noqa: E402
from sbpet.backends.triton_host import STRATEGIES, STRATEGY_ENV  # noqa: E402
from sbpet.kernels import context as context_kernels  # noqa: E402
from sbpet.kernels import fused_bridge, layer_gemm  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
ON_GPU = DEVICE == "cuda"
# tf32x3 on the GPU is close to, not exactly, float32.
GPU_SLACK = dict(rtol=2e-4, atol=1e-5) if ON_GPU else {}

# Tolerances of the triton backend against the float32 reference (precision "fp32"), by states
# dtype, in one place: (rtol, atol, scaled_atol). 16-bit states are exact inputs for both sides, so
# the loss meets float32's tolerances; the states' gradients are stored in the states' dtype, where
# two float32 values a few ulps apart may round one 16-bit ulp apart (2^-11 / 2^-8 relative).
TRITON_TOLERANCES = {
    torch.float32: (*TOLERANCES[torch.float32], 0.0),
    torch.float16: (2**-10, TOLERANCES[torch.float32][1], 0.0),
    torch.bfloat16: (2**-7, TOLERANCES[torch.float32][1], 0.0),
}


@pytest.fixture
def device():
    return DEVICE


@pytest.fixture(autouse=True, params=STRATEGIES)
def strategy(request, monkeypatch):
    """Every test runs with each of kernel 2's strategies (backend="triton" reads the variable)."""
    monkeypatch.setenv(STRATEGY_ENV, request.param)
    return request.param


def _loss_and_grads(backend, states, labels, mask, mapping, tail, bridge="brownian",
                    train_mapping=True, train_tail=True, states_grad=True, **kw):
    states = [h.detach().clone().requires_grad_(states_grad) for h in states]
    tail = tail.detach().clone().requires_grad_(train_tail)
    mapping.zero_grad(set_to_none=True)
    mapping.requires_grad_(train_mapping)
    loss = sbpet.bridge_loss(states, labels, mask, mapping, tail, bridge, backend=backend, **kw)
    if loss.requires_grad:
        loss.backward()
    grads = {f"hidden_states[{i}]": h.grad for i, h in enumerate(states)}
    grads["tail"] = tail.grad
    for name, p in mapping.named_parameters():
        grads[name] = None if p.grad is None else p.grad.clone()
    mapping.requires_grad_(True)
    return loss.detach(), grads


def _compare(case, bridge, dtype=torch.float32, rtol=None, atol=None, **kw):
    ref_loss, ref_grads = _loss_and_grads("reference", *case, bridge=bridge, **kw)
    loss, grads = _loss_and_grads("triton", *case, bridge=bridge, **kw)
    base_rtol, base_atol, scaled_atol = TRITON_TOLERANCES[dtype]
    tol = dict(rtol=base_rtol, atol=base_atol)
    tol.update(GPU_SLACK)
    tol.update({k: v for k, v in dict(rtol=rtol, atol=atol).items() if v is not None})

    def check(actual, expected, name):
        atol_here = max(tol["atol"], scaled_atol * expected.detach().abs().max().item())
        assert_close(actual, expected, dtype, name, rtol=tol["rtol"], atol=atol_here)

    assert loss.dtype == torch.float32 and loss.dim() == 0
    check(loss, ref_loss.float(), "loss")
    for name, ref in ref_grads.items():
        if ref is None:
            assert grads[name] is None, f"{name}: expected no gradient"
            continue
        check(grads[name], ref, name)
    return loss


@pytest.mark.parametrize("bridge", ["brownian", "ou"])
@pytest.mark.parametrize("dims", [(24, 7), (16,), (20, 9, 5), (12, 10, 8, 6)])
def test_triton_matches_reference_float32(bridge, dims, device):
    case = make_case(dims=dims, seed=3, device=device)
    loss = _compare(case, bridge)
    states, labels, mask, mapping, tail = case
    expected = float64_bridge_loss([h.cpu() for h in states], labels.cpu(), mask.cpu(),
                                   copy.deepcopy(mapping).cpu(), tail.cpu(), bridge)
    assert_close(loss, expected.float(), torch.float32, "loss vs float64", **GPU_SLACK)


def test_paper_depth_odd_sizes_chunked(device):
    """Three Linear layers with d1 > one chunk, H not a multiple of any block, S = 13, B = 3."""
    case = make_case(num_states=2, batch=3, seq=13, hidden=37, dims=(40, 18, 9), seed=11, device=device)
    _compare(case, "ou")


@pytest.mark.parametrize("bridge", ["brownian", "ou"])
@pytest.mark.parametrize("dims", [(16,), (24, 7), (20, 9, 5), (12, 10, 8, 6)])
def test_float16_states(bridge, dims, device):
    """float16 states read in place and widened on chip, every depth, odd H."""
    case = make_case(num_states=3, batch=3, seq=13, hidden=37, dims=dims, dtype=torch.float16,
                     seed=5, device=device)
    _compare(case, bridge, dtype=torch.float16)


def test_bfloat16_states(device):
    """bfloat16 states (the interpreter reads them correctly; its bf16 *dots* are emulated, see
    fused_bridge.dot_precision)."""
    case = make_case(num_states=3, batch=2, seq=13, hidden=40, dims=(24, 7), dtype=torch.bfloat16,
                     seed=5, device=device)
    _compare(case, "brownian", dtype=torch.bfloat16)


@pytest.mark.parametrize("train_mapping,train_tail", [(False, False), (False, True), (True, False)])
def test_frozen_mapping_and_tail(train_mapping, train_tail, device):
    case = make_case(dims=(20, 9, 5), seed=7, device=device)
    _compare(case, "brownian", train_mapping=train_mapping, train_tail=train_tail)


def test_single_position(device):
    case = make_case(batch=1, seq=5, positions_per_seq=1, dims=(24, 7), seed=2, device=device)
    assert int((case[1] != -100).sum()) == 1
    _compare(case, "ou")


def test_no_position_gives_exact_zero(device):
    states, labels, mask, mapping, tail = make_case(dims=(24, 7), seed=4, device=device)
    labels = torch.full_like(labels, -100)
    loss, grads = _loss_and_grads("triton", states, labels, mask, mapping, tail)
    assert loss.item() == 0.0
    for name, grad in grads.items():
        assert grad is not None and torch.count_nonzero(grad) == 0, name


@pytest.mark.parametrize("value", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_real_token_is_named_from_the_contexts(value, monkeypatch, device):
    """bridge_loss with backend="triton" checks finiteness from kernel 1's contexts (no second read
    of the states): a NaN / inf at a real token raises validation's error naming it; NaN in the
    padding does not; on valid input the states are never read for the check."""
    from sbpet.core import validation

    states, labels, mask, mapping, tail = make_case(dims=(24, 7), seed=5, device=device)
    assert int(mask[1].sum()) < mask.shape[1]
    for h in states:
        h[mask == 0] = float("nan")
    reads = []
    real_read = validation._nonfinite_positions
    monkeypatch.setattr(validation, "_nonfinite_positions", lambda *a: reads.append(1) or real_read(*a))
    loss = sbpet.bridge_loss(states, labels, mask, mapping, tail, "ou", backend="triton")
    reg = sbpet.BridgeRegularizer(states[0].shape[-1], len(states) - 1, dims=(24, 7), tail=tail, bridge="ou",
                                  backend="triton")
    assert torch.isfinite(loss) and torch.isfinite(reg(states, labels, mask)) and reads == []
    bad = [h.clone() for h in states]
    bad[2][1, 3, 5] = value
    with pytest.raises(ValueError, match=r"not finite .* first at hidden_states\[2\]\[1, 3\]"):
        sbpet.bridge_loss(bad, labels, mask, mapping, tail, "ou", backend="triton")
    # The module route goes through the same check.
    with pytest.raises(ValueError, match=r"first at hidden_states\[2\]\[1, 3\]"):
        reg(bad, labels, mask)
    # The torch backend reads the states for the check (its contexts are not on hand).
    with pytest.raises(ValueError, match=r"first at hidden_states\[2\]\[1, 3\]"):
        sbpet.bridge_loss(bad, labels, mask, mapping, tail, "ou", backend="torch")
    assert reads


def test_context_overflow_is_named(device):
    """Finite states whose mean over a sequence overflows float32 (the row sums do not)."""
    states, labels, mask, mapping, tail = make_case(dims=(24, 7), seed=5, device=device)
    states = [h.clone() for h in states]
    states[1][0, :3, 4] = 3e38
    with pytest.raises(ValueError, match=r"hidden_states\[1\]\[0\]: the mean over the real tokens"):
        sbpet.bridge_loss(states, labels, mask, mapping, tail, "ou", backend="triton")


@pytest.mark.parametrize("train_mapping", [False, True])
def test_sequences_spanning_tiles(train_mapping, device):
    """Every token regularised (the causal-LM pattern): a sequence's rows span several tiles of
    16 and a tile holds the end of one sequence and the start of the next, so the context half's
    per-(tile, sequence) sums and their ordered reduction are all exercised."""
    case = make_case(num_states=2, batch=3, seq=37, hidden=20, dims=(24, 7), positions_per_seq=37, seed=11,
                     device=device)
    assert int((case[1] != -100).sum()) > 2 * 16
    _compare(case, "ou", train_mapping=train_mapping, train_tail=False)
    states, labels, mask, mapping, tail = case
    expected = float64_bridge_loss(states, labels, mask, mapping, tail, "ou")
    loss, _ = _loss_and_grads("triton", *case, bridge="ou", train_mapping=train_mapping, train_tail=False)
    assert_close(loss, expected, torch.float32, "loss vs float64")


def test_tile_sequence_pairs():
    """Pair ids start at every tile and at every change of sequence; the slot count bounds them;
    each sequence's pairs are contiguous; unsorted rows are refused."""
    from sbpet.kernels.segments import tile_sequence_pairs

    batch_index = torch.tensor([0, 0, 0, 1, 1, 3, 3, 3, 3, 3])
    pair_ids, num_pairs, starts = tile_sequence_pairs(batch_index, 4, batch=5)
    # tiles [0..3], [4..7], [8..9]
    assert pair_ids.tolist() == [0, 0, 0, 1, 2, 3, 3, 3, 4, 4]
    assert pair_ids.dtype == torch.int32 and num_pairs >= 5
    assert starts.tolist() == [0, 1, 3, 3, 5, 5]  # sequence 2 and 4 have no rows
    with pytest.raises(RuntimeError, match="sorted by sequence"):
        tile_sequence_pairs(torch.tensor([1, 0]), 4, batch=2)


@pytest.mark.parametrize("train_mapping", [False, True])
def test_two_runs_give_the_same_bits(train_mapping, device, strategy):
    """The states' gradients never depend on the order programs run in (no atomics reach them);
    two runs are bitwise equal. With g and the tail frozen that is every output (the compile check
    shows that backward has no atomic at all); so it is with the GEMM strategy when they train
    (see test_gemm_trained_backward_launches_no_atomics). The fused strategy's trained g and tail
    gradients still use atomics and are left out. In the interpreter programs run in turn, so on
    CPU this guards the reductions' order; on CUDA (gpu_check) it is the real test."""
    case = make_case(num_states=2, batch=3, seq=23, hidden=20, dims=(24, 7), positions_per_seq=23, seed=3,
                     device=device)
    first = _loss_and_grads("triton", *case, train_mapping=train_mapping, train_tail=train_mapping)
    second = _loss_and_grads("triton", *case, train_mapping=train_mapping, train_tail=train_mapping)
    assert torch.equal(first[0], second[0])
    for name, grad in first[1].items():
        if train_mapping and strategy == "fused" and not name.startswith("hidden_states"):
            continue
        assert (grad is None) == (second[1][name] is None), name
        assert grad is None or torch.equal(grad, second[1][name]), name


@pytest.mark.parametrize("train_mapping,train_tail", [(True, True), (True, False), (False, True)])
def test_gemm_trained_backward_launches_no_atomics(train_mapping, train_tail, monkeypatch, device, strategy):
    """With g or the tail trained, the GEMM strategy runs kernel 2's backward only in its frozen
    variant (no atomic instruction: compile_check's must_be_deterministic) or not at all: the
    trained chain's gradients are summed in torch and by the ordered pair sums. The gradients still
    match the reference."""
    if strategy != "gemm":
        pytest.skip("the GEMM strategy's trained backward")
    launches = []
    real = fused_bridge.bridge_backward

    def spy(*args, **kwargs):
        launches.append(args[13:15])  # train_mapping, train_tail
        return real(*args, **kwargs)

    monkeypatch.setattr(fused_bridge, "bridge_backward", spy)
    case = make_case(num_states=2, batch=3, seq=13, hidden=20, dims=(24, 7, 5), positions_per_seq=9, seed=5,
                     device=device)
    _compare(case, "ou", train_mapping=train_mapping, train_tail=train_tail)
    assert all(flags == (False, False) for flags in launches), launches


def test_gemm_wide_chain_backward_runs_in_torch(monkeypatch, device, strategy):
    """A layer 2 wider than kernel 2's spill-free A1_SAVED backward (P2 > SAVED_CHAIN_MAX_P2) takes
    the torch chain on the saved a1 even with g frozen; results still match the reference."""
    if strategy != "gemm":
        pytest.skip("the GEMM strategy's backward")
    from sbpet.kernels.chain_config import SAVED_CHAIN_MAX_P2, saved_chain_fits

    dims = (12, SAVED_CHAIN_MAX_P2 + 3, 6)
    assert not saved_chain_fits(dims) and saved_chain_fits((12, SAVED_CHAIN_MAX_P2, 6))
    launches = []
    monkeypatch.setattr(fused_bridge, "bridge_backward", lambda *a, **k: launches.append(a))
    case = make_case(num_states=2, batch=2, seq=7, hidden=20, dims=dims, positions_per_seq=5, seed=6, device=device)
    _compare(case, "brownian", train_mapping=False, train_tail=False)
    assert launches == []


def test_strided_views_of_a_stacked_tensor(device):
    """Layers as slices of one stacked tensor, one with a non-unit H stride: read in place."""
    states, labels, mask, mapping, tail = make_case(num_states=3, dims=(24, 7), seed=9, device=device)
    stacked = torch.stack(states)  # [L+1, B, S, H]
    views = [stacked[0], stacked[1], stacked[2].transpose(0, 1).contiguous().transpose(0, 1)]
    wide = torch.zeros(*stacked[0].shape[:2], 2 * stacked.shape[-1], device=device)
    wide[..., ::2] = stacked[0]
    views[0] = wide[..., ::2]  # H stride 2
    assert views[0].stride(-1) == 2 and not views[2].is_contiguous()
    _compare((views, labels, mask, mapping, tail), "brownian")


def test_does_not_write_inputs(device):
    states, labels, mask, mapping, tail = make_case(dims=(20, 9, 5), seed=1, device=device)
    before = [h.clone() for h in states] + [tail.clone()] + [p.detach().clone() for p in mapping.parameters()]
    _loss_and_grads("triton", states, labels, mask, mapping, tail)
    after = list(states) + [tail] + [p.detach() for p in mapping.parameters()]
    for i, (a, b) in enumerate(zip(after, before)):
        assert torch.equal(a, b), f"input {i} was modified"


def test_context_kernels_poisoned_outputs(device):
    """Kernel 1 alone, forward and backward, into NaN-filled outputs, against torch formulas."""
    states, labels, mask, _, _ = make_case(num_states=3, batch=3, seq=13, hidden=40, dims=(8,), seed=6,
                                           device=device)
    num_states, (batch, seq, hidden) = len(states), states[0].shape
    table = context_kernels.layer_table(states)
    sequences = context_kernels.Sequences.per_row(mask)
    poisoned = torch.full((num_states, batch, hidden), float("nan"), device=device)
    contexts = context_kernels.context_forward(table, num_states, sequences, out=poisoned)
    m = mask.double()
    expected = torch.stack([(h.double() * m[..., None]).sum(1) / m.sum(1, keepdim=True) for h in states])
    assert_close(contexts, expected, torch.float32, "contexts")

    batch_index, seq_index = (labels != -100).nonzero(as_tuple=True)
    grad_contexts = torch.randn(num_states, batch, hidden, device=device)
    grad_tokens = torch.randn(num_states, batch_index.numel(), hidden, device=device)
    out = torch.full((num_states, batch, seq, hidden), float("nan"), device=device)
    grads = context_kernels.context_backward(grad_contexts, sequences, batch_index, seq_index,
                                             grad_tokens, torch.float32, out=out)
    expected = (m / m.sum(1, keepdim=True))[None, :, :, None] * grad_contexts.double()[:, :, None, :]
    expected[:, batch_index, seq_index] += grad_tokens.double()
    assert_close(grads, expected, torch.float32, "grad_states")


def test_context_kernels_packed_sequences_poisoned_outputs(device):
    """Kernel 1 with packed rows: one context per sequence (a sequence a column range of its row,
    empty slots included), forward and backward into NaN-filled outputs, against float64 formulas;
    with GATHER_ROWS the regularised rows of every sequence are copied out once."""
    from sbpet.backends.triton_host import kernel_sequences
    from sbpet.core.positions import find_segments

    states, labels, mask, _, _ = make_case(num_states=2, batch=2, seq=19, hidden=20, dims=(8,), seed=7,
                                           device=device)
    mask = torch.ones_like(mask)
    mask[1, 15:] = 0  # row 1 padded at its end
    position_ids = torch.tensor([list(range(7)) + list(range(1)) + list(range(11)),
                                 list(range(4)) + list(range(15))])
    segments = find_segments(mask.cpu() != 0, device, position_ids=position_ids)
    assert segments.slots == 3  # row 1 has two sequences: one empty slot
    sequences = kernel_sequences(mask, segments.index, segments.start, segments.end, segments.slots)
    num_states, (batch, seq, hidden) = len(states), states[0].shape
    poisoned = torch.full((num_states, segments.num_contexts, hidden), float("nan"), device=device)
    batch_index, seq_index = (labels != -100).nonzero(as_tuple=True)
    row_of = context_kernels.row_lookup(batch, seq, batch_index, seq_index)
    tokens = torch.full((num_states, batch_index.numel(), hidden), float("nan"), device=device)
    contexts = context_kernels.context_forward(context_kernels.layer_table(states), num_states, sequences,
                                               out=poisoned, row_of=row_of, tokens_out=tokens)
    expected = torch.zeros(num_states, segments.num_contexts, hidden, dtype=torch.float64)
    weights = torch.zeros(batch, seq, dtype=torch.float64)
    for g, (a, b) in enumerate(zip(segments.start.tolist(), segments.end.tolist())):
        if a < b:
            row = g // segments.slots
            real = mask[row, a:b].cpu().double()
            weights[row, a:b] = real / real.sum()
            for layer, h in enumerate(states):
                expected[layer, g] = (h[row, a:b].cpu().double() * real[:, None]).sum(0) / real.sum()
    assert_close(contexts, expected, torch.float32, "packed contexts")
    assert_close(tokens, torch.stack([h[batch_index, seq_index] for h in states]), torch.float32, "gathered rows")

    grad_contexts = torch.randn(num_states, segments.num_contexts, hidden, device=device)
    grad_tokens = torch.randn(num_states, batch_index.numel(), hidden, device=device)
    out = torch.full((num_states, batch, seq, hidden), float("nan"), device=device)
    grads = context_kernels.context_backward(grad_contexts, sequences, batch_index, seq_index, grad_tokens,
                                             torch.float32, out=out)
    index = segments.index.cpu()
    want = weights[None, :, :, None] * grad_contexts.cpu().double()[:, index]
    want[:, batch_index.cpu(), seq_index.cpu()] += grad_tokens.cpu().double()
    assert_close(grads, want, torch.float32, "packed grad_states")


def test_torch_compile_matches_eager(device):
    """A compiled function calling the backend (two registered custom ops) = eager, loss and grads."""
    states, labels, mask, mapping, tail = make_case(dims=(20, 9, 5), seed=8, device=device)

    def regulariser(states, tail):
        return 2.0 * sbpet.bridge_loss(states, labels, mask, mapping, tail, "ou", backend="triton")

    results = []
    for fn in (regulariser, torch.compile(regulariser, backend="aot_eager" if not ON_GPU else "inductor",
                                          fullgraph=False)):
        xs = [h.detach().clone().requires_grad_(True) for h in states]
        t = tail.detach().clone().requires_grad_(True)
        mapping.zero_grad(set_to_none=True)
        loss = fn(xs, t)
        loss.backward()
        results.append((loss.detach(), [x.grad for x in xs], t.grad,
                        [p.grad.clone() for p in mapping.parameters()]))
    (l0, g0, t0, p0), (l1, g1, t1, p1) = results
    assert_close(l1, l0, torch.float32, "compiled loss")
    for i, (a, b) in enumerate(zip(g1, g0)):
        assert_close(a, b, torch.float32, f"compiled grad hidden_states[{i}]")
    assert_close(t1, t0, torch.float32, "compiled grad tail")
    for i, (a, b) in enumerate(zip(p1, p0)):
        assert_close(a, b, torch.float32, f"compiled grad mapping param {i}")


def test_custom_op_schema(strategy):
    """The registered ops pass torch's custom-op checks (fake kernels, autograd registration)."""
    states, labels, mask, mapping, tail = make_case(dims=(12, 5), seed=12, batch=1, seq=5, hidden=16)
    batch_index, seq_index = (labels != -100).nonzero(as_tuple=True)
    mean_coef, variance = sbpet.get_bridge("ou").marginals(len(states))
    states = [h.requires_grad_(True) for h in states]
    args = (states, mask, batch_index, seq_index, labels[batch_index, seq_index],
            [layer.weight for layer in mapping.layers], [layer.bias for layer in mapping.layers],
            tail.requires_grad_(True), mean_coef, variance)
    if ON_GPU:
        args = tuple([a.cuda() for a in x] if isinstance(x, list) else x.cuda() for x in args)
    checks = ("test_schema", "test_faketensor", "test_autograd_registration")
    num_valid = torch.tensor(batch_index.shape[0] - 1, device=tail.device)  # a fixed capacity's count
    # One sequence per row, and the row packed as two sequences (position ids restarting at 2).
    from sbpet.core.positions import Segments, find_segments

    per_row = Segments.per_row(1, 5, tail.device)
    packed = find_segments(torch.ones(1, 5, dtype=torch.bool), tail.device,
                           position_ids=torch.tensor([[0, 1, 0, 1, 2]]))
    layouts = [(s.index, s.start, s.end, s.slots) for s in (per_row, packed)]
    for count in (None, num_valid):
        for layout in layouts:
            torch.library.opcheck(torch.ops.sbpet.triton_bridge_forward.default,
                                  (*args, "fp32", strategy, count, *layout), test_utils=checks)
    # The parts interface's two ops: per-layer capture (kernel 1) and the loss from parts (kernel 2).
    states, mask, batch_index, seq_index, targets, weights, biases, tail, mean_coef, variance = args
    for layout in layouts:
        torch.library.opcheck(torch.ops.sbpet.triton_capture.default, (states[0], mask, batch_index, seq_index,
                                                                        *layout), test_utils=checks)
    contexts = torch.randn(len(states), *states[0].shape[::2], device=tail.device, requires_grad=True)
    tokens = [h.detach()[batch_index, seq_index].requires_grad_(True) for h in states]
    torch.library.opcheck(torch.ops.sbpet.triton_parts_forward.default,
                          (contexts, tokens, batch_index, targets, weights, biases, tail, mean_coef, variance,
                           "bf16", strategy, num_valid), test_utils=checks)


def test_device_checks():
    if ON_GPU:
        with pytest.raises(ValueError, match="CPU"):
            triton_backend.check_triton_available("cpu")
        assert triton_backend.triton_is_usable("cuda")
    else:
        assert triton_backend.triton_is_usable("cpu")
        with pytest.raises(ValueError, match="CPU tensors only|CUDA"):
            triton_backend.check_triton_available("cuda")


def test_cpu_refused_without_interpreter():
    """Outside the interpreter the triton backend refuses CPU tensors with a clear ValueError."""
    code = (
        "import torch, sbpet\n"
        "from sbpet.backends import triton_backend\n"
        "try:\n"
        "    triton_backend.check_triton_available(torch.device('cpu'))\n"
        "except ValueError as e:\n"
        "    assert 'CPU' in str(e), e\n"
        "    print('refused')\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "refused" in out.stdout


@pytest.mark.parametrize("budget", [0.0, 1e9])
@pytest.mark.parametrize("train_mapping", [False, True])
def test_gemm_layer_groups(budget, train_mapping, monkeypatch, device, strategy):
    """The GEMM strategy launches once per group of layers (a1 of a group within the budget): one
    layer per group (budget 0) and all layers in one group give the reference's results, and the
    group split is what the launches used."""
    if strategy != "gemm":
        pytest.skip("the GEMM strategy's groups")
    monkeypatch.setattr(triton_gemm, "GROUP_BUDGET", budget)
    launches = []
    real = layer_gemm.first_layer

    def spy(table, layer0, num_layers, *args, **kwargs):
        launches.append((layer0, num_layers))
        return real(table, layer0, num_layers, *args, **kwargs)

    monkeypatch.setattr(layer_gemm, "first_layer", spy)
    case = make_case(num_states=3, batch=3, seq=19, hidden=21, dims=(20, 9, 5), positions_per_seq=19, seed=4,
                     device=device)
    _compare(case, "ou", train_mapping=train_mapping, train_tail=train_mapping)
    expected = [(0, 1), (1, 1), (2, 1)] if budget == 0.0 else [(0, 3)]
    assert launches == expected * 2  # forward, then the backward's recompute


def test_layer_groups_and_configs(monkeypatch):
    """Group sizes follow the budget; the GPU block sizes switch at FEW_ROWS and by operand width."""
    assert triton_gemm.layer_groups(5, 10, 8, torch.float32, 10**9) == [(0, 5)]
    assert triton_gemm.layer_groups(5, 10, 8, torch.float32, 0) == [(l, l + 1) for l in range(5)]
    # 320 bytes of a1 per layer; the budget's share of 16,000 bytes = 640 bytes: two layers per group.
    monkeypatch.setattr(triton_gemm, "GROUP_BUDGET", 0.04)
    assert triton_gemm.layer_groups(5, 10, 8, torch.float32, 16_000) == [(0, 2), (2, 4), (4, 5)]
    few = layer_gemm.gemm_config(32, "bf16", interpret=False)
    many = layer_gemm.gemm_config(layer_gemm.FEW_ROWS, "bf16", interpret=False)
    wide = layer_gemm.gemm_config(layer_gemm.FEW_ROWS, "fp32", interpret=False)
    assert few["BLOCK_M"] == 16 and many["BLOCK_M"] == 128 and wide["BLOCK_M"] == 64
    assert many["BLOCK_M"] % 64 == 0 and wide["BLOCK_M"] % 64 == 0  # Hopper wgmma tiles
    assert layer_gemm.gemm_config(layer_gemm.FEW_ROWS, "bf16", interpret=False, kernel="token_grad")["BLOCK_M"] == 32
    assert layer_gemm.gemm_config(layer_gemm.FEW_ROWS, "bf16", interpret=False, contiguous_h=False) == few
    assert layer_gemm.gemm_config(layer_gemm.FEW_ROWS, "fp32", interpret=False, contiguous_h=False)["BLOCK_K"] == 16


def test_token_weight_cast_once_per_version():
    """W1's token half in the operand dtype is cast once per weight version."""
    weight = torch.randn(6, 10)
    first = triton_gemm.token_weight(weight, 5, torch.bfloat16)
    assert first.dtype == torch.bfloat16 and torch.equal(first.float(), weight[:, 5:].bfloat16().float())
    assert triton_gemm.token_weight(weight, 5, torch.bfloat16) is first
    with torch.no_grad():
        weight.add_(1.0)  # an optimizer step bumps the version
    again = triton_gemm.token_weight(weight, 5, torch.bfloat16)
    assert again is not first and torch.equal(again.float(), weight[:, 5:].bfloat16().float())
    assert triton_gemm.token_weight(weight, 5, torch.float32).data_ptr() == weight[:, 5:].data_ptr()
