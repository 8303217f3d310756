"""Launch parameters of kernel 2 (:mod:`.fused_bridge`): its block sizes, warps and stages, keyed on
H, the mapping's widths, the operand width, the pass and whether layer 1 comes saved (the GEMM
strategy's ``A1_SAVED``). compile_check builds every choice made here (:mod:`.check_configs`).
"""

from __future__ import annotations

import torch

from .bridge_chain import dot_precision
from .context import interpreting

__all__ = ["MAX_LINEAR", "SAVED_CHAIN_MAX_P2", "BridgeConfig", "bridge_config", "saved_chain_fits"]

MAX_LINEAR = 4
# The widest padded layer-2 width whose A1_SAVED backward compiles without spills at 16-bit dots
# (at P2 = 512 three [16, 512] float32 tiles per program spill 112-488 bytes per thread at any warp
# count or stage count tried, sm_80 and sm_90a): wider chains' backward runs in torch.
SAVED_CHAIN_MAX_P2 = 256


class BridgeConfig(dict):
    """Launch parameters of kernel 2 (a dict of constexprs plus num_warps / num_stages)."""


def _pow2(n: int, floor: int = 16) -> int:
    return max(floor, 1 << (max(int(n), 1) - 1).bit_length())


def saved_chain_fits(dims) -> bool:
    """Whether kernel 2's ``A1_SAVED`` backward is launched for a mapping of widths ``dims`` (the
    GEMM strategy; see :data:`SAVED_CHAIN_MAX_P2`)."""
    return len(dims) < 2 or _pow2(dims[1]) <= SAVED_CHAIN_MAX_P2


def bridge_config(hidden: int, dims, interpret: bool | None = None, train_mapping: bool = False,
                  dtype: torch.dtype = torch.float32, backward: bool | None = None,
                  precision: str | None = None, a1_saved: bool = False) -> BridgeConfig:
    """Block sizes of kernel 2, keyed on H, the mapping dims, the states' dtype and the pass.

    On chip a program holds layer 2's [BLOCK_M, P2] pre-activation (twice in the backward: value
    and gradient, plus gelu(a2)) and, with 4 layers, layer 4's [BLOCK_M, P4]. BLOCK_M bounds these
    to ~8K float32 values per accumulator (64 rows for widths <= 128, 32 for 256, 16 beyond).
    BLOCK_D1 / BLOCK_N3 (the layer-1 and layer-3 column chunks) bound the per-chunk tiles and the
    [BLOCK_D1, P2] / [BLOCK_N3, P2] weight tiles in shared memory: 64 / 32 for P2 <= 64, 32 / 32 up
    to 256, 16 / 16 beyond. The backward halves both (min 16): it keeps three [M, P2] tensors live
    across the chunk loops, and with the forward's chunks ptxas spills 0.4-2 KB per thread at the
    register cap (255 at 8 warps). float32 operands ("fp32" / "tf32"; tf32x3 splits each operand in
    two, so twice the operand registers) take the backward's chunks in the forward too and half the
    rows. BLOCK_K = 64 (H step), 8 warps; 2 stages, 1 when the mapping is trained (the
    weight-gradient tiles need shared memory for their layout changes). Register and spill counts
    of every choice: ``python -m sbpet.kernels.compile_check`` (table in kernels/README.md).
    Under the interpreter every block is 16 so that odd test sizes run several chunks of every loop.
    ``backward`` defaults to ``train_mapping`` for callers that only distinguish the two;
    ``precision`` (see :func:`dot_precision`) decides the operand width.
    ``a1_saved`` (the GEMM strategy: layer 1 read from a1, no token tiles) with 16-bit dots: the
    forward halves BLOCK_D1 and the backward BLOCK_M (min 16), the choices a compile sweep of every
    shape of :mod:`.check_configs` found spill-free on sm_80 and sm_90a (the fused blocks spilled
    16-412 bytes per thread in places; 4 warps spilled 0.2-2.3 KB).
    """
    dims = tuple(int(d) for d in dims)
    num_linear = len(dims)
    if not 1 <= num_linear <= MAX_LINEAR:
        raise ValueError(f"the triton backend supports 1 to {MAX_LINEAR} Linear layers, got {num_linear}")
    padded = dims + (1,) * (MAX_LINEAR - num_linear)
    p2 = _pow2(padded[1]) if num_linear >= 2 else 16
    p4 = _pow2(padded[3]) if num_linear == 4 else 16
    interpret = interpreting() if interpret is None else interpret
    if interpret:
        return BridgeConfig(NUM_LINEAR=num_linear, BLOCK_M=16, BLOCK_K=16, BLOCK_D1=16, BLOCK_N3=16,
                            P2=p2, P4=p4, num_warps=1, num_stages=1)
    backward = train_mapping if backward is None else backward
    wide_operands = dot_precision(dtype, precision) not in ("fp16", "bf16")
    widest = max(p2, p4)
    block_m = 64 if widest <= 128 else 32 if widest <= 256 else 16
    if num_linear == 1:
        block_d1 = min(64, _pow2(dims[0]))
    else:
        block_d1 = 64 if p2 <= 64 else 32 if p2 <= 256 else 16
    block_n3 = 32 if p2 <= 256 else 16
    if backward or wide_operands:
        block_d1, block_n3 = max(16, block_d1 // 2), max(16, block_n3 // 2)
    if wide_operands:
        block_m = max(16, block_m // 2)
    elif a1_saved and backward:
        block_m = max(16, block_m // 2)
    elif a1_saved:
        block_d1 = max(16, block_d1 // 2)
    block_k = min(64, _pow2(hidden))
    num_stages = 1 if train_mapping else 2
    return BridgeConfig(NUM_LINEAR=num_linear, BLOCK_M=block_m, BLOCK_K=block_k, BLOCK_D1=block_d1,
                        BLOCK_N3=block_n3, P2=p2, P4=p4, num_warps=8, num_stages=num_stages)
