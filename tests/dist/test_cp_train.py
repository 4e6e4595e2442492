"""Context parallelism and packed documents through the real trainer and its checkpoints.

A cp checkpoint resumes at another cp size (the weights are whole on every cp rank: cp changes no
stored tensor), its losses equal the uninterrupted serial run's on packed documents (rel 1e-5,
summation order only), and a cp run stopped and resumed at its own layout is bit-identical to one
that never stopped."""

import pytest
import torch

from megatron_lite.checkpoint import CheckpointManager
from megatron_lite.testing import tiny_overrides
from tests.dist.test_reshard import stored
from tests.dist.test_tp_train import train

DOCS = ["data.document_mask=true", "data.reset_position_ids=true", "data.mask_separator_loss=true"]
LAYOUTS = {  # every layout's global batch is 2 x 4 = 8 samples of 32 tokens
    "serial": (1, ["train.grad_accum=4"]),
    "cp2_ring": (2, ["parallel.cp=2", "parallel.cp_algorithm=ring", "train.grad_accum=4"]),
    "cp2dp2_zero1": (4, ["parallel.cp=2", "parallel.dp=2", "train.grad_accum=2", "optim.zero.stage=1"]),
    "tp2cp2_sp": (4, ["parallel.tp=2", "parallel.cp=2", "parallel.sequence_parallel=true",
                      "train.grad_accum=4"]),
}


def _base(corpus_dir):
    return tiny_overrides(corpus_dir, "model.num_layers=4", "model.hidden_size=64", "data.micro_batch_size=2",
                          "model.position_embedding=rope", "train.steps=8", "checkpoint.interval=4",
                          "train.eval_interval=4", "train.eval_iters=2", "optim.warmup_steps=2",
                          "optim.grad_clip=0.5", "log.interval=1", *DOCS)


@pytest.mark.slow
def test_cp_checkpoint_resumes_at_another_cp_size_with_the_serial_losses(corpus_dir, tmp_path):
    base = _base(corpus_dir)
    serial = train(tmp_path, "serial", 1, *base, *LAYOUTS["serial"][1], f"train.out_dir={tmp_path / 's'}")
    run = tmp_path / "run"
    first = train(tmp_path, "a", 4, *base, *LAYOUTS["cp2dp2_zero1"][1], f"train.out_dir={run}",
                  "train.exit_interval=4")
    want = stored(run / "checkpoints" / "step_00000004")
    second = train(tmp_path, "b", 4, *base, *LAYOUTS["tp2cp2_sp"][1], f"train.out_dir={run}",
                   f"--copy-to={tmp_path / 'loaded'}")
    assert second["resumed"] and second["start"] == {"step": 4, "cursor": 32}
    assert first["train_loss"] + second["train_loss"] == pytest.approx(serial["train_loss"], rel=1e-5)
    resumed, straight = dict(first["val_loss"] + second["val_loss"]), dict(serial["val_loss"])
    steps = sorted(set(resumed) & set(straight))
    assert 8 in steps and [resumed[s] for s in steps] == pytest.approx([straight[s] for s in steps], rel=1e-5)
    got = stored(CheckpointManager(tmp_path / "loaded" / "checkpoints").latest())
    assert set(got) == set(want) and any(k.startswith("optim/exp_avg/") for k in want)
    for key, t in want.items():
        assert torch.equal(got[key], t), f"{key} changed by resuming at another cp size"


@pytest.mark.slow
def test_cp_ring_stop_and_resume_is_bit_identical(corpus_dir, tmp_path):
    n, o = LAYOUTS["cp2_ring"]
    # train.sample_tokens: the end-of-run sample decodes whole sequences on every cp rank
    base = _base(corpus_dir) + o + ["train.sample_tokens=6"]
    straight = train(tmp_path, "s", n, *base, f"train.out_dir={tmp_path / 's'}")
    first = train(tmp_path, "a", n, *base, f"train.out_dir={tmp_path / 'r'}", "train.exit_interval=4")
    second = train(tmp_path, "b", n, *base, f"train.out_dir={tmp_path / 'r'}")
    assert second["resumed"] and first["train_loss"] + second["train_loss"] == straight["train_loss"]
    assert straight["sample"] == second["sample"] and len(straight["sample"]) > 0  # same weights, same text
