"""`megatron-lite train`: its sub-parser and command. Building the parser imports nothing heavy (the
trainer, and torch, load when the command runs, after the stop-signal handlers are in)."""

from __future__ import annotations

import logging
import os

log = logging.getLogger("megatron_lite.cli")


def add_parser(subparsers) -> None:
    t = subparsers.add_parser("train", help="train a GPT from a YAML config (resumes from train.out_dir)")
    t.add_argument("--config", required=True, help="YAML config, e.g. configs/tiny.yaml")
    t.add_argument("overrides", nargs="*", help="dotted overrides, e.g. train.steps=20 model.dropout=0.1")
    t.set_defaults(func=cmd_train)


def cmd_train(args) -> int:
    from ..config import Config
    from ..distributed.env import RunEnv
    from ..distributed.stop import StopRequests, requeue_marker
    # The signal handlers go in before torch loads (seconds): a signal during startup is a request.
    cfg = Config.from_yaml(args.config, args.overrides)
    env = RunEnv.from_environ()
    # Only a launcher's worker watches its parent: a shell that exits must not stop a nohup'ed run.
    stops = StopRequests(cfg.launch.stop_signals, watch_parent=env.source in ("torchrun", "slurm")).install()
    from ..logs import setup_logging
    setup_logging(env.rank)
    os.makedirs(cfg.train.out_dir, exist_ok=True)
    # An earlier stop's marker is removed by the Trainer once this run holds the run directory.
    marker = requeue_marker(cfg.train.out_dir)
    hint = (f"another rank died, stalled, or was slower than launch.collective_timeout_s="
            f"{cfg.launch.collective_timeout_s:g}; a rerun resumes from the newest checkpoint in "
            f"{cfg.train.out_dir}/checkpoints.")
    from ..distributed import comm
    with comm.session(env, hint):
        try:
            return _train(cfg, env, stops, marker)
        finally:
            stops.uninstall()


def _train(cfg, env, stops, marker) -> int:
    from ..model.counts import param_count
    from .trainer import Trainer
    trainer = Trainer(cfg, env, stop_hooks=(stops.hook,))
    layout = trainer.layout
    log.info(f"model: {param_count(cfg.model) / 1e6:.2f}M parameters | device {trainer.device} | "
             f"{cfg.train.precision} | {layout.describe()} | batch {cfg.data.micro_batch_size}x"
             f"{layout.micro_batches}x{layout.dp} of {trainer.seq_len} tokens")
    history = trainer.fit()
    vals = history["val_loss"]
    if vals:
        log.info(f"validation loss: first {vals[0][1]:.4f} (step {vals[0][0]}) -> last {vals[-1][1]:.4f} "
                 f"(step {vals[-1][0]})")
    if stops.stopped_by:
        return _stopped_early(cfg, env, trainer, stops.stopped_by, marker)
    if cfg.train.sample_tokens > 0:
        text = trainer.sample()  # every rank takes part: the model is split across them
        if text is None:
            log.info(f"(no sample under pipeline parallelism: run `megatron-lite generate --checkpoint "
                     f"{cfg.train.out_dir}`)")
        else:
            log.info(f"---- sample ----\n{text}\n----------------")
    return 0


def _stopped_early(cfg, env, trainer, reason: str, marker) -> int:
    from ..distributed.stop import write_requeue_marker
    if env.rank == 0:
        write_requeue_marker(marker, trainer.state.step, reason, trainer.checkpoints.latest())
    # torchrun counts any non-zero worker status as a failure and would restart the workers.
    code = 0 if env.source == "torchrun" else cfg.launch.requeue_exit_code
    log.info(f"stopped at step {trainer.state.step} ({reason}) with a checkpoint; rerun (or requeue) "
             f"to resume; exit status {code}")
    return code
