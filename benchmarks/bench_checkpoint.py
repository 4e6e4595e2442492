"""Checkpoint cost, single process (CPU): what a save writes, how long it takes against a raw
write of the same bytes with fsync measured side by side, how much of it the xxh3 checksums cost,
and how long a verified load takes.

For each model (tiny: configs/tiny.yaml's shape; GPT-2 125M), alternating rounds of:
  save      CheckpointManager.save: safetensors write + fsync + checksums + manifest + atomic commit
  raw       the same bytes written to one file with one fsync ("dd"-style baseline)
  checksum  xxh3-64 over the checkpoint's files (included in `save`; shown on its own)
  load      CheckpointManager.load into a fresh model and optimizer (verification included)
  async     checkpoint.async_save: the seconds training is blocked — the snapshot to host memory plus
            waiting at the commit — when a training interval of 3x a sync save follows the save
            (simulated by a sleep, so the writer thread has the cores to itself); `snapshot` is the
            host copy alone, the floor on a CPU (on a GPU it is a device-to-host copy)
Medians over the rounds. Writes benchmarks/results/checkpoint.json and its section of
docs/benchmarks.md.

    python benchmarks/bench_checkpoint.py [--rounds 3]
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.report import write_json, write_section  # noqa: E402
from megatron_lite.checkpoint import CheckpointManager, Stateful, TrainState  # noqa: E402
from megatron_lite.checkpoint.integrity import file_digest  # noqa: E402
from megatron_lite.config import ModelConfig, OptimConfig  # noqa: E402
from megatron_lite.model import GPT  # noqa: E402
from megatron_lite.model.counts import param_count  # noqa: E402
from megatron_lite.optim import build_optimizer  # noqa: E402

MODELS = {
    "tiny": dict(vocab_size=4096, hidden_size=128, num_layers=4, num_attention_heads=4,
                 max_sequence_length=128),
    "gpt2-125m": dict(vocab_size=50257, hidden_size=768, num_layers=12, num_attention_heads=12,
                      max_sequence_length=1024),
}


def trained(cfg: ModelConfig):
    """A model and an AdamW with state (one step taken), as a checkpoint holds them."""
    model = GPT(cfg, seed=0)
    opt = build_optimizer(model, OptimConfig())
    ids = torch.randint(0, cfg.vocab_size, (1, 16))
    model(ids, ids)[1].backward()
    opt.step()
    return model, opt


def raw_write(path: Path, nbytes: int) -> float:
    buf = os.urandom(min(nbytes, 64 * 2**20))
    t0 = time.perf_counter()
    with open(path, "wb") as f:
        left = nbytes
        while left > 0:
            f.write(buf[:left])
            left -= len(buf)
        f.flush()
        os.fsync(f.fileno())
    return time.perf_counter() - t0


def measure(name: str, rounds: int, work: Path) -> dict:
    cfg = ModelConfig(**MODELS[name])
    model, opt = trained(cfg)
    times: dict[str, list[float]] = {"save": [], "raw": [], "checksum": [], "load": [], "async_blocked": [],
                                     "snapshot": []}
    nbytes = 0
    for r in range(rounds):
        shutil.rmtree(work, ignore_errors=True)
        mgr = CheckpointManager(work / "ck", keep=1)
        t0 = time.perf_counter()
        path = mgr.save(r + 1, Stateful(model, opt), TrainState(step=r + 1), "model: {}\n")
        times["save"].append(time.perf_counter() - t0)
        files = [p for p in path.rglob("*") if p.is_file()]
        nbytes = sum(p.stat().st_size for p in files)
        times["raw"].append(raw_write(work / "raw.bin", nbytes))
        t0 = time.perf_counter()
        for p in files:
            file_digest(p)
        times["checksum"].append(time.perf_counter() - t0)
        bg = CheckpointManager(work / "bg", keep=1)
        t0 = time.perf_counter()
        bg.save(r + 1, Stateful(model, opt), TrainState(step=r + 1), "model: {}\n", background=True)
        snapshot = time.perf_counter() - t0
        times["snapshot"].append(snapshot)
        time.sleep(3 * times["save"][-1])  # training goes on
        t0 = time.perf_counter()
        bg.finish()
        times["async_blocked"].append(snapshot + time.perf_counter() - t0)
        fresh, fresh_opt = trained(cfg)
        t0 = time.perf_counter()
        mgr.load(path, Stateful(fresh, fresh_opt), TrainState())
        times["load"].append(time.perf_counter() - t0)
    med = {k: statistics.median(v) for k, v in times.items()}
    return {"model": name, "params": param_count(cfg), "bytes": nbytes, "median_s": med,
            "save_over_raw": med["save"] / med["raw"],
            "checksum_share_of_save": med["checksum"] / med["save"],
            "async_blocked_over_save": med["async_blocked"] / med["save"],
            "checksum_gb_per_s": nbytes / med["checksum"] / 1e9}


def parallel_worker(rank, world, name, kind, directory):
    """Save `name` from `world` ranks (tp or dp): each rank's bytes and the save time."""
    import torch.distributed as dist

    from megatron_lite.parallel.tensor_parallel import parallelize
    cfg = ModelConfig(**MODELS[name])
    model, opt = trained(cfg)
    layout = {"tp": world if kind == "tp" else 1, "pp": 1, "dp": world if kind == "dp" else 1}
    if kind == "tp":  # the serial model's weights and moments, sliced as tensor parallelism holds them
        sharded = parallelize(GPT(cfg, seed=0), dist.group.WORLD)
        opt2 = build_optimizer(sharded.model, OptimConfig())
        full = dict(model.named_parameters())
        for n, q in sharded.model.named_parameters():
            w = full.get(n, full.get("tok_emb.weight"))
            with torch.no_grad():
                q.copy_(sharded.sharder(n, w))
            st = opt.state[w]
            opt2.state[q] = {"step": st["step"].clone(), **{k: sharded.sharder(n, st[k]).clone()
                                                            for k in ("exp_avg", "exp_avg_sq")}}
        model, opt = sharded.model, opt2
    mgr = CheckpointManager(Path(directory), keep=1, rank=rank, group=dist.group.WORLD, layout=layout)
    dist.barrier()
    t0 = time.perf_counter()
    path = mgr.save(1, Stateful(model, opt), TrainState(step=1), "model: {}\n")
    seconds = time.perf_counter() - t0
    mine = path / f"rank_{rank:05d}.safetensors"
    sizes = [torch.zeros(1) for _ in range(world)]
    dist.all_gather(sizes, torch.tensor([float(mine.stat().st_size if mine.exists() else 0)]))
    return {"save_s": seconds, "bytes_per_rank": [int(t.item()) for t in sizes], "path": str(path)}


