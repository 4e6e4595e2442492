"""Data parallelism (plain and the native distributed optimizer, ZeRO-1/2/3), alone and composed with
TP, SP and PP, against serial training on the same global batch: five AdamW steps give the same
losses, grad norms (clipping engaged) and final weights.

fp32: summation order differs (the dp reduction sums micro-batch gradients in another order), so
rounding-level tolerances: 1e-5 relative on losses and norms.
bf16 (bf16 weights, fp32 main grads and masters) against the serial bf16 run: data parallelism
alone sums the same bf16 micro-batch gradients in fp32 in another order (1e-7); tensor parallelism
adds partial sums rounded to bf16 (row-parallel all-reduce, 2**-8 relative each); pipelining sums
the tied embedding's two gradients in fp32 where the serial model adds them in bf16 in autograd.
Those roundings move a master weight by a fraction of a bf16 ulp, which flips the weight's rounding
now and then: losses within 5e-3, norms within 5e-3 relative, weights within 2 bf16 ulps
(2**-6 relative) or 1e-3 absolute (a third of one lr step: an entry whose gradient is rounding noise
steps by a fraction of lr either way) — a lost or doubled gradient moves the norms by ~2x and the
weights by lr per step. AdamW's eps is 1e-4 there (as verify's), which keeps those noise steps
small."""

import contextlib
import importlib.util

import pytest
import torch

from megatron_lite.distributed import comm
from megatron_lite.testing import run_ranks

STEPS = 5


def _config(data_dir, out, *extra):
    from megatron_lite.config import Config
    base = ["model.vocab_size=512", "model.hidden_size=32", "model.num_layers=4", "model.num_attention_heads=4",
            "model.max_sequence_length=32", f"data.dir={data_dir}", "data.micro_batch_size=2",
            f"train.out_dir={out}", "train.steps=20", "train.progress=false", "train.device=cpu",
            "optim.warmup_steps=2", "optim.lr=3e-3", "optim.grad_clip=0.3", "parallel.make_vocab_divisible_by=8"]
    return Config.from_yaml(None, base + list(extra))


def _run(cfg, env=None):
    from megatron_lite.train import Trainer
    trainer = Trainer(cfg, env)
    results = [trainer.train_step() for _ in range(STEPS)]
    return trainer, [(r.loss, r.grad_norm) for r in results]


def _env(rank, world):
    from megatron_lite.distributed.env import RunEnv
    return RunEnv(rank=rank, world_size=world, local_rank=rank, local_world_size=world, source="explicit")


FP32 = dict(rel=1e-5, w_rtol=1e-4, w_atol=1e-5)
BF16 = dict(rel=5e-3, w_rtol=2**-6, w_atol=1e-3)


def _check(rank, world, data_dir, out, layouts, common=(), tol=FP32):
    torch.manual_seed(0)
    # same global batch: 8 samples; the serial reference runs inside this rank, alone (RunEnv())
    serial_cfg = _config(data_dir, f"{out}/serial{rank}", "train.grad_accum=4", *common)
    serial, want = _run(serial_cfg)
    serial_params = dict(serial.model.named_parameters(remove_duplicate=False))
    for extra in layouts:
        dp = int(next(x for x in extra if x.startswith("parallel.dp=")).split("=")[1])
        cfg = _config(data_dir, f"{out}/{'_'.join(extra)}", f"train.grad_accum={4 // dp}", *common, *extra)
        trainer, got = _run(cfg, _env(rank, world))
        where = f"{extra} rank {rank}"
        assert all(n > 0.3 for _, n in want)  # clipping engages on every step
        for (gl, gn), (wl, wn) in zip(got, want):
            assert gl == pytest.approx(wl, rel=tol["rel"]), (where, got, want)
            assert gn == pytest.approx(wn, rel=tol["rel"]), (where, got, want)
        trainer.backend.settle()  # the last step's weight gathers run behind no forward here
        gather = contextlib.nullcontext()
        if trainer.layout.backend == "deepspeed" and cfg.optim.zero.stage == 3:
            import deepspeed  # ZeRO-3 partitions the weights: gather them to compare
            gather = deepspeed.zero.GatheredParameters(list(trainer.model.parameters()))
        elif cfg.optim.zero.stage == 3:
            opt = trainer.backend.optimizer  # between steps only the shards are held
            for b in opt.buckets:  # (experts with one holder per ep rank (ep = dp) are held whole)
                n = comm.size(b.group)
                assert b.sharded_weights or (n == 1 and getattr(b.params[0], "expert_parallel", False)), where
                assert b.weights.untyped_storage().nbytes() == 0 or not b.sharded_weights, where
                assert b.shard_weights.numel() * n == b.numel < sum(p.numel() for p in b.params) + n, where
            gather = opt.full_weights()
        with gather:
            for name, p in trainer.model.named_parameters():
                full = serial_params[name]
                want_p = trainer.slicer(name, full)
                assert p.dtype == want_p.dtype, (where, name, p.dtype)
                torch.testing.assert_close(p.detach().float(), want_p.detach().float(), rtol=tol["w_rtol"],
                                           atol=tol["w_atol"], msg=lambda e: f"{where} {name} {e}")


