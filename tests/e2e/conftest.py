"""Fixtures shared by the end-to-end tests."""

# Local SLURM clusters (launch/local-cluster.sh): local_cluster, slurm_one_node, slurm_two_nodes.
from tests.e2e.cluster import local_cluster, slurm_one_node, slurm_two_nodes  # noqa: F401
