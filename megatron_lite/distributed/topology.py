"""Topology: how world ranks map onto (tp, cp, pp, dp) coordinates, and the process groups.

    topo = Topology(tp=2, pp=1, dp=2, order="tp-dp-pp")   # pure: validates, maps, builds nothing
    groups = topo.build(rank)                               # every process group, on every rank

The rules a model and a schedule impose on a layout live in megatron_lite/layout.py.

`order` lists the axes fastest-varying first (Megatron's default "tp-dp-pp"): with tp=2, dp=2,
ranks 0,1 form a tensor-parallel group, ranks 0,2 a data-parallel group. Keeping tp fastest puts a
TP group on one node, where its frequent all-reduces are cheapest. Context parallelism (cp) goes
next to tp unless `order` places it (Megatron's tp-cp-dp-pp): its per-layer K/V exchange is the
next most frequent. The cp ranks of a model replica hold the same weights and different tokens, so
gradients are reduced over dp x cp (the `dp_cp` group) while each dp rank reads its own samples.

Expert parallelism (ep) is carved out of each dp x cp group (the ranks whose gradients are reduced
together), as Megatron does: consecutive ranks of it form an expert-parallel group (its j-th rank,
dp-major, is ep rank j % ep) that splits the experts between them, and the ranks holding the same
experts form the expert-data-parallel group (dp x cp / ep ranks, stride ep) over which the experts'
gradients are reduced and their ZeRO state sharded.

A Topology is passed explicitly to whatever needs it; there are no module globals, and building the
groups returns them (with this rank's coordinates) instead of storing them on the Topology.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field

from ..errors import LayoutError
from . import comm

AXES = ("tp", "cp", "pp", "dp")


@dataclass(frozen=True)
class Coord:
    tp: int
    pp: int
    dp: int
    cp: int = 0


@dataclass
class Groups:
    """The process groups this rank belongs to (torch ProcessGroup objects) plus their ranks."""
    rank: int
    coord: Coord
    tp: object
    pp: object
    dp: object
    mp: object  # tp x pp (DeepSpeed's model-parallel group)
    cp: object = None
    dp_cp: object = None  # dp x cp: where gradients are reduced and ZeRO shards
    cp_ranks: list[int] = field(default_factory=list)
    dp_cp_ranks: list[int] = field(default_factory=list)
    ep: object = None  # expert-parallel group (None if ep == 1)
    edp: object = None  # expert-data-parallel group: the dp ranks holding the same experts
    ep_ranks: list[int] = field(default_factory=list)
    edp_ranks: list[int] = field(default_factory=list)
    embed: object = None  # first and last pipeline stage (tied-embedding grads); None if pp == 1
    embed_ranks: list[int] = field(default_factory=list)
    tp_ranks: list[int] = field(default_factory=list)
    pp_ranks: list[int] = field(default_factory=list)
    dp_ranks: list[int] = field(default_factory=list)
    mp_ranks: list[int] = field(default_factory=list)


def axis_order(order: str) -> tuple[str, ...]:
    """The axes of `order`, fastest first; cp goes right after tp when `order` does not name it."""
    axes = tuple(order.split("-"))
    if "cp" not in axes and "tp" in axes:
        i = axes.index("tp") + 1
        axes = axes[:i] + ("cp",) + axes[i:]
    if sorted(axes) != sorted(AXES):
        raise LayoutError(f"parallel.order={order!r} must name tp, pp and dp once each (and cp at most "
                          f"once), fastest first, e.g. tp-dp-pp or tp-cp-dp-pp.")
    return axes


class Topology:
    def __init__(self, tp: int = 1, pp: int = 1, dp: int = 1, order: str = "tp-dp-pp", cp: int = 1,
                 ep: int = 1):
        for name, value in (("tp", tp), ("cp", cp), ("pp", pp), ("dp", dp), ("ep", ep)):
            if not isinstance(value, int) or value < 1:
                raise LayoutError(f"parallel.{name}={value!r} must be a positive integer.")
        if (dp * cp) % ep:
            cp_said = f" x parallel.cp={cp}" if cp > 1 else ""
            raise LayoutError(f"parallel.ep={ep} must divide parallel.dp={dp}{cp_said}: the expert-parallel "
                              f"groups are carved from the data-parallel ranks; choose one of its divisors.")
        self.tp, self.cp, self.pp, self.dp, self.order = tp, cp, pp, dp, axis_order(order)
        self.ep = ep
        self.sizes = {"tp": tp, "cp": cp, "pp": pp, "dp": dp}
        self.world_size = tp * cp * pp * dp

    def __repr__(self) -> str:
        cp = f", cp={self.cp}" if self.cp > 1 else ""
        ep = f", ep={self.ep}" if self.ep > 1 else ""
        return f"Topology(tp={self.tp}{cp}, pp={self.pp}, dp={self.dp}{ep}, order={'-'.join(self.order)})"

    def ep_rank(self, coord: Coord) -> int:
        """A rank's place in its expert-parallel group: which 1/ep of the experts it holds."""
        return (coord.dp * self.cp + coord.cp) % self.ep

    def edp_rank(self, coord: Coord) -> int:
        """A rank's place among the ranks holding the same experts (0: the first replica)."""
        return (coord.dp * self.cp + coord.cp) // self.ep

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
            rank += c.get(axis, 0) * stride  # an axis not given (cp of a cp-less caller) is 0
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
            cp = f" x parallel.cp={self.cp}" if self.cp > 1 else ""
            raise LayoutError(
                f"parallel.tp={self.tp}{cp} x parallel.pp={self.pp} x parallel.dp={self.dp} = "
                f"{self.world_size} but the job has {world_size} processes; make the product equal the "
                f"world size.")

    # ---- process groups ------------------------------------------------------------------------
    def build(self, rank: int, timeout_s: float | None = None) -> Groups:
        """Create every group (all ranks must call this, in the same order); returns this rank's.
        timeout_s: their collective timeout (None: torch's default)."""
        mine: dict[str, tuple[object, list[int]]] = {}
        kinds = [("tp", ("tp",)), ("pp", ("pp",)), ("dp", ("dp",)), ("mp", ("tp", "pp"))]
        if self.cp > 1:  # else cp is a group of one and dp x cp is dp: no more groups to create
            kinds += [("cp", ("cp",)), ("dp_cp", ("dp", "cp"))]
        for name, axes in kinds:
            for ranks in self.group_ranks(axes):
                group = comm.new_group(sorted(ranks), timeout_s)
                if rank in ranks:
                    mine[name] = (group, ranks)
        ep, edp = {}, {}
        if self.ep > 1:  # carved from every dp x cp group (dp-major): consecutive ranks, then strided
            for dp_ranks in self.group_ranks(("dp", "cp")):
                n = len(dp_ranks)
                for name, subgroups in (("ep", [dp_ranks[i:i + self.ep] for i in range(0, n, self.ep)]),
                                        ("edp", [dp_ranks[j::self.ep] for j in range(self.ep)])):
                    for ranks in subgroups:
                        group = comm.new_group(sorted(ranks), timeout_s)
                        if rank in ranks:
                            (ep if name == "ep" else edp).update(group=group, ranks=ranks)
        embed, embed_ranks = None, []
        if self.pp > 1:  # first + last stage of every pipeline: they share the tied embedding
            for pp_ranks in self.group_ranks(("pp",)):
                ranks = [pp_ranks[0], pp_ranks[-1]]
                group = comm.new_group(sorted(ranks), timeout_s)
                if rank in ranks:
                    embed, embed_ranks = group, ranks
        return Groups(rank=rank, coord=self.coord(rank), tp=mine["tp"][0], pp=mine["pp"][0], dp=mine["dp"][0],
                      mp=mine["mp"][0], tp_ranks=mine["tp"][1], pp_ranks=mine["pp"][1],
                      dp_ranks=mine["dp"][1], mp_ranks=mine["mp"][1], embed=embed, embed_ranks=embed_ranks,
                      cp=mine.get("cp", (None,))[0], cp_ranks=mine.get("cp", (None, [rank]))[1],
                      dp_cp=mine.get("dp_cp", mine["dp"])[0], dp_cp_ranks=mine.get("dp_cp", mine["dp"])[1],
                      ep=ep.get("group"), ep_ranks=ep.get("ranks", [rank]), edp=edp.get("group"),
                      edp_ranks=edp.get("ranks", [rank]))