def test_dp2_plain_and_native_zero1(corpus_dir, tmp_path):
    run_ranks(_check, 2, str(corpus_dir), str(tmp_path),
              [("parallel.dp=2",), ("parallel.dp=2", "optim.zero.stage=1")])


@pytest.mark.slow
def test_dp2_composed_with_tp2_and_pp2(corpus_dir, tmp_path):
    run_ranks(_check, 4, str(corpus_dir), str(tmp_path),
              [("parallel.dp=2", "parallel.tp=2", "optim.zero.stage=1"),
               ("parallel.dp=2", "parallel.pp=2", "optim.zero.stage=1")])


# Small buckets: many buckets per stage, parameters cut between the ranks' shards, the tied
# embedding's own bucket on the first and last stage.
ZERO_LAYOUTS = [
    ("parallel.dp=4", "optim.zero.stage=2"),
    ("parallel.dp=2", "parallel.tp=2", "parallel.sequence_parallel=true", "optim.zero.stage=2"),
    ("parallel.dp=2", "parallel.pp=2", "optim.zero.stage=2"),
    ("parallel.dp=2", "parallel.pp=2", "parallel.schedule=interleaved", "parallel.virtual_stages=2",
     "optim.zero.stage=1"),
]


@pytest.mark.slow
def test_distributed_optimizer_zero1_zero2_with_tp_sp_pp_fp32(corpus_dir, tmp_path):
    run_ranks(_check, 4, str(corpus_dir), str(tmp_path), ZERO_LAYOUTS, ("optim.zero.bucket_elements=700",))


# ZeRO-3 (weights sharded too, gathered per block just in time) with every axis and both
# recompute modes (a recomputation runs inside the backward, while the block's weights are held).
ZERO3_LAYOUTS = [
    ("parallel.dp=4", "optim.zero.stage=3", "train.recompute=full"),
    ("parallel.dp=2", "parallel.tp=2", "parallel.sequence_parallel=true", "optim.zero.stage=3",
     "train.recompute=selective"),
    ("parallel.dp=2", "parallel.pp=2", "parallel.schedule=interleaved", "parallel.virtual_stages=2",
     "optim.zero.stage=3"),
]


@pytest.mark.slow
def test_zero3_with_tp_sp_pp_and_recompute_fp32_and_bf16(corpus_dir, tmp_path):
    run_ranks(_check, 4, str(corpus_dir), str(tmp_path), ZERO3_LAYOUTS)
    run_ranks(_check, 4, str(corpus_dir), str(tmp_path / "bf16"), ZERO3_LAYOUTS,
              ("train.precision=bf16", "optim.eps=1e-4"), BF16)


@pytest.mark.slow
def test_bf16_layouts_match_the_serial_bf16_run(corpus_dir, tmp_path):
    run_ranks(_check, 4, str(corpus_dir), str(tmp_path),
              [("parallel.dp=4", "optim.zero.stage=1"), ("parallel.dp=4", "optim.zero.stage=0")] + ZERO_LAYOUTS[1:],
              ("optim.zero.bucket_elements=700", "train.precision=bf16", "optim.eps=1e-4"), BF16)


def _bf16(rank, world, data_dir, out):
    env = _env(rank, world)
    fp32 = _run(_config(data_dir, f"{out}/f", "parallel.dp=2", "train.grad_accum=2"), env)[1]
    bf16 = _run(_config(data_dir, f"{out}/b", "parallel.dp=2", "train.grad_accum=2", "train.precision=bf16",
                        "optim.zero.stage=1"), env)[1]
    # bf16 keeps 8 mantissa bits (~0.4% relative per rounding); over five steps the loss curve
    # stays within 2% of fp32's, while a real bug (e.g. lost grads) moves it by far more.
    for (lb, _), (lf, _) in zip(bf16, fp32):
        assert lb == pytest.approx(lf, rel=0.02), (bf16, fp32)
    if importlib.util.find_spec("deepspeed") is not None:  # DeepSpeed's bf16: bf16 weights, fp32 masters
        ds = _run(_config(data_dir, f"{out}/d", "parallel.dp=2", "train.grad_accum=2", "train.precision=bf16",
                          "optim.zero.stage=1", "optim.zero.backend=deepspeed"), env)[1]
        for (ld, _), (lf, _) in zip(ds, fp32):
            assert ld == pytest.approx(lf, rel=0.02), (ds, fp32)


