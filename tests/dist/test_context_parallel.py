"""Context parallelism's attention (parallel/context_parallel.py) against whole-sequence attention.

float64 and gloo: every rank builds the same whole-sequence q, k, v and upstream gradient, runs its
shard through allgather or ring attention, and must get its rows of the serial output and of the
serial dq, dk, dv (summation order is the only difference: 1e-12)."""

import pytest
import torch
import torch.nn.functional as F

from megatron_lite.testing import run_ranks

TOL = dict(rtol=1e-10, atol=1e-12)


def _attention(rank, world, algorithm, documents):
    import torch.distributed as dist

    from megatron_lite.model.gpt import Documents
    from megatron_lite.parallel.context_parallel import (
        allgather_attention,
        local_index,
        ring_attention,
        shard_batch,
    )
    group, cp = dist.group.WORLD, world
    B, H, K, T, D = 2, 4, 2, 8 * cp, 8
    g = torch.Generator().manual_seed(0)
    q = torch.randn(B, H, T, D, generator=g, dtype=torch.float64)
    k = torch.randn(B, K, T, D, generator=g, dtype=torch.float64)
    v = torch.randn(B, K, T, D, generator=g, dtype=torch.float64)
    up = torch.randn(B, H, T, D, generator=g, dtype=torch.float64)
    docs = None
    mask = torch.ones(T, T, dtype=torch.bool).tril()[None, None]  # (1, 1, T, T)
    if documents:  # row 0: documents of 3, 10 and T-13 tokens; row 1: one document then single tokens
        seg = torch.zeros(B, T, dtype=torch.long)
        seg[0, 3:], seg[0, 13:] = 1, 2
        seg[1, T // 2:] = torch.arange(1, T - T // 2 + 1)
        docs = Documents(seg)
        mask = (mask & (seg[:, :, None] == seg[:, None, :])[:, None])  # (B, 1, T, T)

    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    ref = F.scaled_dot_product_attention(*leaves, attn_mask=mask, enable_gqa=True)
    ref.backward(up)

    mine = local_index(T, cp, rank)
    ids = torch.zeros(B, T, dtype=torch.long)
    _, _, shard = shard_batch((ids, ids, docs) if docs else (ids, ids), cp, rank)
    local = [t[:, :, mine].clone().requires_grad_() for t in (q, k, v)]
    mask = shard.attention(torch.float64).mask  # additive, as the model hands it to the core
    if algorithm == "allgather":
        out = allgather_attention(*local, mask, group)
    else:
        out = ring_attention(*local, mask, group, list(range(cp)), rank)
    out.backward(up[:, :, mine])
    torch.testing.assert_close(out, ref[:, :, mine].detach(), **TOL)
    for name, got, leaf in zip("qkv", local, leaves, strict=True):
        torch.testing.assert_close(got.grad, leaf.grad[:, :, mine], **TOL, msg=f"d{name}")


def _every_case(rank, world):
    for algorithm in ("allgather", "ring"):
        for documents in (False, True):
            _attention(rank, world, algorithm, documents)


@pytest.mark.parametrize("world", [2, 4])
def test_context_parallel_attention_equals_whole_sequence_attention(world):
    run_ranks(_every_case, world)


def test_load_balanced_layout_covers_the_sequence_once_with_equal_causal_work():
    from megatron_lite.parallel.context_parallel import gathered_index, local_index
    T, cp = 32, 4
    assert sorted(gathered_index(T, cp).tolist()) == list(range(T))
    work = [int(sum(i + 1 for i in local_index(T, cp, r).tolist())) for r in range(cp)]
    assert len(set(work)) == 1  # every rank's queries see the same number of keys
    assert local_index(T, cp, 1).tolist() == [4, 5, 6, 7, 24, 25, 26, 27]
