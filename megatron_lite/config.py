"""One typed configuration tree, loaded from YAML with dotted command-line overrides.

    cfg = Config.from_yaml("configs/tiny.yaml", overrides=["train.steps=20", "model.dropout=0.1"])

Every error a user can make here (unknown key, wrong type, impossible value) raises ConfigError
with one sentence that names the key and the fix. validate() checks each field and the relations
between fields; the rules of a parallel layout (what tp x pp x dp, a schedule or ZeRO need) live in
megatron_lite/layout.py, which is built from a validated Config.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Literal, Optional

import yaml

from .errors import ConfigError

__all__ = ["Config", "ConfigError", "ModelConfig", "MoEConfig", "ParallelConfig", "OptimConfig", "ZeroConfig",
           "DataConfig", "BlendSource", "TrainConfig", "CheckpointConfig", "LogConfig", "LaunchConfig",
           "apply_override"]

# AdamW's update runs in float32 (also its scalar factors): beyond this it overflows inside torch.
FLOAT32_MAX = 3.4028234663852886e38


@dataclass(unsafe_hash=True)  # hashable like the rest of ModelConfig's fields (plan caches by them)
class MoEConfig:
    """model.moe: a mixture of experts in place of the MLP of some blocks (model/moe.py)."""
    num_experts: int = 0  # 0: every block keeps its dense MLP
    top_k: int = 2  # experts per token
    intermediate_size: Optional[int] = None  # each expert's width; None -> model.intermediate_size
    num_shared_experts: int = 0  # always-on experts (DeepSeek, Qwen2-MoE), run as one MLP
    shared_intermediate_size: Optional[int] = None  # their summed width; None -> shared x expert width
    shared_expert_gate: bool = False  # Qwen2-MoE: the shared output scaled by sigmoid(x w_g) per token
    layer_freq: int = 1  # block i is MoE when i % layer_freq == 0 (1: every block)
    router: Literal["softmax", "sigmoid"] = "softmax"  # softmax: Mixtral, Qwen; sigmoid: DeepSeek-V3
    norm_topk_prob: bool = True  # renormalise the chosen experts' weights to sum to 1 (sigmoid: always)
    aux_loss_coeff: float = 0.0  # Switch / GShard load-balancing loss weight (0: off)
    z_loss_coeff: float = 0.0  # router z-loss weight (0: off)
    # DeepSeek-V3's auxiliary-loss-free balancing: per-expert bias step after each optimizer step (0: off)
    bias_update_rate: float = 0.0
    capacity_factor: Optional[float] = None  # None: dropless; else each expert's capacity per micro-batch
    # the experts' GEMMs as torch._grouped_mm (one kernel for all experts, no host sync) where torch
    # has it and the widths are 16-byte multiples; false: a loop over the experts (the reference)
    grouped_gemm: bool = True

    def validate(self) -> None:
        if self.num_experts < 0:
            raise ConfigError(f"model.moe.num_experts={self.num_experts} must be 0 (dense) or more.")
        if not self.num_experts:
            return
        if not 1 <= self.top_k <= self.num_experts:
            raise ConfigError(f"model.moe.top_k={self.top_k} must be between 1 and model.moe.num_experts="
                              f"{self.num_experts}.")
        for key in ("intermediate_size", "shared_intermediate_size", "layer_freq"):
            if getattr(self, key) is not None and getattr(self, key) < 1:
                raise ConfigError(f"model.moe.{key}={getattr(self, key)} must be a positive integer.")
        for key in ("aux_loss_coeff", "z_loss_coeff", "bias_update_rate"):
            if getattr(self, key) < 0:
                raise ConfigError(f"model.moe.{key}={getattr(self, key)} must be >= 0 (0 turns it off).")
        if self.capacity_factor is not None and self.capacity_factor <= 0:
            raise ConfigError(f"model.moe.capacity_factor={self.capacity_factor} must be positive, or null "
                              f"for dropless routing.")
        if self.num_shared_experts < 0:
            raise ConfigError(f"model.moe.num_shared_experts={self.num_shared_experts} must be >= 0.")
        if self.shared_expert_gate and not self.num_shared_experts:
            raise ConfigError("model.moe.shared_expert_gate=true gates the shared experts, but "
                              "model.moe.num_shared_experts=0; set it or drop the gate.")

    def is_moe(self, layer: int) -> bool:
        return self.num_experts > 0 and layer % self.layer_freq == 0


@dataclass
class ModelConfig:
    vocab_size: int = 50257
    hidden_size: int = 768
    num_layers: int = 12
    num_attention_heads: int = 12
    num_kv_heads: Optional[int] = None  # None -> num_attention_heads (plain multi-head attention)
    intermediate_size: Optional[int] = None  # None -> 4 * hidden_size
    dropout: float = 0.0
    max_sequence_length: int = 1024
    position_embedding: Literal["learned", "rope"] = "learned"
    rope_theta: float = 10000.0
    norm: Literal["layernorm", "rmsnorm"] = "layernorm"
    norm_eps: float = 1e-5
    # the norms keep their output (which the next GEMM keeps anyway) and 1/std per row for backward,
    # instead of their input: Megatron/Apex's "memory-efficient" norm (model/gpt.py)
    norm_saves_output: bool = False
    activation: Literal["gelu", "gelu_exact", "swiglu"] = "gelu"  # gelu: tanh form (GPT-2); gelu_exact: erf
    tie_embeddings: bool = True
    bias: bool = True
    init_std: float = 0.02
    moe: MoEConfig = field(default_factory=MoEConfig)

    def __post_init__(self) -> None:
        if self.num_kv_heads is None:
            self.num_kv_heads = self.num_attention_heads
        if self.intermediate_size is None:
            self.intermediate_size = 4 * self.hidden_size
        if not isinstance(self.moe, MoEConfig):  # ModelConfig(**asdict(cfg)), or moe=None: dense
            self.moe = MoEConfig(**(self.moe or {}))
        m = self.moe
        if m.num_experts and m.intermediate_size is None:  # a copy: a MoEConfig may be shared
            m = self.moe = dataclasses.replace(m, intermediate_size=self.intermediate_size)
        if m.num_experts and m.num_shared_experts and m.shared_intermediate_size is None:
            width = m.num_shared_experts * m.intermediate_size
            self.moe = dataclasses.replace(m, shared_intermediate_size=width)

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    def validate(self) -> None:
        for key in ("vocab_size", "hidden_size", "num_layers", "num_attention_heads",
                    "num_kv_heads", "intermediate_size", "max_sequence_length"):
            if getattr(self, key) < 1:
                raise ConfigError(f"model.{key}={getattr(self, key)} must be a positive integer.")
        if self.hidden_size % self.num_attention_heads:
            raise ConfigError(
                f"model.hidden_size={self.hidden_size} is not divisible by "
                f"model.num_attention_heads={self.num_attention_heads}; pick a head count that "
                f"divides the hidden size.")
        if self.num_attention_heads % self.num_kv_heads:
            raise ConfigError(
                f"model.num_kv_heads={self.num_kv_heads} must divide "
                f"model.num_attention_heads={self.num_attention_heads} (each kv head serves a "
                f"whole group of query heads).")
        if self.position_embedding == "rope" and self.head_dim % 2:
            raise ConfigError(
                f"model.position_embedding=rope needs an even head dim, but hidden_size/heads = "
                f"{self.head_dim}; change model.hidden_size or model.num_attention_heads.")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"model.dropout={self.dropout} must be in [0, 1).")
        if self.init_std <= 0:
            raise ConfigError(f"model.init_std={self.init_std} must be positive.")
        if not isinstance(self.norm_saves_output, bool):
            raise ConfigError(f"model.norm_saves_output={self.norm_saves_output!r} must be true or false.")
        self.moe.validate()


@dataclass
class ParallelConfig:
    tp: int = 1  # tensor-parallel size (Megatron column/row layers)
    pp: int = 1  # pipeline-parallel size
    # data-parallel size, or auto: the job's processes / (tp x cp x pp), so a job restarted on more or
    # fewer nodes keeps its layout's other axes (and, with data.global_batch_size, its batches)
    dp: int | Literal["auto"] = "auto"
    # context-parallel size: every layer's sequence split over cp ranks (parallel/context_parallel.py)
    cp: int = 1
    # how attention sees the other cp ranks' keys: allgather (all K/V gathered) or ring (K/V blocks
    # passed around the ring behind the computation)
    cp_algorithm: Literal["allgather", "ring"] = "allgather"
    # expert-parallel size: each MoE layer's experts split over groups of ep data-parallel ranks,
    # tokens sent to their experts' rank by all-to-all (parallel/expert_parallel.py); divides dp
    ep: int = 1
    sequence_parallel: bool = False  # norms/dropout on sequence shards inside each tp group
    make_vocab_divisible_by: int = 128  # the vocabulary is padded to a multiple of this x tp
    order: str = "tp-dp-pp"  # rank layout, fastest-varying axis first
    schedule: Literal["gpipe", "1f1b", "interleaved"] = "1f1b"  # pipeline schedule (pp > 1)
    virtual_stages: int = 1  # model chunks per pipeline stage (interleaved schedule)
    # micro-batches per step and dp rank; another name for train.grad_accum (set one: Layout checks)
    microbatches: Optional[int] = None
    # how blocks are split into the pp x virtual_stages pipeline pieces (pipeline/partition.py);
    # balanced counts the embedding and the LM head as one block each
    partition: Literal["even", "params", "balanced"] = "even"
    # explicit blocks per pipeline piece, pp x virtual_stages of them in virtual-stage order (overrides
    # partition); 0 only for the first piece (embedding alone) or the last (final norm + head alone)
    pp_layers: Optional[list[int]] = None
    # Native backends: each gradient bucket's data-parallel reduction starts as soon as its last
    # gradient of the step is final, while the backward goes on (false: all after the backward)
    overlap_grad_reduce: bool = True
    # Native ZeRO-1/2: the updated weights' all-gather runs behind the next forward, each bucket
    # waited for just before its first use; ZeRO-3: the next block's gather is started one ahead
    overlap_param_gather: bool = True

    def validate(self) -> None:
        for key in ("tp", "pp", "dp", "cp", "ep"):
            if key == "dp" and self.dp == "auto":
                continue
            if not isinstance(getattr(self, key), int) or getattr(self, key) < 1:
                raise ConfigError(f"parallel.{key}={getattr(self, key)!r} must be a positive integer.")
        for key in ("overlap_grad_reduce", "overlap_param_gather"):
            if not isinstance(getattr(self, key), bool):
                raise ConfigError(f"parallel.{key}={getattr(self, key)!r} must be true or false.")
        if sorted(a for a in self.order.split("-") if a != "cp") != ["dp", "pp", "tp"] \
                or self.order.split("-").count("cp") > 1:
            raise ConfigError(f"parallel.order={self.order!r} must name tp, pp and dp once each (and cp at "
                              f"most once, else it follows tp), fastest first, e.g. tp-dp-pp.")
        if self.virtual_stages < 1:
            raise ConfigError(f"parallel.virtual_stages={self.virtual_stages} must be >= 1.")
        if self.schedule == "interleaved" and self.virtual_stages < 2:
            raise ConfigError("parallel.schedule=interleaved needs parallel.virtual_stages >= 2 "
                              "(model chunks per stage); with 1 chunk use parallel.schedule=1f1b.")
        if self.virtual_stages > 1 and self.schedule != "interleaved":
            raise ConfigError(f"parallel.virtual_stages={self.virtual_stages} needs "
                              f"parallel.schedule=interleaved.")
        if self.microbatches is not None and self.microbatches < 1:
            raise ConfigError(f"parallel.microbatches={self.microbatches} must be >= 1.")
        if self.make_vocab_divisible_by < 1:
            raise ConfigError(f"parallel.make_vocab_divisible_by={self.make_vocab_divisible_by} "
                              f"must be >= 1.")
        if self.pp_layers is not None and (not self.pp_layers or min(self.pp_layers) < 0):
            raise ConfigError(f"parallel.pp_layers={self.pp_layers} must list a block count >= 0 for each "
                              f"pipeline piece (or be null to use parallel.partition).")


@dataclass
class ZeroConfig:
    stage: int = 0  # 0: none; 1: optimizer state sharded over dp; 2: + gradients; 3: + parameters
    # native: our distributed optimizer (optim/distributed.py, stages 0-3); deepspeed: DeepSpeed ZeRO 1-3
    backend: Literal["native", "deepspeed"] = "native"
    bucket_elements: int = 40_000_000  # native: parameters reduced / gathered together (Megatron's default)

    def validate(self) -> None:
        if self.stage not in (0, 1, 2, 3):
            raise ConfigError(f"optim.zero.stage={self.stage} must be 0, 1, 2 or 3.")
        if self.bucket_elements < 1:
            raise ConfigError(f"optim.zero.bucket_elements={self.bucket_elements} must be >= 1 "
                              f"(parameters per gradient bucket; Megatron uses 40000000).")


@dataclass
class OptimConfig:
    lr: float = 3e-4
    min_lr: float = 3e-5
    warmup_steps: int = 100
    decay_steps: Optional[int] = None  # None -> train.steps (cosine reaches min_lr at the end)
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    grad_clip: float = 1.0  # global grad-norm clip; 0 disables clipping
    zero: ZeroConfig = field(default_factory=ZeroConfig)

    def validate(self) -> None:
        if self.lr <= 0:
            raise ConfigError(f"optim.lr={self.lr} must be positive.")
        for key in ("beta1", "beta2"):
            if not 0 <= getattr(self, key) < 1:
                raise ConfigError(f"optim.{key}={getattr(self, key)} must be in [0, 1).")
        # Adam's first update scales by lr / (1 - beta1) and decays by lr * weight_decay, as float32.
        largest = max(self.lr / (1 - self.beta1), self.lr * self.weight_decay)
        if largest >= FLOAT32_MAX:
            raise ConfigError(f"optim.lr={self.lr} overflows float32 in AdamW's first update "
                              f"({largest:.3g} > {FLOAT32_MAX:.3g}); use a learning rate below 1 "
                              f"(typically 1e-4 to 1e-3).")
        if not 0 <= self.min_lr <= self.lr:
            raise ConfigError(f"optim.min_lr={self.min_lr} must be between 0 and optim.lr={self.lr}.")
        if self.warmup_steps < 0:
            raise ConfigError(f"optim.warmup_steps={self.warmup_steps} must be >= 0.")
        if self.decay_steps is not None and self.decay_steps < 1:
            raise ConfigError(f"optim.decay_steps={self.decay_steps} must be >= 1 (or null for train.steps).")
        if self.weight_decay < 0 or self.grad_clip < 0 or self.eps <= 0:
            raise ConfigError("optim.weight_decay and optim.grad_clip must be >= 0 and optim.eps > 0.")
        self.zero.validate()


@dataclass
class BlendSource:
    """One corpus of data.blend: a prepared directory and its share of the training samples."""
    dir: str = ""
    weight: Optional[float] = None  # relative: the weights are normalised by their sum
    name: Optional[str] = None  # in metrics (val/NAME/loss); None -> the directory's own name

    @staticmethod
    def from_raw(value: Any, key: str) -> dict:
        """The mapping form of one source; Megatron's short form [weight, dir] is read as one."""
        if isinstance(value, list) and len(value) == 2:
            return {"weight": value[0], "dir": value[1]}
        if isinstance(value, dict):
            return value
        raise ConfigError(f"{key}={value!r} must be {{dir: DIR, weight: W}} (name optional) or [W, DIR].")

    @property
    def label(self) -> str:
        return self.name if self.name is not None else Path(self.dir).name


