"""Fuzz of the public entry points with invalid inputs: only ValueError / TypeError, naming the argument.

Hypothesis draws a small valid case (sizes, dtype, mask with padded tails, labels, flags), one entry
point (``sbpet.bridge_loss``, a ``BridgeRegularizer`` or an ``SDEBridgeRegularizer`` called on the
case) and one corruption of it: wrong ranks, shapes, dtypes or types, a second device ("meta"),
labels outside [0, V), a wrong layer count or hidden size, NaN / inf in a real token's state, a
sequence with no real token, bad options. The call must raise ValueError or TypeError whose message
names the offending argument: never another exception, never a silent result. The constructor of
``BridgeRegularizer`` is fuzzed the same way, and valid variations (NaN in padding, any mask dtype,
a stacked tensor) must still pass.
"""

import math

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import sbpet
from sbpet.core.seeding import seeded_init

SETTINGS = settings(max_examples=150, deadline=None, derandomize=True, database=None,
                    suppress_health_check=[HealthCheck.too_slow])
ENTRY_POINTS = ("bridge_loss", "BridgeRegularizer", "SDEBridgeRegularizer")
NON_TENSORS = (None, 1.0, "states", [[0.0]], {"a": 1}, np.zeros((2, 2)))


@st.composite
def valid_cases(draw):
    num_layers = draw(st.integers(0, 2))
    batch, seq, hidden = draw(st.integers(1, 3)), draw(st.integers(1, 5)), draw(st.integers(1, 6))
    vocab, latent = draw(st.integers(1, 7)), draw(st.integers(1, 3))
    dtype = draw(st.sampled_from([torch.float32, torch.bfloat16, torch.float16]))
    gen = torch.Generator().manual_seed(draw(st.integers(0, 2**16)))
    lengths = [draw(st.integers(1, seq)) for _ in range(batch)]
    mask = (torch.arange(seq)[None, :] < torch.tensor(lengths)[:, None]).long()
    states = [(torch.randn(batch, seq, hidden, generator=gen) + 0.5).to(dtype) for _ in range(num_layers + 1)]
    for h in states:
        h[mask == 0] = float("nan")  # padded positions may hold anything
    ignore_index = draw(st.sampled_from([-100, -1]))
    labels = torch.randint(0, vocab, (batch, seq), generator=gen)
    labels[torch.rand(batch, seq, generator=gen) < 0.5] = ignore_index
    labels[mask == 0] = ignore_index
    tail = torch.randn(vocab, latent, generator=gen)
    return dict(
        num_layers=num_layers, batch=batch, seq=seq, hidden=hidden, vocab=vocab, latent=latent, dtype=dtype,
        states=states, labels=labels, mask=mask, tail=tail, dims=(draw(st.integers(1, 4)), latent),
        ignore_index=ignore_index, shift_labels=draw(st.booleans()),
        bridge=draw(st.sampled_from(["brownian", "ou"])),
        backend=draw(st.sampled_from(["auto", "reference", "torch"])),
        pass_num_layers=draw(st.booleans()),
    )


def call(entry, case, **over):
    """Run ``entry`` on ``case`` with the fields in ``over`` replaced (after building the module)."""
    args = dict(case, **over)
    if entry == "bridge_loss":
        mapping = args.get("mapping")
        if mapping is None:
            with seeded_init(0):
                mapping = sbpet.BridgeMapping(case["hidden"], case["dims"])
        extra = {k: args[k] for k in ("precision",) if k in args}
        return sbpet.bridge_loss(
            args["states"], args["labels"], args["mask"], mapping, args["tail"], args["bridge"],
            ignore_index=args["ignore_index"], shift_labels=args["shift_labels"], backend=args["backend"],
            num_layers=args["num_layers"] if args["pass_num_layers"] or "num_layers" in over else None, **extra,
        )
    common = dict(tail=case["tail"], bridge=case["bridge"], ignore_index=case["ignore_index"],
                  shift_labels=args["shift_labels"], seed=0)
    if entry == "BridgeRegularizer":
        module = sbpet.BridgeRegularizer(case["hidden"], case["num_layers"], dims=case["dims"], backend=case["backend"],
                                         **common)
    else:
        module = sbpet.SDEBridgeRegularizer(case["hidden"], case["num_layers"], latent_size=case["latent"], width=4,
                                            **common)
    if args.get("module_device"):
        module = module.to(args["module_device"])
    kwargs = {k: args[k] for k in ("backend", "precision") if k in over}
    return module(args["states"], args["labels"], args["mask"], **kwargs)


