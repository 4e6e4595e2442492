"""Run under torchrun by tests: train with the given overrides, rank 0 dumps the loss history.

    train_script.py OUT.json [--copy-to=DIR] section.key=value ...

--copy-to: right after building (and resuming), before training, save the state as loaded into
DIR/checkpoints with this run's layout, so a test can compare what a reshard loaded with what was
saved."""

import json
import sys

from megatron_lite.checkpoint import CheckpointManager
from megatron_lite.config import Config
from megatron_lite.distributed import comm
from megatron_lite.distributed.env import RunEnv
from megatron_lite.train import Trainer

if __name__ == "__main__":
    out, args = sys.argv[1], sys.argv[2:]
    copy_to = next((a.split("=", 1)[1] for a in args if a.startswith("--copy-to=")), None)
    overrides = [a for a in args if not a.startswith("--copy-to=")]
    trainer = Trainer(Config.from_yaml(None, overrides), RunEnv.from_environ())  # torchrun's variables
    try:
        if copy_to:
            copy = CheckpointManager(f"{copy_to}/checkpoints", rank=trainer.rank, group=trainer.checkpoints.group,
                                     layout=trainer.layout.as_dict())
            copy.save(trainer.state.step, trainer.backend.stateful(), trainer.state, trainer.cfg.to_yaml())
        start = {"step": trainer.state.step, "cursor": trainer.state.cursor}
        hist = trainer.fit()
        # what `megatron-lite train` does after fit (every rank takes part), when asked for
        sample = trainer.sample() if trainer.cfg.train.sample_tokens else None
        if trainer.is_main:
            with open(out, "w") as f:
                json.dump({"train_loss": hist["train_loss"], "val_loss": hist["val_loss"],
                           "resumed": trainer.resumed_from is not None, "start": start, "sample": sample}, f)
    finally:
        comm.destroy()
    comm.exit_process(0)  # finished: skip native teardown (see comm.exit_process)
