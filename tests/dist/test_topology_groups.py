"""Process groups built from a Topology reduce over exactly the right peers (4 gloo ranks)."""

import torch

from megatron_lite.testing import run_ranks


def _groups(rank, world):
    from megatron_lite.distributed import comm
    from megatron_lite.distributed.topology import Topology
    topo = Topology(tp=2, pp=1, dp=2)
    topo.check_world(world)
    groups = topo.build(rank)
    assert groups.tp_ranks == [rank - rank % 2, rank - rank % 2 + 1]
    assert groups.dp_ranks == [rank % 2, rank % 2 + 2]
    assert groups.coord.tp == rank % 2 and groups.coord.dp == rank // 2 and groups.coord.pp == 0
    t = torch.tensor([float(rank)])
    comm.all_reduce(t, groups.tp)
    assert t.item() == sum(groups.tp_ranks)
    t = torch.tensor([float(rank)])
    comm.all_reduce(t, groups.dp)
    assert t.item() == sum(groups.dp_ranks)
    assert comm.size(groups.pp) == 1 and comm.size(groups.mp) == 2


def test_groups_reduce_over_their_peers():
    run_ranks(_groups, 4)
