"""DeepSpeed ZeRO stages 1-3 as the optimizer of our model, over the data-parallel group only,
composed with our tensor parallelism (stages 1-3: ZeRO-3 partitions the tensor-parallel shards) and
pipeline parallelism (stage 1): five AdamW steps match serial training on the same global
batch (losses, clipped grad norms, final weights). fp32; DeepSpeed sums gradients in its own
bucket order, so rounding-level tolerances (1e-5 relative). Needs the DeepSpeed extra."""

import os

import pytest
import torch

pytest.importorskip("deepspeed")
os.environ.setdefault("DS_ACCELERATOR", "cpu")

from megatron_lite.testing import run_ranks  # noqa: E402
from tests.dist.test_data_parallel import _check  # noqa: E402

DS = "optim.zero.backend=deepspeed"


@pytest.mark.slow
def test_deepspeed_zero_stages_dp2(corpus_dir, tmp_path):
    run_ranks(_check, 2, str(corpus_dir), str(tmp_path),
              [("parallel.dp=2", DS, f"optim.zero.stage={s}") for s in (1, 2, 3)])


@pytest.mark.slow
def test_deepspeed_zero_with_tensor_and_pipeline_parallel(corpus_dir, tmp_path):
    run_ranks(_check, 4, str(corpus_dir), str(tmp_path),
              [("parallel.dp=2", "parallel.tp=2", DS, f"optim.zero.stage={s}") for s in (1, 2, 3)] +
              [("parallel.dp=2", "parallel.pp=2", DS, "optim.zero.stage=1")])


def _inner_state(trainer) -> dict[str, torch.Tensor]:
    """Every tensor DeepSpeed's update would touch on this rank: the model's weights, the fp32
    master partitions and the AdamW moments/step of the optimizer inside its ZeRO wrapper."""
    ds = trainer.backend.ds
    out = {f"model.{n}": p.detach().clone() for n, p in trainer.model.named_parameters()}
    zero = ds.optimizer  # ZeRO 1/2 and ZeRO 3 name their flat fp32 master partitions differently
    masters = getattr(zero, "single_partition_of_fp32_groups", None) or zero.fp32_partitioned_groups_flat
    for i, p in enumerate(masters):
        out[f"master.{i}"] = p.detach().clone()
    for i, state in enumerate(zero.optimizer.state.values()):  # AdamW's, keyed by those partitions
        for k, v in state.items():
            out[f"adam.{i}.{k}"] = v.detach().clone() if torch.is_tensor(v) else torch.tensor(v)
    assert any(k.startswith("adam.") for k in out), "no AdamW state found"
    return out


def _nonfinite(rank, world, data_dir, out, layouts):
    """Step 2's loss is NaN (NaN gradients), step 3's is +inf with *finite* gradients (the case
    DeepSpeed's own norm check cannot see): both skipped, every tensor bit-identical; step 4 trains."""
    from megatron_lite.train import Trainer
    from tests.dist.test_data_parallel import _config, _env
    for extra in layouts:
        dp = int(next(x for x in extra if x.startswith("parallel.dp=")).split("=")[1])
        trainer = Trainer(_config(data_dir, f"{out}/{'_'.join(extra)}", f"train.grad_accum={4 // dp}", *extra),
                          _env(rank, world))
        real, real_run = trainer.model.forward, trainer.model.run

        def spoil(loss, trainer=trainer):
            step = trainer.state.step + 1
            if step == 2:
                return loss * float("nan")
            return loss + float("inf") if step == 3 else loss  # inf: d(loss)/d(weights) stays finite

        def forward(ids, labels=None, cache=None, docs=None, real=real, spoil=spoil, model=trainer.model):
            logits, loss = real(ids, labels, cache, docs=docs)
            return logits, spoil(loss) if labels is not None and model.training else loss

        def run(x, layers, labels=None, first=True, last=True, docs=None, real_run=real_run, spoil=spoil,
                model=trainer.model):
            out = real_run(x, layers, labels, first=first, last=last, docs=docs)  # the engine's chunk call
            return (out[0], spoil(out[1])) if last and labels is not None and model.training else out
        trainer.model.forward, trainer.model.run = forward, run
        where = f"{extra} rank {rank}"
        r1 = trainer.train_step()
        assert not r1.skipped, where
        before = _inner_state(trainer)
        for _ in (2, 3):
            r = trainer.train_step()
            assert r.skipped, (where, r)
            after = _inner_state(trainer)
            for k, v in before.items():
                assert torch.equal(v, after[k]), f"{where}: {k} changed by a skipped step"
        r4 = trainer.train_step()
        assert not r4.skipped and r4.grad_norm > 0, where
        assert any(not torch.equal(v, _inner_state(trainer)[k]) for k, v in before.items()), where
        assert trainer.state.total_skips == 2 and trainer.state.consecutive_skips == 0, where


@pytest.mark.slow
def test_deepspeed_skipped_steps_leave_weights_and_optimizer_state_bit_identical(corpus_dir, tmp_path):
    run_ranks(_nonfinite, 2, str(corpus_dir), str(tmp_path),
              [("parallel.dp=2", DS, f"optim.zero.stage={s}") for s in (1, 2, 3)])


@pytest.mark.slow
def test_deepspeed_with_pipeline_skips_non_finite_steps(corpus_dir, tmp_path):
    run_ranks(_nonfinite, 4, str(corpus_dir), str(tmp_path), [("parallel.dp=2", "parallel.pp=2", DS,
                                                               "optim.zero.stage=1")])
