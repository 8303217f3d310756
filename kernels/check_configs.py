"""The configurations :mod:`.compile_check` builds: every choice the launchers can make.

Kernel 1 (``context_config``): forward with and without ``GATHER_ROWS``, contiguous and strided;
backward with the token rows (fused strategy) and without (GEMM strategy).

Kernel 2 (``bridge_config``): its blocks and dots are fixed by the user's ``precision`` ("fp32" ->
tf32x3 dots on float32 operands, "tf32", "bf16" -> bfloat16 operands) and its token loads by the
states' dtype. The paper's mapping is built for every (states dtype, precision) pair; the widths of
the other shapes hit every BLOCK_M / BLOCK_D1 / BLOCK_N3 branch of ``bridge_config`` and every
mapping depth, for float32 states at "fp32" and bfloat16 states at "fp32" (the default) and "bf16";
both passes (the backward takes narrower chunks), g and the tail frozen or trained. The GEMM
strategy runs the same kernels on the saved a1 (``A1_SAVED``: no token loads, so one states dtype
per precision; blocks of their own; the backward only frozen and only where
``chain_config.saved_chain_fits``, as the GEMM strategy launches it).

The GEMM strategy's layer-1 kernels (``gemm_candidates``: the fixed tile and every tile opt-in
autotuning may choose): their blocks depend only on the rows per layer (many / few) and the operand
width, not on the mapping's widths, so every (states dtype, precision) pair with both row classes;
the token gradient with the context share (whole states) and, once, without it (parts).

``PADDED`` (a fixed capacity: rows gated by a device count, ``max_positions``) adds a load and a
compare to each kernel 2 and layer-1 GEMM program: built for the paper's mapping (every pair, both
passes, every kernel-2 variant) and for the layer-1 GEMM's fixed tiles, every pair and row class
(the token-gradient GEMM needs no mask: a padding row's da1 is 0).
"""

from __future__ import annotations

__all__ = ["BRIDGE_SHAPES", "EVERY_PAIR", "QUICK_SHAPES", "configs", "blocks"]

# (hidden, dims, [(states dtype, precision)]): "tf32" shares "fp32"'s blocks.
EVERY_PAIR = tuple((dtype, precision) for dtype in ("float32", "float16", "bfloat16")
                    for precision in ("fp32", "tf32", "bf16"))
_BRANCH_PAIRS = (("float32", "fp32"), ("bfloat16", "fp32"), ("bfloat16", "bf16"))
BRIDGE_SHAPES = [
    (4096, (1024, 256, 128), EVERY_PAIR),  # paper: P2 = 256 -> BLOCK_M 32
    (1024, (128,), _BRANCH_PAIRS),  # 1 layer
    (768, (512, 64), _BRANCH_PAIRS),  # 2 layers, P2 = 64 -> BLOCK_M 64, BLOCK_D1 64
    (4096, (1024, 512, 128), _BRANCH_PAIRS),  # P2 = 512 -> BLOCK_M 16
    (2048, (512, 256, 128, 64), _BRANCH_PAIRS),  # 4 layers
]
QUICK_SHAPES = [(4096, (1024, 256, 128), (("bfloat16", "bf16"),))]


def blocks(cfg: dict) -> str:
    return " ".join(f"{k}={v}" for k, v in cfg.items() if k != "NUM_LINEAR")


def _split(cfg) -> tuple[dict, int, int]:
    cfg = dict(cfg)
    return cfg, cfg.pop("num_warps"), cfg.pop("num_stages")


def _context_configs(quick: bool):
    from .context import context_config

    ctx_cfg = context_config(4096, interpret=False)
    for dtype in ("bfloat16",) if quick else ("float32", "float16", "bfloat16"):
        for contiguous in (True,) if quick else (True, False):
            # GATHER_ROWS: kernel 1 also copies the regularised rows out (the dispatcher's route).
            for gather in (True,) if quick else (False, True):
                consts = dict(BLOCK_S=ctx_cfg["BLOCK_S"], BLOCK_H=ctx_cfg["BLOCK_H"],
                              CONTIGUOUS_H=contiguous, ALIGNED=contiguous, GATHER_ROWS=gather)
                yield (f"context_fwd {dtype} contiguous_h={contiguous} gather_rows={gather}",
                       "context_forward_kernel", dtype, consts, ctx_cfg["num_warps"], 2)
        for has_tokens in (True,) if quick else (True, False):
            consts = dict(BLOCK_S=ctx_cfg["BLOCK_S"], BLOCK_H=ctx_cfg["BLOCK_H"], HAS_TOKENS=has_tokens)
            yield (f"context_bwd {dtype} has_tokens={has_tokens}", "context_backward_kernel", dtype, consts,
                   ctx_cfg["bwd_num_warps"], 2)


def _bridge_configs(quick: bool):
    paper = QUICK_SHAPES[0][:2]
    for hidden, dims, pairs in QUICK_SHAPES if quick else BRIDGE_SHAPES:
        for padded in (False, True) if (hidden, dims) == paper else (False,):
            yield from _bridge_shape_configs(hidden, dims, pairs, quick, padded)


