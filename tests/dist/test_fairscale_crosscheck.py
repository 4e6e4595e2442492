"""Independent cross-check: our column/row/vocab-parallel layers and vocab-parallel CE equal
fairscale's model-parallel ones (an archived but independent Megatron port) given the same master
weights, tp=2 on gloo. fairscale is a test-only extra; its RNG tracker needs CUDA, so no dropout."""

import pytest
import torch

from megatron_lite.testing import run_ranks

fairscale = pytest.importorskip("fairscale")
TOL = dict(rtol=1e-12, atol=1e-12)


def _crosscheck(rank, world):
    import torch.distributed as dist
    from fairscale.nn.model_parallel import cross_entropy as fs_ce
    from fairscale.nn.model_parallel import initialize as fs_init
    from fairscale.nn.model_parallel import layers as fs

    from megatron_lite.parallel.cross_entropy import vocab_parallel_cross_entropy
    from megatron_lite.parallel.layers import (ColumnParallelLinear, RowParallelLinear, VocabParallelEmbedding,
                                               tp_shard)
    fs_init.initialize_model_parallel(world)
    group = fs_init.get_model_parallel_group()
    torch.set_default_dtype(torch.float64)
    try:
        g = torch.Generator().manual_seed(3)
        B, T, C, H, V = 2, 5, 8, 12, 16
        x = torch.randn(B, T, C, generator=g)
        W1, b1 = torch.randn(H, C, generator=g), torch.randn(H, generator=g)
        W2, b2 = torch.randn(C, H, generator=g), torch.randn(C, generator=g)
        E = torch.randn(V, C, generator=g)
        ids = torch.randint(0, V, (B, T), generator=g)

        def both(make_ours, make_theirs, inp, shard_grads):
            outs, grads = [], []
            for make in (make_ours, make_theirs):
                layer = make()
                xin = inp.clone().requires_grad_() if inp.is_floating_point() else inp
                y = layer(xin)
                (y * torch.arange(y.numel(), dtype=y.dtype).view_as(y).sin()).sum().backward()
                outs.append(y.detach())
                grads.append([p.grad for p in shard_grads(layer)] +
                             ([xin.grad] if inp.is_floating_point() else []))
            torch.testing.assert_close(outs[0], outs[1], **TOL)
            for a, b in zip(*grads):
                torch.testing.assert_close(a, b, **TOL)

        def fs_col():
            m = fs.ColumnParallelLinear(C, H, bias=True, gather_output=True)
            m.weight.data.copy_(tp_shard(W1, group, 0))
            m.bias.data.copy_(tp_shard(b1, group, 0))
            return m
        both(lambda: ColumnParallelLinear(tp_shard(W1, group, 0), tp_shard(b1, group, 0), group, gather_output=True),
             fs_col, x, lambda m: [m.weight, m.bias])

        h = torch.randn(B, T, H, generator=g)

        def fs_row():
            m = fs.RowParallelLinear(H, C, bias=True, input_is_parallel=False)
            m.weight.data.copy_(tp_shard(W2, group, 1))
            m.bias.data.copy_(b2)
            return m
        both(lambda: RowParallelLinear(tp_shard(W2, group, 1), b2.clone(), group, input_is_parallel=False),
             fs_row, h, lambda m: [m.weight, m.bias])

        def fs_emb():
            m = fs.VocabParallelEmbedding(V, C)
            m.weight.data.copy_(tp_shard(E, group, 0))
            return m
        both(lambda: VocabParallelEmbedding(tp_shard(E, group, 0), rank * V // world, group), fs_emb, ids,
             lambda m: [m.weight])

        logits = torch.randn(B, T, V, generator=g)
        labels = torch.randint(0, V, (B, T), generator=g)
        local = tp_shard(logits, group, 2)
        a = local.clone().requires_grad_()
        ours = vocab_parallel_cross_entropy(a.flatten(0, 1), labels.flatten(), rank * V // world, V, group)
        ours.backward()
        b = local.clone().requires_grad_()
        theirs = fs_ce.vocab_parallel_cross_entropy(b, labels).mean()
        theirs.backward()
        torch.testing.assert_close(ours, theirs, **TOL)
        torch.testing.assert_close(a.grad.view_as(b.grad), b.grad, **TOL)
        assert dist.get_world_size(group) == world
    finally:
        torch.set_default_dtype(torch.float32)
        fs_init.destroy_model_parallel()


def test_our_layers_equal_fairscale_layers():
    run_ranks(_crosscheck, 2)