def test_bf16_tracks_fp32_under_data_parallel_zero1(corpus_dir, tmp_path):
    run_ranks(_bf16, 2, str(corpus_dir), str(tmp_path))


def _overlap(rank, world, data_dir, out):
    """Overlap on against off, per ZeRO stage at dp=2: the same collectives on the same data, so
    bit-identical losses, norms and weights; and the communication really started early."""
    from megatron_lite.optim.distributed import Bucket, DistributedOptimizer
    real_finish, real_gather = DistributedOptimizer.finish, Bucket.gather
    real_end = DistributedOptimizer._end_of_backward
    seen = {"started_before_finish": [], "prefetched": 0}

    def finish(self):  # stages 0-1: how much of the reduction the last backward started
        if self.stage < 2:
            seen["started_before_finish"].append(sum(b.launched for b in self.buckets))
        real_finish(self)

    def end_of_backward(self):  # stages 2-3: reductions still in flight when the backward ended
        seen["started_before_finish"].append(len(self._inflight))
        real_end(self)

    def gather(self, group):  # ZeRO-3: needed now, and already on its way (started one block ahead)
        seen["prefetched"] += self.gathering is not None
        real_gather(self, group)
    DistributedOptimizer.finish, Bucket.gather = finish, gather
    DistributedOptimizer._end_of_backward = end_of_backward
    for stage in (0, 1, 2, 3):
        runs = {}
        for overlap in (True, False):
            seen["started_before_finish"].clear()
            seen["prefetched"] = 0
            cfg = _config(data_dir, f"{out}/z{stage}_{overlap}", "parallel.dp=2", "train.grad_accum=2",
                          f"optim.zero.stage={stage}", "optim.zero.bucket_elements=2000",
                          f"parallel.overlap_grad_reduce={str(overlap).lower()}",
                          f"parallel.overlap_param_gather={str(overlap).lower()}")
            trainer, got = _run(cfg, _env(rank, world))
            opt = trainer.backend.optimizer
            assert len(opt.buckets) > 2, stage
            started = list(seen["started_before_finish"])
            if stage == 3:  # blocks gathered ahead of their use, in forward and backward (4 blocks)
                assert (seen["prefetched"] >= 6 * STEPS * 2) if overlap else seen["prefetched"] == 0
            if overlap and stage in (1, 2):  # the step left every bucket's all-gather running
                assert all(b.gathering is not None for b in opt.buckets), stage
                trainer.evaluate()  # a forward waits for each bucket just before its first use
                assert all(b.gathering is None for b in opt.buckets), stage
            trainer.backend.settle()
            with opt.full_weights():
                runs[overlap] = (got, [p.detach().clone() for p in trainer.model.parameters()], started)
        (on, w_on, s_on), (off, w_off, s_off) = runs[True], runs[False]
        assert on == off, (stage, on, off)  # bit-identical
        for a, b in zip(w_on, w_off, strict=True):
            assert torch.equal(a, b), stage
        if stage < 2:  # every bucket's reduction started during the last backward
            assert all(s == len(opt.buckets) for s in s_on) and all(s == 0 for s in s_off), (stage, s_on)
        else:  # still in flight when each backward ended (without overlap: each waited at once, and
            # the end of the backward only adds the embedding lookup's gathered rows)
            assert len(s_on) == 2 * STEPS and all(s > 0 for s in s_on) and all(s == 0 for s in s_off), \
                (stage, s_on, s_off)


def test_overlapped_communication_is_bit_identical_and_starts_early(corpus_dir, tmp_path):
    run_ranks(_overlap, 2, str(corpus_dir), str(tmp_path))


