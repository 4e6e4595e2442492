"""Layout: how one run is split across processes, decided once, before any process group exists.

    layout = Layout.build(cfg, world_size=8)   # every layout rule, one sentence each; no process
    layout.topology.coord(rank)                 # (tp, cp, pp, dp) of a rank
    layout.chunks(stage)                        # the pipeline pieces a stage builds
    layout.micro_batches, layout.global_batch_size, layout.act_shape, layout.backend

Config validates fields; a Layout checks what a *combination* needs: tp x cp x pp x dp against the
world size, heads / kv heads / intermediate size (and, with sequence parallelism, the sequence
length) divisible by tp, the sequence by 2 cp, the pipeline partition and schedule, which ZeRO
stage composes with what, and the global-batch arithmetic. It is pure and cheap (no
torch.distributed, no tensors), so a layout planner can enumerate thousands of them; training
builds exactly one.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from functools import cached_property

from .config import Config, ParallelConfig
from .distributed.topology import Topology
from .errors import LayoutError
from .parallel.compile import unsupported as compile_unsupported
from .pipeline.partition import Chunk, piece_sizes, stage_chunks
from .pipeline.schedules import Action
from .pipeline.schedules import build as build_schedule


@dataclass(frozen=True)
class Layout:
    config: Config
    topology: Topology
    micro_batches: int  # micro-batches per optimizer step on each data-parallel rank
    backend: str  # "local" (serial / TP / DP / native ZeRO-1), "pipeline" or "deepspeed"

    @classmethod
    def build(cls, cfg: Config, world_size: int | None = None) -> "Layout":
        """Check every layout rule for `cfg` (and the job's process count, when given). The layout's
        config is `cfg` with parallel.dp=auto resolved (for the world size: one data-parallel
        replica without it)."""
        auto = cfg.parallel.dp == "auto"
        cfg = resolve_dp(cfg, world_size)
        p, z = cfg.parallel, cfg.optim.zero
        n = cfg.model.moe.num_experts
        if p.ep > 1 and not n:
            raise LayoutError(f"parallel.ep={p.ep} splits the experts of MoE blocks, but "
                              f"model.moe.num_experts=0; set model.moe.num_experts or parallel.ep=1.")
        if p.ep > 1 and n % p.ep:
            raise LayoutError(f"parallel.ep={p.ep} must divide model.moe.num_experts={n} (each rank holds an "
                              f"equal share of every MoE layer's experts).")
        topology = Topology(p.tp, p.pp, p.dp, p.order, p.cp, p.ep)
        _check_model(cfg, p.tp)
        if p.cp > 1:
            _check_context_parallel(cfg)
        if cfg.model.moe.num_experts:
            _check_moe(cfg)
        said = f" (auto: {world_size} processes / (tp x cp x pp))" if auto and world_size else ""
        m = _micro_batches(cfg, said)
        if cfg.data.global_batch_size is not None:
            per_step = cfg.data.micro_batch_size * m * p.dp
            if cfg.data.global_batch_size != per_step:
                raise LayoutError(
                    f"data.global_batch_size={cfg.data.global_batch_size} is not data.micro_batch_size="
                    f"{cfg.data.micro_batch_size} x {m} micro-batches x parallel.dp={p.dp} = {per_step}; "
                    f"choose micro-batches that divide the global batch (or leave them unset: they then "
                    f"follow from it).")
        if cfg.train.compile and (why := compile_unsupported()):
            raise LayoutError(why)
        deepspeed = z.backend == "deepspeed" and z.stage > 0
        if deepspeed:
            _check_deepspeed(cfg)
        if p.pp > 1 or p.pp_layers:
            stage_chunks(cfg.model, p.pp, 0, p.virtual_stages, p.partition, p.pp_layers)
            # e.g. interleaving needs m % pp == 0 (evaluation's forward-only lists take any train.eval_iters)
            build_schedule(p.schedule, p.pp, m, p.virtual_stages)
        if world_size is not None:
            if auto:
                _check_auto_world(p, world_size)
            topology.check_world(world_size)
        backend = "deepspeed" if deepspeed else "pipeline" if p.pp > 1 else "local"
        return cls(cfg, topology, m, backend)

    # ---- derived facts -------------------------------------------------------------------------
    @property
    def tp(self) -> int:
        return self.topology.tp

    @property
    def pp(self) -> int:
        return self.topology.pp

    @property
    def dp(self) -> int:
        return self.topology.dp

    @property
    def cp(self) -> int:
        return self.topology.cp

    @property
    def ep(self) -> int:
        return self.topology.ep

    @property
    def world_size(self) -> int:
        return self.topology.world_size

    @property
    def seq_length(self) -> int:
        return self.config.seq_length

    @property
    def global_batch_size(self) -> int:
        """Samples per optimizer step over the whole job."""
        return self.config.data.micro_batch_size * self.micro_batches * self.dp

    @property
    def sequence_parallel(self) -> bool:
        return self.config.parallel.sequence_parallel and self.tp > 1

    @property
    def act_shape(self) -> tuple[int, int, int]:
        """Shape of the activations between pipeline stages: (micro-batch, sequence or its
        sequence-parallel shard, hidden)."""
        seq = self.seq_length // self.cp  # each cp rank's tokens
        seq = seq // self.tp if self.sequence_parallel else seq
        return (self.config.data.micro_batch_size, seq, self.config.model.hidden_size)

    def chunks(self, stage: int) -> list[Chunk]:
        """The model pieces pipeline stage `stage` holds (all blocks, embedding and head when pp = 1)."""
        p = self.config.parallel
        return stage_chunks(self.config.model, p.pp, stage, p.virtual_stages, p.partition, p.pp_layers)

    @property
    def pieces(self) -> list[int]:
        """Blocks of each of the pp x virtual_stages pipeline pieces, in virtual-stage order (0 for a
        piece holding only the embedding or only the final norm + head)."""
        p = self.config.parallel
        return piece_sizes(self.config.model, p.pp, p.virtual_stages, p.partition, p.pp_layers)

    @cached_property
    def schedule(self) -> list[list[Action]]:
        """Every stage's action list for one training step."""
        p = self.config.parallel
        return build_schedule(p.schedule, p.pp, self.micro_batches, p.virtual_stages)

    def as_dict(self) -> dict:
        """What a checkpoint records about the layout that wrote it."""
        p = self.config.parallel
        return {"tp": self.tp, "pp": self.pp, "dp": self.dp, "cp": self.cp, "ep": self.ep, "order": p.order,
                "make_vocab_divisible_by": p.make_vocab_divisible_by, "virtual_stages": p.virtual_stages,
                "zero_stage": self.config.optim.zero.stage, "zero_backend": self.config.optim.zero.backend}

    def describe(self) -> str:
        """One line for the log: tp 2 +sp pp 2 (1f1b, 4 micro-batches) dp 2 zero-1 (native)."""
        p, z = self.config.parallel, self.config.optim.zero
        out = f"tp {self.tp}{' +sp' if self.sequence_parallel else ''}"
        if self.cp > 1:
            out += f" cp {self.cp} ({p.cp_algorithm})"
        out += f" pp {self.pp}"
        if self.pp > 1:
            out += f" ({p.schedule}{f' x{p.virtual_stages}' if p.virtual_stages > 1 else ''})"
        out += f" dp {self.dp}"
        if self.ep > 1:
            out += f" (ep {self.ep})"
        if z.stage:
            out += f" zero-{z.stage} ({z.backend})"
        return out


def resolve_dp(cfg: Config, world_size: int | None) -> Config:
    """`cfg` with parallel.dp=auto replaced by the data-parallel size of a job of `world_size`
    processes (tp x cp x pp of them per replica; 1 when the world is not known, or is no multiple of
    a replica: Layout.build then refuses it after the rules of the layout itself)."""
    p = cfg.parallel
    if p.dp != "auto":
        return cfg
    replica = p.tp * p.cp * p.pp
    dp = world_size // replica if world_size and world_size % replica == 0 else 1
    return dataclasses.replace(cfg, parallel=dataclasses.replace(p, dp=dp))


def _check_auto_world(p: ParallelConfig, world_size: int) -> None:
    replica = p.tp * p.cp * p.pp
    if world_size % replica:
        raise LayoutError(f"parallel.dp=auto: the job's {world_size} processes are not a multiple of "
                          f"parallel.tp={p.tp} x cp={p.cp} x pp={p.pp} = {replica} (one data-parallel "
                          f"replica); run a multiple of {replica} processes or change tp, cp or pp.")


def _micro_batches(cfg: Config, dp_said: str = "") -> int:
    """parallel.microbatches (the pipeline's name) or train.grad_accum: the same number; with neither
    set and data.global_batch_size given, what that global batch needs at this dp."""
    p, t, d = cfg.parallel, cfg.train, cfg.data
    if p.microbatches is None and t.grad_accum == 1 and d.global_batch_size is not None:
        replica_batch = d.micro_batch_size * p.dp
        if d.global_batch_size % replica_batch:
            raise LayoutError(f"data.global_batch_size={d.global_batch_size} is not a multiple of "
                              f"data.micro_batch_size={d.micro_batch_size} x parallel.dp={p.dp}{dp_said} = "
                              f"{replica_batch}; choose a data-parallel size (process count) or micro-batch "
                              f"size whose product divides the global batch.")
        return d.global_batch_size // replica_batch
    if p.microbatches is None:
        return t.grad_accum
    if t.grad_accum not in (1, p.microbatches):
        raise LayoutError(f"parallel.microbatches={p.microbatches} and train.grad_accum={t.grad_accum} both "
                          f"set the micro-batches per step; set only one of them.")
    return p.microbatches


def _refuse_first(rules: list[tuple[object, str]]) -> None:
    """LayoutError with the sentence of the first rule broken (rules: (broken?, sentence))."""
    for broken, msg in rules:
        if broken:
            raise LayoutError(msg)


def _check_model(cfg: Config, tp: int) -> None:
    """Tensor parallelism splits heads, kv heads and the MLP width; sequence parallelism the sequence."""
    m = cfg.model
    rules = [
        (m.num_attention_heads % tp, f"model.num_attention_heads={m.num_attention_heads} is not "
         f"divisible by parallel.tp={tp}; each tensor-parallel rank must hold whole heads."),
        (m.num_kv_heads % tp, f"model.num_kv_heads={m.num_kv_heads} is not divisible by "
         f"parallel.tp={tp}; use a kv head count that is a multiple of tp (or lower tp)."),
        (m.intermediate_size % tp, f"model.intermediate_size={m.intermediate_size} is not divisible "
         f"by parallel.tp={tp}; pick a multiple of tp."),
        (cfg.parallel.sequence_parallel and (cfg.seq_length // cfg.parallel.cp) % tp,
         f"sequence length {cfg.seq_length} / parallel.cp={cfg.parallel.cp} is not divisible by "
         f"parallel.tp={tp}, which parallel.sequence_parallel=true needs; change data.seq_length."),
    ]
    _refuse_first(rules)


def _check_context_parallel(cfg: Config) -> None:
    """Context parallelism cuts every sequence into 2 cp chunks (parallel/context_parallel.py)."""
    cp, seq = cfg.parallel.cp, cfg.seq_length
    rules = [
        (seq % (2 * cp), f"sequence length {seq} is not divisible by 2 x parallel.cp={cp} (each cp rank "
         f"holds two of 2 cp equal chunks); change data.seq_length or parallel.cp."),
        (cfg.model.dropout > 0, f"model.dropout={cfg.model.dropout} with parallel.cp={cp}: the attention "
         f"over other ranks' keys has no dropout; set model.dropout=0 or parallel.cp=1."),
        (cfg.optim.zero.backend == "deepspeed" and cfg.optim.zero.stage > 0,
         f"optim.zero.backend=deepspeed does not know parallel.cp={cp} (its gradients must be reduced "
         f"over dp x cp); use optim.zero.backend=native."),
        (cfg.train.compile, f"train.compile=true with parallel.cp={cp}: the context-parallel attention "
         f"communicates inside the compiled block; set train.compile=false or parallel.cp=1."),
    ]
    _refuse_first(rules)


def _check_moe(cfg: Config) -> None:
    """Mixture-of-experts blocks (model/moe.py) train serially, data- and expert-parallel, under
    tensor parallelism (its experts replicated over tp: without sequence parallelism each tp rank
    runs the MoE block on the whole sequence, with it on its sequence shard), context-parallel, and
    pipelined, with the native backends (every ZeRO stage). Where the tokens of a sequence are split
    over ranks (cp, SP) only dropless routing: the balancing loss counts the whole sequences'
    assignments, but a capacity's first come, first served would need the whole sequence. Under
    train.compile the MoE MLP itself stays eager (parallel/compile.py). Not given to DeepSpeed."""
    p, n = cfg.parallel, cfg.model.moe.num_experts
    rules = [
        (p.cp > 1 and cfg.model.moe.capacity_factor is not None,
         f"model.moe.capacity_factor={cfg.model.moe.capacity_factor} with parallel.cp={p.cp}: first come, "
         f"first served runs over the whole sequence, which no cp rank holds; unset it (dropless)."),
        (p.tp > 1 and p.sequence_parallel and cfg.model.moe.capacity_factor is not None,
         f"model.moe.capacity_factor={cfg.model.moe.capacity_factor} with parallel.sequence_parallel=true: "
         f"first come, first served runs over the whole sequence, which each tp rank holds only a shard "
         f"of; unset it (dropless) or set parallel.sequence_parallel=false."),
        (cfg.optim.zero.backend == "deepspeed" and cfg.optim.zero.stage > 0,
         f"model.moe.num_experts={n} with optim.zero.backend=deepspeed: its engine is not given the MoE "
         f"parameters' groups; use optim.zero.backend=native."),
    ]
    _refuse_first(rules)


def _check_deepspeed(cfg: Config) -> None:
    """What DeepSpeed ZeRO composes with here (it partitions over the data-parallel group only, which
    our mpu gives it: every stage composes with tensor parallelism, ZeRO-3's partitions being of the
    tensor-parallel shards)."""
    p, z = cfg.parallel, cfg.optim.zero
    if p.dp < 2:
        raise LayoutError(f"optim.zero.backend=deepspeed shards over the data-parallel group, but "
                          f"parallel.dp={p.dp}; use parallel.dp >= 2 or optim.zero.stage=0.")
    if p.pp > 1 and z.stage > 1:
        raise LayoutError(f"DeepSpeed's ZeRO-{z.stage} reduces each gradient once per step (its own pipeline "
                          f"refuses it too) while parallel.pp={p.pp} runs a backward per micro-batch; use "
                          f"optim.zero.backend=native, whose ZeRO-2 and ZeRO-3 compose with pipelining, or "
                          f"DeepSpeed's stage 1.")
    if p.pp > 1 and cfg.train.precision == "bf16":
        raise LayoutError(f"DeepSpeed's bf16 optimizer stalls in its step under our pipeline engine "
                          f"(parallel.pp={p.pp}: measured at 1F1B and GPipe, a gloo receive never "
                          f"completes); use optim.zero.backend=native, whose bf16 composes with "
                          f"pipelining, or train.precision=fp32.")
    if p.sequence_parallel:
        raise LayoutError("optim.zero.backend=deepspeed does not support parallel.sequence_parallel=true "
                          "(DeepSpeed reduces gradients before the sequence-parallel sum); use "
                          "optim.zero.backend=native, which composes with it, or turn one off.")
