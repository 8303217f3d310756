"""Shared test helpers: tolerances keyed by dtype in one place, one comparison that says where."""

from __future__ import annotations

import torch

import sbpet

# (rtol, atol) for comparing a backend run on inputs of this dtype against the reference.
TOLERANCES = {
    torch.float64: (1e-10, 1e-12),
    torch.float32: (2e-5, 1e-6),
    torch.float16: (5e-3, 1e-4),
    torch.bfloat16: (3e-2, 1e-3),
}

# A fast backend (torch, triton) against the reference at precision "fp32", by the dtype of the
# compared tensor: (rtol, atol, scaled_atol); the absolute tolerance is the larger of atol and
# scaled_atol * max|expected|. Both sides widen 16-bit states exactly and compute in float32, so a
# float32 loss meets float32's tolerance, and scaled_atol absorbs float32 cancellation in an element
# that sums contributions much larger than itself (a token's context share and its own row). A
# 16-bit gradient is a float32 value rounded to the states' dtype, where two values a few float32
# ulps apart may round one 16-bit ulp apart (rtol: one ulp, 2^-10 / 2^-7).
BACKEND_TOLERANCES = {
    torch.float64: (1e-10, 1e-12, 1e-12),
    torch.float32: (2e-5, 1e-6, 2e-6),
    torch.float16: (2**-10, 1e-6, 2e-6),
    torch.bfloat16: (2**-7, 1e-6, 2e-6),
}
# On a GPU the triton backend's tf32x3 dots are close to, not exactly, float32.
GPU_SLACK = dict(rtol=2e-4, atol=1e-5)


def backend_tolerance(expected, dtype, on_gpu=False):
    """``rtol`` / ``atol`` for :func:`assert_close` of a fast backend's tensor of ``dtype`` against
    ``expected`` (see BACKEND_TOLERANCES)."""
    rtol, atol, scaled_atol = BACKEND_TOLERANCES[dtype]
    scale = expected.detach().abs().max().item() if expected.numel() else 0.0
    tol = dict(rtol=rtol, atol=max(atol, scaled_atol * scale))
    if on_gpu:
        tol = {k: max(v, GPU_SLACK[k]) for k, v in tol.items()}
    return tol


def assert_close(actual, expected, dtype=torch.float32, name="tensor", rtol=None, atol=None):
    """Assert ``actual`` matches ``expected`` within the tolerance for ``dtype``; on failure say
    where: shapes, the first bad indices and the max absolute / relative error. NaN never passes."""
    default_rtol, default_atol = TOLERANCES[dtype]
    rtol = default_rtol if rtol is None else rtol
    atol = default_atol if atol is None else atol
    assert actual is not None, f"{name}: got None"
    assert actual.shape == expected.shape, f"{name}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    a = actual.detach().double().cpu()
    e = expected.detach().double().cpu()
    bad = ~((a - e).abs() <= atol + rtol * e.abs())
    bad |= torch.isnan(a) | torch.isnan(e)
    if bad.any():
        idx = bad.nonzero()[:5].tolist()
        diff = (a - e).abs()
        rel = diff / e.abs().clamp_min(1e-30)
        raise AssertionError(
            f"{name}: {int(bad.sum())} of {a.numel()} elements differ (rtol={rtol}, atol={atol}); "
            f"first at {idx}: actual {[a[tuple(i)].item() for i in idx]} expected "
            f"{[e[tuple(i)].item() for i in idx]}; max abs err {diff.nan_to_num(float('inf')).max().item():.3e}, "
            f"max rel err {rel.nan_to_num(float('inf')).max().item():.3e}"
        )


