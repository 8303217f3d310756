"""Opt-in autotuning of the GEMM strategy's layer-1 kernels (sbpet.backends.gemm_tuning): off by
default, on with SBPET_AUTOTUNE=1, ignored under deterministic algorithms; a tuned run matches the
reference and float64, the tiles it may choose are the ones compile_check builds, and the trials
leave no trace in the result (the chosen tile's run gives the same bits as a later run with the
choice recorded)."""

import logging
import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

triton = pytest.importorskip("triton")

import sbpet  # noqa: E402
from helpers import assert_close, float64_bridge_loss, make_case  # noqa: E402
from sbpet.backends import gemm_tuning  # noqa: E402
from sbpet.backends.triton_host import STRATEGY_ENV  # noqa: E402
from sbpet.kernels import check_configs, layer_gemm  # noqa: E402
from sbpet.kernels.bridge_chain import dot_precision  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.fixture(autouse=True)
def fresh(monkeypatch):
    monkeypatch.setenv(STRATEGY_ENV, "gemm")
    gemm_tuning.clear()
    yield
    gemm_tuning.clear()


def _run(case, train=True, backend="triton"):
    states, labels, mask, mapping, tail = case
    states = [h.detach().clone().requires_grad_(True) for h in states]
    tail = tail.detach().clone().requires_grad_(train)
    mapping.zero_grad(set_to_none=True)
    mapping.requires_grad_(train)
    loss = sbpet.bridge_loss(states, labels, mask, mapping, tail, "ou", backend=backend)
    loss.backward()
    grads = [h.grad for h in states] + [p.grad.clone() for p in mapping.parameters() if p.grad is not None]
    return loss.detach(), grads


def _case():
    # 40 rows per layer: the interpreter's tiles (16 / 32 rows) cut it unevenly.
    return make_case(num_states=4, batch=2, seq=24, hidden=40, dims=(24, 7), positions_per_seq=20, seed=3,
                     device=DEVICE)


def _spy(monkeypatch):
    timed = []
    real = gemm_tuning._time

    def spy(run, cfg, device):
        timed.append(dict(cfg))
        return real(run, cfg, device)

    monkeypatch.setattr(gemm_tuning, "_time", spy)
    return timed


def test_off_by_default_runs_the_fixed_tiles(monkeypatch):
    monkeypatch.delenv(gemm_tuning.AUTOTUNE_ENV, raising=False)
    timed = _spy(monkeypatch)
    _run(_case())
    assert timed == [] and gemm_tuning.choices() == {}


def test_tuned_run_matches_the_reference_and_repeats_bitwise(monkeypatch, caplog):
    monkeypatch.setenv(gemm_tuning.AUTOTUNE_ENV, "1")
    timed = _spy(monkeypatch)
    case = _case()
    with caplog.at_level(logging.INFO, logger="sbpet.autotune"):
        loss, grads = _run(case)
    chosen = gemm_tuning.choices()
    assert {key[0] for key in chosen} == {"first_layer", "token_grad"}, chosen
    candidates = layer_gemm.gemm_candidates(40, "fp32")
    assert len(timed) == len(chosen) * len(candidates)  # each key timed every tile once
    assert all(cfg in candidates for cfg in chosen.values())
    assert all(key[6] == 64 for key in chosen)  # 40 rows per layer -> 64
    assert sum("autotune" in r.getMessage() for r in caplog.records) == len(chosen)
    ref_loss, ref_grads = _run(case, backend="reference")
    assert_close(loss, ref_loss)
    for got, want in zip(grads, ref_grads):
        assert_close(got, want)
    assert_close(loss.double(), float64_bridge_loss(*case, bridge="ou"), rtol=1e-5, atol=1e-6)
    # The second run uses the recorded choice (no timing) and gives the same bits: the trials of
    # the first left nothing behind.
    timed.clear()
    again, again_grads = _run(case)
    assert timed == [] and torch.equal(again, loss)
    assert all(torch.equal(a, b) for a, b in zip(again_grads, grads))


@pytest.mark.parametrize("cfg_index", [0, 1, 2])
def test_every_interpreter_tile_is_right(cfg_index, monkeypatch):
    """Each tile the tuner may pick gives the reference's gradients (a tile always chosen first
    would leave the others untested)."""
    monkeypatch.setenv(gemm_tuning.AUTOTUNE_ENV, "1")
    monkeypatch.setattr(gemm_tuning, "_time", lambda run, cfg, device: 0.0 if cfg == pick else 1.0)
    pick = layer_gemm.gemm_candidates(40, "fp32")[cfg_index]
    case = _case()
    loss, grads = _run(case)
    assert all(cfg == pick for cfg in gemm_tuning.choices().values())
    ref_loss, ref_grads = _run(case, backend="reference")
    assert_close(loss, ref_loss)
    for got, want in zip(grads, ref_grads):
        assert_close(got, want)


def test_deterministic_mode_ignores_the_switch(monkeypatch, caplog):
    monkeypatch.setenv(gemm_tuning.AUTOTUNE_ENV, "on")
    timed = _spy(monkeypatch)
    monkeypatch.setattr(gemm_tuning, "_LOGGED", set())
    previous = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        with caplog.at_level(logging.INFO, logger="sbpet.autotune"):
            _run(_case(), train=False)
    finally:
        torch.use_deterministic_algorithms(previous)
    assert timed == [] and gemm_tuning.choices() == {}
    assert any("ignored under torch.use_deterministic_algorithms" in r.getMessage() for r in caplog.records)


