"""Dropout under tensor parallelism: per-rank masks inside TP regions, identical masks in
replicated regions, and a fixed seed reproduces a run exactly (2 gloo ranks)."""

import torch
import torch.nn.functional as F

from megatron_lite.testing import run_ranks


def _gather(t, group):
    import torch.distributed as dist
    out = [torch.empty_like(t) for _ in range(dist.get_world_size(group))]
    dist.all_gather(out, t, group=group)
    return out


def _dropout(rank, world):
    import torch.distributed as dist

    from megatron_lite.config import ModelConfig
    from megatron_lite.model import GPT
    from megatron_lite.parallel.random import RNGTracker
    from megatron_lite.parallel.tensor_parallel import parallelize
    group = dist.group.WORLD
    torch.manual_seed(123)
    tracker = RNGTracker(123, rank, torch.device("cpu"))
    ones = torch.ones(4000)
    replicated = F.dropout(ones, 0.5)
    with tracker.fork():
        tp_region = F.dropout(ones, 0.5)
    after = torch.rand(8)
    masks_r, masks_tp = _gather(replicated, group), _gather(tp_region, group)
    assert all(torch.equal(m, masks_r[0]) for m in masks_r)  # replicated: the same on every rank
    assert not torch.equal(masks_tp[0], masks_tp[1])  # TP region: different per rank
    # The fork leaves the default stream exactly where it would be without it.
    torch.manual_seed(123)
    F.dropout(ones, 0.5)
    assert torch.equal(torch.rand(8), after)

    # A whole TP model with dropout on: a fixed seed reproduces the loss and grads exactly.
    cfg = ModelConfig(vocab_size=64, hidden_size=32, num_layers=2, num_attention_heads=4,
                      max_sequence_length=16, dropout=0.2)
    ids = torch.randint(0, 64, (2, 16), generator=torch.Generator().manual_seed(0))
    runs = []
    for sp in (False, True, False, True):
        torch.manual_seed(7)
        model = parallelize(GPT(cfg, seed=1), group, sequence_parallel=sp,
                            tracker=RNGTracker(7, rank, torch.device("cpu"))).model
        _, loss = model(ids, ids)
        loss.backward()
        runs.append((loss.item(), model.blocks["0"].mlp.fc1.weight.grad.clone()))
    assert runs[0][0] == runs[2][0] and torch.equal(runs[0][1], runs[2][1])
    assert runs[1][0] == runs[3][0] and torch.equal(runs[1][1], runs[3][1])
    # Dropout really acts (eval mode gives another loss), and every rank computed the same loss.
    model.eval()
    with torch.no_grad():
        assert model(ids, ids)[1].item() != runs[3][0]
    losses = _gather(torch.tensor([runs[0][0]]), group)
    assert losses[0].item() == losses[1].item()

    # Recompute under TP replays both dropout streams: same loss and grads as storing activations.
    from megatron_lite.parallel.random import recompute_context_fn
    grads = {}
    for mode in ("none", "full", "selective"):
        torch.manual_seed(7)
        tracker = RNGTracker(7, rank, torch.device("cpu"))
        model = parallelize(GPT(cfg, seed=1), group, sequence_parallel=True, tracker=tracker).model
        model.set_recompute(mode, recompute_context_fn(tracker))
        _, loss = model(ids, ids)
        loss.backward()
        grads[mode] = (loss.item(), {n: p.grad.clone() for n, p in model.named_parameters()})
    for mode in ("full", "selective"):
        assert grads[mode][0] == grads["none"][0], mode
        for name, g in grads["none"][1].items():
            torch.testing.assert_close(grads[mode][1][name], g, rtol=1e-6, atol=1e-7, msg=f"{mode} {name}")


def test_tp_dropout_rng():
    run_ranks(_dropout, 2)
