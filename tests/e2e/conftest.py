"""Fixtures shared by the end-to-end tests: real local SLURM clusters (launch/local-cluster.sh,
driven by megatron_lite.testing.cluster).

``slurm_one_node`` / ``slurm_two_nodes`` bring the wanted cluster up and return a ``Cluster``. Only
one cluster can be up at a time, so these fixtures are function-scoped and cheap (an ``up`` of a
healthy cluster is a health check); the session-scoped ``local_cluster`` manager brings whatever is
up down at the end of the session. Without root or the tools the tests skip with the reason."""

import pytest

from megatron_lite.testing.cluster import Cluster, ClusterManager, skip_reason


@pytest.fixture(scope="session")
def local_cluster():
    """The session's ClusterManager; whatever is up at the end is brought down."""
    reason = skip_reason()
    if reason:
        pytest.skip(reason)
    manager = ClusterManager()
    yield manager
    manager.down()


@pytest.fixture
def slurm_one_node(local_cluster) -> Cluster:
    """A one-node cluster (the host, 127.0.0.1; >= 4 CPUs declared)."""
    return local_cluster.up(1)


@pytest.fixture
def slurm_two_nodes(local_cluster) -> Cluster:
    """A two-node cluster: nodes mlite-n1/mlite-n2 in network namespaces (addresses in .addrs,
    interface .ifname = eth0)."""
    return local_cluster.up(2)
