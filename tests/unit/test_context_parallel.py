"""Context parallelism and packed documents without processes: the layout rules, the topology's
cp axis, each cp rank's shard of a micro-batch, the samplers' documents, verify's cp layouts, and
the micro-batch weights that keep the loss a global token mean."""

import numpy as np
import pytest
import torch
import torch.distributed as dist

from megatron_lite.config import Config
from megatron_lite.data.dataset import Sampler
from megatron_lite.data.documents import Packing, window_documents
from megatron_lite.distributed.topology import Topology
from megatron_lite.errors import ConfigError, LayoutError
from megatron_lite.layout import Layout
from megatron_lite.model.gpt import Documents
from megatron_lite.parallel.context_parallel import ContextSharder, gathered_index, local_index, shard_batch
from megatron_lite.train.backends import loss_weights


def _cfg(*overrides):
    return Config.from_yaml(None, ["model.num_layers=4", "model.num_attention_heads=4",
                                   "model.hidden_size=64", "model.max_sequence_length=64",
                                   "data.micro_batch_size=2", *overrides])


def test_cp_layout_facts():
    layout = Layout.build(_cfg("parallel.tp=2", "parallel.cp=2", "parallel.pp=2", "parallel.dp=2",
                               "parallel.sequence_parallel=true", "parallel.microbatches=2",
                               "parallel.cp_algorithm=ring"), world_size=16)
    assert layout.cp == 2 and layout.world_size == 16
    assert layout.act_shape == (2, 64 // 2 // 2, 64)  # the cp shard, then its sequence-parallel shard
    assert layout.global_batch_size == 2 * 2 * 2  # cp ranks share their samples: dp alone counts
    assert "tp 2 +sp cp 2 (ring) pp 2" in layout.describe() and layout.as_dict()["cp"] == 2


@pytest.mark.parametrize("overrides, world, words", [
    (("parallel.cp=2", "parallel.dp=2"), 2, "cp=2 x parallel.pp=1 x parallel.dp=2 = 4 but the job has 2"),
    (("parallel.cp=3",), None, "not divisible by 2 x parallel.cp=3"),
    (("parallel.cp=2", "model.dropout=0.1"), None, "set model.dropout=0 or parallel.cp=1"),
    (("parallel.cp=2", "parallel.dp=2", "optim.zero.stage=1", "optim.zero.backend=deepspeed"), None,
     "use optim.zero.backend=native"),
    (("parallel.cp=2", "train.compile=true"), None, "set train.compile=false or parallel.cp=1"),
    (("parallel.cp=4", "model.max_sequence_length=36"), None, "sequence length 36 is not divisible by 2 x"),
    (("parallel.cp=2", "parallel.tp=4", "parallel.sequence_parallel=true", "model.max_sequence_length=36"),
     None, "/ parallel.cp=2 is not divisible by parallel.tp=4"),
])
def test_cp_layout_rules_are_one_sentence_before_any_group(overrides, world, words):
    with pytest.raises(LayoutError, match=words.replace("(", r"\(").replace(")", r"\)")):
        Layout.build(_cfg(*overrides), world_size=world)
    assert not dist.is_initialized()


@pytest.mark.parametrize("overrides, words", [
    (("parallel.cp=0",), "parallel.cp=0 must be a positive integer"),
    (("parallel.order=tp-cp-dp-cp-pp",), "cp at most once"),
    (("parallel.cp_algorithm=ulysses",), "cp_algorithm"),
    (("data.reset_position_ids=true",), "needs data.document_mask=true"),
])
def test_cp_and_document_config_errors(overrides, words):
    with pytest.raises(ConfigError, match=words):
        _cfg(*overrides)


def test_cp_sits_next_to_tp_unless_the_order_places_it():
    topo = Topology(tp=2, cp=2, pp=1, dp=2)
    assert topo.order == ("tp", "cp", "dp", "pp")
    assert [topo.coord(r).cp for r in range(8)] == [0, 0, 1, 1, 0, 0, 1, 1]
    assert topo.group_ranks(("cp",))[0] == [0, 2] and topo.group_ranks(("dp", "cp"))[0] == [0, 2, 4, 6]
    last = Topology(tp=2, cp=2, dp=2, order="tp-dp-pp-cp")
    assert last.group_ranks(("cp",))[0] == [0, 4]
    for r in range(8):
        assert topo.rank_of(topo.coord(r)) == r and last.rank_of(last.coord(r)) == r
    assert Topology(tp=2, dp=2).rank_of(tp=1, dp=1, pp=0) == 3  # a cp-less coordinate: cp 0


def test_shard_batch_takes_the_ranks_chunks_and_masks_by_global_index():
    T, cp = 16, 2
    ids = torch.arange(T).repeat(2, 1)  # (2, T): token t's id is t
    labels = ids + 100
    seg = torch.tensor([[0] * 5 + [1] * 11, [0] * 16])
    for rank in range(cp):
        mine = local_index(T, cp, rank)
        x, y, shard = shard_batch((ids, labels, Documents(seg)), cp, rank)
        assert x[0].tolist() == mine.tolist() and y[0].tolist() == (mine + 100).tolist()
        keys = gathered_index(T, cp)
        want = (keys[None, :] <= mine[:, None]) & (seg[:, mine, None] == seg[:, None, keys])  # (2, T/cp, T)
        assert torch.equal(shard.mask[:, 0], want)
        assert shard.positions.tolist() == [mine.tolist()]  # global positions: one row for all
    _, _, plain = shard_batch((ids, labels), cp, 1)
    assert plain.mask.shape == (1, 1, T // cp, T)
    reset = Documents(seg, torch.tensor([list(range(5)) + list(range(11)), list(range(16))]))
    _, _, shard = shard_batch((ids, labels, reset), cp, 0)
    # rank 0 holds tokens 0-3 and 12-15; row 0's second document starts at token 5
    assert shard.positions.tolist() == [[0, 1, 2, 3, 7, 8, 9, 10], [0, 1, 2, 3, 12, 13, 14, 15]]


def test_sharder_shares_one_shard_and_one_additive_mask_without_documents():
    """ContextSharder = shard_batch, moved to the device; without documents every micro-batch gets
    the same ContextShard, whose additive mask is built once per dtype; with documents each its own,
    built per forward (the masks differ)."""
    T, cp = 16, 2
    g = torch.Generator().manual_seed(0)
    batches = [(torch.randint(0, 50, (2, T), generator=g), torch.randint(0, 50, (2, T), generator=g))
               for _ in range(3)]
    sharder = ContextSharder(cp, 1, torch.device("cpu"))
    got = [sharder(b) for b in batches]
    for (x, y, shard), b in zip(got, batches, strict=True):
        want = shard_batch(b, cp, 1)
        assert torch.equal(x, want[0]) and torch.equal(y, want[1])
        assert torch.equal(shard.mask, want[2].mask) and torch.equal(shard.positions, want[2].positions)
        assert shard is got[0][2]
    fp32 = got[0][2].attention(torch.float32).mask  # (1, 1, T/cp, T)
    assert all(s.attention(torch.float32).mask is fp32 for _, _, s in got)
    assert torch.equal(fp32, shard_batch(batches[0], cp, 1)[2].attention(torch.float32).mask)
    assert got[1][2].attention(torch.bfloat16).mask.dtype == torch.bfloat16
    seg = torch.tensor([[0] * 5 + [1] * 11, [0] * 16])
    docs = [sharder((x, y, Documents(seg))) for x, y in batches[:2]]
    assert docs[0][2] is not docs[1][2] and docs[0][2].additive is None
    assert docs[0][2].attention(torch.float32).mask is not docs[0][2].attention(torch.float32).mask


def _held_masks(rank, world, docs):
    """Three micro-batches' forwards of a 2-layer GPT on a real cp group, all held for backward as a
    pipeline stage holds its in-flight micro-batches: the distinct (.., T/cp, T) mask storages their
    graphs keep, and their bytes."""
    import torch.distributed as dist

    from megatron_lite.config import ModelConfig
    from megatron_lite.model import GPT
    from megatron_lite.parallel.context_parallel import apply_context_parallel
    T = 32
    mc = ModelConfig(vocab_size=64, hidden_size=32, num_layers=2, num_attention_heads=4,
                     max_sequence_length=T)
    model = GPT(mc, seed=0).train()
    apply_context_parallel(model, dist.group.WORLD, list(range(world)), rank, "allgather")
    sharder = ContextSharder(world, rank, torch.device("cpu"))
    g = torch.Generator().manual_seed(0)
    seg = torch.tensor([[0] * 5 + [1] * 27, [0] * 20 + [1] * 12])
    masks, losses = {}, []

    def pack(t):
        if t.dim() == 4 and t.shape[1:] == (1, T // world, T):  # (B|1, 1, T/cp, T): only the mask
            masks[t.untyped_storage()._cdata] = t.untyped_storage().nbytes()
        return t
    for _ in range(3):
        ids = torch.randint(0, 64, (2, T + 1), generator=g)
        batch = (ids[:, :-1], ids[:, 1:]) + ((Documents(seg),) if docs else ())
        x, y, shard = sharder(batch)
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            losses.append(model(x, y, docs=shard)[1])
    sum(losses).backward()
    return {"storages": len(masks), "bytes": sum(masks.values())}


@pytest.mark.parametrize("docs", [False, True], ids=["causal", "documents"])
def test_in_flight_micro_batches_hold_one_mask_without_documents(docs):
    """plan.memory's mask terms, measured: without documents the micro-batches in flight share one
    (1, 1, T/cp, T) additive mask (memory.attention_mask_bytes once per rank); with documents each
    holds its own (B, 1, T/cp, T) one."""
    from megatron_lite.plan.memory import attention_mask_bytes
    from megatron_lite.testing import spawn_json
    got = spawn_json(_held_masks, 2, docs)
    n = 3 if docs else 1
    assert got == {"storages": n, "bytes": n * attention_mask_bytes(2, 32, 2, 4, docs)}


def test_sampler_carries_documents_and_masks_separator_targets():
    tokens = np.array([5, 6, 0, 7, 8, 9, 0, 3, 4, 0, 1, 2, 0], dtype=np.uint16)  # 0 ends each document
    starts = np.array([0, 3, 7, 10])
    sampler = Sampler(tokens, seq_len=4, seed=0, shuffle=False, packing=Packing(starts, True, 0))
    x, y, docs = sampler.batch(0, 3)  # windows at tokens 0, 4, 8
    assert x.tolist() == [[5, 6, 0, 7], [8, 9, 0, 3], [4, 0, 1, 2]]
    assert y.tolist() == [[6, 0, -100, 8], [9, 0, -100, 4], [0, -100, 2, 0]]  # none where the input is 0
    want = window_documents(starts, [0, 4, 8], 4, True)
    assert torch.equal(docs.segments, want.segments) and torch.equal(docs.positions, want.positions)
    assert docs.segments.tolist() == [[0, 0, 0, 1], [0, 0, 0, 1], [0, 0, 1, 1]]
    assert len(Sampler(tokens, 4, 0, shuffle=False, packing=Packing(None, False, 0)).batch(0, 1)) == 2


def test_loss_weights_are_the_counted_targets_share():
    y = torch.ones(2, 4, dtype=torch.long)
    half = y.clone()
    half[:, :2] = -100
    assert loss_weights([(y, y), (y, y)], None) == [1.0, 1.0]
    # 8 and 4 counted targets: the mean over all 12 weighs the micro-batches 8/6 and 4/6
    assert loss_weights([(y, y), (y, half)], None) == pytest.approx([8 / 6, 4 / 6])


def test_verify_enumerates_cp_layouts_with_both_algorithms():
    from megatron_lite.verify.select import candidates, default_selection
    cands, unfit = candidates(4, [], deepspeed=False)
    chosen = {v.name for v in default_selection(cands)}
    assert {"cp4:allgather", "cp4:ring"} <= chosen and not unfit
    assert any(n.startswith("tp2") and ".cp2:" in n for n in chosen)
    assert any(n.startswith("cp2:") and ".pp2:" in n for n in chosen)
    assert any(n.startswith("cp2:") and ".dp2:zero1" in n for n in chosen)