@dataclass
class DataConfig:
    dir: str = "data/stdlib"  # a directory written by `megatron-lite prepare-data` (without data.blend)
    # Several prepared directories (one tokenizer), each sample drawn from one of them by weight:
    # [{dir: data/web, weight: 0.6}, {dir: data/code, weight: 0.4, name: code}] or [[0.6, data/web], ...].
    # When set, data.dir is not read.
    blend: Optional[list[BlendSource]] = None
    seq_length: Optional[int] = None  # None -> model.max_sequence_length
    micro_batch_size: int = 8
    # Samples per optimizer step over the job. Set with train.grad_accum / parallel.microbatches left
    # unset, it is the invariant: micro-batches per step = global / (micro_batch_size x dp), so the
    # optimizer sees the same batches at any dp (an elastic job's). With them set, a check.
    global_batch_size: Optional[int] = None
    seed: int = 1234  # shuffling seed of the sampler (independent of the init seed)
    # Packed documents: attention stays inside each document of a training sequence (the starts come
    # from prepare-data's index); positions restart at each document; the targets that follow a
    # separator (the next document's first token) are not trained on (Megatron's eod_mask_loss).
    document_mask: bool = False
    reset_position_ids: bool = False
    mask_separator_loss: bool = False

    @property
    def sources(self) -> list[BlendSource]:
        """The training corpora: data.blend, or data.dir alone with all the weight."""
        return self.blend if self.blend is not None else [BlendSource(dir=self.dir, weight=1.0)]

    @property
    def tokenizer_dir(self) -> str:
        """A directory holding the tokenizer of every source (validation checks they share one)."""
        return self.sources[0].dir

    def validate(self) -> None:
        if self.micro_batch_size < 1:
            raise ConfigError(f"data.micro_batch_size={self.micro_batch_size} must be >= 1.")
        if self.seq_length is not None and self.seq_length < 1:
            raise ConfigError(f"data.seq_length={self.seq_length} must be >= 1.")
        for key in ("document_mask", "reset_position_ids", "mask_separator_loss"):
            if not isinstance(getattr(self, key), bool):
                raise ConfigError(f"data.{key}={getattr(self, key)!r} must be true or false.")
        if self.reset_position_ids and not self.document_mask:
            raise ConfigError("data.reset_position_ids=true restarts positions at each document, which "
                              "needs data.document_mask=true (else a token would see earlier documents "
                              "at repeated positions); set both or neither.")
        if self.blend is not None:
            self._validate_blend()

    def _validate_blend(self) -> None:
        example = "as in data.blend=[[0.6, data/web], [0.4, data/code]]"
        if not self.blend:
            raise ConfigError(f"data.blend=[] lists no source; list prepared directories with weights "
                              f"({example}) or remove data.blend to train on data.dir.")
        seen: dict[str, int] = {}
        for i, s in enumerate(self.blend):
            if not s.dir:
                raise ConfigError(f"data.blend[{i}] names no dir; give each source the prepared directory "
                                  f"it reads ({example}).")
            if s.weight is None:
                raise ConfigError(f"data.blend[{i}] ({s.dir}) has no weight; give each source its relative "
                                  f"share of the samples ({example}).")
            if s.weight < 0:
                raise ConfigError(f"data.blend[{i}].weight={s.weight} ({s.dir}) is negative; weights are "
                                  f"shares of the samples: use 0 or more.")
            if not s.label or "/" in s.label:
                raise ConfigError(f"data.blend[{i}].name={s.label!r} ({s.dir}) must be a non-empty name "
                                  f"without '/' (it names the source's metrics).")
            if s.label in seen:
                raise ConfigError(f"data.blend[{seen[s.label]}] and data.blend[{i}] are both named "
                                  f"{s.label!r}; give each source a distinct name, such as "
                                  f"{{dir: {s.dir}, weight: {s.weight:g}, name: {s.label}_{i}}}.")
            seen[s.label] = i
        total = sum(s.weight for s in self.blend)
        if not total > 0:
            weights = ", ".join(f"{s.weight:g}" for s in self.blend)
            raise ConfigError(f"data.blend weights ({weights}) sum to {total:g}, not to a positive number; "
                              f"give at least one source a weight above 0.")


