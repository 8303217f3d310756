"""The SDE regulariser (sbpet.modules.sde): drift network, solver, loss, module, save/load (the
spline is tested in tests/core/test_spline.py).

Independent float64 checks: the KL against hand-computed one- and two-step values and against the exact expectation of
the Euler estimator for a zero drift; torchsde's logqp on the same Brownian path when torchsde
happens to be installed.
"""

import math

import pytest
import torch

from helpers import assert_close

import sbpet
from sbpet.core.bridges import get_bridge, layer_times
from sbpet.core.spline import NaturalCubicSpline, solver_times
from sbpet.modules.sde import DriftNetwork, SDEBridgeRegularizer, sde_bridge_loss

BRIDGES = ("brownian", "ou")
METHODS = ("euler", "heun")


# ------------------------------------------------------------------------------------------------
# helpers


def make_sde_case(num_states=4, batch=3, seq=11, hidden=13, latent=5, vocab=29, dtype=torch.float32, seed=0):
    gen = torch.Generator().manual_seed(seed)
    states = [torch.randn(batch, seq, hidden, generator=gen).to(dtype) + 0.3 for _ in range(num_states)]
    labels = torch.full((batch, seq), -100, dtype=torch.long)
    for b in range(batch):
        pos = torch.randperm(seq, generator=gen)[:2]
        labels[b, pos] = torch.randint(0, vocab, (2,), generator=gen)
    mask = torch.ones(batch, seq, dtype=torch.long)
    tail = sbpet.tail_from_embeddings(torch.randn(vocab, hidden, generator=gen), latent)
    return states, labels, mask, tail


def positions(labels):
    b, s = (labels != -100).nonzero(as_tuple=True)
    return b, s, labels[b, s]


def run_loss(states, labels, net, tail, bridge="brownian", steps=1, method="euler", seed=0, mask=None):
    b, s, y = positions(labels)
    gen = torch.Generator().manual_seed(seed)
    return sde_bridge_loss(states, mask, b, s, y, net, tail, bridge, steps, method, gen)


# ------------------------------------------------------------------------------------------------
# drift network


def test_drift_network_split_first_layer_matches_forward():
    torch.manual_seed(0)
    net = DriftNetwork(hidden_size=13, latent_size=5, width=17, depth=3, init_scale=1.0).double()
    z = torch.randn(4, 5, dtype=torch.float64)
    x = torch.randn(4, 13, dtype=torch.float64) * 3 + 1
    t = 0.37
    w = net.input.weight
    inputs = torch.cat([torch.full((4, 1), t, dtype=torch.float64), z, torch.nn.functional.layer_norm(x, (13,))], 1)
    out = inputs @ w.T + net.input.bias
    for layer in net.hidden:
        out = layer(0.909 * out * torch.sigmoid(out))
    expected = net.output(0.909 * out * torch.sigmoid(out))
    assert_close(net(t, z, x), expected, torch.float64, "drift")
    assert_close(net(torch.full((4,), t, dtype=torch.float64), z, x), expected, torch.float64, "drift [N] t")


def test_drift_network_starts_small():
    torch.manual_seed(0)
    net = DriftNetwork(64, 8)
    out = net(0.5, torch.randn(100, 8), torch.randn(100, 64))
    assert out.abs().max() < 0.1
    assert torch.equal(net.output.bias, torch.zeros(8))


# ------------------------------------------------------------------------------------------------
# the loss


@pytest.mark.parametrize("bridge", BRIDGES)
@pytest.mark.parametrize("method", METHODS)
def test_kl_nonnegative_and_zero_for_prior_drift(bridge, method):
    states, labels, _, tail = make_sde_case()
    torch.manual_seed(0)
    net = DriftNetwork(13, 5, width=16, init_scale=1.0)
    for seed in range(3):
        assert run_loss(states, labels, net, tail, bridge, 2, method, seed).item() > 0
    b, s, y = positions(labels)
    ends = tail[y]
    prior = get_bridge(bridge)

    def prior_drift(t, z, x):
        return prior.drift(t, z, ends)

    for steps in (1, 3):
        loss = run_loss(states, labels, prior_drift, tail, bridge, steps, method)
        assert loss.item() == 0.0


