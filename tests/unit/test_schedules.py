"""Pipeline schedules as pure action lists: ordering, matching sends/receives, in-flight limits,
coverage, deadlock-freedom (by simulation) and the bubble each one leaves; and the partition of the
blocks into pipeline pieces (uneven, interleaved, embedding- or head-only end pieces)."""

import pytest

from megatron_lite.config import ConfigError, ModelConfig
from megatron_lite.errors import LayoutError
from megatron_lite.pipeline.partition import equal_load, piece_sizes, stage_chunks
from megatron_lite.pipeline.schedules import Action, build, build_forward_only, message, simulate

CASES = [("gpipe", pp, m, 1) for pp in (2, 4) for m in (1, 3, 4, 8)] + \
        [("1f1b", pp, m, 1) for pp in (2, 4) for m in (1, 3, 4, 8)] + \
        [("interleaved", pp, m, v) for pp in (2, 4) for m in (pp, 2 * pp, 4 * pp) for v in (2, 3)]


@pytest.mark.parametrize("name, pp, m, v", CASES)
def test_schedule_invariants(name, pp, m, v):
    lists = build(name, pp, m, v)
    assert len(lists) == pp
    for _, actions in enumerate(lists):
        compute = [(a.kind, a.mb, a.chunk) for a in actions if a.kind in ("F", "B")]
        # every (micro-batch, chunk) exactly once forward and once backward
        want = {(mb, c) for mb in range(m) for c in range(v)}
        assert sorted((mb, c) for k, mb, c in compute if k == "F") == sorted(want)
        assert sorted((mb, c) for k, mb, c in compute if k == "B") == sorted(want)
        # a micro-batch's forward precedes its backward on every stage
        order = {(k, mb, c): i for i, (k, mb, c) in enumerate(compute)}
        assert all(order[("F", mb, c)] < order[("B", mb, c)] for mb, c in want)
    # sends match receives across neighbours, one to one
    sends = sorted((message(a, s, pp), s, a.peer) for s, acts in enumerate(lists) for a in acts
                   if a.kind.startswith("SEND"))
    recvs = sorted((message(a, s, pp), a.peer, s) for s, acts in enumerate(lists) for a in acts
                   if a.kind.startswith("RECV"))
    assert sends == recvs and len(sends) == 2 * m * (pp * v - 1)
    assert all(dst == (src + (1 if msg[0] == "F" else -1)) % pp for msg, src, dst in sends)
    # and the lists run to completion (no deadlock) with a bubble no larger than the theory's
    finish, busy, peak = simulate(lists)
    theory = (pp - 1) / (m * v + pp - 1) if name != "gpipe" or v == 1 else None
    if name == "interleaved":
        theory = (pp - 1) / v / (m + (pp - 1) / v)
    idle = 1 - busy[0] / finish
    assert idle <= theory + 1e-9, (idle, theory)
    if name == "gpipe":
        assert peak[0] == m  # GPipe keeps every micro-batch's activations
    if name == "1f1b":
        assert peak[0] == min(pp, m)  # 1F1B never holds more than pp on stage 0


@pytest.mark.parametrize("pp, m, v", [(pp, m, v) for pp in (2, 4) for m in (1, 3, 5) for v in (1, 2, 3)])
def test_forward_only_lists_take_any_number_of_micro_batches(pp, m, v):
    lists = build_forward_only(pp, m, v)
    for actions in lists:
        assert sorted((a.mb, a.chunk) for a in actions if a.kind == "F") == \
            sorted((mb, c) for mb in range(m) for c in range(v))
        assert not any(a.kind in ("B", "RECV_B", "SEND_B") for a in actions)
    # the last virtual stage meets the micro-batches in order: the loss sums as serial evaluation does
    assert [a.mb for a in lists[pp - 1] if a.kind == "F" and a.chunk == v - 1] == list(range(m))
    simulate(lists)  # runs to completion: no deadlock


def test_chunks_are_visited_in_order_for_interleaving():
    lists = build("interleaved", 2, 4, 2)
    # stage 0 starts with chunk 0 for micro-batches 0, 1, then chunk 1 for 0, 1 (groups of pp)
    f = [(a.mb, a.chunk) for a in lists[0] if a.kind == "F"]
    assert f[:4] == [(0, 0), (1, 0), (0, 1), (1, 1)]
    assert lists[1][0] == Action("RECV_F", 0, 0, 0)


