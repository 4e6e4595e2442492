"""Measuring what one transformer block keeps for backward (tests/dist/test_activation_memory.py and
benchmarks/bench_activations.py share it).

Every tensor autograd saves passes through torch.autograd.graph.saved_tensors_hooks' pack hook;
the bytes held are those of the distinct storages behind them (a saved view holds its whole
storage), read after the forward (a storage that selective recompute freed holds 0 bytes),
parameters' and buffers' storages excluded (weights are not activations)."""

from __future__ import annotations

import dataclasses

import torch

LAYER = 0  # the block measured: a one-block GPT without embedding or head


def saved_bytes(fn, exclude=()) -> tuple[object, int]:
    """(fn(), bytes of the distinct storages fn saved for backward, those of `exclude` left out)."""
    skip = {t.untyped_storage()._cdata for t in exclude}
    held: dict[int, torch.UntypedStorage] = {}

    def pack(t):
        storage = t.untyped_storage()
        if storage._cdata not in skip:
            held[storage._cdata] = storage  # keyed by the storage itself, never by its data pointer
        return t
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return out, sum(s.nbytes() for s in held.values())


def measure_block(mc, b: int, s: int, modes, group=None, sp: bool = False,
                  dtype=torch.bfloat16) -> dict[str, int]:
    """Bytes one block keeps per recompute mode on this rank: the model cast to `dtype` (no
    autocast), the residual dropouts of mc on, attention dropout off (flash attention drops inside
    the kernel and keeps no mask), tensor-parallel over `group` (None: serial)."""
    from ..model import GPT
    from ..parallel.random import RNGTracker, recompute_context_fn
    from ..parallel.tensor_parallel import parallelize
    torch.manual_seed(0)
    model = GPT(mc, seed=0, layers=[LAYER], embed=False, head=False)
    tp, context_fn = 1, None
    if group is not None:
        from ..distributed import comm
        tp = comm.size(group)
        tracker = RNGTracker(0, comm.rank(group), torch.device("cpu"))
        parallelize(model, group, sequence_parallel=sp, tracker=tracker)
        context_fn = recompute_context_fn(tracker)
    model.to(dtype).train()
    model.blocks[str(LAYER)].attn.dropout = 0.0
    weights = [*model.parameters(), *model.buffers()]
    out = {}
    for mode in modes:
        model.set_recompute(mode, context_fn)
        x = torch.randn(b, s // tp if sp else s, mc.hidden_size, dtype=dtype, requires_grad=True)  # (B, T, C)
        y, n = saved_bytes(lambda: model.run_block(LAYER, x), exclude=weights)  # noqa: B023
        y.float().square().mean().backward()  # the graph works (and frees what it held)
        out[mode] = n
    return out


def _worker(rank, world, mc_fields, b, s, modes, sp):
    import torch.distributed as dist

    from ..config import ModelConfig
    return measure_block(ModelConfig(**mc_fields), b, s, modes, dist.group.WORLD, sp)


def measure(mc, b: int, s: int, tp: int, sp: bool, modes=("none", "selective", "full")) -> dict[str, int]:
    """measure_block on rank 0 of `tp` spawned gloo ranks (in this process when tp == 1)."""
    if tp == 1:
        return measure_block(mc, b, s, modes)
    from . import spawn_json
    return spawn_json(_worker, tp, dataclasses.asdict(mc), b, s, list(modes), sp)
