"""The training loop: check -> build -> (resume) -> step -> evaluate -> checkpoint -> sample.

    trainer = Trainer(cfg, env=RunEnv.from_environ())   # the launcher's view of this process
    history = trainer.fit()

Everything that can fail because of the user — the layout (megatron_lite/layout.py), the data
directory, the tokenizer's vocabulary against the model, a checkpoint of another model or layout —
is checked before this process joins a process group, so a mistake costs one sentence, not a hung
job. So is a second training on the same train.out_dir: rank 0 holds the run directory's lock
(checkpoint/lock.py) from construction until fit() ends. The trainer never asks which parallelism
it runs: a Backend (train/backends.py) runs the micro-batches and applies (or skips) the update.

One optimizer step = layout.micro_batches micro-batches of data.micro_batch_size sequences per
data-parallel rank; the loss is their mean, exactly as one big batch would average it. A step whose
loss or gradient norm is not finite is skipped (no update, on every backend) and logged; more than
train.max_skipped_steps in a row stop the run with a clear message. Skipped steps never touch the
weights, so they never reach a checkpoint.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import socket
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from tqdm import tqdm

from ..checkpoint import CheckpointManager, RunLock, TrainState, describe_layout, verify
from ..config import Config
from ..data import BlendedSampler, Sampler, TokenStore, check_same_tokenizer, load_tokenizer
from ..data.blend import open_sources, source_sampler, source_seed
from ..data.dataset import rank_micro_batch_starts
from ..data.documents import Packing
from ..distributed import comm
from ..distributed.env import RunEnv
from ..distributed.stop import requeue_marker
from ..errors import CheckpointError, ConfigError, TrainingError
from ..layout import Layout
from ..model import GPT, generate
from ..model.counts import flops_per_token
from ..optim import lr_at
from ..parallel.compile import compile_blocks
from ..parallel.context_parallel import ContextSharder, apply_context_parallel, whole_sequence_attention
from ..parallel.random import RNGTracker, recompute_context_fn
from ..parallel.tensor_parallel import TensorParallel, build_stage, set_sequence_parallel
from ..slicing import TPSharder
from .backends import build_backend
from .metrics import ScalarLog, memory_gb, peak_flops, read_metrics

log = logging.getLogger(__name__)

# A stop condition: looks at the trainer between steps, returns why it should stop (or None).
StopHook = Callable[["Trainer"], "str | None"]


@dataclass
class StepResult:
    loss: float
    grad_norm: float
    lr: float
    skipped: bool


def resolve_device(name: str, local_rank: int = 0) -> torch.device:
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError("train.device=cuda but no CUDA device is visible; "
                              "use train.device=cpu or auto.")
        device = torch.device("cuda", local_rank % torch.cuda.device_count())
        torch.cuda.set_device(device)
        return device
    return torch.device(name)


def _none_verifies(directory: Path) -> CheckpointError:
    # Starting afresh would silently overwrite them: stop instead.
    return CheckpointError(f"no checkpoint in {str(directory)!r} verifies (see the warnings above); "
                           f"delete the damaged ones or choose a new train.out_dir.")


def open_data(cfg: Config) -> list[TokenStore]:
    """The prepared token store of each source (data.dir, or every source of data.blend: all of
    one tokenizer), checked against the model's vocabulary."""
    if cfg.data.blend is None:
        stores, where = [TokenStore(cfg.data.dir)], f"data.dir {cfg.data.dir!r}"
    else:
        sources = cfg.data.blend
        stores = open_sources([s.dir for s in sources], [s.label for s in sources])
        where = f"the data.blend sources ({', '.join(repr(s.dir) for s in sources)})"
    vocab = stores[0].vocab_size  # one tokenizer, one vocabulary
    if vocab > cfg.model.vocab_size:
        raise ConfigError(
            f"model.vocab_size={cfg.model.vocab_size} is smaller than the tokenizer's vocabulary "
            f"({vocab}) in {where}; set model.vocab_size >= {vocab}.")
    return stores


