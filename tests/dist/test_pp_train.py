"""`megatron-lite train` with pipeline parallelism (and TP x PP) under torchrun, end to end."""

import importlib.util
import json

import pytest

from megatron_lite.testing import tiny_overrides
from tests.conftest import cli
from tests.dist.test_tp_train import train, train_serial


@pytest.mark.slow
def test_pipeline_training_matches_serial(corpus_dir, tmp_path):
    base = tiny_overrides(corpus_dir, "model.num_layers=4", "data.micro_batch_size=2",
                          "parallel.microbatches=4", "data.global_batch_size=8", "train.steps=8",
                          "train.eval_interval=4", "optim.warmup_steps=2", "log.interval=2")
    serial = train_serial(tmp_path, "serial", *base, f"train.out_dir={tmp_path / 's'}")
    pp = train(tmp_path, "pp", 2, *base, "parallel.pp=2", "parallel.schedule=1f1b", "train.recompute=full",
               f"train.out_dir={tmp_path / 'p'}")
    # uneven interleaved pieces: stage 0 holds the embedding alone and blocks 2, 3; stage 1 blocks 0, 1
    # and the head alone (tied: its own copy), under sequence parallelism, saved and consolidated
    tp_pp = train(tmp_path, "tppp", 4, *base, "parallel.pp=2", "parallel.tp=2",
                  "parallel.sequence_parallel=true", "parallel.schedule=interleaved",
                  "parallel.virtual_stages=2", "parallel.pp_layers=[0,2,2,0]",
                  f"train.out_dir={tmp_path / 'tp'}")
    # fp32, another summation order: rounding-level differences only
    assert pp["train_loss"] == pytest.approx(serial["train_loss"], rel=1e-5)
    assert tp_pp["train_loss"] == pytest.approx(serial["train_loss"], rel=1e-5)
    assert [v for _, v in pp["val_loss"]] == pytest.approx([v for _, v in serial["val_loss"]], rel=1e-5)
    manifest = json.loads((tmp_path / "tp" / "checkpoints" / "step_00000008" / "manifest.json").read_text())
    assert manifest["layout"]["pp"] == 2 and manifest["layout"]["tp"] == 2
    # Both layouts' checkpoints consolidate into the serial model for generation.
    outs = [cli("generate", "--checkpoint", str(tmp_path / d), "--prompt", "def ", "--max-new-tokens", "10",
                "--temperature", "0") for d in ("s", "p", "tp")]
    assert all(o.returncode == 0 for o in outs), [o.stderr for o in outs]
    assert outs[0].stdout == outs[1].stdout == outs[2].stdout


@pytest.mark.slow
def test_pipeline_layout_errors_before_any_process_group(corpus_dir):
    r = cli("train", "--config", "configs/tiny.yaml", "parallel.pp=2", "parallel.schedule=interleaved",
            "parallel.virtual_stages=2", "parallel.microbatches=3")
    assert r.returncode == 2 and "multiple of parallel.pp=2" in r.stderr and "Traceback" not in r.stderr


@pytest.mark.slow
def test_3d_tp2_pp2_dp2_zero1_eight_ranks(corpus_dir, tmp_path):
    """8 ranks: tp=2 x pp=2 x dp=2 with ZeRO-1 (native, then DeepSpeed) give the serial losses."""
    base = tiny_overrides(corpus_dir, "model.num_layers=4", "data.micro_batch_size=2", "train.steps=4",
                          "train.eval_interval=4", "train.eval_iters=1", "optim.warmup_steps=1",
                          "log.interval=1")
    serial = train_serial(tmp_path, "serial", *base, "train.grad_accum=4", f"train.out_dir={tmp_path / 's'}")
    three_d = train(tmp_path, "3d", 8, *base, "parallel.tp=2", "parallel.pp=2", "parallel.dp=2",
                    "parallel.microbatches=2", "data.global_batch_size=8", "optim.zero.stage=1",
                    f"train.out_dir={tmp_path / '3d'}")
    assert three_d["train_loss"] == pytest.approx(serial["train_loss"], rel=1e-5)
    if importlib.util.find_spec("deepspeed") is not None:  # the same 3D layout with DeepSpeed ZeRO-1
        ds = train(tmp_path, "3d_ds", 8, *base, "parallel.tp=2", "parallel.pp=2", "parallel.dp=2",
                   "parallel.microbatches=2", "optim.zero.stage=1", "optim.zero.backend=deepspeed",
                   f"train.out_dir={tmp_path / '3d_ds'}")
        assert ds["train_loss"] == pytest.approx(serial["train_loss"], rel=1e-5)