def test_schedule_errors_are_one_sentence():
    with pytest.raises(ConfigError, match="multiple of parallel.pp=4"):
        build("interleaved", 4, 3, 2)  # fewer micro-batches than stages: cannot run interleaved
    with pytest.raises(ConfigError, match="unknown"):
        build("zigzag", 2, 4)


def test_a_broken_list_is_caught_by_the_simulator():
    lists = build("1f1b", 2, 2)
    lists[1] = [a for a in lists[1] if not (a.kind == "RECV_F" and a.mb == 1)]
    with pytest.raises(RuntimeError, match="never received"):
        simulate(lists)
    swapped = build("1f1b", 2, 2)
    swapped[0] = list(reversed(swapped[0]))
    with pytest.raises(RuntimeError, match="deadlock"):
        simulate(swapped)


@pytest.mark.parametrize("name, pp, m, v", CASES + [("1f1b", 4, 32, 1), ("interleaved", 2, 32, 2)])
def test_send_releases_are_sound_and_bounded(name, pp, m, v):
    """A send is released only at a point where its receiver has certainly taken it, checked
    against random executions of the lists (any order the messages allow); under 1F1B the
    number of sends a stage holds does not grow with m."""
    import random

    from megatron_lite.pipeline.schedules import send_releases
    lists = build(name, pp, m, v)
    releases = send_releases(lists)
    receiver = {message(a, s, pp): (s, i) for s, acts in enumerate(lists) for i, a in enumerate(acts)
                if a.kind.startswith("RECV")}
    rng = random.Random(0)
    for _ in range(5):
        pos, sent = [0] * pp, set()
        while any(pos[s] < len(lists[s]) for s in range(pp)):
            ready = [s for s in range(pp) if pos[s] < len(lists[s]) and not (
                lists[s][pos[s]].kind.startswith("RECV") and message(lists[s][pos[s]], s, pp) not in sent)]
            s = rng.choice(ready)
            i, a = pos[s], lists[s][pos[s]]
            if a.kind.startswith("SEND"):
                sent.add(message(a, s, pp))
            pos[s] += 1
            for j in releases[s].get(i, ()):
                q, r = receiver[message(lists[s][j], s, pp)]
                assert pos[q] > r, (s, i, lists[s][j], "released before its receive ran")
    held = []
    for s, acts in enumerate(lists):
        out = most = 0
        for i, a in enumerate(acts):
            out += a.kind.startswith("SEND") - len(releases[s].get(i, ()))
            most = max(most, out)
        held.append(most)
    if name == "1f1b":
        assert max(held) <= pp, held
    if name == "interleaved":
        assert max(held) <= 2 * pp * v, held


# ---- the partition ------------------------------------------------------------------------------
LLAMA3_405B = ModelConfig(vocab_size=128256, hidden_size=16384, num_layers=126, num_attention_heads=128,
                          num_kv_heads=8, intermediate_size=53248, max_sequence_length=8192,
                          position_embedding="rope", norm="rmsnorm", activation="swiglu",
                          tie_embeddings=False, bias=False)


def _covered(cfg, pp, v, method="even", sizes=None):
    """Every stage's chunks, checked to hold each block once, in piece order, the embedding on
    piece 0 and the head on the last piece; returns {stage: [blocks per chunk]}."""
    pieces = {}
    for stage in range(pp):
        chunks = stage_chunks(cfg, pp, stage, v, method, sizes)
        assert [c.virtual_stage for c in chunks] == [c * pp + stage for c in range(v)]
        for c in chunks:
            pieces[c.virtual_stage] = c
    ordered = [pieces[k] for k in range(pp * v)]
    assert [i for c in ordered for i in c.layers] == list(range(cfg.num_layers))
    assert [c.first for c in ordered] == [True] + [False] * (pp * v - 1)
    assert [c.last for c in ordered] == [False] * (pp * v - 1) + [True]
    # a piece without blocks still holds the embedding or the head
    assert all(c.layers or c.first or c.last for c in ordered)
    return {s: [len(pieces[c * pp + s].layers) for c in range(v)] for s in range(pp)}


