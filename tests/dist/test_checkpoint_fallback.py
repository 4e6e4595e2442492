"""Ranks agree on the checkpoint to resume: when only rank 1's shard of the newest checkpoint is
damaged, rank 1 names the file and *both* ranks fall back to the previous one (tp=2, gloo)."""

from megatron_lite.testing import run_ranks


def _fallback(rank, world, data_dir, out):
    import torch.distributed as dist

    from megatron_lite.train import Trainer
    from tests.dist.test_data_parallel import _config, _env
    cfg = lambda: _config(data_dir, out, "parallel.tp=2", "train.steps=4", "checkpoint.interval=2",
                          "train.eval_interval=100", "train.eval_iters=1")
    Trainer(cfg(), _env(rank, world)).fit()  # step_2 and step_4, a shard per rank
    dist.barrier()
    if rank == 1:
        from pathlib import Path
        f = Path(out) / "checkpoints" / "step_00000004" / "rank_00001.safetensors"
        data = bytearray(f.read_bytes())
        data[-5] ^= 0x01
        f.write_bytes(bytes(data))
    dist.barrier()
    again = Trainer(cfg(), _env(rank, world))
    assert again.resumed_from.name == "step_00000002" and again.state.step == 2, (rank, again.resumed_from)


def test_ranks_agree_to_fall_back_when_one_shard_is_damaged(corpus_dir, tmp_path):
    run_ranks(_fallback, 2, str(corpus_dir), str(tmp_path / "run"))