def newest_resumable(cfg: Config) -> Path | None:
    """Before any process group: the newest committed checkpoint in train.out_dir whose manifest and
    shared files (config, tokenizer) verify, checked against this model; damaged ones are skipped
    with a warning naming the file. The shards are verified after the group exists (choose())."""
    manager = CheckpointManager(Path(cfg.train.out_dir) / "checkpoints")
    manager.latest()  # refuses a `latest` pointer that leaves the directory
    committed = manager.committed()
    for path in reversed(committed):
        try:
            verify(path, check=lambda name: "/" not in name)
        except CheckpointError as e:
            log.warning(f"warning: {e}")
            continue
        check_resumable(cfg, path)
        return path
    if committed:
        raise _none_verifies(manager.dir)
    return None


def check_resumable(cfg: Config, path: Path) -> None:
    """A checkpoint must hold this model (at any layout: it is resharded on load), trained on tokens
    of the data's tokenizer (data.dir's, or the one all of data.blend's sources share)."""
    saved_yaml = path / "config.yaml"
    if saved_yaml.is_file():
        saved = Config.from_yaml(saved_yaml).model
        diff = [f"model.{k}" for k, v in vars(saved).items() if getattr(cfg.model, k) != v]
        if diff:
            raise ConfigError(
                f"train.out_dir {cfg.train.out_dir!r} holds a checkpoint of a different model "
                f"({', '.join(diff)} changed); restore those settings to resume, or choose a new "
                f"train.out_dir.")
    check_same_tokenizer(cfg.data.tokenizer_dir, path)


def preflight(cfg: Config, world_size: int, check_lock: bool = True) -> Layout:
    """Every check a user's mistake can fail, without starting anything: what a launcher runs once
    before it starts workers (each worker's Trainer runs the same checks again). An elastic node
    joining a running job skips the lock (its own job holds it: the workers check it again)."""
    layout = Layout.build(cfg.validate(), world_size)
    if check_lock:
        RunLock(cfg.train.out_dir).check_free()  # no worker of ours exists yet: any holder is another run
    open_data(cfg)
    newest_resumable(cfg)
    return layout


def job_name(env: RunEnv) -> str:
    """A name every rank of this job shares and no other running job does: the address its
    processes meet at (only one job can listen there), or this process alone."""
    if not env.distributed:
        return f"pid {os.getpid()} on {socket.gethostname()}"
    return f"{env.source} {env.url} {env.master_addr}:{env.master_port}"


def claim_run_dir(out_dir: Path, env: RunEnv) -> RunLock | None:
    """Rank 0, which commits the checkpoints, takes the run directory's lock; every other rank
    checks that no other job holds it, so each refuses a busy directory before any group exists.
    Holding it, rank 0 removes an earlier stop's requeue marker (this run answers it); a refused
    run leaves the holder's marker alone."""
    lock = RunLock(out_dir, job=job_name(env))
    if env.rank == 0:
        lock.acquire()
        requeue_marker(out_dir).unlink(missing_ok=True)
        return lock
    lock.check_free()
    return None


@dataclass
class Resume:
    """What a resume cost, recorded at the first step after it: the world before and now (a
    membership change when they differ: an elastic job, a requeue on other nodes), the steps
    computed since the checkpoint and lost (the newest step the metrics hold beyond it: exact with
    log.interval=1, a lower bound otherwise), and the seconds from the previous run's last record
    (metrics.jsonl's modification) to the end of this run's first step."""
    world_before: int
    world: int
    layout_before: str  # the layout keys that changed, as they were
    layout: str  # and as they are
    step: int
    steps_lost: int
    last_record: float | None  # time.time() of the previous run's last metrics line

    @classmethod
    def of(cls, written: dict, layout: Layout, step: int, out_dir: Path) -> "Resume":
        before, now = {"tp": 1, "pp": 1, "dp": 1, "cp": 1, **written}, layout.as_dict()
        changed = [k for k in now if k in before and before[k] != now[k]]
        logged = read_metrics(out_dir, "train/loss")
        metrics = out_dir / "metrics.jsonl"
        return cls(before["tp"] * before["pp"] * before["dp"] * before["cp"], layout.world_size,
                   " ".join(f"{k}={before[k]}" for k in changed), " ".join(f"{k}={now[k]}" for k in changed),
                   step, max([s - step for s in logged if s > step], default=0),
                   metrics.stat().st_mtime if metrics.is_file() else None)

    def record(self) -> dict[str, float]:
        seconds = time.time() - self.last_record if self.last_record is not None else math.nan
        return {"resume/world_before": self.world_before, "resume/world": self.world,
                "resume/steps_lost": self.steps_lost, "resume/seconds": seconds}

    def describe(self, r: dict[str, float] | None = None) -> str:
        """One log line; `r`: the record() it goes with (taken now when not given)."""
        r = r or self.record()
        what = (f"membership change: world {self.world_before} -> {self.world} ({self.layout_before} -> "
                f"{self.layout})" if self.world != self.world_before else f"resume at world {self.world}")
        return (f"{what}; resumed at step {self.step}, {self.steps_lost} steps lost, first step "
                f"{r['resume/seconds']:.1f} s after the previous run's last record")


