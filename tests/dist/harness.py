"""Spawn gloo ranks for multi-process tests: file-store rendezvous (no port races), one thread
per rank, the process group always destroyed. Child failures re-raise in the test."""

from __future__ import annotations

import os
import tempfile

import torch
import torch.multiprocessing as mp


def _entry(rank: int, world: int, store: str, fn, args) -> None:
    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)
    import torch.distributed as dist
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    try:
        fn(rank, world, *args)
    finally:
        dist.destroy_process_group()
    # Success: end without native teardown, which can abort a finished rank (comm.exit_process).
    from megatron_lite.distributed import comm
    comm.exit_process(0)


def run_ranks(fn, world: int, *args) -> None:
    """Run fn(rank, world, *args) on `world` gloo ranks; fn must be a module-level function."""
    with tempfile.TemporaryDirectory() as d:
        mp.spawn(_entry, args=(world, os.path.join(d, "store"), fn, args), nprocs=world, join=True)