def test_a_failing_tile_is_left_out_with_a_warning(monkeypatch):
    monkeypatch.setenv(gemm_tuning.AUTOTUNE_ENV, "1")
    candidates = [dict(BLOCK_M=1, BLOCK_N=1, BLOCK_K=1, GROUP_M=1, num_warps=1, num_stages=1, bad=True),
                  dict(BLOCK_M=2, BLOCK_N=1, BLOCK_K=1, GROUP_M=1, num_warps=1, num_stages=1)]

    def run(cfg):
        if cfg.get("bad"):
            raise RuntimeError("out of shared memory")

    with pytest.warns(RuntimeWarning, match="out of shared memory"):
        assert gemm_tuning.choose(lambda: ("k",), candidates, run, torch.device("cpu")) == candidates[1]
    with pytest.raises(RuntimeError, match="no tile"), pytest.warns(RuntimeWarning):
        gemm_tuning.choose(lambda: ("j",), candidates[:1] * 2, run, torch.device("cpu"))


def test_bad_switch_value_is_refused(monkeypatch):
    monkeypatch.setenv(gemm_tuning.AUTOTUNE_ENV, "maybe")
    with pytest.raises(ValueError, match="SBPET_AUTOTUNE"):
        gemm_tuning.autotune_enabled()


def test_key_rounds_rows_to_a_power_of_two():
    key = gemm_tuning.tuning_key("first_layer", 64, 32, torch.bfloat16, torch.bfloat16, "bf16", 1000, True,
                                 torch.device("cpu"))
    assert key[6] == 1024
    assert gemm_tuning.tuning_key("first_layer", 64, 32, torch.bfloat16, torch.bfloat16, "bf16", 1024, True,
                                  torch.device("cpu"))[6] == 1024


def test_compile_check_builds_every_tile_the_tuner_may_choose():
    """Every GPU tile of every class is among compile_check's configurations, for both row classes
    and every (states dtype, precision) pair (so none runs without its spill check)."""
    built = {}
    for name, kernel, dtype, consts, warps, stages in check_configs.configs(quick=False):
        if kernel in ("first_layer_kernel", "token_grad_kernel"):
            tile = (consts["BLOCK_M"], consts["BLOCK_N"], consts["BLOCK_K"], consts["GROUP_M"], warps, stages)
            built.setdefault((kernel[: -len("_kernel")], dtype, consts["DOT_PRECISION"]), set()).add(tile)
    for dtype, precision in check_configs.EVERY_PAIR:
        dot = dot_precision(precision=precision)
        for rows in (32, layer_gemm.FEW_ROWS):
            for kernel in layer_gemm.KERNELS:
                for cfg in layer_gemm.gemm_candidates(rows, precision, interpret=False, kernel=kernel):
                    tile = tuple(cfg[k] for k in ("BLOCK_M", "BLOCK_N", "BLOCK_K", "GROUP_M", "num_warps",
                                                  "num_stages"))
                    assert tile in built[(kernel, dtype, dot)], (kernel, dtype, precision, rows, tile)


def test_tile_tables():
    """Each class starts with the fixed tile; the many-rows alternatives have M a multiple of 64
    (Hopper's wgmma); no tile twice; strided states get the fixed tile only."""
    for (kernel, rows, width), tiles in layer_gemm.TILES.items():
        count = 32 if rows == "few" else layer_gemm.FEW_ROWS
        precision = "bf16" if width == 16 else "fp32"
        assert layer_gemm.tile_class(count, precision, kernel) == (kernel, rows, width)
        fixed = layer_gemm.gemm_config(count, precision, interpret=False, kernel=kernel)
        assert tuple(fixed.values()) == tiles[0]
        assert len(set(tiles)) == len(tiles)
        if rows == "many":
            assert all(tile[0] % 64 == 0 for tile in tiles[1:]), (kernel, width)
    for precision, width in (("bf16", 16), ("fp32", 32)):
        strided = layer_gemm.gemm_candidates(layer_gemm.FEW_ROWS, precision, interpret=False, contiguous_h=False)
        assert [tuple(cfg.values()) for cfg in strided] == [layer_gemm.STRIDED_TILES[width]]
    with pytest.raises(ValueError, match="kernel"):
        layer_gemm.tile_class(32, "bf16", "bridge")


def test_parts_route_is_tuned_too(monkeypatch):
    """The hooks' route (capture per layer, then the loss from the parts: BridgeTrainer,
    fit_mapping) reaches the same tuner: its token gradient runs without the context share."""
    from sbpet.backends import dispatch

    monkeypatch.setenv(gemm_tuning.AUTOTUNE_ENV, "1")
    states, labels, mask, mapping, tail = _case()
    backend = dispatch.get_backend("triton")
    batch_index, seq_index = (labels != -100).nonzero(as_tuple=True)
    leaves = [h.detach().clone().requires_grad_(True) for h in states]
    parts = [backend.capture_layer(h, mask, batch_index, seq_index) for h in leaves]
    from sbpet.core.bridges import get_bridge

    mean_coef, variance = get_bridge("ou").marginals(len(states))
    loss = backend.loss_from_parts([c for c, _ in parts], [t for _, t in parts], batch_index,
                                   labels[batch_index, seq_index], mapping, tail, mean_coef, variance)
    loss.backward()
    chosen = gemm_tuning.choices()
    assert {(key[0], key[7]) for key in chosen} == {("first_layer", True), ("token_grad", False)}, chosen
    assert all(leaf.grad is not None for leaf in leaves)