def _layer(draw, case):
    return draw(st.integers(0, case["num_layers"]))


def _replace_layer(case, index, value):
    states = list(case["states"])
    states[index] = value
    return states


# Each corruption: (draw, case, entry) -> (the fields to replace, names one of which the message must hold).
def states_rank(draw, case, entry):
    i = _layer(draw, case)
    h = case["states"][i]
    bad = draw(st.sampled_from([h[0], h[None], h[..., 0], h.reshape(-1)]))
    return dict(states=_replace_layer(case, i, bad)), ("hidden_states",)


def stacked_rank(draw, case, entry):
    stacked = torch.stack(case["states"])
    bad = draw(st.sampled_from([stacked[0], stacked[None], stacked.reshape(-1)]))
    return dict(states=bad), ("hidden_states",)


def states_dtype(draw, case, entry):
    dtype = draw(st.sampled_from([torch.long, torch.int32, torch.uint8, torch.bool, torch.complex64]))
    states = [h.nan_to_num(0).to(dtype) for h in case["states"]]
    if draw(st.booleans()) and len(states) > 1:  # or one layer of another float dtype than the others
        other = torch.float64 if case["dtype"] != torch.float64 else torch.float32
        states = _replace_layer(case, draw(st.integers(1, case["num_layers"])),
                                case["states"][0].to(other))
    return dict(states=states), ("hidden_states",)


def states_device(draw, case, entry):
    i = _layer(draw, case)
    return dict(states=_replace_layer(case, i, case["states"][i].to("meta"))), ("hidden_states",)


def states_shape(draw, case, entry):
    if case["num_layers"] == 0:
        return layer_count(draw, case, entry)
    i = draw(st.integers(1, case["num_layers"]))
    h = case["states"][i]
    axis = draw(st.integers(0, 2))
    grown = torch.cat([h, h.narrow(axis, 0, 1)], dim=axis)
    bad = draw(st.sampled_from([grown] + ([h.narrow(axis, 0, h.shape[axis] - 1)] if h.shape[axis] > 1 else [])))
    return dict(states=_replace_layer(case, i, bad)), ("hidden_states",)


def states_type(draw, case, entry):
    if draw(st.booleans()):
        bad = draw(st.sampled_from([None, 3, "states", {"a": 1}, np.zeros((1, 2, 3, 4)), iter(case["states"])]))
        return dict(states=bad), ("hidden_states",)
    i = _layer(draw, case)
    return dict(states=_replace_layer(case, i, draw(st.sampled_from(NON_TENSORS)))), ("hidden_states",)


def states_empty(draw, case, entry):
    bad = draw(st.sampled_from([[], (), torch.zeros(0, case["batch"], case["seq"], case["hidden"])]))
    return dict(states=bad), ("hidden_states",)


def layer_count(draw, case, entry):
    states = list(case["states"])
    if draw(st.booleans()) or len(states) == 1:
        states.append(states[-1].clone())
    else:
        states.pop(draw(st.integers(0, len(states) - 1)))
    return dict(states=states, pass_num_layers=True), ("hidden_states", "num_layers")


def hidden_size(draw, case, entry):
    extra = draw(st.integers(1, 3))
    states = [torch.cat([h, h[..., :1].expand(-1, -1, extra)], dim=-1) for h in case["states"]]
    if draw(st.booleans()) and case["hidden"] > 1:
        states = [h[..., 1:] for h in case["states"]]
    return dict(states=states), ("hidden_states", "hidden_size")