def measure_parallel(name: str, work: Path, serial_path: Path) -> list[dict]:
    """tp=2 and dp=2 saves of `name`; then loading the tp=2 checkpoint into a serial model
    (resharded) against loading the serial one (same layout), in this process."""
    from megatron_lite.testing import spawn_json
    cfg = ModelConfig(**MODELS[name])
    rows = []
    for kind in ("dp", "tp"):
        res = spawn_json(parallel_worker, 2, name, kind, str(work / kind))
        row = {"model": name, "layout": f"{kind}=2", "save_s": res["save_s"],
               "bytes_per_rank": res["bytes_per_rank"]}
        if kind == "tp":
            loads = {"same": [], "resharded": []}
            for _ in range(3):
                for which, path in (("same", serial_path), ("resharded", Path(res["path"]))):
                    fresh, fresh_opt = trained(cfg)
                    t0 = time.perf_counter()
                    CheckpointManager(path.parent).load(path, Stateful(fresh, fresh_opt), TrainState())
                    loads[which].append(time.perf_counter() - t0)
            row.update(load_same_s=statistics.median(loads["same"]),
                       load_resharded_s=statistics.median(loads["resharded"]))
        rows.append(row)
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--models", nargs="+", default=list(MODELS))
    p.add_argument("--out", default=str(ROOT / "benchmarks/results/checkpoint.json"))
    a = p.parse_args()
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory(dir=ROOT / "benchmarks") as d:
        rows = [measure(m, a.rounds, Path(d) / m) for m in a.models]
        serial = CheckpointManager(Path(d) / "serial", keep=1)
        model, opt = trained(ModelConfig(**MODELS[a.models[-1]]))
        serial_path = serial.save(1, Stateful(model, opt), TrainState(step=1), "model: {}\n")
        del model, opt
        par = measure_parallel(a.models[-1], Path(d) / "par", serial_path)
    write_json(a.out, {"torch": torch.__version__, "rounds": a.rounds, "rows": rows, "parallel": par})
    table = [f"Single process, CPU, this machine's disk; median of {a.rounds} alternating rounds. `save` "
             "includes the safetensors write, fsync, the xxh3 checksums, the manifest and the atomic "
             "commit; `raw` writes the same number of bytes to one file with one fsync in the same run.", "",
             "| model | params | bytes | save (s) | raw write+fsync (s) | save / raw | checksum (s) | "
             "checksum share of save | checksum GB/s | verified load (s) | async: snapshot (s) | "
             "async: blocked (s) | blocked / save |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        m = r["median_s"]
        table.append(f"| {r['model']} | {r['params'] / 1e6:.1f}M | {r['bytes']:,} | {m['save']:.3f} | "
                     f"{m['raw']:.3f} | {r['save_over_raw']:.2f}x | {m['checksum']:.3f} | "
                     f"{100 * r['checksum_share_of_save']:.1f}% | {r['checksum_gb_per_s']:.1f} | "
                     f"{m['load']:.3f} | {m['snapshot']:.3f} | {m['async_blocked']:.3f} | "
                     f"{r['async_blocked_over_save']:.2f} |")
    table += ["", f"{a.models[-1]} from 2 gloo processes on these 2 cores (each rank writes the slices it "
              "owns; the tp=2 checkpoint is then loaded into a serial model, resharded, against the serial "
              "checkpoint loaded at its own layout, median of 3):", "",
              "| layout | save (s) | bytes per rank | load same layout (s) | load resharded (s) | "
              "resharded / same |",
              "|---|---|---|---|---|---|"]
    for r in par:
        load = (f"{r['load_same_s']:.3f} | {r['load_resharded_s']:.3f} | "
                f"{r['load_resharded_s'] / r['load_same_s']:.2f}x") if "load_same_s" in r else "- | - | -"
        per_rank = " / ".join(f"{b:,}" for b in r["bytes_per_rank"])
        table.append(f"| {r['layout']} | {r['save_s']:.3f} | {per_rank} | {load} |")
    print("\n".join(table))
    write_section(ROOT / "docs/benchmarks.md", "checkpoint", "\n".join(table))


if __name__ == "__main__":
    main()