@dataclass
class TrainConfig:
    out_dir: str = "runs/default"  # logs and checkpoints go here; a run found here is resumed
    steps: int = 1000
    grad_accum: int = 1  # micro-batches per optimizer step
    seed: int = 1234  # init seed and dropout RNG seed
    device: Literal["auto", "cpu", "cuda"] = "auto"
    # bf16: weights, activations and messages in bf16; fp32 main grads, masters and AdamW moments
    precision: Literal["fp32", "bf16"] = "fp32"
    eval_interval: int = 100
    eval_iters: int = 10
    max_skipped_steps: int = 5  # consecutive non-finite steps tolerated before the run stops
    recompute: Literal["none", "full", "selective"] = "none"  # activation checkpointing per block
    exit_interval: Optional[int] = None  # stop (with a checkpoint) after this many steps; rerun resumes
    peak_tflops: Optional[float] = None  # for MFU; None -> a per-device estimate
    sample_tokens: int = 120  # tokens generated from the final model (0 disables)
    progress: bool = True  # tqdm progress bar
    # torch.compile each transformer block (regional compilation, as torchtitan does): inductor
    # on CPU and GPU; the block's hooks (ZeRO-3 gathers) stay outside the compiled code
    compile: bool = False

    def validate(self) -> None:
        if not isinstance(self.compile, bool):
            raise ConfigError(f"train.compile={self.compile!r} must be true or false.")
        for key in ("steps", "grad_accum", "eval_interval", "eval_iters"):
            if getattr(self, key) < 1:
                raise ConfigError(f"train.{key}={getattr(self, key)} must be >= 1.")
        if self.exit_interval is not None and self.exit_interval < 1:
            raise ConfigError(f"train.exit_interval={self.exit_interval} must be >= 1 or null.")
        if self.max_skipped_steps < 0:
            raise ConfigError(f"train.max_skipped_steps={self.max_skipped_steps} must be >= 0.")
        if self.peak_tflops is not None and self.peak_tflops <= 0:
            raise ConfigError(f"train.peak_tflops={self.peak_tflops} must be positive or null.")