def test_fast_path_matches_generic_callable():
    states, labels, _, tail = make_sde_case(num_states=5)
    torch.manual_seed(0)
    net = DriftNetwork(13, 5, width=16, init_scale=0.5)
    for method in METHODS:
        fast = run_loss(states, labels, net, tail, "ou", 2, method, seed=4)
        generic = run_loss(states, labels, lambda t, z, x: net(t, z, x), tail, "ou", 2, method, seed=4)
        assert_close(fast, generic, torch.float32, f"fast vs generic {method}")


@pytest.mark.parametrize("bridge", BRIDGES)
def test_kl_hand_computed_one_and_two_steps(bridge):
    """L = 0: one hidden state at t_0 = 1/2. A constant drift c; the prior at (t, z)."""
    prior = get_bridge(bridge)
    c = torch.tensor([[0.3, -0.2, 0.5]], dtype=torch.float64)
    e = torch.tensor([[0.6, 0.0, -0.8]], dtype=torch.float64)
    tail = e.clone()
    states = [torch.randn(1, 1, 4, dtype=torch.float64)]
    labels = torch.zeros(1, 1, dtype=torch.long)

    def const(t, z, x):
        return c.expand_as(z)

    def prior_value(t, z):  # written from docs/METHOD.md, not via sbpet.core.bridges
        if bridge == "brownian":
            return (e - z) / (1 - t)
        return -z / math.tanh(1 - t) + e / math.sinh(1 - t)

    one = run_loss(states, labels, const, tail, bridge, 1, "euler")
    expected = 0.5 * 0.5 * (c - prior_value(0.0, torch.zeros(1, 3))).pow(2).sum()
    assert_close(one, expected, torch.float64, "one Euler step")

    # two sub-steps of 1/4; the noise is one standard-normal [G-1, N, D] draw scaled by sqrt(dt)
    xi = torch.randn((2, 1, 3), generator=torch.Generator().manual_seed(7), dtype=torch.float64) * 0.5
    z1 = c * 0.25 + xi[0]
    u0 = c - prior_value(0.0, torch.zeros(1, 3))
    u1 = c - prior_value(0.25, z1)
    euler = 0.5 * 0.25 * (u0.pow(2).sum() + u1.pow(2).sum())
    assert_close(run_loss(states, labels, const, tail, bridge, 2, "euler", seed=7), euler, torch.float64, "euler 2")
    # Heun: trapezoid on the predictor; with a constant drift, predictor = corrector
    z2 = z1 + c * 0.25 + xi[1]
    u2 = c - prior_value(0.5, z2)
    heun = 0.25 * 0.25 * (u0.pow(2).sum() + 2 * u1.pow(2).sum() + u2.pow(2).sum())
    assert_close(run_loss(states, labels, const, tail, bridge, 2, "heun", seed=7), heun, torch.float64, "heun 2")
    assert prior.drift(torch.tensor(0.25, dtype=torch.float64), z1, e).sub(prior_value(0.25, z1)).abs().max() < 1e-14


def test_euler_kl_expectation_for_zero_drift():
    """f = 0: z_k = W(t_k), so E[KL_euler] = sum_k dt/2 (|e|^2 + D t_k) / (1 - t_k)^2 (Brownian).
    Checks the noise scale and the solver against a formula, within 5 standard errors."""
    num_states, steps, d, n = 3, 2, 4, 4000
    tail = torch.tensor([[0.0, 0.6, 0.8, 0.0]], dtype=torch.float64)
    states = [torch.zeros(1, n, 2, dtype=torch.float64) for _ in range(num_states)]
    labels = torch.zeros(1, n, dtype=torch.long)
    b, s, y = positions(labels)
    zero = lambda t, z, x: torch.zeros_like(z)  # noqa: E731
    times = solver_times(num_states, steps)
    expected = sum(
        0.5 * float(times[k + 1] - times[k]) * (1.0 + d * float(times[k])) / (1 - float(times[k])) ** 2
        for k in range(len(times) - 1)
    )
    # per-path KLs: the loss over one position at a time is too slow; use N positions and the
    # variance from 8 independent batches
    means = torch.stack([
        sde_bridge_loss(states, None, b, s, y, zero, tail, "brownian", steps, "euler",
                        torch.Generator().manual_seed(seed))
        for seed in range(8)
    ])
    stderr = float(means.std() / math.sqrt(8))
    assert abs(float(means.mean()) - expected) < 5 * stderr + 1e-9, (float(means.mean()), expected, stderr)


