"""Per-sample rows from captured factors (orthograd_fast.engine.factors): the small tensors' rows
formed together at the retain exit (explicit_rows_many) against a per-sample float64 loop, and
equal to each entry's own rows."""

import pytest
import torch

from orthograd_fast.engine.factors import ExplicitRows, OuterFactors, explicit_rows, explicit_rows_many
from tolerance import assert_close


def _dense(gen, B, T, O, I, dtype=torch.float32, transposed=False):
    A = torch.randn(B, T, 1, I, generator=gen).to(dtype)
    D = torch.randn(B, T, 1, O, generator=gen).to(dtype)
    return [OuterFactors(A, D, None, (1, O, I), transposed)]


def _oracle(us):
    """sum over uses and tokens of D_bt (x) A_bt, float64, one sample at a time, in the stored
    parameter's layout (transposed: [I, O])."""
    rows = []
    for b in range(us[0].B):
        g = 0
        for u in us:
            A = u.A[b, :, 0, :].double()
            if u.ids is None:
                D = u.D[b, :, 0, :].double()
            else:
                D = torch.nn.functional.one_hot(u.ids[b], u.shape[1]).double()
            gb = D.t() @ A  # [O, I]
            g = g + (gb.t() if u.transposed else gb)
        rows.append(g.reshape(-1))
    return torch.stack(rows)


@pytest.mark.parametrize("B", [1, 7])
def test_rows_formed_together_match_the_loop_and_each_entrys_own(B):
    gen = torch.Generator().manual_seed(11 + B)
    ids = torch.randint(0, 6, (B, 3), generator=gen)
    entries = [
        _dense(gen, B, 1, 5, 3),  # one-token Linears of one shape: one batch
        _dense(gen, B, 1, 5, 3),
        _dense(gen, B, 1, 3, 5, transposed=True),  # stored [5, 3]: rows A (x) D, the same batch
        _dense(gen, B, 1, 5, 3, dtype=torch.bfloat16),  # its own batch (dtype)
        _dense(gen, B, 1, 5, 3, dtype=torch.bfloat16),
        _dense(gen, B, 4, 5, 3),  # several tokens: formed alone
        _dense(gen, B, 1, 2, 9),  # a one-token shape seen once
        [OuterFactors(torch.randn(B, 3, 1, 4, generator=gen), None, ids, (1, 6, 4))],  # a lookup
        _dense(gen, B, 1, 5, 3) + _dense(gen, B, 1, 5, 3),  # two uses of one tensor
        [ExplicitRows(torch.randn(B, 4, generator=gen))],
    ]
    got = explicit_rows_many(entries)
    assert len(got) == len(entries)
    for k, (us, g) in enumerate(zip(entries, got)):
        assert g.dtype == torch.float64 and g.shape[0] == B, k
        assert torch.equal(g, explicit_rows(us)), f"entry {k}: not the entry's own rows"
        if not isinstance(us[0], ExplicitRows):
            half = us[0].A.dtype == torch.bfloat16
            # the rows are single products (one token) or short sums, formed in float32
            assert_close(g, _oracle(us), dtype=torch.float32, reduction_len=4 * len(us), scale=1.0)
            assert not half or g.abs().max() > 0


def test_small_tensors_rows_at_the_retain_exit_are_batched(monkeypatch):
    # the retain exit forms the small one-token weights' rows in one batch per shape: a stack of
    # equal Linears makes one broadcast product, not one bmm per weight
    from torch import nn

    import orthograd_fast.engine.factors as factors
    from benchmarks.host_overhead import Stack
    from orthograd_fast import OrthoGrad

    calls = []
    orig = factors.OuterFactors.explicit

    def spy(self):
        calls.append(tuple(self.A.shape))
        return orig(self)

    monkeypatch.setattr(factors.OuterFactors, "explicit", spy)
    torch.manual_seed(5)
    model = Stack(d=4, depth=6)
    og = OrthoGrad(model)
    x, y = torch.randn(9, 5), torch.randint(0, 4, (9,))
    with og.retain():
        nn.functional.cross_entropy(model(x), y).backward()
    og.prepare()  # (on two threads the rows are formed on the prefetch thread: done by now)
    # the 6 block Linears and the head (all 4 x 4) go together; the input layer (5 -> 4) alone
    assert calls == [(9, 1, 1, 5)], calls
    og.close()


@pytest.mark.parametrize("nthreads", [1, 2])
def test_rows_side_by_side_equal_each_entrys_own(nthreads, monkeypatch):
    # on several intra-op threads the entries (a convolution's rows, a batch of Linears, a
    # multi-token use) are formed side by side: bitwise the entries' own rows, in their places
    from orthograd_fast.engine import threads as og_threads
    from orthograd_fast.engine.conv_factors import ConvFactors

    gen = torch.Generator().manual_seed(3)
    B = 6
    conv = ConvFactors(torch.randn(B, 3, 7, 6, generator=gen), torch.randn(B, 4, 7, 6, generator=gen), (3, 3), (1, 1), (1, 1), (1, 1))
    entries = [_dense(gen, B, 4, 5, 3), [conv], _dense(gen, B, 1, 5, 3), _dense(gen, B, 1, 5, 3), [ExplicitRows(torch.randn(B, 4, generator=gen))]]
    spread = []
    orig = og_threads.map_balanced
    monkeypatch.setattr(og_threads, "map_balanced", lambda fn, items, cost, n: (spread.append((n, len(items))), orig(fn, items, cost, n))[1])
    n0 = torch.get_num_threads()
    torch.set_num_threads(nthreads)
    try:
        got = explicit_rows_many(entries)
    finally:
        torch.set_num_threads(n0)
    assert spread == ([] if nthreads == 1 else [(2, 4)])  # four jobs: the two Linears are one batch
    for k, (us, g) in enumerate(zip(entries, got)):
        assert torch.equal(g, explicit_rows(us)), f"entry {k}"