@dataclass
class CheckpointConfig:
    interval: int = 500  # steps between checkpoints (a final one is always written)
    keep: int = 2  # newest checkpoints kept on disk
    async_save: bool = False  # write in a background thread; commit at the next step boundary

    def validate(self) -> None:
        if self.interval < 1:
            raise ConfigError(f"checkpoint.interval={self.interval} must be >= 1.")
        if self.keep < 1:
            raise ConfigError(f"checkpoint.keep={self.keep} must be >= 1 (the latest is never deleted).")


STOP_SIGNALS = ("SIGTERM", "SIGUSR1", "SIGUSR2", "SIGINT", "SIGHUP", "SIGQUIT")


@dataclass
class LaunchConfig:
    """How a run meets its launcher: preemption signals, failures of other ranks, requeueing."""
    # A signal on any rank stops every rank at the same step boundary with a checkpoint
    # (SLURM preemption and `--signal=USR1@T` time limits, torchrun's SIGTERM, Ctrl-C).
    stop_signals: list[str] = field(default_factory=lambda: ["SIGTERM", "SIGUSR1", "SIGINT"])
    # Exit status after such a stop ("stopped early, resume me"); torchrun workers exit 0 instead,
    # since the agent counts any other status as a failure and would restart them.
    requeue_exit_code: int = 75  # EX_TEMPFAIL
    # A collective waiting longer than this fails on every rank (a peer died or stalled). It must
    # cover the slowest legitimate wait: startup (DeepSpeed's first op compile), a checkpoint save.
    collective_timeout_s: float = 600.0

    def validate(self) -> None:
        for name in self.stop_signals:
            if name not in STOP_SIGNALS:
                raise ConfigError(f"launch.stop_signals entry {name!r} is not a signal a run can stop on; "
                                  f"choose from {', '.join(STOP_SIGNALS)}.")
        if not 1 <= self.requeue_exit_code <= 125:
            raise ConfigError(f"launch.requeue_exit_code={self.requeue_exit_code} must be in 1..125 "
                              f"(0 means success, above 125 the shell's own statuses).")
        if self.collective_timeout_s <= 0:
            raise ConfigError(f"launch.collective_timeout_s={self.collective_timeout_s} must be positive.")


