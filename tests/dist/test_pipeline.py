"""Pipeline parallelism against the serial model with gradient accumulation over the same
micro-batches: loss, every gradient, three optimizer steps with clipping, tied embeddings kept
identical — for GPipe, 1F1B and interleaved at pp=2 and pp=4, tp=2 x pp=2 with sequence
parallelism, and uneven pieces (interleaved chunks of different sizes, an embedding-only first and a
head-only last piece, the balanced partition's Llama-3-like split). float64, so differences are
summation-order rounding only (1e-9 relative)."""


import pytest
import torch

from megatron_lite.testing import run_ranks

TOL = dict(rtol=1e-9, atol=1e-11)


def _case(rank, world, pp, tp, schedule, v, m, sp=False, variant="gpt2", sizes=None, partition="even",
          num_layers=None):
    import torch.distributed as dist

    from megatron_lite.config import ModelConfig
    from megatron_lite.distributed.topology import Topology
    from megatron_lite.model import GPT
    from megatron_lite.parallel.grads import GradSync, tied_embedding_copy
    from megatron_lite.parallel.tensor_parallel import parallelize
    from megatron_lite.pipeline.engine import PipelineEngine
    from megatron_lite.pipeline.partition import stage_chunks
    where = f"[{schedule} pp={pp} tp={tp} v={v} m={m} sp={sp} {variant} {sizes or partition} rank={rank}]"
    topo = Topology(tp=tp, pp=pp, dp=1)
    groups = topo.build(rank)
    coord = groups.coord
    extra = dict(position_embedding="rope", activation="swiglu", norm="rmsnorm", bias=False,
                 tie_embeddings=False) if variant == "llama" else {}
    layers = num_layers or (sum(sizes) if sizes else pp * v * (2 if pp == 2 else 1))
    cfg = ModelConfig(vocab_size=101, hidden_size=32, num_layers=layers,
                      num_attention_heads=4, intermediate_size=64, max_sequence_length=16, **extra)
    serial = GPT(cfg, seed=21).double()
    g = torch.Generator().manual_seed(8)
    batches = [(torch.randint(0, 101, (2, 16), generator=g), torch.randint(0, 101, (2, 16), generator=g))
               for _ in range(m)]
    chunks = stage_chunks(cfg, pp, coord.pp, v, partition, sizes)
    layers = [i for c in chunks for i in c.layers]
    stage = GPT(cfg, seed=21, layers=layers, embed=any(c.first for c in chunks),
                head=any(c.last for c in chunks)).double()
    tp_group = groups.tp if tp > 1 else None
    shard = lambda n, t: t  # noqa: E731
    if tp > 1:
        shard = parallelize(stage, groups.tp, sequence_parallel=sp, make_vocab_divisible_by=8).sharder
    sync = GradSync(tp_group=tp_group, pp_group=groups.pp, embed_group=groups.embed)
    engine = PipelineEngine(stage, chunks, coord.pp, groups.pp_ranks, groups.pp, schedule,
                            act_shape=(2, 16 // tp if sp else 16, 32), device=torch.device("cpu"),
                            dtype=torch.float64)
    opt_s = torch.optim.AdamW(serial.parameters(), lr=1e-2)
    opt_p = torch.optim.AdamW(stage.parameters(), lr=1e-2)
    copy_w = tied_embedding_copy(stage)
    for step in range(3):
        opt_s.zero_grad()
        opt_p.zero_grad()
        ref = torch.zeros((), dtype=torch.float64)
        for x, y in batches:
            _, loss = serial(x, y)
            (loss / m).backward()
            ref += loss.detach() / m
        got = engine.run(batches)
        torch.testing.assert_close(got, ref, **TOL, msg=lambda e, step=step: f"loss step {step} {where} {e}")
        sync.finish(stage)  # sequence-parallel sums, tied-embedding copies
        if step == 0:
            sg = dict(serial.named_parameters(remove_duplicate=False))
            for name, p in stage.named_parameters():
                torch.testing.assert_close(p.grad, shard(name, sg[name].grad), **TOL,
                                           msg=lambda e, name=name: f"grad {name} {where} {e}")
        ns = torch.nn.utils.clip_grad_norm_(serial.parameters(), 0.05).item()
        npp = sync.clip(stage, 0.05)
        assert ns > 0.05 and abs(npp - ns) < 1e-9 * ns, (npp, ns, where)
        opt_s.step()
        opt_p.step()
    sp_ = dict(serial.named_parameters(remove_duplicate=False))
    for name, p in stage.named_parameters():
        torch.testing.assert_close(p, shard(name, sp_[name]), **TOL,
                                   msg=lambda e, name=name: f"weight {name} {where} {e}")
    if copy_w is not None:  # the first and last stage copies of the tied embedding are identical
        mine = copy_w.detach().clone()
        other = [torch.empty_like(mine) for _ in groups.embed_ranks]
        dist.all_gather(other, mine, group=groups.embed)
        assert torch.equal(other[0], other[1]), where


def _held_messages(rank, world):
    """The message buffers a stage holds (sent and not yet released, received and not yet used,
    outputs not yet sent; a sent output awaiting its backward is freed once its send is released)
    are what schedules.held_messages predicts (plan's pipeline term), for every schedule and m,
    forward-only too; under 1F1B they do not grow with m, under GPipe they do (no send of the
    forward phase is known received before the first gradient comes back)."""
    from megatron_lite.config import ModelConfig
    from megatron_lite.distributed.topology import Topology
    from megatron_lite.model import GPT
    from megatron_lite.pipeline.engine import PipelineEngine
    from megatron_lite.pipeline.partition import stage_chunks
    from megatron_lite.pipeline.schedules import build, build_forward_only, held_messages
    groups = Topology(pp=world).build(rank)
    cfg = ModelConfig(vocab_size=64, hidden_size=16, num_layers=2 * world, num_attention_heads=2,
                      max_sequence_length=8)
    message = 2 * 8 * 16 * 4  # one (micro-batch, sequence, hidden) fp32 tensor
    peaks = {}
    for schedule, v in (("1f1b", 1), ("gpipe", 1), ("interleaved", 2)):
        chunks = stage_chunks(cfg, world, rank, v)
        stage = GPT(cfg, seed=0, layers=[i for c in chunks for i in c.layers],
                    embed=any(c.first for c in chunks), head=any(c.last for c in chunks))
        engine = PipelineEngine(stage, chunks, rank, groups.pp_ranks, groups.pp, schedule, (2, 8, 16),
                                torch.device("cpu"))
        for m in (4, 16):
            for forward_only in (False, True):
                engine.run([(torch.randint(0, 64, (2, 8)),) * 2 for _ in range(m)], forward_only)
                lists = build_forward_only(world, m, v) if forward_only else build(schedule, world, m, v)
                want = held_messages(lists, rank) * message
                assert engine.trace.peak_message_bytes == want, (schedule, m, forward_only, rank,
                                                                  engine.trace.peak_message_bytes, want)
                if not forward_only:
                    peaks[schedule, m] = want
    assert peaks["1f1b", 16] == peaks["1f1b", 4] <= 2 * world * message, peaks
    assert peaks["gpipe", 16] >= 3 * peaks["gpipe", 4] > 0, peaks  # m + 2 messages at its peak
    assert peaks["interleaved", 16] == peaks["interleaved", 4], peaks


def _world2(rank, world):
    for schedule, v in (("gpipe", 1), ("1f1b", 1), ("interleaved", 2)):
        _case(rank, world, 2, 1, schedule, v, 4)
    _case(rank, world, 2, 1, "1f1b", 1, 3, variant="llama")  # m not a multiple of pp: fine for 1F1B
    # uneven interleaved chunks: stage 0 holds blocks (0,) and (3,), stage 1 (1, 2) and (4,)
    _case(rank, world, 2, 1, "interleaved", 2, 4, sizes=[1, 2, 1, 1])
    # an embedding-only first piece and a head-only last one (tied: the copies on stages 0 and 1)
    _case(rank, world, 2, 1, "interleaved", 2, 2, sizes=[0, 2, 2, 0])
    _case(rank, world, 2, 1, "1f1b", 1, 2, variant="llama", sizes=[0, 3])  # stage 0: the embedding alone
    _held_messages(rank, world)


def _world4(rank, world):
    for schedule, v in (("gpipe", 1), ("1f1b", 1), ("interleaved", 2)):
        _case(rank, world, 4, 1, schedule, v, 4)
    _case(rank, world, 2, 2, "1f1b", 1, 4, sp=True)
    _case(rank, world, 2, 2, "interleaved", 2, 2, variant="llama")
    # Llama 3 405B's split in small: 6 blocks + embedding + head = 8 pieces of one unit, so the
    # embedding and the head are alone on stage 0's and stage 3's chunk
    _case(rank, world, 4, 1, "interleaved", 2, 4, variant="llama", partition="balanced", num_layers=6)


@pytest.mark.parametrize("world", [2, 4])
def test_pipeline_matches_serial_gradient_accumulation(world):
    run_ranks(_world2 if world == 2 else _world4, world)


def _evaluate(rank, world, data_dir, out):
    from megatron_lite.train import Trainer
    from tests.dist.test_data_parallel import _config, _env
    extra = ("train.eval_iters=3", "parallel.microbatches=2")
    serial_trainer = Trainer(_config(data_dir, f"{out}/serial{rank}", *extra))
    serial = serial_trainer.evaluate()
    inter = (*extra, "parallel.pp=2", "parallel.schedule=interleaved", "parallel.virtual_stages=2")
    pp = Trainer(_config(data_dir, f"{out}/pp", *inter), _env(rank, world)).evaluate()
    # the same three batches, summed in the same order by the last stage: the same mean, bit for bit
    assert pp == serial, (rank, pp, serial)
    # The trainer's own stage models with an embedding-only first piece and a head-only last one
    # (stage 0: embedding + blocks 2, 3; stage 1: blocks 0, 1 + the tied head copy): the same
    # forward, then one training step (tied-embedding sum, clipping) and the loss after it.
    uneven = Trainer(_config(data_dir, f"{out}/uneven", *inter, "parallel.pp_layers=[0,2,2,0]"),
                     _env(rank, world))
    assert [c.layers for c in uneven.layout.chunks(rank)] == ([(), (2, 3)] if rank == 0 else [(0, 1), ()])
    assert uneven.evaluate() == serial, rank
    s, u = serial_trainer.train_step(), uneven.train_step()
    assert float(u.loss) == pytest.approx(float(s.loss), rel=1e-6), (rank, u, s)
    assert float(u.grad_norm) == pytest.approx(float(s.grad_norm), rel=1e-5), (rank, u, s)
    assert uneven.evaluate() == pytest.approx(serial_trainer.evaluate(), rel=1e-5), rank


def test_interleaved_evaluation_takes_any_number_of_batches(corpus_dir, tmp_path):
    """eval_iters=3 at pp=2 interleaved (no multiple of pp): the mean over exactly those 3 batches;
    and the trainer with an embedding-only first and a head-only last piece."""
    run_ranks(_evaluate, 2, str(corpus_dir), str(tmp_path))
