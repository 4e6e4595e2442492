"""Expert parallelism: every MoE layer's experts split over an expert-parallel group (ep ranks carved
from the data-parallel ones, distributed/topology.py), tokens sent to their expert's rank and back
by all-to-all. A layer in parallel/, like tensor parallelism: the model holds no parallel code.

    apply_expert_parallel(model, group)   # in place: each MoE layer keeps its 1/ep of the experts

The serial MoE block (model/moe.py) routes, drops and groups its token-expert assignments by expert,
hands the grouped rows to `experts(rows, counts)`, and weighs and scatters what comes back. Only that
call changes here (ExpertParallelExperts), so routing, dropping, the balancing losses and the
metrics stay the serial code's, computed on the rank that owns the tokens:

  1. the grouped rows are already contiguous per destination: rank r holds experts
     [r E/ep, (r+1) E/ep), so its rows are the counts of those experts, in order
  2. the counts per (destination rank, its local expert) are exchanged (an all-to-all of E integers
     per rank), so each rank knows how many rows each source sends for each of its experts
  3. the rows travel (all-to-all, variable splits) and arrive source-major; they are regrouped
     expert-major, run through the local experts (grouped_mlp), put back source-major and sent back
     by the reverse all-to-all
  4. backward takes the same two all-to-alls in reverse (AllToAll)

An expert's gradient then holds the contributions of every rank of the group that sent it tokens.
The distributed optimizer (optim/distributed.py) sums it over the expert-data-parallel group (the
ranks holding the same experts) and divides by dp like every gradient, which gives the serial
model's gradient for the global batch. Every rank runs both all-to-alls of every MoE layer in every
forward and backward, even with no rows to send or receive (empty expert GEMMs keep the graph
connected), so the collectives always match.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from ..distributed import comm
from ..model.moe import Experts, MoE, grouped_mlp
from .layers import mark


class AllToAll(torch.autograd.Function):
    """Rows of x to every rank of the group (in_splits[j] to rank j), returning the rows received
    (out_splits[j] from rank j); the gradient travels back the same way."""

    @staticmethod
    def forward(ctx, x, out_splits: list[int], in_splits: list[int], group):
        ctx.splits, ctx.group = (out_splits, in_splits), group
        return comm.all_to_all(x, out_splits, in_splits, group)

    @staticmethod
    def backward(ctx, grad):
        out_splits, in_splits = ctx.splits
        return comm.all_to_all(grad, in_splits, out_splits, ctx.group), None, None, None


class ExpertParallelExperts(nn.Module):
    """This rank's E/ep experts of one MoE layer, called as Experts is: (rows grouped by global
    expert (M, C), counts per global expert) -> (M, C), each row through its expert wherever it is."""

    def __init__(self, experts: Experts, group):
        super().__init__()
        self.group, self.ep, rank = group, comm.size(group), comm.rank(group)
        num_experts = experts.fc1.shape[0]
        self.local = num_experts // self.ep
        lo = rank * self.local
        self.swiglu, self.gelu_approximate = experts.swiglu, experts.gelu_approximate
        self.grouped = experts.grouped
        # (E/ep, 2I | I, C) and (E/ep, C, I): experts [lo, lo + E/ep) of the serial stack, kept under
        # the serial names; tagged so the optimizer reduces them over the expert-data-parallel group
        # (the serial parameters' marks kept: sequence-parallel MoE's sequence_parallel)
        self.fc1 = mark(nn.Parameter(experts.fc1.detach()[lo:lo + self.local].clone()),
                        **{**vars(experts.fc1), "expert_parallel": True})
        self.fc2 = mark(nn.Parameter(experts.fc2.detach()[lo:lo + self.local].clone()),
                        **{**vars(experts.fc2), "expert_parallel": True})

    def forward(self, x: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        ep, n = self.ep, self.local
        send = counts.to(torch.long)  # (E,) rows per global expert
        # (ep, E/ep): received[s, e] = rows source s sends for local expert e
        exchanged = comm.all_to_all(send, [n] * ep, [n] * ep, self.group).view(ep, n)
        received = exchanged.tolist()  # the splits on the host: the one sync expert parallelism needs
        send_splits = send.view(ep, n).sum(1).tolist()  # rows to each rank
        recv_splits = [sum(row) for row in received]  # rows from each rank
        rows = AllToAll.apply(x, recv_splits, send_splits, self.group)  # (R, C) source-major
        parts = rows.split([c for row in received for c in row])  # [s * n + e]
        grouped = torch.cat([parts[s * n + e] for e in range(n) for s in range(ep)])  # (R, C) expert-major
        per_expert = exchanged.sum(0)  # (E/ep,) rows for each local expert
        y = grouped_mlp(grouped, self.fc1, self.fc2, per_expert, self.swiglu, self.gelu_approximate,
                        self.grouped)  # (R, C)
        outs = y.split([received[s][e] for e in range(n) for s in range(ep)])  # [e * ep + s]
        back = torch.cat([outs[e * ep + s] for s in range(ep) for e in range(n)])  # (R, C) source-major
        return AllToAll.apply(back, send_splits, recv_splits, self.group)  # (M, C) in x's order


@torch.no_grad()
def apply_expert_parallel(model: nn.Module, group) -> int:
    """Every MoE layer of `model` keeps only its expert-parallel rank's experts (sliced from the
    serial stack it holds); returns how many layers changed."""
    layers = [m for m in model.modules() if isinstance(m, MoE)]
    for m in layers:
        m.experts = ExpertParallelExperts(m.experts, group)
    return len(layers)