@dataclass
class LogConfig:
    interval: int = 10  # steps between log lines and TensorBoard scalars
    tensorboard: bool = True

    def validate(self) -> None:
        if self.interval < 1:
            raise ConfigError(f"log.interval={self.interval} must be >= 1.")


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    log: LogConfig = field(default_factory=LogConfig)
    launch: LaunchConfig = field(default_factory=LaunchConfig)

    @property
    def seq_length(self) -> int:
        return self.data.seq_length or self.model.max_sequence_length

    def validate(self) -> "Config":
        for f in fields(self):
            getattr(self, f.name).validate()
        decay = self.optim.decay_steps or self.train.steps
        if decay <= self.optim.warmup_steps:
            raise ConfigError(
                f"optim.warmup_steps={self.optim.warmup_steps} must be below the decay horizon "
                f"({decay}: optim.decay_steps or train.steps); lower the warmup or train longer.")
        if self.seq_length > self.model.max_sequence_length:
            raise ConfigError(
                f"data.seq_length={self.seq_length} exceeds model.max_sequence_length="
                f"{self.model.max_sequence_length}; lower the first or raise the second.")
        return self

    # ---- construction -------------------------------------------------------------------
    @classmethod
    def from_dict(cls, raw: dict) -> "Config":
        return _build(cls, raw or {}, prefix="")

    @classmethod
    def from_yaml(cls, path: str | Path | None, overrides: list[str] | None = None) -> "Config":
        raw: dict = {}
        if path is not None:
            path = Path(path)
            if not path.is_file():
                raise ConfigError(f"config file {str(path)!r} does not exist; pass an existing YAML "
                                  f"file such as configs/tiny.yaml.")
            try:
                raw = yaml.safe_load(path.read_text()) or {}
            except yaml.YAMLError as e:
                raise ConfigError(f"config file {str(path)!r} is not valid YAML ({_one_line(e)}); "
                                  f"fix the syntax at that position.") from None
            if not isinstance(raw, dict):
                raise ConfigError(f"config file {str(path)!r} must hold a mapping of sections "
                                  f"(model:, train:, ...), not a {type(raw).__name__}.")
        for item in overrides or []:
            apply_override(raw, item)
        return cls.from_dict(raw).validate()

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)