def make_case(
    num_states=3,
    batch=2,
    seq=13,
    hidden=40,
    dims=(24, 7),
    vocab=50,
    positions_per_seq=2,
    dtype=torch.float32,
    param_dtype=torch.float32,
    device="cpu",
    seed=0,
    padding=True,
):
    """Random hidden states, labels, mask, mapping and tail for one test case.

    Hidden states have a nonzero mean so the context matters; the mask pads the tail of every
    sequence but the first; ``positions_per_seq`` real positions per sequence are regularised.
    """
    gen = torch.Generator().manual_seed(seed)
    states = [
        (torch.randn(batch, seq, hidden, generator=gen) + 0.5).to(dtype=dtype, device=device)
        for _ in range(num_states)
    ]
    mask = torch.ones(batch, seq, dtype=torch.long)
    if padding:
        for b in range(1, batch):
            mask[b, seq - 1 - (b % max(1, seq - 2)) :] = 0
    labels = torch.full((batch, seq), -100, dtype=torch.long)
    for b in range(batch):
        real = int(mask[b].sum())
        pos = torch.randperm(real, generator=gen)[: min(positions_per_seq, real)]
        labels[b, pos] = torch.randint(0, vocab, (len(pos),), generator=gen)
    torch.manual_seed(seed)
    mapping = sbpet.BridgeMapping(hidden, dims).to(dtype=param_dtype, device=device)
    tail = sbpet.tail_from_embeddings(torch.randn(vocab, hidden, generator=gen), dims[-1])
    return states, labels.to(device), mask.to(device), mapping, tail.to(dtype=param_dtype, device=device)


def float64_bridge_loss(states, labels, mask, mapping, tail, bridge, ignore_index=-100, full_nll=False):
    """An independent float64 formula of R, written loop by loop from docs/METHOD.md.

    Differentiable: gradients reach ``states``, g's parameters and ``tail`` through the float64
    casts (in their own dtypes). The context averages the real tokens only (mask nonzero, each
    weighing 1), so whatever a padded position holds never enters."""
    import math

    num_states = len(states)
    weights = [(layer.weight.double(), layer.bias.double()) for layer in mapping.layers]
    tail = tail.double()
    total, pairs = torch.zeros((), dtype=torch.float64), 0
    for l in range(num_states):
        t = (l + 1) / (num_states + 1)
        if bridge == "brownian":
            coef, var = t, t * (1 - t)
        else:
            coef, var = math.sinh(t) / math.sinh(1), math.sinh(t) * math.sinh(1 - t) / math.sinh(1)
        h = states[l].double()
        for b in range(h.shape[0]):
            real = mask[b] != 0
            c = h[b][real].sum(0) / int(real.sum())
            for s in range(h.shape[1]):
                if int(labels[b, s]) == ignore_index:
                    continue
                x = torch.cat([c, h[b, s]])
                for i, (w, bias) in enumerate(weights):
                    if i:
                        x = 0.5 * x * (1 + torch.erf(x / math.sqrt(2)))
                    x = w @ x + bias
                r = x - coef * tail[int(labels[b, s])]
                total = total + (r * r).sum() / (2 * var)
                if full_nll:
                    total = total + 0.5 * r.numel() * math.log(2 * math.pi * var)
                pairs += 1
    return total / max(pairs, 1)


def loss_and_grads(backend, states, labels, mask, mapping, tail, bridge="brownian", **kw):
    """R by ``backend`` (:func:`sbpet.bridge_loss`, keywords passed on) and its gradients of every
    hidden state, the tail and g's parameters, on fresh leaf copies: (R, {name: gradient})."""
    import sbpet

    states = [h.detach().clone().requires_grad_(True) for h in states]
    tail = tail.detach().clone().requires_grad_(True)
    mapping.zero_grad(set_to_none=True)
    loss = sbpet.bridge_loss(states, labels, mask, mapping, tail, bridge, backend=backend, **kw)
    loss.backward()
    grads = {f"hidden_states[{i}]": h.grad for i, h in enumerate(states)}
    grads["tail"] = tail.grad
    grads.update({name: p.grad.clone() for name, p in mapping.named_parameters()})
    return loss.detach(), grads