def test_heun_is_more_accurate_than_euler():
    """Zero drift, Brownian bridge: the exact expected KL up to T' = (L+1)/(L+2) is
    1/2 int_0^T' (|e|^2 + D t) / (1-t)^2 dt. Heun with 2 sub-steps beats Euler with 4 (same cost)."""
    num_states, d, n = 3, 4, 6000
    T = num_states / (num_states + 1)
    exact = 0.5 * ((1 / (1 - T) - 1) + d * ((1 / (1 - T) - 1) + math.log(1 - T)))
    tail = torch.tensor([[1.0, 0.0, 0.0, 0.0]])
    states = [torch.zeros(1, n, 2) for _ in range(num_states)]
    labels = torch.zeros(1, n, dtype=torch.long)
    zero = lambda t, z, x: torch.zeros_like(z)  # noqa: E731
    euler = float(run_loss(states, labels, zero, tail, "brownian", 4, "euler", seed=1))
    heun = float(run_loss(states, labels, zero, tail, "brownian", 2, "heun", seed=1))
    assert abs(heun - exact) < 0.5 * abs(euler - exact), (heun, euler, exact)
    assert abs(heun - exact) / exact < 0.12


def test_fixed_seed_fixed_loss():
    states, labels, _, tail = make_sde_case()
    torch.manual_seed(0)
    net = DriftNetwork(13, 5, width=16, init_scale=1.0)
    a = run_loss(states, labels, net, tail, "ou", 2, "heun", seed=11)
    b = run_loss(states, labels, net, tail, "ou", 2, "heun", seed=11)
    c = run_loss(states, labels, net, tail, "ou", 2, "heun", seed=12)
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