def apply_override(raw: dict, item: str) -> None:
    """Apply one `section.key=value` override (value parsed as YAML) to a raw config dict."""
    if "=" not in item:
        raise ConfigError(f"override {item!r} must look like section.key=value, e.g. train.steps=20.")
    key, value = item.split("=", 1)
    parts = key.strip().split(".")
    if len(parts) < 2 or not all(parts):
        raise ConfigError(f"override key {key!r} must be dotted like section.key, e.g. train.steps.")
    try:
        parsed = yaml.safe_load(value) if value.strip() else None
    except yaml.YAMLError:
        parsed = value
    node = raw
    for p in parts[:-1]:
        node = node.setdefault(p, {})
        if not isinstance(node, dict):
            raise ConfigError(f"override {item!r} descends into {p!r}, which is not a section.")
    node[parts[-1]] = parsed


def _one_line(e: Exception) -> str:
    return " ".join(str(e).split())


def _build(cls: type, raw: Any, prefix: str):
    if not isinstance(raw, dict):
        raise ConfigError(f"{prefix.rstrip('.') or 'config'} must be a mapping of keys, "
                          f"got {raw!r}.")
    hints = typing.get_type_hints(cls)
    known = {f.name for f in fields(cls)}
    for key in raw:
        if key not in known:
            import difflib
            guess = difflib.get_close_matches(str(key), sorted(known), n=1)
            hint = f"did you mean {prefix}{guess[0]}?" if guess else \
                f"valid keys are: {', '.join(sorted(known))}."
            raise ConfigError(f"unknown config key {prefix}{key}; {hint}")
    kwargs = {}
    for f in fields(cls):
        if f.name not in raw:
            continue
        typ = hints[f.name]
        if dataclasses.is_dataclass(typ) and isinstance(raw[f.name], typ):  # built already (vars(cfg))
            kwargs[f.name] = raw[f.name]
        elif dataclasses.is_dataclass(typ):
            kwargs[f.name] = _build(typ, raw[f.name], prefix=f"{prefix}{f.name}.")
        else:
            kwargs[f.name] = _coerce(raw[f.name], typ, f"{prefix}{f.name}")
    return cls(**kwargs)


