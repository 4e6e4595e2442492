"""Mappings and tensor-parallel layers against their definitions and dense counterparts, gloo.

float64: the only differences are summation order (~1e-16 relative), so 1e-12 tolerances."""

import pytest
import torch
import torch.nn.functional as F

from megatron_lite.testing import run_ranks

TOL = dict(rtol=1e-12, atol=1e-12)


def _mappings(rank, world):
    import torch.distributed as dist

    from megatron_lite.distributed import comm
    from megatron_lite.parallel import mappings as M
    group = dist.group.WORLD
    g = torch.Generator().manual_seed(0)
    # Every rank builds the same "global" tensors; rank-specific inputs are derived from them.
    full = torch.randn(2, 4 * world, 3 * world, generator=g, dtype=torch.float64)  # (B, T, C)
    per_rank = torch.randn(world, 2, 4 * world, 3 * world, generator=g, dtype=torch.float64)
    up = torch.randn(world, 2, 4 * world, 3 * world, generator=g, dtype=torch.float64)  # upstream grads
    mine, gmine = per_rank[rank], up[rank]
    col = lambda t, r: t.chunk(world, dim=-1)[r]  # noqa: E731
    seq = lambda t, r: t.chunk(world, dim=1)[r]  # noqa: E731

    stats = comm.CommStats()

    def run(fn, x, grad):
        x = x.clone().requires_grad_()
        with stats.recording():
            y = fn(x, group)
            y.backward(grad)
        return y.detach(), x.grad

    # copy_to_tp: fwd identity, bwd sum of the ranks' grads
    y, dx = run(M.copy_to_tp, mine, gmine)
    torch.testing.assert_close(y, mine, **TOL)
    torch.testing.assert_close(dx, up.sum(0), **TOL)
    # reduce_from_tp: fwd sum over ranks, bwd identity
    y, dx = run(M.reduce_from_tp, mine, gmine)
    torch.testing.assert_close(y, per_rank.sum(0), **TOL)
    torch.testing.assert_close(dx, gmine, **TOL)
    # scatter_to_tp: fwd my last-dim slice, bwd all-gather of the slices' grads
    y, dx = run(M.scatter_to_tp, full, col(gmine, 0))
    torch.testing.assert_close(y, col(full, rank), **TOL)
    torch.testing.assert_close(dx, torch.cat([col(up[r], 0) for r in range(world)], -1), **TOL)
    # gather_from_tp: fwd concat of the ranks' slices, bwd my slice of the grad
    y, dx = run(M.gather_from_tp, col(mine, 0), gmine)
    torch.testing.assert_close(y, torch.cat([col(per_rank[r], 0) for r in range(world)], -1), **TOL)
    torch.testing.assert_close(dx, col(gmine, rank), **TOL)
    # scatter_to_sp: fwd my sequence slice, bwd all-gather along the sequence
    y, dx = run(M.scatter_to_sp, full, seq(gmine, 0))
    torch.testing.assert_close(y, seq(full, rank), **TOL)
    torch.testing.assert_close(dx, torch.cat([seq(up[r], 0) for r in range(world)], 1), **TOL)
    # gather_from_sp: fwd all-gather along the sequence, bwd reduce-scatter of the grads
    y, dx = run(M.gather_from_sp, seq(mine, 0), gmine)
    torch.testing.assert_close(y, torch.cat([seq(per_rank[r], 0) for r in range(world)], 1), **TOL)
    torch.testing.assert_close(dx, seq(up.sum(0), rank), **TOL)
    # reduce_scatter_to_sp: fwd sum then my sequence slice, bwd all-gather
    y, dx = run(M.reduce_scatter_to_sp, mine, seq(gmine, 0))
    torch.testing.assert_close(y, seq(per_rank.sum(0), rank), **TOL)
    torch.testing.assert_close(dx, torch.cat([seq(up[r], 0) for r in range(world)], 1), **TOL)
    assert stats.bytes["all_reduce"] > 0 and stats.bytes["all_gather"] > 0 and stats.bytes["reduce_scatter"] > 0