@pytest.mark.parametrize("v, ends, middle", [(1, 7, 8), (2, 3, 4), (4, 1, 2), (8, 0, 1)])
def test_balanced_partition_runs_llama3_405b_on_pp16_interleaved(v, ends, middle):
    """126 blocks + the embedding + the head = 128 units = 16 x 8: every piece one equal share, the
    end pieces one block short (v = 8: the embedding alone, the head alone, as Llama 3 ran it)."""
    sizes = piece_sizes(LLAMA3_405B, 16, v, "balanced")
    assert sizes == [ends] + [middle] * (16 * v - 2) + [ends]
    per_stage = _covered(LLAMA3_405B, 16, v, "balanced")
    assert [sum(c) for c in per_stage.values()] == [7] + [8] * 14 + [7]  # every stage 8 units
    assert equal_load(LLAMA3_405B, 16 * v, "balanced") and not equal_load(LLAMA3_405B, 16 * v, "even")
    if v == 8:
        first, last = stage_chunks(LLAMA3_405B, 16, 0, 8, "balanced")[0], \
            stage_chunks(LLAMA3_405B, 16, 15, 8, "balanced")[-1]
        assert first.layers == () and first.first and last.layers == () and last.last


def test_balanced_spreads_a_remainder_after_the_first_piece():
    cfg = ModelConfig(vocab_size=64, hidden_size=16, num_layers=9, num_attention_heads=2)
    assert piece_sizes(cfg, 2, 2, "balanced") == [1, 3, 3, 2]  # 11 units: 2 3 3 3, less the two ends
    assert piece_sizes(cfg, 1, 1, "balanced") == [9]  # one piece holds everything
    assert piece_sizes(cfg, 11, 1, "balanced") == [0] + [1] * 9 + [0]
    _covered(cfg, 2, 2, "balanced")


def test_uneven_interleaving_even_params_and_explicit():
    cfg = ModelConfig(vocab_size=64, hidden_size=16, num_layers=5, num_attention_heads=2)
    # no longer needs num_layers divisible by pp x v: the first pieces take the remainder
    assert _covered(cfg, 2, 2) == {0: [2, 1], 1: [1, 1]}
    assert sum(piece_sizes(cfg, 2, 2, "params")) == 5 and min(piece_sizes(cfg, 2, 2, "params")) >= 1
    # explicit: one count per virtual stage, in virtual-stage order (piece k on stage k % pp)
    assert _covered(cfg, 2, 2, sizes=[1, 2, 1, 1]) == {0: [1, 1], 1: [2, 1]}
    assert [c.layers for c in stage_chunks(cfg, 2, 1, 2, sizes=[1, 2, 1, 1])] == [(1, 2), (4,)]
    # empty end pieces: the embedding alone on stage 0's first chunk, the head alone on stage 1's last
    assert _covered(cfg, 2, 2, sizes=[0, 3, 2, 0]) == {0: [0, 2], 1: [3, 0]}
    assert _covered(cfg, 2, 1, sizes=[0, 5]) == {0: [0], 1: [5]}  # without interleaving too
    assert equal_load(cfg, 4, sizes=[0, 3, 2, 0]) and not equal_load(cfg, 4)


@pytest.mark.parametrize("pp, v, method, sizes, words", [
    (2, 2, "even", [1, 0, 3, 1], ["parallel.pp_layers=[1, 0, 3, 1]", "piece 1 with no blocks",
                                  "move a block into piece 1"]),
    (2, 2, "even", [0, 0, 4, 1], ["piece 1 with no blocks"]),
    (2, 2, "even", [2, 3], ["parallel.pp_layers=[2, 3]", "4 block counts", "virtual_stages=2"]),
    (2, 2, "even", [1, 1, 1, 1], ["summing to model.num_layers=5"]),
    (2, 2, "even", [2, -1, 3, 1], ["each >= 0"]),
    (4, 2, "even", None, ["parallel.pp=4 x parallel.virtual_stages=2 = 8", "model.num_layers=5",
                          "parallel.partition=balanced"]),
    (4, 2, "params", None, ["model.num_layers=5"]),
    (4, 2, "balanced", None, ["= 8 pipeline pieces exceed model.num_layers + 2 = 7"]),
    (2, 1, "zigzag", None, ["parallel.partition='zigzag'", "balanced"]),
])
def test_partition_refusals_are_one_sentence(pp, v, method, sizes, words):
    cfg = ModelConfig(vocab_size=64, hidden_size=16, num_layers=5, num_attention_heads=2)
    with pytest.raises(LayoutError) as e:
        stage_chunks(cfg, pp, 0, v, method, sizes)
    msg = str(e.value)
    assert all(w in msg for w in words), msg
    assert "\n" not in msg and msg.endswith(".") and msg.count(". ") == 0, msg