def _coerce(value: Any, typ: Any, key: str) -> Any:
    origin = typing.get_origin(typ)
    args = typing.get_args(typ)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        for option in inner[:-1]:  # int | Literal["auto"]: the first that takes the value
            try:
                return _coerce(value, option, key)
            except ConfigError:
                pass
        try:
            return _coerce(value, inner[-1], key)
        except ConfigError:
            if len(inner) == 1:
                raise
        raise ConfigError(f"{key}={value!r} has the wrong type; it must be "
                          f"{' or '.join(_type_name(a) for a in inner)}.")
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"{key}={value!r} must be a list, e.g. [2, 2].")
        return [_coerce(v, args[0], f"{key}[{i}]") for i, v in enumerate(value)]
    if dataclasses.is_dataclass(typ):  # a section inside a list (data.blend's sources)
        raw = typ.from_raw(value, key) if hasattr(typ, "from_raw") else value
        return _build(typ, raw, prefix=f"{key}.")
    if origin is Literal:
        if value not in args:
            raise ConfigError(f"{key}={value!r} is not allowed; choose one of "
                              f"{', '.join(map(str, args))}.")
        return value
    if typ is bool:
        if isinstance(value, bool):
            return value
    elif typ is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
    elif typ is float:  # NaN and infinities are never meaningful settings
        if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads "3e-4" as a string
            try:
                parsed = float(value)
            except ValueError:
                parsed = math.nan
            if math.isfinite(parsed):
                return parsed
    elif typ is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
    else:  # pragma: no cover - a field type this loader does not know is a programming error
        raise TypeError(f"config field {key} has unsupported type {typ}")
    raise ConfigError(f"{key}={value!r} has the wrong type; it must be {_type_name(typ)}.")


def _type_name(typ: Any) -> str:
    if typing.get_origin(typ) is Literal:
        return " or ".join(map(str, typing.get_args(typ)))
    return {bool: "true or false", int: "an integer", float: "a number",
            str: "a string"}.get(typ, str(typ))