@pytest.mark.parametrize("method", METHODS)
def test_gradcheck_hidden_states_and_drift_network(method):
    torch.manual_seed(0)
    states, labels, _, tail = make_sde_case(num_states=3, batch=2, seq=3, hidden=4, latent=2, vocab=7,
                                            dtype=torch.float64)
    tail = tail.double()
    net = DriftNetwork(4, 2, width=5, depth=2, init_scale=1.0).double()
    b, s, y = positions(labels)
    names = [name for name, _ in net.named_parameters()]

    class Wrapped(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.net = net

        def forward(self, states):
            return sde_bridge_loss(states, None, b, s, y, self.net, tail, "ou", 2, method,
                                   torch.Generator().manual_seed(3))

    wrapped = Wrapped()

    def fn(*args):
        st, params = list(args[: len(states)]), args[len(states):]
        return torch.func.functional_call(wrapped, {f"net.{n}": p for n, p in zip(names, params)}, (st,))

    inputs = [h.clone().requires_grad_(True) for h in states]
    params = [p.detach().clone().requires_grad_(True) for p in net.parameters()]
    assert torch.autograd.gradcheck(fn, (*inputs, *params), eps=1e-6, atol=1e-6, rtol=1e-5)
    # the gradient reaches every layer's regularised tokens (Heun also uses the last layer)
    loss = fn(*inputs, *params)
    grads = torch.autograd.grad(loss, inputs)
    used = grads[:-1] if method == "euler" else grads
    for layer, g in enumerate(used):
        assert g[b, s].abs().sum() > 0, f"no gradient at layer {layer}"
        rest = g.clone()
        rest[b, s] = 0
        assert torch.equal(rest, torch.zeros_like(rest)), "gradient leaked to unregularised positions"


def test_empty_batch_is_exactly_zero_with_zero_gradients():
    states, labels, _, tail = make_sde_case()
    states = [h.requires_grad_(True) for h in states]
    net = DriftNetwork(13, 5, width=8)
    labels = torch.full_like(labels, -100)
    loss = run_loss(states, labels, net, tail, "brownian", 2, "heun")
    assert loss.item() == 0.0
    loss.backward()
    for h in states:
        assert h.grad is None or torch.equal(h.grad, torch.zeros_like(h))
    for p in net.parameters():
        assert p.grad is None or torch.equal(p.grad, torch.zeros_like(p))


def test_low_precision_states_computed_in_float32():
    states, labels, _, tail = make_sde_case()
    torch.manual_seed(0)
    net = DriftNetwork(13, 5, width=16, init_scale=1.0)
    ref = run_loss(states, labels, net, tail, "brownian", 1, "euler")
    low = run_loss([h.bfloat16() for h in states], labels, net, tail, "brownian", 1, "euler")
    assert low.dtype == torch.float32
    assert_close(low, ref, torch.bfloat16, "bf16 states")


def test_loss_option_errors():
    states, labels, _, tail = make_sde_case()
    net = DriftNetwork(13, 5, width=8)
    with pytest.raises(ValueError, match="method"):
        run_loss(states, labels, net, tail, method="rk4")
    with pytest.raises(ValueError, match="steps_per_layer"):
        run_loss(states, labels, net, tail, steps=0)
    with pytest.raises(ValueError, match="bridge"):
        run_loss(states, labels, net, tail, bridge="geometric")


# ------------------------------------------------------------------------------------------------
# the module


def make_module(**kw):
    args = dict(hidden_size=13, num_layers=3, latent_size=5, word_embeddings=torch.randn(29, 13,
                generator=torch.Generator().manual_seed(0)), width=16, seed=0)
    args.update(kw)
    torch.manual_seed(0)
    return SDEBridgeRegularizer(**args)


def test_module_forward_matches_function_and_is_seeded():
    states, labels, mask, _ = make_sde_case()
    reg = make_module(bridge="ou", steps_per_layer=2, method="heun")
    b, s, y = positions(labels)
    expected = sde_bridge_loss(states, mask, b, s, y, reg.drift_net, reg.tail, "ou", 2, "heun",
                               torch.Generator().manual_seed(0))
    first, second = reg(states, labels, mask), reg(states, labels, mask)
    assert_close(first, expected, torch.float32, "module")
    assert not torch.equal(first, second)  # fresh noise each call
    again = make_module(bridge="ou", steps_per_layer=2, method="heun")
    assert torch.equal(again(states, labels, mask), first)
    reg.reseed()
    assert torch.equal(reg(states, labels, mask), first)
    assert reg.mapping is reg.drift_net
    assert isinstance(reg, sbpet.BridgeRegularizer) and reg.config["kind"] == "sde"


def test_module_shift_labels_and_stacked_states():
    states, labels, mask, _ = make_sde_case()
    reg = make_module(shift_labels=True)
    shifted = torch.full_like(labels, -100)
    shifted[:, :-1] = labels[:, 1:]
    a = reg(torch.stack(states), labels, mask)
    reg.reseed()
    plain = make_module()
    assert torch.equal(a, plain(states, shifted, mask))


def test_module_bad_inputs():
    states, labels, mask, tail = make_sde_case()
    reg = make_module()
    with pytest.raises(ValueError, match="num_layers"):
        reg(states[:-1], labels, mask)
    with pytest.raises(ValueError, match="hidden size"):
        reg([h[..., :-1] for h in states], labels, mask)
    with pytest.raises(ValueError, match="hidden_states\\[2\\]"):
        reg([states[0], states[1], states[2][:, :-1], states[3]], labels, mask)
    bad = labels.clone()
    bad[0, 0] = 29
    with pytest.raises(ValueError, match="labels must be in"):
        reg(states, bad, mask)
    empty = mask.clone()
    empty[1] = 0
    with pytest.raises(ValueError, match="attention_mask"):
        reg(states, labels, empty)
    with pytest.raises(ValueError, match="method"):
        make_module(method="milstein")
    with pytest.raises(ValueError, match="steps_per_layer"):
        make_module(steps_per_layer=0)
    with pytest.raises(ValueError, match="seed"):
        make_module(seed=1.5)
    with pytest.raises(ValueError, match="tail"):
        SDEBridgeRegularizer(13, 3, latent_size=4, tail=tail)  # tail has 5 columns
    with pytest.raises(ValueError, match="exactly one"):
        SDEBridgeRegularizer(13, 3, latent_size=5)


def test_module_save_and_load(tmp_path):
    states, labels, mask, _ = make_sde_case()
    reg = make_module(bridge="ou", method="heun", steps_per_layer=2, train_tail=True, depth=3)
    with torch.no_grad():
        for p in reg.parameters():
            p.add_(0.01 * torch.randn_like(p))
    expected = reg(states, labels, mask)
    reg.save_pretrained(tmp_path / "sde")
    for cls in (sbpet.BridgeRegularizer, SDEBridgeRegularizer):
        loaded = cls.from_pretrained(tmp_path / "sde")
        assert type(loaded) is SDEBridgeRegularizer
        assert loaded.config == reg.config
        assert isinstance(loaded.tail, torch.nn.Parameter)
        for k, v in reg.state_dict().items():
            assert torch.equal(loaded.state_dict()[k], v), k
        assert torch.equal(loaded(states, labels, mask), expected)


def test_fitting_reduces_the_kl():
    """A few AdamW steps on f (common random numbers: reseeded each step) lower the KL."""
    states, labels, mask, _ = make_sde_case(num_states=5)
    reg = make_module(num_layers=4, method="heun")
    optimizer = torch.optim.AdamW(reg.parameters(), lr=1e-2)
    history = []
    for _ in range(30):
        reg.reseed()
        loss = reg(states, labels, mask)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        history.append(loss.item())
    assert history[-1] < 0.7 * history[0], history


# ------------------------------------------------------------------------------------------------
# torchsde, when it happens to be installed (never a dependency)


@pytest.mark.parametrize("method", METHODS)
def test_matches_torchsde_logqp(method):
    torchsde = pytest.importorskip("torchsde")
    from torchsde._brownian.brownian_base import BaseBrownian

    num_states, steps, bridge = 4, 2, "ou"
    states, labels, _, tail = make_sde_case(num_states=num_states, dtype=torch.float64)
    tail = tail.double()
    torch.manual_seed(0)
    net = DriftNetwork(13, 5, width=16, init_scale=1.0).double()
    b, s, y = positions(labels)
    count, d = y.numel(), tail.shape[1]
    times = solver_times(num_states, steps)
    dt = float(times[1] - times[0])
    noise = torch.randn((len(times) - 1, count, d), generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    path = torch.cat([torch.zeros(1, count, d + 1, dtype=torch.float64),
                      torch.nn.functional.pad(torch.cumsum(noise * dt**0.5, 0), (0, 1))])

    class GridBrownian(BaseBrownian):
        """The same increments our solver draws, for torchsde's solver (extra logqp channel 0)."""

        def __call__(self, ta, tb=None, return_U=False, return_A=False):
            ia, ib = (int(round(float(t) / dt)) for t in (ta, tb))
            return path[ib] - path[ia]

        def __repr__(self):
            return "GridBrownian()"

        dtype = torch.float64
        device = torch.device("cpu")
        shape = (count, d + 1)
        levy_area_approximation = "none"

    knots = torch.cat([torch.zeros(1, dtype=torch.float64), layer_times(num_states)])
    spline = NaturalCubicSpline(knots, torch.cat([torch.zeros(1, count, 13, dtype=torch.float64),
                                                  torch.stack([h[b, s] for h in states])]))
    prior = get_bridge(bridge)
    ends = tail[y]

    class SDE(torch.nn.Module):
        noise_type = "diagonal"
        sde_type = "ito" if method == "euler" else "stratonovich"

        def f(self, t, z):
            return net(t, z, spline.evaluate(t))

        def g(self, t, z):
            return torch.ones_like(z)

        def h(self, t, z):
            return prior.drift(torch.as_tensor(t, dtype=torch.float64), z, ends)

    _, log_ratio = torchsde.sdeint(SDE(), torch.zeros(count, d, dtype=torch.float64),
                                   torch.tensor([0.0, float(times[-1])], dtype=torch.float64),
                                   method=method, dt=dt, bm=GridBrownian(), logqp=True)
    ours = run_loss(states, labels, net, tail, bridge, steps, method, seed=5)
    assert_close(ours, log_ratio.sum(0).mean(), torch.float64, f"torchsde {method}", rtol=1e-9, atol=1e-12)


# ------------------------------------------------------------------------------------------------
# Hugging Face: BridgeTrainer with the SDE regulariser (through output_hidden_states)


def test_bridge_trainer_with_sde_regulariser(tmp_path):
    pytest.importorskip("accelerate")
    transformers = pytest.importorskip("transformers")
    from hf_helpers import LABEL_WORDS, MASK_ID, classification_batch, tiny_bert_config

    from sbpet.hf import masked_lm_bridge_labels
    from sbpet.hf.trainer import BridgeTrainer

    torch.manual_seed(0)
    model = transformers.BertForSequenceClassification(tiny_bert_config())
    cfg = model.config
    reg = SDEBridgeRegularizer(cfg.hidden_size, cfg.num_hidden_layers, latent_size=6, width=16, seed=0,
                               word_embeddings=model.get_input_embeddings().weight, method="heun")
    before = {k: v.clone() for k, v in reg.state_dict().items()}
    ids, mask, y = classification_batch(batch=8)
    bridge_labels = masked_lm_bridge_labels(ids, y, MASK_ID, LABEL_WORDS)
    data = [{"input_ids": ids[i], "attention_mask": mask[i], "labels": y[i], "bridge_labels": bridge_labels[i]}
            for i in range(8)]
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path), per_device_train_batch_size=4, max_steps=2, logging_steps=1, learning_rate=1e-3,
        report_to=[], use_cpu=True, save_strategy="no", disable_tqdm=True, seed=0)
    collate = lambda rows: {k: torch.stack([r[k] for r in rows]) for k in rows[0]}  # noqa: E731
    trainer = BridgeTrainer(model=model, args=args, train_dataset=data, data_collator=collate, bridge=reg,
                            bridge_weight=0.5)
    assert trainer.capture_mode == "hidden_states"  # chosen for the SDE kind
    trainer.train()
    logs = [entry for entry in trainer.state.log_history if "bridge_loss" in entry]
    assert len(logs) == 2 and all(entry["bridge_loss"] > 0 for entry in logs)
    for entry in logs:
        assert entry["loss"] == pytest.approx(entry["task_loss"] + 0.5 * entry["bridge_loss"], rel=1e-3, abs=1e-4)
    for k, v in reg.state_dict().items():
        assert torch.equal(v, before[k]), f"the SDE regulariser changed: {k}"


