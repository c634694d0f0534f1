"""Route choice (orthograd_fast/engine/route.py): ghost (token Grams) vs tile (per-sample tiles), for the
torch path (opt_einsum's plan) and for the fused Triton kernels (their own flop counts)."""

import pytest
import torch

import orthograd_fast.engine.gram as gram
from orthograd_fast.engine.factors import OuterFactors
from orthograd_fast.engine.gram import PerSampleGrads
from orthograd_fast.engine.route import GHOST, TILE, choose_route, choose_route_fused, route_costs


@pytest.mark.parametrize(
    "shape,want",
    [
        ((64, 1, 1, 1024, 1024), GHOST),  # an MLP layer: one token per sample
        ((8, 512, 1, 64, 64), TILE),  # long sequences, narrow layer
        ((32, 64, 1, 128, 384), TILE),  # the CPU zoo's transformer qkv at B = 32
        ((128, 4, 1, 3072, 768), GHOST),  # few tokens, wide layer
    ],
)
def test_torch_route_on_clear_cut_shapes(shape, want):
    assert choose_route(*shape) == want
    costs = route_costs(*shape)
    assert min(costs, key=costs.get) == want  # opt_einsum's plan agrees with the flop formulas


def test_fused_route_counts_the_tile_kernels_recomputation():
    # GPT-2-small qkv at the scale row: B = 1024, T = 32. The torch path stores tiles
    # (B T I O + B^2 I O: tile); the fused kernel forms them (B / 16 + 1) times: ghost is cheaper.
    shape = (1024, 32, 1, 768, 2304)
    assert choose_route(*shape) == TILE
    assert choose_route_fused(*shape) == GHOST
    # long sequences at a small B stay on the tile kernel
    assert choose_route_fused(64, 512, 1, 1024, 1024) == TILE
    # one sample block: the kernels do what the torch path does (up to the ghost's pair factor)
    for shape in [(16, 64, 1, 256, 256), (16, 2, 1, 256, 256)]:
        B, T, G, I, O = shape
        tile = 2 * B * T * I * O + B * B * I * O
        ghost = 2 * (B * T) ** 2 * (I + O)
        assert choose_route_fused(*shape) == (GHOST if ghost <= tile else TILE)


def test_param_term_takes_the_fused_route_only_on_the_kernels():
    B, T, I, O = 256, 8, 96, 96  # tile on the torch path, ghost for the kernels
    w = torch.nn.Parameter(torch.randn(O, I))

    def use(dtype):
        return OuterFactors(torch.randn(B, T, 1, I, dtype=dtype), torch.randn(B, T, 1, O, dtype=dtype), None, (1, O, I))

    assert choose_route(B, T, 1, I, O) == TILE and choose_route_fused(B, T, 1, I, O) == GHOST
    assert PerSampleGrads("w", w, [use(torch.float32)], backend="torch").mode == TILE
    assert PerSampleGrads("w", w, [use(torch.float32)], backend="triton").mode == GHOST
    # float64 factors stay on the torch path, and so on its route
    assert PerSampleGrads("w", w, [use(torch.float64)], backend="triton").mode == TILE


def _embedding_term(B, T, V, d, tied):
    # shapes only: zero-stride views, nothing of B x T x V is allocated
    emb = torch.nn.Parameter(torch.empty(V, d))
    ids = torch.zeros(1, 1, dtype=torch.long).expand(B, T)
    uses = [OuterFactors(torch.empty(1, 1, 1, d).expand(B, T, 1, d), None, ids, (1, V, d))]
    if tied:  # the head: h [B, T, d] against logits gradients [B, T, V]
        uses.append(OuterFactors(torch.empty(1, 1, 1, d).expand(B, T, 1, d), torch.empty(1, 1, 1, V).expand(B, T, 1, V), None, (1, V, d)))
    return PerSampleGrads("emb", emb, uses)


@pytest.mark.parametrize(
    "B,T,V,d,tied,want",
    [
        # the CPU zoo's GPT-2 shape at B = 512: lookup 512^2 x 2048 x 128 = 6.9e10 multiply-adds;
        # tokens (16384 + 16384)^2 x 128 + 16384^2 x 2048 = 6.9e11 (the head's logits gradients).
        # B x numel = 1.3e8 elements: only slabs of it exist at a time, so no size cap applies.
        (512, 32, 2048, 128, True, "lookup"),
        (8, 4, 50000, 64, False, "tokens"),  # a large untied table, few tokens: pair the tokens
        (64, 64, 256, 128, False, "lookup"),  # the CPU zoo transformer's table
    ],
)
def test_embedding_route_counts_the_tied_heads_products(B, T, V, d, tied, want, monkeypatch):
    # the cost model between the lookup and token routes (an untied table takes the sparse route
    # when it is on: test_untied_tables_take_the_sparse_route)
    monkeypatch.setattr(gram, "SPARSE_LOOKUP", False)
    assert _embedding_term(B, T, V, d, tied).mode == want


@pytest.mark.parametrize("B,T,V,d", [(512, 32, 2048, 128), (8, 4, 50000, 64), (64, 64, 256, 128)])
def test_untied_tables_take_the_sparse_route(B, T, V, d):
    assert _embedding_term(B, T, V, d, tied=False).mode == "sparse"
    assert _embedding_term(B, T, V, d, tied=True).mode != "sparse"  # a dense use of the table


@pytest.mark.parametrize("hold_ok,want", [(False, "tokens"), (True, "lookup")])
def test_embedding_route_counts_held_float32_rows(hold_ok, want, monkeypatch):
    monkeypatch.setattr(gram, "SPARSE_LOOKUP", False)
    # the CPU zoo's BERT table (B = 32, T = 32, V = 2048, d = 128, untied): lookup 32^2 x 2048 x 128
    # = 2.7e8 multiply-adds against the token route's 1024^2 x 128 = 1.3e8 in float64; rows the
    # projection lets the term hold (33.5 MB, float32, per-tensor scope) halve the lookup's cost
    B, T, V, d = 32, 32, 2048, 128
    emb = torch.nn.Parameter(torch.empty(V, d))
    ids = torch.zeros(1, 1, dtype=torch.long).expand(B, T)
    uses = [OuterFactors(torch.empty(1, 1, 1, d).expand(B, T, 1, d), None, ids, (1, V, d))]
    assert PerSampleGrads("emb", emb, uses, hold_ok=hold_ok).mode == want
    # float64 factors cannot hold float32 rows: the token route stays
    uses64 = [OuterFactors(torch.empty(1, 1, 1, d, dtype=torch.float64).expand(B, T, 1, d), None, ids, (1, V, d))]
    emb64 = torch.nn.Parameter(torch.empty(V, d, dtype=torch.float64))
    assert PerSampleGrads("emb", emb64, uses64, hold_ok=True).mode == "tokens"
