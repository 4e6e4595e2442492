"""Topology: rank <-> coordinates, group membership, and every layout error before any group."""

import pytest

from megatron_lite.config import Config, ConfigError, DataConfig, ModelConfig, ParallelConfig
from megatron_lite.distributed.topology import Coord, Topology
from megatron_lite.layout import Layout


def test_rank_coordinates_round_trip_and_groups():
    topo = Topology(tp=2, pp=2, dp=2)  # tp fastest, then dp, then pp (Megatron's order)
    assert topo.coord(0) == Coord(0, 0, 0) and topo.coord(1) == Coord(tp=1, pp=0, dp=0)
    assert topo.coord(2) == Coord(tp=0, pp=0, dp=1) and topo.coord(4) == Coord(tp=0, pp=1, dp=0)
    for r in range(8):
        assert topo.rank_of(topo.coord(r)) == r
    assert sorted(topo.group_ranks(("tp",))) == [[0, 1], [2, 3], [4, 5], [6, 7]]
    assert sorted(topo.group_ranks(("dp",))) == [[0, 2], [1, 3], [4, 6], [5, 7]]
    assert sorted(topo.group_ranks(("pp",))) == [[0, 4], [1, 5], [2, 6], [3, 7]]
    assert [sorted(g) for g in topo.group_ranks(("tp", "pp"))] == [[0, 1, 4, 5], [2, 3, 6, 7]]
    # Every rank is in exactly one group of each kind.
    for axes in (("tp",), ("dp",), ("pp",), ("tp", "pp")):
        assert sorted(r for g in topo.group_ranks(axes) for r in g) == list(range(8))
    other = Topology(tp=2, pp=1, dp=2, order="dp-tp-pp")
    assert other.group_ranks(("tp",)) == [[0, 2], [1, 3]]


@pytest.mark.parametrize("kwargs, cfg, seq, sp, words", [
    (dict(tp=3), dict(), 16, False, ["num_attention_heads=4", "parallel.tp=3"]),
    (dict(tp=4), dict(num_kv_heads=2), 16, False, ["num_kv_heads=2", "parallel.tp=4"]),
    (dict(tp=2), dict(intermediate_size=63), 16, False, ["intermediate_size=63"]),
    (dict(tp=2), dict(), 15, True, ["sequence length 15", "sequence_parallel"]),
])
def test_invalid_layouts_fail_in_one_sentence(kwargs, cfg, seq, sp, words):
    import torch.distributed as dist
    model = ModelConfig(vocab_size=50257, hidden_size=64, num_attention_heads=4, **cfg)
    config = Config(model=model, parallel=ParallelConfig(sequence_parallel=sp, **kwargs),
                    data=DataConfig(seq_length=seq))
    with pytest.raises(ConfigError) as e:
        Layout.build(config.validate())
    for w in words:
        assert w in str(e.value)
    assert "\n" not in str(e.value)
    assert not dist.is_initialized()  # nothing was started


def test_bad_sizes_and_world():
    with pytest.raises(ConfigError, match="parallel.tp=0"):
        Topology(tp=0)
    with pytest.raises(ConfigError, match="parallel.order='tp-pp'"):
        Topology(order="tp-pp")
    with pytest.raises(ConfigError, match="= 4 but the job has 3 processes"):
        Topology(tp=2, dp=2).check_world(3)
