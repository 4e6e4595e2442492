"""What the tests and the benchmarks share: the tiny model's overrides and spawning gloo ranks here;
running the CLI as a launcher would and hurting its ranks in `faults`, the local SLURM clusters in
`cluster`.

Plain functions (no test framework), so neither the benchmarks nor the tests reach into each other
(no `import tests`). For tests and benchmarks only: no module of the package imports it."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

# The source checkout the tests and benchmarks run from (configs/, launch/).
ROOT = Path(__file__).resolve().parents[2]


def tiny_overrides(data_dir, *extra: str) -> list[str]:
    """Dotted overrides for a tiny, fast model on a small prepared corpus (later entries win)."""
    return [
        "model.vocab_size=512", "model.hidden_size=32", "model.num_layers=2", "model.num_attention_heads=4",
        "model.max_sequence_length=32", f"data.dir={data_dir}", "data.micro_batch_size=4",
        "train.steps=20", "train.eval_interval=10", "train.eval_iters=2", "train.progress=false",
        "train.sample_tokens=0", "train.device=cpu", "optim.warmup_steps=5", "optim.lr=3e-3",
        "checkpoint.interval=100", "log.interval=5", "parallel.make_vocab_divisible_by=8", *extra,
    ]


def _spawn(entry, world: int, *args) -> None:
    """entry(rank, world, store_path, *args) on `world` processes meeting in a file store (no port
    races); a child's failure re-raises here."""
    import torch.multiprocessing as mp
    with tempfile.TemporaryDirectory() as d:
        mp.spawn(entry, args=(world, os.path.join(d, "store"), *args), nprocs=world, join=True)


def _in_group(rank: int, world: int, store: str, fn, args) -> None:
    import torch
    import torch.distributed as dist

    from ..distributed.env import export
    export({"OMP_NUM_THREADS": "1"})  # for whatever this rank starts (DeepSpeed's ops, subprocesses)
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    try:
        fn(rank, world, *args)
    finally:
        dist.destroy_process_group()
    # Success: end without native teardown, which can abort a finished rank (comm.exit_process).
    from ..distributed import comm
    comm.exit_process(0)


def run_ranks(fn, world: int, *args) -> None:
    """Run fn(rank, world, *args) on `world` gloo ranks, the default group set up and always
    destroyed; fn must be a module-level function."""
    _spawn(_in_group, world, fn, args)


def _json_rank(rank: int, world: int, worker, args, out: str) -> None:
    value = worker(rank, world, *args)
    if rank == 0:
        Path(out).write_text(json.dumps(value))


def spawn_json(worker, world: int, *args):
    """worker(rank, world, *args) on `world` gloo ranks (run_ranks: the default group set up, torn
    down, the process ended without native teardown); returns what rank 0's worker returned, through
    JSON."""
    with tempfile.TemporaryDirectory() as d:
        out = os.path.join(d, "out.json")
        run_ranks(_json_rank, world, worker, args, out)
        return json.loads(Path(out).read_text())
