"""Topology: how world ranks map onto (tp, pp, dp) coordinates, and the process groups.

    topo = Topology(tp=2, pp=1, dp=2, order="tp-dp-pp")   # pure: validates, maps, builds nothing
    groups = topo.build(rank)                               # every process group, on every rank

The rules a model and a schedule impose on a layout live in megatron_lite/layout.py.

`order` lists the axes fastest-varying first (Megatron's default "tp-dp-pp"): with tp=2, dp=2,
ranks 0,1 form a tensor-parallel group, ranks 0,2 a data-parallel group. Keeping tp fastest puts a
TP group on one node, where its frequent all-reduces are cheapest.

A Topology is passed explicitly to whatever needs it; there are no module globals, and building the
groups returns them (with this rank's coordinates) instead of storing them on the Topology.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field

from ..errors import LayoutError
from . import comm

AXES = ("tp", "pp", "dp")


@dataclass(frozen=True)
class Coord:
    tp: int
    pp: int
    dp: int


@dataclass
class Groups:
    """The process groups this rank belongs to (torch ProcessGroup objects) plus their ranks."""
    rank: int
    coord: Coord
    tp: object
    pp: object
    dp: object
    mp: object  # model-parallel: tp x pp (what one model replica spans)
    embed: object = None  # first and last pipeline stage (tied-embedding grads); None if pp == 1
    embed_ranks: list[int] = field(default_factory=list)
    tp_ranks: list[int] = field(default_factory=list)
    pp_ranks: list[int] = field(default_factory=list)
    dp_ranks: list[int] = field(default_factory=list)
    mp_ranks: list[int] = field(default_factory=list)


class Topology:
    def __init__(self, tp: int = 1, pp: int = 1, dp: int = 1, order: str = "tp-dp-pp"):
        for name, value in (("tp", tp), ("pp", pp), ("dp", dp)):
            if not isinstance(value, int) or value < 1:
                raise LayoutError(f"parallel.{name}={value!r} must be a positive integer.")
        axes = tuple(order.split("-"))
        if sorted(axes) != sorted(AXES):
            raise LayoutError(f"parallel.order={order!r} must name tp, pp and dp once each, fastest "
                              f"first, e.g. tp-dp-pp.")
        self.tp, self.pp, self.dp, self.order = tp, pp, dp, axes
        self.sizes = {"tp": tp, "pp": pp, "dp": dp}
        self.world_size = tp * pp * dp

    def __repr__(self) -> str:
        return f"Topology(tp={self.tp}, pp={self.pp}, dp={self.dp}, order={'-'.join(self.order)})"

    # ---- pure rank arithmetic ---------------------------------------------------------------
    def coord(self, rank: int) -> Coord:
        if not 0 <= rank < self.world_size:
            raise ValueError(f"rank {rank} outside world of {self.world_size}")
        c = {}
        for axis in self.order:  # mixed-radix digits, fastest axis first
            rank, c[axis] = divmod(rank, self.sizes[axis])
        return Coord(**c)

    def rank_of(self, coord: Coord | None = None, **kw: int) -> int:
        c = vars(coord) if coord is not None else kw
        rank, stride = 0, 1
        for axis in self.order:
            rank += c[axis] * stride
            stride *= self.sizes[axis]
        return rank

    def group_ranks(self, axes: tuple[str, ...]) -> list[list[int]]:
        """All groups varying along `axes` (others fixed), each listed in coordinate order (so a pp
        group's i-th rank is pipeline stage i)."""
        fixed = [a for a in AXES if a not in axes]
        out = []
        for fixed_vals in itertools.product(*(range(self.sizes[a]) for a in fixed)):
            base = dict(zip(fixed, fixed_vals, strict=True))
            ranks = [self.rank_of(**base, **dict(zip(axes, vals, strict=True)))
                     for vals in itertools.product(*(range(self.sizes[a]) for a in axes))]
            out.append(ranks)
        return out

    # ---- layout rules (before any process group exists) --------------------------------------
    def check_world(self, world_size: int) -> None:
        if world_size != self.world_size:
            raise LayoutError(
                f"parallel.tp={self.tp} x parallel.pp={self.pp} x parallel.dp={self.dp} = {self.world_size} "
                f"but the job has {world_size} processes; make the product equal the world size.")

    # ---- process groups ------------------------------------------------------------------------
    def build(self, rank: int, timeout_s: float | None = None) -> Groups:
        """Create every group (all ranks must call this, in the same order); returns this rank's.
        timeout_s: their collective timeout (None: torch's default)."""
        mine: dict[str, tuple[object, list[int]]] = {}
        for name, axes in (("tp", ("tp",)), ("pp", ("pp",)), ("dp", ("dp",)), ("mp", ("tp", "pp"))):
            for ranks in self.group_ranks(axes):
                group = comm.new_group(sorted(ranks), timeout_s)
                if rank in ranks:
                    mine[name] = (group, ranks)
        embed, embed_ranks = None, []
        if self.pp > 1:  # first + last stage of every pipeline: they share the tied embedding
            for pp_ranks in self.group_ranks(("pp",)):
                ranks = [pp_ranks[0], pp_ranks[-1]]
                group = comm.new_group(sorted(ranks), timeout_s)
                if rank in ranks:
                    embed, embed_ranks = group, ranks
        return Groups(rank=rank, coord=self.coord(rank), tp=mine["tp"][0], pp=mine["pp"][0], dp=mine["dp"][0],
                      mp=mine["mp"][0], tp_ranks=mine["tp"][1], pp_ranks=mine["pp"][1],
                      dp_ranks=mine["dp"][1], mp_ranks=mine["mp"][1], embed=embed, embed_ranks=embed_ranks)
