"""The training loop: build -> (resume) -> step -> evaluate -> checkpoint -> sample.

One optimizer step = train.grad_accum micro-batches of data.micro_batch_size sequences; the loss is
their mean, exactly as one big batch would average it. A step whose loss or gradient norm is not
finite is skipped (no optimizer update) and logged; more than train.max_skipped_steps in a row stop
the run with a clear message. Skipped steps never touch the weights, so they never reach a
checkpoint.
"""

from __future__ import annotations

import contextlib
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from ..checkpoint import CheckpointManager, TrainState
from ..config import Config, ConfigError
from ..data import Sampler, TokenStore, load_tokenizer
from ..data.dataset import rank_micro_batch_starts
from ..distributed import comm
from ..distributed.topology import Topology
from ..model import GPT, generate
from ..optim import build_optimizer, lr_at, set_lr
from ..pipeline.engine import PipelineEngine, sync_tied_embeddings, tied_embedding_copy
from ..pipeline.partition import stage_chunks
from ..parallel.data_parallel import allreduce_gradients
from ..parallel.random import RNGTracker, recompute_context_fn
from ..parallel.tensor_parallel import (clip_grad_norm_, parallelize, set_sequence_parallel,
                                        sync_sequence_parallel_grads)
from .metrics import ScalarLog, memory_gb, peak_flops


class TrainingError(RuntimeError):
    """The run cannot go on (e.g. too many non-finite steps); one-sentence message."""


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
            raise ConfigError("train.device=cuda but no CUDA device is visible; use train.device=cpu or auto.")
        device = torch.device("cuda", local_rank % torch.cuda.device_count())
        torch.cuda.set_device(device)
        return device
    return torch.device(name)