def _bridge_shape_configs(hidden, dims, pairs, quick, padded):
    from .chain_config import bridge_config, saved_chain_fits
    from .fused_bridge import dot_precision

    saved_done = set()
    for dtype, precision in pairs:
        dot = dot_precision(precision=precision)
        # The GEMM strategy's runs (A1_SAVED) do not read the states: one dtype per precision.
        variants = [False] + ([True] if dot not in saved_done else [])
        saved_done.add(dot)
        for saved in variants:
            cfg, num_warps, num_stages = _split(bridge_config(hidden, dims, interpret=False, precision=precision,
                                                              a1_saved=saved))
            consts = dict(cfg, CONTIGUOUS_H=True, ALIGNED=True, DOT_PRECISION=dot, A1_SAVED=saved, PADDED=padded)
            tag = f"H={hidden} dims={dims} {dtype} precision={precision} ({dot}) a1_saved={saved} padded={padded}"
            yield (f"bridge_fwd {tag} {blocks(cfg)} w{num_warps}s{num_stages}", "bridge_forward_kernel",
                   dtype, consts, num_warps, num_stages)
            # The A1_SAVED backward runs only with g and the tail frozen and a spill-free width.
            trains = [(False, False)] if quick or saved else [(False, False), (True, True)]
            if saved and not saved_chain_fits(dims):
                trains = []
            for train_mapping, train_tail in trains:
                bcfg, bwarps, bstages = _split(bridge_config(hidden, dims, interpret=False,
                                                             train_mapping=train_mapping, backward=True,
                                                             precision=precision, a1_saved=saved))
                bconsts = dict(bcfg, CONTIGUOUS_H=True, ALIGNED=True, DOT_PRECISION=dot,
                               TRAIN_MAPPING=train_mapping, TRAIN_TAIL=train_tail, A1_SAVED=saved,
                               PADDED=padded)
                yield (f"bridge_bwd {tag} {blocks(bcfg)} w{bwarps}s{bstages} train_mapping={train_mapping} "
                       f"train_tail={train_tail}", "bridge_backward_kernel", dtype, bconsts, bwarps, bstages)


def _gemm_configs(quick: bool):
    from .fused_bridge import dot_precision
    from .layer_gemm import FEW_ROWS

    pairs = (("bfloat16", "bf16"),) if quick else EVERY_PAIR
    for dtype, precision in pairs:
        dot = dot_precision(precision=precision)
        for rows in (FEW_ROWS // 8, FEW_ROWS) if not quick else (FEW_ROWS,):
            for kernel in ("first_layer", "token_grad"):
                both = (dtype, precision) == ("bfloat16", "bf16")
                if kernel == "first_layer":
                    # Strided states: one tile whatever the rows (STRIDED_TILES), built once.
                    for contiguous in (True, False) if not quick and rows == FEW_ROWS else (True,):
                        for index, tile in enumerate(_tiles(rows, precision, kernel, quick, contiguous_h=contiguous)):
                            cfg, num_warps, num_stages = _split(tile)
                            tag = _gemm_tag(dtype, precision, dot, rows, cfg, num_warps, num_stages)
                            for padded in (False, True) if index == 0 and contiguous else (False,):
                                consts = dict(cfg, CONTIGUOUS_H=contiguous, ALIGNED=contiguous, DOT_PRECISION=dot,
                                              PADDED=padded)
                                yield (f"first_layer {tag} contiguous_h={contiguous} padded={padded}",
                                       "first_layer_kernel", dtype, consts, num_warps, num_stages)
                else:
                    for index, tile in enumerate(_tiles(rows, precision, kernel, quick)):
                        cfg, num_warps, num_stages = _split(tile)
                        tag = _gemm_tag(dtype, precision, dot, rows, cfg, num_warps, num_stages)
                        # The parts route (no context share) with the fixed tile only: same loop.
                        for add_context in (True, False) if both and index == 0 else (True,):
                            consts = dict(cfg, ADD_CONTEXT=add_context, DOT_PRECISION=dot)
                            yield (f"token_grad {tag} add_context={add_context}", "token_grad_kernel", dtype, consts,
                                   num_warps, num_stages)


def _tiles(rows, precision, kernel, quick, contiguous_h=True):
    """The fixed tile, then (unless ``quick``) every tile autotuning may choose."""
    from .layer_gemm import gemm_candidates

    tiles = gemm_candidates(rows, precision, interpret=False, kernel=kernel, contiguous_h=contiguous_h)
    return tiles[:1] if quick else tiles


def _gemm_tag(dtype, precision, dot, rows, cfg, num_warps, num_stages) -> str:
    from .layer_gemm import FEW_ROWS

    kind = "few" if rows < FEW_ROWS else "many"
    return f"{dtype} precision={precision} ({dot}) rows={kind} {blocks(cfg)} w{num_warps}s{num_stages}"


def configs(quick: bool):
    """Yield (name, kernel name, states dtype, constexprs, num_warps, num_stages) to compile."""
    yield from _context_configs(quick)
    yield from _bridge_configs(quick)
    yield from _gemm_configs(quick)
    yield ("pair_sum BLOCK_D=128", "pair_sum_kernel", "float32", dict(BLOCK_D=128), 4, 1)
