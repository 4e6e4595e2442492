"""Run by test_train.py: train with checkpoints every 2 steps, but make the save of step 4 stall
(inside the tensor write) after announcing it in READY, so the test can SIGKILL this process
mid-save. argv: READY OUT_DIR DATA_DIR sync|async"""

import sys
import time
from pathlib import Path

from megatron_lite.checkpoint.store import ShardWriter
from megatron_lite.config import Config
from megatron_lite.testing import tiny_overrides
from megatron_lite.train import Trainer

if __name__ == "__main__":
    ready, out, data, mode = sys.argv[1:5]
    real_write = ShardWriter.write

    def write(self, directory):
        if Path(directory).name == ".step_00000004.tmp":
            path = real_write(self, directory)  # the bytes are on disk, the commit is not
            Path(ready).write_text("writing")
            time.sleep(600)  # killed here
            return path
        return real_write(self, directory)
    ShardWriter.write = write
    background = "true" if mode == "async" else "false"
    cfg = Config.from_yaml(None, tiny_overrides(data, f"train.out_dir={out}", "train.steps=8",
                                                "checkpoint.interval=2", "optim.warmup_steps=1",
                                                f"checkpoint.async_save={background}"))
    Trainer(cfg).fit()