class Trainer:
    def __init__(self, cfg: Config, log=tqdm.write):
        cfg.validate()
        self.cfg = cfg
        par = cfg.parallel
        # Layout rules were checked by cfg.validate(); the world size is known before any group.
        self.topology = Topology(par.tp, par.pp, par.dp, par.order)
        self.topology.check_world(int(os.environ.get("WORLD_SIZE", "1")))
        self.device = resolve_device(cfg.train.device, local_rank=int(os.environ.get("LOCAL_RANK", "0")))
        self.distributed = self.topology.world_size > 1
        self.rank, self.groups, self.tp_group, self.pp_group, self.dp_group = 0, None, None, None, None
        if self.distributed:
            comm.init(self.device)
            self.rank = comm.global_rank()
            self.groups = self.topology.build(self.rank)
            self.tp_group = self.groups.tp if par.tp > 1 else None
            self.pp_group = self.groups.pp if par.pp > 1 else None
            self.dp_group = self.groups.dp if par.dp > 1 else None
        self.is_main = self.rank == 0
        self.log = log if self.is_main else (lambda *a, **k: None)
        log = self.log
        self.out_dir = Path(cfg.train.out_dir)
        self.store = TokenStore(cfg.data.dir)
        if self.store.vocab_size > cfg.model.vocab_size:
            raise ConfigError(
                f"model.vocab_size={cfg.model.vocab_size} is smaller than the tokenizer's vocabulary "
                f"({self.store.vocab_size}) in data.dir {cfg.data.dir!r}; set model.vocab_size >= "
                f"{self.store.vocab_size}.")
        self.seq_len = cfg.seq_length
        self.train_data = Sampler(self.store.split("train"), self.seq_len, cfg.data.seed)
        self.val_data = Sampler(self.store.split("val"), self.seq_len, cfg.data.seed, shuffle=False)

        # Dropout RNG: the same default stream on every tp rank (replicated regions); init uses its
        # own per-parameter seeds, so every layout starts from the same weights.
        torch.manual_seed(cfg.train.seed)
        coord = self.topology.coord(self.rank)
        # Each rank builds only its pipeline stage's pieces (all of them when pp = 1).
        self.chunks = stage_chunks(cfg.model, par.pp, coord.pp, par.virtual_stages, par.partition, par.pp_layers)
        self.model = GPT(cfg.model, seed=cfg.train.seed, layers=[i for c in self.chunks for i in c.layers],
                         embed=any(c.first for c in self.chunks), head=any(c.last for c in self.chunks))
        self.model.to(self.device)
        tracker = None
        if self.tp_group is not None:
            tracker = RNGTracker(cfg.train.seed, coord.tp, self.device)
            self.model = parallelize(self.model, self.tp_group, sequence_parallel=par.sequence_parallel,
                                     make_vocab_divisible_by=par.make_vocab_divisible_by, tracker=tracker)
        self.model.set_recompute(cfg.train.recompute, recompute_context_fn(tracker) if tracker else None)
        self.engine = None
        if self.pp_group is not None:
            seq = self.seq_len // par.tp if par.sequence_parallel else self.seq_len
            self.engine = PipelineEngine(self.model, self.chunks, coord.pp, self.groups.pp_ranks, self.pp_group,
                                         par.schedule, (cfg.data.micro_batch_size, seq, cfg.model.hidden_size),
                                         self.device, autocast=self.autocast)
        self.optimizer = build_optimizer(self.model, cfg.optim, dp_group=self.dp_group)
        self.ds = None  # a DeepSpeed engine owns the optimizer step under optim.zero.backend=deepspeed
        if cfg.optim.zero.backend == "deepspeed" and cfg.optim.zero.stage > 0:
            from ..optim.deepspeed import initialize
            self.ds = initialize(self.model, self.optimizer, cfg, self.topology, self.groups)
        self.state = TrainState()
        self.state.rng_tracker = getattr(self.model, "rng_tracker", None)
        layout = {"tp": par.tp, "pp": par.pp, "dp": par.dp, "order": par.order,
                  "make_vocab_divisible_by": par.make_vocab_divisible_by}
        self.checkpoints = CheckpointManager(self.out_dir / "checkpoints", keep=cfg.checkpoint.keep, rank=self.rank,
                                             group=comm.world() if self.distributed else None, layout=layout)
        self.resumed_from = self.checkpoints.latest()
        if self.resumed_from is not None:
            self._check_same_model(self.resumed_from)
            if self.ds is not None:
                self.checkpoints.load(self.resumed_from, self.model, None, self.state, extra_load=lambda p: (
                    self.ds.load_checkpoint(str(p / "deepspeed"), tag="state", load_lr_scheduler_states=False)))
            else:
                self.checkpoints.load(self.resumed_from, self.model, self.optimizer, self.state)
            log(f"resumed from {self.resumed_from} (step {self.state.step}, sample {self.state.cursor})")
        self.flops_per_token = self.model.flops_per_token(self.seq_len)
        # MFU over the whole job: every process contributes its device's peak.
        self.peak = peak_flops(self.device, cfg.train.peak_tflops) * self.topology.world_size

    def _check_same_model(self, path: Path) -> None:
        saved_yaml = path / "config.yaml"
        if not saved_yaml.is_file():
            return
        saved = Config.from_yaml(saved_yaml).model
        diff = [f"model.{k}" for k, v in vars(saved).items() if getattr(self.cfg.model, k) != v]
        if diff:
            raise ConfigError(
                f"train.out_dir {str(self.out_dir)!r} holds a checkpoint of a different model ({', '.join(diff)} "
                f"changed); restore those settings to resume, or choose a new train.out_dir.")

    # ---- pieces -----------------------------------------------------------------------------
    def autocast(self):
        if self.cfg.train.precision == "bf16":
            return torch.autocast(self.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def step_batches(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """This rank's micro-batches of the next global batch. The global batch is samples
        [cursor, cursor + mb * m * dp); micro-batch j of dp rank r is its slice j * dp + r, so the
        ranks together see every sample once, in the order serial accumulation would."""
        mb, m, dp = self.cfg.data.micro_batch_size, self.cfg.train.grad_accum, self.topology.dp
        r = self.topology.coord(self.rank).dp
        out = []
        for start in rank_micro_batch_starts(self.state.cursor, mb, m, dp, r):
            x, y = self.train_data.batch(start, mb)
            out.append((x.to(self.device), y.to(self.device)))
        self.state.cursor += mb * m * dp
        self.state.tokens += mb * m * dp * self.seq_len
        return out

    def train_step(self) -> StepResult:
        cfg = self.cfg
        self.model.train()
        lr = lr_at(self.state.step, cfg.optim, cfg.train.steps)
        set_lr(self.optimizer, lr)
        self.optimizer.zero_grad(set_to_none=True)
        batches = self.step_batches()
        if self.ds is not None:
            return self._deepspeed_step(batches, lr)
        if self.engine is not None:  # pipelined: the schedule runs every micro-batch
            total = self.engine.run(batches)
        else:
            total = torch.zeros((), device=self.device)
            for x, y in batches:
                with self.autocast():
                    _, loss = self.model(x, y)
                (loss / len(batches)).backward()
                total += loss.detach()
            total = total / len(batches)
        if self.dp_group is not None:  # the global batch's mean loss, the same on every rank
            comm.all_reduce(total, self.dp_group)
            total /= self.topology.dp
        loss = total.item()
        grad_norm = self.clip_gradients()
        skipped = not (math.isfinite(loss) and math.isfinite(grad_norm))
        if skipped:
            self.optimizer.zero_grad(set_to_none=True)
            self.state.consecutive_skips += 1
            self.state.total_skips += 1
        else:
            self.optimizer.step()
            self.state.consecutive_skips = 0
        self.state.step += 1
        return StepResult(loss, grad_norm, lr, skipped)

    def _deepspeed_step(self, batches, lr: float) -> StepResult:
        """DeepSpeed accumulates, averages over dp, clips and steps (at the accumulation boundary)."""
        set_lr(self.ds.optimizer, lr)
        if self.engine is not None:  # our schedule runs the backward; ZeRO reduces, clips, steps
            total = self.engine.run(batches).float()
            sync_tied_embeddings(self.model, self.groups.embed)
            self.ds.optimizer.reduce_gradients(pipeline_parallel=True)
            self.ds.step()
        else:
            total = torch.zeros((), device=self.device)
            for x, y in batches:
                ctx = contextlib.nullcontext() if self.cfg.train.precision == "bf16" else self.autocast()
                with ctx:
                    _, loss = self.ds(x, y)
                self.ds.backward(loss)
                self.ds.step()
                total += loss.detach().float()
            total /= len(batches)
        comm.all_reduce(total, self.dp_group)
        loss = (total / self.topology.dp).item()
        norm = self.ds.get_global_grad_norm()
        grad_norm = float(norm) if norm is not None else float("nan")
        # DeepSpeed has already applied the update; a non-finite step is reported, not undone.
        skipped = not (math.isfinite(loss) and math.isfinite(grad_norm))
        self.state.consecutive_skips = self.state.consecutive_skips + 1 if skipped else 0
        self.state.total_skips += int(skipped)
        self.state.step += 1
        return StepResult(loss, grad_norm, lr, skipped)

    def clip_gradients(self) -> float:
        """Finish the grads (sequence-parallel sums) and clip by the global norm; returns the norm."""
        clip = self.cfg.optim.grad_clip
        if self.groups is None:
            return torch.nn.utils.clip_grad_norm_(self.model.parameters(), clip if clip > 0 else math.inf).item()
        if self.dp_group is not None:  # once per step, after every micro-batch
            allreduce_gradients(self.model.parameters(), self.dp_group)
        if self.tp_group is not None:
            sync_sequence_parallel_grads(self.model, self.tp_group)
        duplicates = ()
        if self.pp_group is not None:
            sync_tied_embeddings(self.model, self.groups.embed)
            copy = tied_embedding_copy(self.model)
            duplicates = (copy,) if copy is not None and not self.model.has_embed else ()
        return clip_grad_norm_(list(self.model.parameters()), clip, self.tp_group, self.pp_group, duplicates)

    @torch.no_grad()
    def evaluate(self) -> float:
        self.model.eval()
        mb, total = self.cfg.data.micro_batch_size, 0.0
        if self.engine is not None:
            batches = [tuple(t.to(self.device) for t in self.val_data.batch(i * mb, mb))
                       for i in range(self.cfg.train.eval_iters)]
            return self.engine.run(batches, forward_only=True).item()
        for i in range(self.cfg.train.eval_iters):
            x, y = self.val_data.batch(i * mb, mb)
            with self.autocast():
                _, loss = self.model(x.to(self.device), y.to(self.device))
            total += loss.item()
        return total / self.cfg.train.eval_iters

    def save(self) -> Path:
        if self.ds is not None:  # DeepSpeed writes its partitioned optimizer state itself
            return self.checkpoints.save(self.state.step, self.model, None, self.state, self.cfg.to_yaml(),
                                         data_dir=self.cfg.data.dir, extra_save=lambda d: (
                                             self.ds.save_checkpoint(str(d / "deepspeed"), tag="state")))
        return self.checkpoints.save(self.state.step, self.model, self.optimizer, self.state,
                                     self.cfg.to_yaml(), data_dir=self.cfg.data.dir)

    def sample(self, prompt: str = "def ", max_new_tokens: int | None = None) -> str | None:
        """Generate from the model in memory; None under pipelining (no single rank holds the
        whole forward pass: use `megatron-lite generate` on the checkpoint)."""
        if self.engine is not None:
            return None
        tok = load_tokenizer(self.cfg.data.dir)
        n = self.cfg.train.sample_tokens if max_new_tokens is None else max_new_tokens
        ids = torch.tensor([tok.encode(prompt)], device=self.device)
        g = torch.Generator(device=self.device).manual_seed(self.cfg.train.seed)
        sp = self.tp_group is not None and self.cfg.parallel.sequence_parallel
        if sp:
            set_sequence_parallel(self.model, False)
        try:
            out = generate(self.model, ids, n, temperature=0.8, top_k=50, generator=g)
        finally:
            if sp:
                set_sequence_parallel(self.model, True)
        return tok.decode(out[0].tolist())

    # ---- the loop -----------------------------------------------------------------------------
    def fit(self) -> dict:
        cfg, st = self.cfg, self.state
        scalars = ScalarLog(self.out_dir, cfg.log.tensorboard and self.is_main)
        history: dict = {"train_loss": [], "val_loss": [], "skipped": []}
        try:
            val = self.evaluate()
            history["val_loss"].append((st.step, val))
            scalars.scalars(st.step, {"val/loss": val, "val/perplexity": math.exp(min(val, 50))})
            self.log(f"step {st.step:>6} | val loss {val:.4f} | ppl {math.exp(min(val, 50)):.1f}")
            end = cfg.train.steps
            if cfg.train.exit_interval is not None:
                end = min(end, st.step + cfg.train.exit_interval)
            bar = tqdm(total=cfg.train.steps, initial=st.step, disable=not (cfg.train.progress and self.is_main),
                       dynamic_ncols=True, mininterval=1.0, desc="train")
            last_save, t0, tokens0 = st.step, time.perf_counter(), st.tokens
            while st.step < end:
                r = self.train_step()
                history["train_loss"].append(r.loss)
                bar.update(1)
                if r.skipped:
                    history["skipped"].append(st.step)
                    self.log(f"warning: step {st.step} skipped: loss {r.loss} grad norm {r.grad_norm} not "
                             f"finite ({st.consecutive_skips} in a row, {cfg.train.max_skipped_steps} allowed)")
                    if st.consecutive_skips > cfg.train.max_skipped_steps:
                        raise TrainingError(
                            f"{st.consecutive_skips} consecutive steps had a non-finite loss or gradient "
                            f"norm (train.max_skipped_steps={cfg.train.max_skipped_steps}); lower optim.lr or "
                            f"resume from the last checkpoint in {self.checkpoints.dir}.")
                    continue
                bar.set_postfix(loss=f"{r.loss:.3f}", refresh=False)
                if st.step % cfg.log.interval == 0 or st.step == end:
                    dt = time.perf_counter() - t0
                    tps = (st.tokens - tokens0) / max(dt, 1e-9)
                    mfu = tps * self.flops_per_token / self.peak
                    scalars.scalars(st.step, {"train/loss": r.loss, "train/lr": r.lr,
                                              "train/grad_norm": r.grad_norm, "train/tokens_per_s": tps,
                                              "train/mfu": mfu, "train/memory_gb": memory_gb(self.device)})
                    self.log(f"step {st.step:>6} | loss {r.loss:.4f} | lr {r.lr:.2e} | grad norm "
                              f"{r.grad_norm:.3f} | {tps:,.0f} tok/s | mfu {100 * mfu:.1f}%")
                    t0, tokens0 = time.perf_counter(), st.tokens
                if st.step % cfg.train.eval_interval == 0 or st.step == end:
                    val = self.evaluate()
                    history["val_loss"].append((st.step, val))
                    scalars.scalars(st.step, {"val/loss": val, "val/perplexity": math.exp(min(val, 50))})
                    self.log(f"step {st.step:>6} | val loss {val:.4f} | ppl {math.exp(min(val, 50)):.1f}")
                if st.step % cfg.checkpoint.interval == 0:
                    self.log(f"saved {self.save()}")
                    last_save = st.step
            bar.close()
            if st.step != last_save:
                self.log(f"saved {self.save()}")
        finally:
            scalars.close()
        history["step"] = st.step
        return history