def _lookup(rank, world, data_dir, out):
    """The token embedding's lookup gradient under dp2 (stages 0-3, tied and untied; tp and pp are in
    the parity tests): the rows the batch touched travel (an all-gather of ids and rows on the
    backward whose gradient is reduced: the last of a step for stages 0-1, every one for 2-3) instead of
    a (V, C) gradient in the reduction; for a tied weight the head's part is reduced during the backward,
    its bucket launched before the lookup's backward runs. The sums themselves are the parity tests'."""
    from megatron_lite.distributed import comm
    from megatron_lite.optim.distributed import Bucket, DistributedOptimizer
    from megatron_lite.optim.distributed import lookup_rows_travel as real_rule
    real, real_gather = DistributedOptimizer._lookup_grad, Bucket.start_gather
    seen, gathers = [], []

    def start_gather(self, group):  # ZeRO-3: which buckets are gathered (not already held)
        if not self.gathered:
            gathers.append(id(self))
        real_gather(self, group)
    Bucket.start_gather = start_gather

    def lookup_grad(self, p, ids, grad):
        b, _ = self.bucket_of[id(p)]
        seen.append((self._lookups + 1, b.launched, ids.numel(), grad.shape[-1]))
        real(self, p, ids, grad)
    DistributedOptimizer._lookup_grad = lookup_grad
    for extra in (("optim.zero.stage=0",), ("optim.zero.stage=1",), ("optim.zero.stage=2",),
                  ("optim.zero.stage=3",), ("optim.zero.stage=1", "model.tie_embeddings=false")):
        seen.clear()
        cfg = _config(data_dir, f"{out}/{'_'.join(extra)}", "parallel.dp=2", "train.grad_accum=2",
                      "optim.zero.bucket_elements=2000", *extra)
        from megatron_lite.train import Trainer
        trainer = Trainer(cfg, _env(rank, world))
        opt = trainer.backend.optimizer
        assert opt._deferred is trainer.model.tok_emb and opt._lookup_only == ("model.tie_embeddings=false" in extra)
        stats = comm.CommStats()
        gathers.clear()
        with stats.recording():
            trainer.train_step()
        N, C = 2 * 32, 32  # tokens of a micro-batch, width
        if "optim.zero.stage=3" in extra:  # the embedding-and-head bucket: gathered once per micro-batch
            rest, _ = opt.bucket_of[id(trainer.model.tok_emb.weight)]
            assert rest.hold_forward and gathers.count(id(rest)) == 2, (gathers.count(id(rest)), len(gathers))
        assert [(k, n, c) for k, _, n, c in seen] == [(1, N, C), (2, N, C)], (extra, seen)
        stage = cfg.optim.zero.stage
        gathered = 2 * N * (8 + 4 * C)  # ids (int64) and fp32 rows of both ranks, per gathered backward
        weights = sum(b.numel * 4 for b in opt.buckets) if stage in (1, 2) else 0  # the step's all-gather
        zero3 = stats.bytes["all_gather"] - gathered * 2 if stage == 3 else 0  # ZeRO-3's weight gathers
        assert stats.bytes["all_gather"] == gathered * (2 if stage >= 2 else 1) + weights + zero3, \
            (extra, dict(stats.bytes))
        if stage < 2 and "model.tie_embeddings=false" not in extra:  # the head's part already on its way
            assert seen[-1][1], extra
        trainer.backend.settle()
        trainer.close()
    # Where the group's rows (2 x 256 tokens) are as many as the table's (512), the gradient stays
    # dense, reduced with its bucket (lookup_rows_travel); the weights after a step equal those of the
    # same step with the rows forced to travel (the same sums in another order).
    from megatron_lite.optim import distributed
    weights = {}
    for forced in (False, True):
        seen.clear()
        if forced:
            distributed.lookup_rows_travel = lambda *args: True
        cfg = _config(data_dir, f"{out}/dense_{forced}", "parallel.dp=2", "train.grad_accum=2",
                      "data.micro_batch_size=8", "optim.zero.stage=1")
        from megatron_lite.train import Trainer
        trainer = Trainer(cfg, _env(rank, world))
        opt = trainer.backend.optimizer
        assert (opt._deferred is None) != forced
        stats = comm.CommStats()
        with stats.recording():
            trainer.train_step()
        rows = 2 * 256 * (8 + 4 * 32)
        assert stats.bytes["all_gather"] == sum(b.numel * 4 for b in opt.buckets) + rows * forced
        assert len(seen) == 2 * forced
        trainer.backend.settle()
        weights[forced] = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
        trainer.close()
    distributed.lookup_rows_travel = real_rule
    for n, w in weights[False].items():
        torch.testing.assert_close(w, weights[True][n], rtol=0, atol=1e-6, msg=n)


def test_embedding_lookup_gradient_travels_as_rows(corpus_dir, tmp_path):
    run_ranks(_lookup, 2, str(corpus_dir), str(tmp_path))