class Trainer:
    def __init__(self, cfg: Config, env: RunEnv | None = None, stop_hooks: tuple[StopHook, ...] = ()):
        self.cfg = cfg.validate()
        self.env = env or RunEnv()
        self.stop_hooks = list(stop_hooks)
        # ---- checks: nothing here talks to another process --------------------------------------
        self.layout = Layout.build(cfg, self.env.world_size)
        self.cfg = cfg = self.layout.config  # parallel.dp=auto resolved for this job's world
        self.out_dir = Path(cfg.train.out_dir)
        self._lock = claim_run_dir(self.out_dir, self.env)  # before anything reads the run directory
        try:
            self._open_inputs()
            self._build()
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        """Release the run directory (fit() does when it ends; a trainer never fit holds it until
        close() or the end of the process)."""
        if self._lock is not None:
            self._lock.release()

    def _open_inputs(self) -> None:
        """The data, the newest resumable checkpoint and the device: still no process group."""
        cfg = self.cfg
        self.seq_len = cfg.seq_length
        self.blend = cfg.data.blend is not None
        self.train_data, self.val_data = self._samplers(open_data(cfg))
        self.resumed_from = newest_resumable(cfg)
        self.device = resolve_device(cfg.train.device, local_rank=self.env.local_rank)

    def _samplers(self, stores: list[TokenStore]) -> tuple[Sampler | BlendedSampler, dict[str, Sampler]]:
        """The training sampler (of global samples) and each source's validation sampler by name."""
        data, L = self.cfg.data, self.seq_len
        sources = data.sources

        def packing(store: TokenStore, split: str) -> Packing | None:
            if not (data.document_mask or data.mask_separator_loss):
                return None
            return Packing(store.documents(split) if data.document_mask else None, data.reset_position_ids,
                           store.eot_id if data.mask_separator_loss else None)
        if not self.blend:
            st = stores[0]
            val = Sampler(st.split("val"), L, data.seed, shuffle=False, packing=packing(st, "val"))
            return (Sampler(st.split("train"), L, data.seed, packing=packing(st, "train")),
                    {sources[0].label: val})
        train = [source_sampler(st, "train", L, source_seed(data.seed, k), s.label, shuffle=True,
                                packing=packing(st, "train"))
                 for k, (s, st) in enumerate(zip(sources, stores, strict=True))]
        val = {s.label: source_sampler(st, "val", L, data.seed, s.label, shuffle=False,
                                       packing=packing(st, "val"))
               for s, st in zip(sources, stores, strict=True)}
        total = sum(s.weight for s in sources)
        for s, t in zip(sources, train, strict=True):
            log.info(f"data.blend: {s.label} ({s.dir}): {s.weight / total:.1%} of the samples, "
                     f"{t.num_windows:,} training sequences per epoch")
        return BlendedSampler(train, [s.weight for s in sources], [s.label for s in sources]), val

    def _build(self) -> None:
        """The job's process groups, then this rank's model and backend, resumed."""
        cfg = self.cfg
        self.groups = None
        if self.env.distributed:
            timeout = cfg.launch.collective_timeout_s
            comm.init(self.device, self.env, timeout)
            self.groups = self.layout.topology.build(self.env.rank, timeout)
        self.rank = self.env.rank
        self.coord = self.layout.topology.coord(self.rank)  # (tp, cp, pp, dp) of this process
        # this cp rank's share of each micro-batch (one shared mask for document-free sequences)
        self.sharder = ContextSharder(self.layout.cp, self.coord.cp, self.device)
        self.is_main = self.rank == 0
        # Dropout RNG: the same default stream on every tp rank (replicated regions); init uses its
        # own per-parameter seeds, so every layout starts from the same weights.
        torch.manual_seed(cfg.train.seed)
        self.model, self.tp = self._build_model()
        # this rank's slice of any serial parameter (its tp and ep slices), e.g. to compare with serial
        self.slicer = TPSharder(cfg.model, self.layout.tp, self.coord.tp,
                                cfg.parallel.make_vocab_divisible_by, self.layout.ep,
                                self.layout.topology.ep_rank(self.coord))
        self.state = TrainState()
        self.checkpoints = CheckpointManager(self.out_dir / "checkpoints", keep=cfg.checkpoint.keep,
                                             rank=self.rank,
                                             group=comm.world() if self.env.distributed else None,
                                             layout=self.layout.as_dict())
        if self.resumed_from is not None:
            self.resumed_from = self._choose_checkpoint()
            # Weights first: a backend that wraps the model (DeepSpeed) builds its state from them.
            self.checkpoints.load_weights(self.resumed_from, self.model)
        self.backend = build_backend(self.layout, self.model, self.groups, self.device, self.autocast,
                                     rng_tracker=self.tp.tracker if self.tp else None,
                                     local_rank=self.env.local_rank)
        self.resume: Resume | None = None
        if self.resumed_from is not None:
            written = self.checkpoints.load_state(self.resumed_from, self.backend.stateful(), self.state)
            if describe_layout(written) != describe_layout(self.layout.as_dict()):
                log.info(f"resharded {self.resumed_from}: written with {describe_layout(written)}, "
                         f"now {describe_layout(self.layout.as_dict())}")
            log.info(f"resumed from {self.resumed_from} (step {self.state.step}, sample {self.state.cursor})")
            self._check_source_cursors()
            self.resume = Resume.of(written, self.layout, self.state.step, self.out_dir)
        self._start_step = self.state.step  # where this process's run began (for exit_interval)
        # model FLOPs (model/counts.py: the matmuls, no recompute), the same count plan's MFU uses
        self.flops_per_token = flops_per_token(cfg.model, self.seq_len)
        # MFU over the whole job: every process contributes its device's peak.
        self.peak = peak_flops(self.device, cfg.train.peak_tflops) * self.layout.world_size

    # ---- build ------------------------------------------------------------------------------
    def _choose_checkpoint(self) -> Path:
        """Every rank verifies the files it will read; they agree on the newest good checkpoint."""
        chosen = self.checkpoints.choose()
        if chosen is None:
            raise _none_verifies(self.checkpoints.dir)
        if chosen != self.resumed_from:
            check_resumable(self.cfg, chosen)
        return chosen

    def _build_model(self) -> tuple[GPT, TensorParallel | None]:
        """This rank's part of the model: its pipeline stage's pieces (all of them when pp = 1),
        tensor-parallel when tp > 1, its experts split when ep > 1. Built on the meta device and
        materialised shard by shard (build_stage): the serial stage in fp32 would outgrow the
        training peak at scale."""
        cfg, layout = self.cfg, self.layout
        chunks = layout.chunks(self.coord.pp)
        tracker = RNGTracker(cfg.train.seed, self.coord.tp, self.device) if layout.tp > 1 else None
        model, tp = build_stage(cfg.model, cfg.train.seed, [i for c in chunks for i in c.layers],
                                any(c.first for c in chunks), any(c.last for c in chunks), self.device,
                                self.groups.tp if layout.tp > 1 else None,
                                sequence_parallel=cfg.parallel.sequence_parallel,
                                make_vocab_divisible_by=cfg.parallel.make_vocab_divisible_by, tracker=tracker,
                                ep_group=self.groups.ep if layout.ep > 1 else None)
        model.set_recompute(cfg.train.recompute, recompute_context_fn(tp.tracker) if tp else None)
        if layout.cp > 1:
            apply_context_parallel(model, self.groups.cp, self.groups.cp_ranks, self.coord.cp,
                                   cfg.parallel.cp_algorithm)
        if cfg.train.compile:  # last: it reads the recompute mode; the backend's hooks go around it
            n = compile_blocks(model, self.device)
            log.info(f"train.compile: torch.compile (inductor, {self.device.type}) on each of this rank's "
                     f"{n} transformer blocks; the first steps include compiling them")
        return model, tp

    def source_cursors(self) -> dict[str, dict]:
        """Per blend source: its weight and the samples it has given so far (derived from the global
        cursor; saved with each checkpoint, so a resume can check them). Empty without a blend."""
        if not self.blend:
            return {}
        cursors = self.train_data.cursors(self.state.cursor)
        return {s.label: {"weight": s.weight, "samples": cursors[s.label]} for s in self.cfg.data.sources}

    def _check_source_cursors(self) -> None:
        """A blend resumed as saved continues every source where it stopped; another blend (changed
        weights or sources) continues on its own schedule, which can repeat or skip a source's samples."""
        saved, now = self.state.extra.get("data_sources", {}), self.source_cursors()
        if saved != now:
            def said(d: dict) -> str:
                return ", ".join(f"{n} {v['samples']} (weight {v['weight']:g})" for n, v in d.items()) \
                    or "data.dir alone"
            log.warning(f"warning: at sample {self.state.cursor} the checkpoint's data sources had given "
                        f"{said(saved)}; this run's data gives {said(now)}: training goes on with this run's "
                        f"data, so a source's samples may repeat or be skipped")

    def autocast(self):
        """torch.autocast for DeepSpeed's bf16 (the native backends hold bf16 weights instead)."""
        if self.cfg.train.precision == "bf16" and self.layout.backend == "deepspeed":
            return torch.autocast(self.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    # ---- one step -----------------------------------------------------------------------------
    def next_batches(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """This rank's micro-batches of the next global batch. The global batch is samples
        [cursor, cursor + mb * m * dp); micro-batch j of dp rank r is its slice j * dp + r, so the
        ranks together see every sample once, in the order serial accumulation would."""
        mb, m, dp = self.cfg.data.micro_batch_size, self.layout.micro_batches, self.layout.dp
        out = [self._place(self.train_data.batch(start, mb))
               for start in rank_micro_batch_starts(self.state.cursor, mb, m, dp, self.coord.dp)]
        self.state.cursor += self.layout.global_batch_size
        self.state.tokens += self.layout.global_batch_size * self.seq_len
        return out

    def _place(self, batch: tuple) -> tuple:
        """A micro-batch of whole sequences (ids, labels[, Documents]) -> this rank's, on its device:
        under context parallelism its cp rank's tokens (ids, labels, ContextShard)."""
        if self.layout.cp > 1:
            return self.sharder(batch)
        return tuple(t.to(self.device) for t in batch)

    def train_step(self) -> StepResult:
        lr = lr_at(self.state.step, self.cfg.optim, self.cfg.train.steps)
        loss = self.backend.forward_backward(self.next_batches())
        out = self.backend.step(lr, loss)
        st = self.state
        st.consecutive_skips = st.consecutive_skips + 1 if out.skipped else 0
        st.total_skips += int(out.skipped)
        st.step += 1
        return StepResult(loss, out.grad_norm, lr, out.skipped)

    @torch.no_grad()
    def evaluate_sources(self) -> dict[str, float]:
        """Each source's validation loss: the first train.eval_iters micro-batches of its val split."""
        mb = self.cfg.data.micro_batch_size
        losses = {}
        for name, sampler in self.val_data.items():
            batches = [self._place(sampler.batch(i * mb, mb)) for i in range(self.cfg.train.eval_iters)]
            losses[name] = self.backend.forward_backward(batches, forward_only=True)
        return losses

    def validation_loss(self, losses: dict[str, float]) -> float:
        """The sources' losses weighted as the blend draws them (the one source's loss alone);
        a source of weight 0 is evaluated, never trained on, and left out."""
        weighted = [(s.weight, losses[s.label]) for s in self.cfg.data.sources if s.weight > 0]
        return sum(w * v for w, v in weighted) / sum(w for w, _ in weighted)

    def evaluate(self) -> float:
        return self.validation_loss(self.evaluate_sources())

    def save(self, background: bool = False) -> Path:
        if self.blend:
            self.state.extra["data_sources"] = self.source_cursors()
        return self.checkpoints.save(self.state.step, self.backend.stateful(), self.state, self.cfg.to_yaml(),
                                     data_dir=self.cfg.data.tokenizer_dir, background=background)

    def sample(self, prompt: str = "def ", max_new_tokens: int | None = None) -> str | None:
        """Generate from the model in memory; None under pipelining (no single rank holds the
        whole forward pass: use `megatron-lite generate` on the checkpoint)."""
        if self.layout.pp > 1:
            return None
        tok = load_tokenizer(self.cfg.data.tokenizer_dir)
        n = self.cfg.train.sample_tokens if max_new_tokens is None else max_new_tokens
        ids = torch.tensor([tok.encode(prompt)], device=self.device)
        g = torch.Generator(device=self.device).manual_seed(self.cfg.train.seed)
        sp = self.tp is not None and self.tp.sequence_parallel
        if sp:  # decoding's one-token steps cannot be split along the sequence
            set_sequence_parallel(self.model, False)
        try:
            # nor across cp ranks: each holds the whole model and decodes the whole sequence
            with whole_sequence_attention(self.model):
                out = generate(self.model, ids, n, temperature=0.8, top_k=50, generator=g)
        finally:
            if sp:
                set_sequence_parallel(self.model, True)
        return tok.decode(out[0].tolist())

    # ---- the loop -----------------------------------------------------------------------------
    def should_stop(self) -> str | None:
        """Why the loop ends before the next step (None: go on). Hooks come after the step budget,
        so a launcher can add preemption or a time limit without touching the loop."""
        st, t = self.state, self.cfg.train
        if st.step >= t.steps:
            return f"reached train.steps={t.steps}"
        if t.exit_interval is not None and st.step >= self._start_step + t.exit_interval:
            return f"train.exit_interval={t.exit_interval} steps done"
        for hook in self.stop_hooks:
            reason = hook(self)
            if reason:
                return reason
        return None

    def fit(self) -> dict:
        if self._lock is not None and not self._lock.held:  # a second fit() of this trainer
            self._lock.acquire()
        self._start_step = self.state.step
        self._scalars = ScalarLog(self.out_dir, self.is_main, self.cfg.log.tensorboard)
        self._history: dict = {"train_loss": [], "val_loss": [], "val_loss_sources": [], "skipped": []}
        self._last_save = self.state.step
        bar = tqdm(total=self.cfg.train.steps, initial=self.state.step, dynamic_ncols=True, mininterval=1.0,
                   desc="train", disable=not (self.cfg.train.progress and self.is_main))
        try:
            self._evaluate_and_log()
            self._window = (time.perf_counter(), self.state.tokens)
            while (reason := self.should_stop()) is None:
                r = self.train_step()
                bar.update(1)
                if self.resume is not None:  # the first step since the resume: what it cost
                    row = self.resume.record()
                    self._scalars.scalars(self.resume.step, row)
                    log.info(self.resume.describe(row))
                    self.resume = None
                if self.checkpoints.in_flight:  # a background save: commit it at this step boundary
                    log.info(f"saved {self.checkpoints.finish()}")
                if self._record(r):
                    bar.set_postfix(loss=f"{r.loss:.3f}", refresh=False)
                    self._maybe_log(r)
                    self._maybe_evaluate()
                    self._maybe_save()
            bar.close()
            self.backend.settle()  # the last step's weight gathers (they ran behind no forward)
            log.info(f"stopping at step {self.state.step}: {reason}")
            if self.checkpoints.in_flight:
                log.info(f"saved {self.checkpoints.finish()}")
            if self.state.step != self._last_save:
                self._save_and_log()
        finally:
            bar.close()
            self._scalars.close()
            self.close()
        self._history["step"] = self.state.step
        return self._history

    def _is_last_planned_step(self) -> bool:
        t = self.cfg.train
        end = t.steps if t.exit_interval is None else min(t.steps, self._start_step + t.exit_interval)
        return self.state.step == end

    def _record(self, r: StepResult) -> bool:
        """History and the skip policy; False for a skipped step (nothing else happens after it)."""
        st, limit = self.state, self.cfg.train.max_skipped_steps
        self._history["train_loss"].append(r.loss)
        if not r.skipped:
            return True
        self._history["skipped"].append(st.step)
        log.warning(f"warning: step {st.step} skipped: loss {r.loss} grad norm {r.grad_norm} not finite "
                    f"({st.consecutive_skips} in a row, {limit} allowed)")
        if st.consecutive_skips > limit:
            raise TrainingError(
                f"{st.consecutive_skips} consecutive steps had a non-finite loss or gradient norm "
                f"(train.max_skipped_steps={limit}); lower optim.lr or resume from the last checkpoint "
                f"in {self.checkpoints.dir}.")
        return False

    def _maybe_log(self, r: StepResult) -> None:
        st = self.state
        if st.step % self.cfg.log.interval and not self._is_last_planned_step():
            return
        t0, tokens0 = self._window
        tps = (st.tokens - tokens0) / max(time.perf_counter() - t0, 1e-9)
        mfu = tps * self.flops_per_token / self.peak
        samples = {f"data/{name}/samples": v["samples"] for name, v in self.source_cursors().items()}
        moe = self.backend.router_metrics()  # expert load and router losses since the last log
        self._scalars.scalars(st.step, {"train/loss": r.loss, "train/lr": r.lr,
                                        "train/grad_norm": r.grad_norm,
                                        "train/tokens_per_s": tps, "train/mfu": mfu,
                                        "train/samples": st.cursor,
                                        "train/memory_gb": memory_gb(self.device), **samples, **moe})
        experts = f" | expert load max/mean {moe['moe/load_max_over_mean']:.2f}" if moe else ""
        log.info(f"step {st.step:>6} | loss {r.loss:.4f} | lr {r.lr:.2e} | grad norm {r.grad_norm:.3f} | "
                 f"{tps:,.0f} tok/s | mfu {100 * mfu:.1f}%{experts}")
        self._window = (time.perf_counter(), st.tokens)

    def _maybe_evaluate(self) -> None:
        if self.state.step % self.cfg.train.eval_interval == 0 or self._is_last_planned_step():
            self._evaluate_and_log()

    def _evaluate_and_log(self) -> None:
        losses, step = self.evaluate_sources(), self.state.step
        val = self.validation_loss(losses)
        ppl = math.exp(min(val, 50))
        self._history["val_loss"].append((step, val))
        self._history["val_loss_sources"].append((step, losses))
        per_source = {f"val/{name}/loss": v for name, v in losses.items()} if self.blend else {}
        self._scalars.scalars(step, {"val/loss": val, "val/perplexity": ppl, **per_source})
        each = "".join(f" | {name} {v:.4f}" for name, v in losses.items()) if self.blend else ""
        log.info(f"step {step:>6} | val loss {val:.4f} | ppl {ppl:.1f}{each}")

    def _maybe_save(self) -> None:
        if self.state.step % self.cfg.checkpoint.interval == 0:
            if self.cfg.checkpoint.async_save and not self._is_last_planned_step():
                log.info(f"saving {self.save(background=True)} in the background")
                self._last_save = self.state.step
            else:
                self._save_and_log()

    def _save_and_log(self) -> None:
        log.info(f"saved {self.save()}")
        self._last_save = self.state.step
