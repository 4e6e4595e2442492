"""`make train` — the README's main job — end to end (shortened), through the real Makefile."""

import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import ROOT


@pytest.mark.slow
def test_make_train_lowers_validation_loss(tmp_path):
    venv = Path(sys.prefix)
    data, run = tmp_path / "data", tmp_path / "run"
    args = (f"train.out_dir={run} data.dir={data} train.steps=150 train.eval_interval=75 "
            f"train.progress=false checkpoint.interval=150 train.sample_tokens=40")
    r = subprocess.run(["make", "train", f"VENV={venv}", f"DATA={data}", f"ARGS={args}"], cwd=ROOT,
                       capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    m = re.search(r"validation loss: first ([\d.]+) \(step 0\) -> last ([\d.]+) \(step 150\)", r.stdout)
    assert m, r.stdout[-3000:]
    first, last = map(float, m.groups())
    assert last < first - 2.0, (first, last)
    assert "---- sample ----" in r.stdout
    assert (run / "tb").is_dir() and (run / "checkpoints" / "step_00000150" / "manifest.json").is_file()
