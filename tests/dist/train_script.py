"""Run under torchrun by tests: train with the given overrides, rank 0 dumps the loss history."""

import json
import sys

from megatron_lite.config import Config
from megatron_lite.distributed import comm
from megatron_lite.distributed.env import RunEnv
from megatron_lite.train import Trainer

if __name__ == "__main__":
    out, overrides = sys.argv[1], sys.argv[2:]
    trainer = Trainer(Config.from_yaml(None, overrides), RunEnv.from_environ())  # torchrun's variables
    try:
        hist = trainer.fit()
        if trainer.is_main:
            with open(out, "w") as f:
                json.dump({"train_loss": hist["train_loss"], "val_loss": hist["val_loss"],
                           "resumed": trainer.resumed_from is not None}, f)
    finally:
        comm.destroy()