def test_fit_mapping_fits_the_sde_drift_network(tmp_path):
    from hf_helpers import tiny_bert_config, tiny_texts, tiny_tokenizer
    from transformers import BertForMaskedLM

    from sbpet.hf.fitting import fit_mapping

    torch.manual_seed(0)
    model = BertForMaskedLM(tiny_bert_config())
    cfg = model.config
    reg = SDEBridgeRegularizer(cfg.hidden_size, cfg.num_hidden_layers, latent_size=6, width=16, seed=0,
                               word_embeddings=model.get_input_embeddings().weight)
    before = {k: v.clone() for k, v in reg.drift_net.state_dict().items()}
    history = fit_mapping(model, tiny_tokenizer(tmp_path), tiny_texts(), reg, steps=6, batch_size=4,
                          learning_rate=1e-2, progress=False)
    assert len(history["loss"]) == 6 and all(math.isfinite(v) for v in history["loss"])
    assert any(not torch.equal(v, before[k]) for k, v in reg.drift_net.state_dict().items())


def test_packed_rows_stop_the_causal_shift():
    """The SDE regulariser reads each token's own path (no context): packed rows (position_ids)
    give the padded batch's R when the causal shift stops at each sequence's end, and a
    different R when the boundaries are left out (the last state of one sequence paired with the
    next sequence's first token)."""
    gen = torch.Generator().manual_seed(0)
    lengths, hidden = (4, 2, 5), 8
    torch.manual_seed(0)
    reg = SDEBridgeRegularizer(hidden, 2, latent_size=3, tail=torch.randn(20, 3, generator=gen), shift_labels=True,
                               seed=3)
    seqs = [(torch.randn(3, n, hidden, generator=gen), torch.randint(0, 20, (n,), generator=gen)) for n in lengths]
    padded = torch.zeros(3, len(lengths), max(lengths), hidden)
    labels = torch.full((len(lengths), max(lengths)), -100)
    mask = torch.zeros_like(labels)
    for b, (x, y) in enumerate(seqs):
        padded[:, b, : len(y)], labels[b, : len(y)], mask[b, : len(y)] = x, y, 1
    packed = torch.cat([x for x, _ in seqs], dim=1)[:, None]
    packed_labels = torch.cat([y for _, y in seqs])[None]
    position_ids = torch.cat([torch.arange(n) for n in lengths])[None]
    reg.reseed(3)
    want = reg(list(padded.unbind(0)), labels, mask)
    reg.reseed(3)
    got = reg(list(packed.unbind(0)), packed_labels, None, position_ids)
    assert_close(got, want, torch.float32, "packed SDE R")
    reg.reseed(3)
    assert not torch.allclose(reg(list(packed.unbind(0)), packed_labels, None), want)