@pytest.mark.parametrize("world", [2, 4])
def test_mappings_forward_and_backward_equal_their_definitions(world):
    run_ranks(_mappings, world)


def _reduce_scatter_async(rank, world):
    """Several reduce-scatters in flight on the world and on subgroups (ranks 0, 2 | 1, 3): each
    rank's chunk of the sum, in place in its own chunk of the input. On gloo they are built from
    point-to-point transfers: no all-reduce, and each rank sends (n-1)/n of the input, a ring's volume
    (gloo's own reduce_scatter_tensor all-reduces, twice that)."""
    import torch.distributed as dist

    from megatron_lite.distributed import comm
    pairs = [dist.new_group([0, 2]), dist.new_group([1, 3])]  # every rank creates every group
    sent = []
    real_isend, real_all_reduce = dist.isend, dist.all_reduce

    def isend(t, *a, **k):
        sent.append(t.numel())
        return real_isend(t, *a, **k)

    def no_all_reduce(*a, **k):
        raise AssertionError("reduce-scatter fell back to an all-reduce")

    dist.isend, dist.all_reduce = isend, no_all_reduce
    try:
        pair = (pairs[rank % 2], [rank % 2, rank % 2 + 2])
        for group, members in ((dist.group.WORLD, list(range(world))), pair):
            n, me = len(members), members.index(rank)
            inputs = [torch.randn(world, 6 * n, generator=torch.Generator().manual_seed(10 * i + r),
                                  dtype=torch.float64)[r].clone() for i in range(3) for r in members]
            mine = inputs[me::n]  # (3 tensors of this rank)
            sums = [sum(inputs[i * n:(i + 1) * n]) for i in range(3)]
            sent.clear()
            pending = [comm.reduce_scatter_async(t, group) for t in mine]
            for p, t, total in zip(pending, mine, sums, strict=True):
                out = p.wait()
                torch.testing.assert_close(out, total.chunk(n)[me], **TOL)
                assert out.data_ptr() == t.chunk(n)[me].data_ptr()  # in place, as the optimizer expects
            assert sum(sent) == 3 * (n - 1) * 6  # (n-1) chunks of 6 elements per tensor
    finally:
        dist.isend, dist.all_reduce = real_isend, real_all_reduce


def test_reduce_scatter_async_on_gloo_sends_a_rings_volume():
    run_ranks(_reduce_scatter_async, 4)


