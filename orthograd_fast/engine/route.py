"""Cost model: which contraction computes a layer's per-sample Gram most cheaply.

For a factored use with A [B, T, G, I] and D [B, T, G, O] the Gram is

    K[b, c] = sum_{g, t, s} (A_bt . A_cs)_g (D_bt . D_cs)_g       'btgi,btgo,csgi,csgo->bc'

Two orders matter (docs/math.md section 3):

* ghost: token Grams A A^T and D D^T first, ~ (B T)^2 (I + O) G flops, (B T)^2 memory;
* tile:  per-sample gradient tiles D_b^T A_b first, ~ B T I O G + B^2 I O G flops, B G O I memory.

opt_einsum is asked for the cheapest path under a memory limit (in elements of the largest
intermediate) and its first pairwise step tells the route: pairing A with A (or D with D) across
samples is the ghost order; pairing A with D of the same sample is the tile order. Both routes are
executed in chunks by :mod:`orthograd_fast.engine.routes`, so the memory limit only steers the choice.
"""

from __future__ import annotations

from functools import lru_cache

import opt_einsum

GHOST = "ghost"
TILE = "tile"

# Largest intermediate opt_einsum may plan for (elements). Chunked execution keeps the real
# footprint lower; the limit keeps the planner from preferring a huge single-shot contraction.
DEFAULT_MEMORY_LIMIT = 1 << 31


@lru_cache(maxsize=4096)
def choose_route(B: int, T: int, G: int, I: int, O: int, memory_limit: int = DEFAULT_MEMORY_LIMIT) -> str:
    """Return ``"ghost"`` or ``"tile"`` for a use of shape B, T, G, I, O (cached per shape)."""
    shapes = [(B, T, G, I), (B, T, G, O), (B, T, G, I), (B, T, G, O)]
    # The same sample index appears twice (b and c); opt_einsum sees them as distinct operands.
    path, _ = opt_einsum.contract_path(
        "btgi,btgo,csgi,csgo->bc", *shapes, shapes=True, optimize="optimal", memory_limit=memory_limit
    )
    first = tuple(sorted(path[0]))
    # Operands: 0 = A_b, 1 = D_b, 2 = A_c, 3 = D_c.
    if first in ((0, 1), (2, 3)):
        return TILE
    if first in ((0, 2), (1, 3)):
        return GHOST
    # A single-step plan (memory limit hit or tiny problem): fall back on the flop estimates.
    ghost = (B * T) ** 2 * (I + O) * G
    tile = B * T * I * O * G + B * B * I * O * G
    return GHOST if ghost <= tile else TILE


# Sample block of the fused Triton kernels (orthograd_fast.kernels: tile_gram and ghost_gram).
FUSED_SAMPLE_BLOCK = 16


def choose_route_fused(B: int, T: int, G: int, I: int, O: int, sample_block: int = FUSED_SAMPLE_BLOCK) -> str:
    """The route for the fused Triton kernels, whose costs differ from the torch path's: the tile
    kernel never stores per-sample tiles, so it forms each block's tiles once per later block,
    (nb + 1) B T I O flops for nb = B / sample_block, plus ~ B^2 I O for the Gram; the ghost
    kernel computes the token Grams of block pairs p <= q, ~ (B T)^2 (I + O) (1 + 1 / nb)."""
    nb = -(-B // sample_block)
    tile = ((nb + 1) * B * T * I * O + B * B * I * O) * G
    ghost = (B * T) ** 2 * (I + O) * G * (nb + 1) / nb
    return GHOST if ghost <= tile else TILE


def route_costs(B: int, T: int, G: int, I: int, O: int) -> dict:
    """Flop estimates of both routes (for docs, benchmarks and debugging)."""
    return {
        GHOST: 2 * (B * T) ** 2 * (I + O) * G,
        TILE: 2 * B * T * I * O * G + 2 * B * B * I * O * G,
    }