def non_finite(draw, case, entry):
    """NaN / inf in a real token's state (padding already holds NaN, which is valid)."""
    i = _layer(draw, case)
    b = draw(st.integers(0, case["batch"] - 1))
    s = draw(st.integers(0, int(case["mask"][b].sum()) - 1))
    k = draw(st.integers(0, case["hidden"] - 1))
    h = case["states"][i].clone()
    h[b, s, k] = draw(st.sampled_from([math.nan, math.inf, -math.inf]))
    return dict(states=_replace_layer(case, i, h)), ("hidden_states",)


def labels_range(draw, case, entry):
    labels = case["labels"].clone()
    shift = case["shift_labels"] and case["seq"] > 1  # shifted, position 0 is dropped: put it after
    b = draw(st.integers(0, case["batch"] - 1))
    s = draw(st.integers(1 if shift else 0, case["seq"] - 1))
    low = st.integers(-10**6, -1).filter(lambda v: v != case["ignore_index"])
    labels[b, s] = draw(st.one_of(st.integers(case["vocab"], 10**6), low))
    return dict(labels=labels, shift_labels=shift), ("labels",)


def labels_bad(draw, case, entry):
    labels = case["labels"]
    bad = draw(st.sampled_from([
        labels[0], labels[None], labels[:, :-1] if case["seq"] > 1 else labels[:, None],
        labels.float(), labels.bool(), labels.to(torch.complex64), labels.to("meta"),
        None, labels.tolist(), labels.numpy(),
    ]))
    return dict(labels=bad), ("labels",)


def mask_bad(draw, case, entry):
    mask = case["mask"]
    empty = mask.clone()
    empty[draw(st.integers(0, case["batch"] - 1))] = 0
    bad = draw(st.sampled_from([
        mask[0], mask[None], torch.ones(case["batch"], case["seq"] + 1, dtype=torch.long), mask.to("meta"),
        mask.tolist(), mask.numpy(), 1, empty, empty.bool(), empty.double(),
    ]))
    return dict(mask=bad), ("attention_mask",)


def options_bad(draw, case, entry):
    """Bad options: backend / precision everywhere, and bridge_loss's own arguments."""
    choices = [("backend", "cuda"), ("precision", "fp8"), ("precision", 32)]
    if entry == "bridge_loss":
        choices += [("backend", None), ("bridge", "levy"), ("bridge", 3), ("ignore_index", None),
                    ("ignore_index", 1.5), ("ignore_index", "-100"), ("num_layers", "2"), ("num_layers", 1.0),
                    ("num_layers", -1)]
    elif entry == "SDEBridgeRegularizer":  # its forward takes no options: its module on another device
        choices = [("module_device", "meta")]
    else:  # forward(backend=None) means the module's own backend: valid
        choices += [("module_device", "meta")]
    field, value = draw(st.sampled_from(choices))
    names = {"module_device": ("tail", "mapping", "drift_net")}.get(field, (field,))
    return {field: value}, names


def mapping_bad(draw, case, entry):
    """bridge_loss's g and tail: wrong type, hidden size, width, rank, dtype, device."""
    if entry != "bridge_loss":
        return options_bad(draw, case, entry)
    tail = case["tail"]
    choices = [
        (dict(mapping=torch.nn.Linear(2, 2)), ("mapping",)),
        (dict(mapping=sbpet.BridgeMapping(case["hidden"] + 1, case["dims"])), ("hidden_size", "hidden_states")),
        (dict(mapping=sbpet.BridgeMapping(case["hidden"], case["dims"]).to("meta")), ("mapping",)),
        (dict(tail=tail[:, :-1] if case["latent"] > 1 else torch.cat([tail, tail], 1)), ("tail",)),
        (dict(tail=tail[0]), ("tail",)),
        (dict(tail=tail[None]), ("tail",)),
        (dict(tail=tail.tolist()), ("tail",)),
        (dict(tail=None), ("tail",)),
        (dict(tail=tail.long()), ("tail",)),
        (dict(tail=tail.to("meta")), ("tail",)),
    ]
    return draw(st.sampled_from(choices))


CORRUPTIONS = {
    f.__name__: f for f in (
        states_rank, stacked_rank, states_dtype, states_device, states_shape, states_type, states_empty,
        layer_count, hidden_size, non_finite, labels_range, labels_bad, mask_bad, options_bad, mapping_bad,
    )
}