def _layers(rank, world):
    import torch.distributed as dist

    from megatron_lite.parallel.cross_entropy import vocab_parallel_cross_entropy
    from megatron_lite.parallel.layers import ColumnParallelLinear, RowParallelLinear, VocabParallelEmbedding, tp_shard
    from megatron_lite.slicing import padded_vocab
    group = dist.group.WORLD
    g = torch.Generator().manual_seed(1)
    B, T, C, O, V = 2, 4 * world, 6, 4 * world, 23  # V=23: not divisible by tp
    x = torch.randn(B, T, C, generator=g, dtype=torch.float64)
    W = torch.randn(O, C, generator=g, dtype=torch.float64)
    b = torch.randn(O, generator=g, dtype=torch.float64)
    up = torch.randn(B, T, O, generator=g, dtype=torch.float64)

    dense = torch.nn.Linear(C, O).double()
    dense.weight.data.copy_(W)
    dense.bias.data.copy_(b)
    xd = x.clone().requires_grad_()
    (dense(xd) * up).sum().backward()

    for sp in (False, True):
        for gather in (True, False):
            if sp and gather:
                continue
            layer = ColumnParallelLinear(tp_shard(W, group, 0), tp_shard(b, group, 0), group,
                                         gather_output=gather, sequence_parallel=sp)
            xin = (tp_shard(x, group, 1) if sp else x).clone().requires_grad_()
            y = layer(xin)
            want = dense(x) if gather else tp_shard(dense(x), group, 2)
            torch.testing.assert_close(y, want.detach(), **TOL)
            (y * (up if gather else tp_shard(up, group, 2))).sum().backward()
            torch.testing.assert_close(layer.weight.grad, tp_shard(dense.weight.grad, group, 0), **TOL)
            torch.testing.assert_close(layer.bias.grad, tp_shard(dense.bias.grad, group, 0), **TOL)
            torch.testing.assert_close(xin.grad, tp_shard(xd.grad, group, 1) if sp else xd.grad, **TOL)

    # Row-parallel: O outputs from C'=O inputs split over tp; the bias is added once.
    W2 = torch.randn(C, O, generator=g, dtype=torch.float64)
    b2 = torch.randn(C, generator=g, dtype=torch.float64)
    h = torch.randn(B, T, O, generator=g, dtype=torch.float64)
    up2 = torch.randn(B, T, C, generator=g, dtype=torch.float64)
    dense2 = torch.nn.Linear(O, C).double()
    dense2.weight.data.copy_(W2)
    dense2.bias.data.copy_(b2)
    hd = h.clone().requires_grad_()
    (dense2(hd) * up2).sum().backward()
    for sp in (False, True):
        for parallel_in in (True, False):
            layer = RowParallelLinear(tp_shard(W2, group, 1), b2.clone(), group, input_is_parallel=parallel_in,
                                      sequence_parallel=sp)
            hin = (tp_shard(h, group, 2) if parallel_in else h).clone().requires_grad_()
            y = layer(hin)
            want = dense2(h).detach()
            torch.testing.assert_close(y, tp_shard(want, group, 1) if sp else want, **TOL)
            (y * (tp_shard(up2, group, 1) if sp else up2)).sum().backward()
            torch.testing.assert_close(layer.weight.grad, tp_shard(dense2.weight.grad, group, 1), **TOL)
            bias_grad = layer.bias.grad.clone()
            if sp:  # each rank saw a sequence shard: the full bias grad is the sum over tp
                dist.all_reduce(bias_grad, group=group)
            torch.testing.assert_close(bias_grad, dense2.bias.grad, **TOL)
            torch.testing.assert_close(hin.grad, tp_shard(hd.grad, group, 2) if parallel_in else hd.grad, **TOL)

    # Vocab-parallel embedding over a padded vocabulary.
    Vp = padded_vocab(V, world, 4)
    E = torch.randn(V, C, generator=g, dtype=torch.float64)
    Ep = torch.cat([E, torch.zeros(Vp - V, C, dtype=torch.float64)])
    ids = torch.randint(0, V, (B, T), generator=g)
    emb = torch.nn.Embedding(V, C).double()
    emb.weight.data.copy_(E)
    (emb(ids) * up2).sum().backward()
    vpe = VocabParallelEmbedding(tp_shard(Ep, group, 0), rank * Vp // world, group)
    out = vpe(ids)
    torch.testing.assert_close(out, emb(ids).detach(), **TOL)
    (out * up2).sum().backward()
    full_grad = torch.cat([emb.weight.grad, torch.zeros(Vp - V, C, dtype=torch.float64)])
    torch.testing.assert_close(vpe.weight.grad, tp_shard(full_grad, group, 0), **TOL)

    # Vocab-parallel cross-entropy vs F.cross_entropy, with ignored labels and padded columns.
    logits = torch.randn(B * T, Vp, generator=g, dtype=torch.float64)
    labels = torch.randint(0, V, (B * T,), generator=g)
    labels[::5] = -100
    ref_in = logits[:, :V].clone().requires_grad_()
    ref = F.cross_entropy(ref_in, labels)
    (2.0 * ref).backward()
    local = tp_shard(logits, group, 1).clone().requires_grad_()
    loss = vocab_parallel_cross_entropy(local, labels, rank * Vp // world, V, group)
    torch.testing.assert_close(loss, ref.detach(), **TOL)
    (2.0 * loss).backward()
    full_grad = torch.cat([ref_in.grad, torch.zeros(B * T, Vp - V, dtype=torch.float64)], dim=1)
    torch.testing.assert_close(local.grad, tp_shard(full_grad, group, 1), **TOL)


@pytest.mark.parametrize("world", [2, 4])
def test_parallel_layers_equal_dense_layers(world):
    run_ranks(_layers, world)