@pytest.mark.parametrize("corruption", sorted(CORRUPTIONS))
@settings(SETTINGS, max_examples=50)
@given(data=st.data())
def test_invalid_input_is_a_named_error(corruption, data):
    case = data.draw(valid_cases(), label="case")
    entry = data.draw(st.sampled_from(ENTRY_POINTS), label="entry")
    over, names = CORRUPTIONS[corruption](data.draw, case, entry)
    with pytest.raises((ValueError, TypeError)) as info:
        call(entry, case, **over)
    message = str(info.value)
    assert any(name in message for name in names), f"{entry}: the message names none of {names}: {message!r}"


@SETTINGS
@given(case=valid_cases(), entry=st.sampled_from(ENTRY_POINTS),
       form=st.sampled_from(["tuple", "list", "stacked"]),
       mask_dtype=st.sampled_from([torch.long, torch.bool, torch.int32, torch.float32, torch.float64, None]))
def test_valid_variations_pass(case, entry, form, mask_dtype):
    """The control: what the fuzz corrupts is valid as drawn (NaN in padding, any mask dtype, a
    stacked tensor, no mask at all when nothing is padded), and R is finite."""
    states = case["states"] if mask_dtype is not None else [h.nan_to_num(0) for h in case["states"]]
    states = {"tuple": tuple, "list": list, "stacked": torch.stack}[form](states)
    mask = case["mask"].to(mask_dtype) if mask_dtype is not None else None
    loss = call(entry, case, states=states, mask=mask)
    assert loss.dim() == 0 and torch.isfinite(loss)


CONSTRUCTOR_ERRORS = [
    (dict(hidden_size=value), "hidden_size") for value in (0, -3, 2.5, "8", None, True)
] + [
    (dict(dims=value), "dims") for value in ((), (0,), (4, -1), (2.5, 3), "53", None, 5, (3, None))
] + [
    (dict(bridge="levy"), "bridge"), (dict(bridge=3), "bridge"),
    (dict(backend="cuda"), "backend"), (dict(precision="fp8"), "precision"),
    (dict(seed=1.5), "seed"), (dict(seed="0"), "seed"), (dict(seed=True), "seed"),
    (dict(num_layers=-1), "num_layers"),
    (dict(tail=torch.randn(7, 4)), "tail"), (dict(tail=torch.randn(7)), "tail"), (dict(tail=[[0.0] * 3]), "tail"),
    (dict(tail=None), "tail"), (dict(word_embeddings=torch.randn(7, 8)), "tail"),
    (dict(tail=None, word_embeddings=[[0.0] * 8]), "word_embeddings"),
    (dict(tail=None, word_embeddings=torch.randn(7)), "word_embeddings"),
    (dict(tail=None, word_embeddings=torch.randn(2, 8)), "dim"),
]


@SETTINGS
@given(bad=st.sampled_from(CONSTRUCTOR_ERRORS), flags=st.fixed_dictionaries(
    dict(train_tail=st.booleans(), shift_labels=st.booleans(), full_nll=st.booleans())))
def test_invalid_constructor_argument_is_a_named_error(bad, flags):
    over, name = bad
    args = dict(hidden_size=8, num_layers=2, dims=(5, 3), tail=torch.randn(7, 3), **flags)
    args.update(over)
    with pytest.raises((ValueError, TypeError)) as info:
        sbpet.BridgeRegularizer(**args)
    assert name in str(info.value), f"the message does not name {name!r}: {str(info.value)!r}"


@pytest.mark.parametrize("cls", [sbpet.BridgeRegularizer, sbpet.SDEBridgeRegularizer])
@pytest.mark.parametrize("field,value", [("num_layers", 2.5), ("num_layers", "x"), ("num_layers", None),
                                         ("ignore_index", 1.5), ("ignore_index", "x"), ("ignore_index", None)])
def test_module_int_arguments_are_checked(cls, field, value):
    args = dict(hidden_size=8, num_layers=2, tail=torch.randn(7, 3))
    args[field] = value
    with pytest.raises((ValueError, TypeError)) as info:
        cls(**args)
    assert field in str(info.value)
