"""Mixture-of-experts training (model.moe) through the Trainer: data parallelism (plain, native
ZeRO-1 and ZeRO-3) against serial training on the same global batch, with the balancing and z
losses on (their gradient scaled as the main loss is, 1 / micro-batches), shared experts, MoE every
other block and the auxiliary-loss-free bias moved by the load summed over the data-parallel ranks:
the same losses, grad norms (clipping engaged) and final weights, biases included (test_data_parallel's
check, fp32 tolerances); the router metrics global over the ranks; exact resume."""

import pytest
import torch

from megatron_lite.testing import run_ranks, spawn_json
from tests.dist.test_data_parallel import _check, _config, _env, _run

MOE = ("model.moe.num_experts=4", "model.moe.top_k=2", "model.moe.intermediate_size=32",
       "model.moe.num_shared_experts=1", "model.moe.layer_freq=2", "model.moe.aux_loss_coeff=0.05",
       "model.moe.z_loss_coeff=0.001", "model.moe.bias_update_rate=0.01", "model.activation=swiglu")


def _metrics(rank, world, data_dir, out):
    """Router metrics since the start (no log step in between): every rank's equal to the serial
    run's over the same global batches, whether the tokens are split over dp (and their experts over
    ep) or the MoE layers over pipeline stages."""
    torch.manual_seed(0)
    serial = _config(data_dir, f"{out}/serial{rank}", "train.grad_accum=4", *MOE)
    trainer, _ = _run(serial)
    want = trainer.backend.router_metrics()
    for extra in (("train.grad_accum=2", "parallel.dp=2", "parallel.ep=2"), ("train.grad_accum=4", "parallel.pp=2"),
                  ("train.grad_accum=4", "parallel.tp=2", "parallel.sequence_parallel=true")):
        cfg = _config(data_dir, f"{out}/{'_'.join(extra)}", *extra, *MOE)
        trainer, _ = _run(cfg, _env(rank, world))
        got = trainer.backend.router_metrics()
        assert set(got) == set(want) and "moe/layer2/load_max_over_mean" in got, (extra, got)
        for k in want:
            assert got[k] == pytest.approx(want[k], rel=1e-5), (extra, k)
        moved = [m.expert_bias.abs().sum() > 0 for m in trainer.model.modules() if hasattr(m, "expert_bias")]
        assert moved and all(moved)


def test_moe_dp2_plain_zero1_zero3_match_serial(corpus_dir, tmp_path):
    run_ranks(_check, 2, str(corpus_dir), str(tmp_path),
              [("parallel.dp=2",), ("parallel.dp=2", "optim.zero.stage=1"),
               ("parallel.dp=2", "optim.zero.stage=3")], MOE)


def test_moe_expert_parallel_ep2_plain_zero1_zero3_recompute_match_serial(corpus_dir, tmp_path):
    """parallel.ep=2 over dp2: each rank holds 2 of the 4 experts, tokens travel by all-to-all; the
    expert-data-parallel group has one rank (experts reduced nowhere, divided by dp). Under full
    recompute the block's forward, all-to-alls included, runs again inside the backward on every rank."""
    run_ranks(_check, 2, str(corpus_dir), str(tmp_path),
              [("parallel.dp=2", "parallel.ep=2"), ("parallel.dp=2", "parallel.ep=2", "optim.zero.stage=1"),
               ("parallel.dp=2", "parallel.ep=2", "optim.zero.stage=3"),
               ("parallel.dp=2", "parallel.ep=2", "optim.zero.stage=1", "train.recompute=full")], MOE)


def test_moe_context_parallel_with_and_without_ep_matches_serial(corpus_dir, tmp_path):
    """cp2: each rank routes its half of every sequence; the balancing loss counts the assignments of
    the whole sequences (summed over cp) against this rank's mean scores, so its gradient, averaged
    over dp x cp as every gradient is, is the serial one. With ep2 the two cp ranks split the experts
    (the expert-parallel group is carved from dp x cp)."""
    run_ranks(_check, 2, str(corpus_dir), str(tmp_path),
              [("parallel.dp=1", "parallel.cp=2"), ("parallel.dp=1", "parallel.cp=2", "parallel.ep=2"),
               ("parallel.dp=1", "parallel.cp=2", "parallel.cp_algorithm=ring", "parallel.ep=2",
                "optim.zero.stage=1")], MOE)


def test_moe_sequence_parallel_matches_serial(corpus_dir, tmp_path):
    """tp2 with sequence parallelism: each tp rank routes and computes its half of every sequence
    through the replicated experts (no collective around the MoE block); the MoE parameters'
    gradients are summed over tp, the balancing loss counts both halves' assignments and its and the
    z-loss's gradients are weighted 1/tp; the bias moves by the load summed over tp. Plain, under
    ZeRO-1 with full recompute (the block, its count all-reduce included, again in backward), and
    bf16-free fp32 throughout."""
    run_ranks(_check, 2, str(corpus_dir), str(tmp_path),
              [("parallel.dp=1", "parallel.tp=2", "parallel.sequence_parallel=true"),
               ("parallel.dp=1", "parallel.tp=2", "parallel.sequence_parallel=true", "optim.zero.stage=1",
                "train.recompute=full")], MOE)


@pytest.mark.slow
def test_moe_expert_parallel_over_four_ranks_matches_serial(corpus_dir, tmp_path):
    """dp4 with ep2 (two replicas of each half of the experts: their gradients reduced and their ZeRO
    state sharded over the expert-data-parallel pair) under ZeRO-1, -2 and -3; dp4 with ep4 (one
    expert per rank); ep2 with tp2 (the MoE block whole on each tp rank; with sequence parallelism
    each tp rank's own tokens dispatched within its ep group) and with pp2 (one MoE block per stage:
    the auxiliary losses' gradient scale and the bias update per stage), tp2 + SP with pp2; and the
    capacity-factor mode under ep2, which must drop the tokens serial drops
    (the drop is decided on the token's own rank, before the all-to-all; about 14% of the assignments
    are dropped here)."""
    run_ranks(_check, 4, str(corpus_dir), str(tmp_path),
              [("parallel.dp=4", "parallel.ep=2", "optim.zero.stage=1"),
               ("parallel.dp=4", "parallel.ep=2", "optim.zero.stage=2", "optim.zero.bucket_elements=700"),
               ("parallel.dp=4", "parallel.ep=2", "optim.zero.stage=3"),
               ("parallel.dp=4", "parallel.ep=4"),
               ("parallel.dp=2", "parallel.cp=2", "parallel.ep=4", "optim.zero.stage=1")], MOE)
    run_ranks(_check, 4, str(corpus_dir), str(tmp_path / "composed"),
              [("parallel.dp=2", "parallel.ep=2", "parallel.tp=2", "optim.zero.stage=1"),
               ("parallel.dp=2", "parallel.ep=2", "parallel.tp=2", "parallel.sequence_parallel=true",
                "optim.zero.stage=3"),
               ("parallel.dp=2", "parallel.ep=2", "parallel.pp=2", "optim.zero.stage=1"),
               ("parallel.dp=1", "parallel.tp=2", "parallel.sequence_parallel=true", "parallel.pp=2")], MOE)
    run_ranks(_check, 2, str(corpus_dir), str(tmp_path / "capacity"),
              [("parallel.dp=2", "parallel.ep=2", "optim.zero.stage=1")], MOE + ("model.moe.capacity_factor=1.0",))


def test_moe_router_metrics_are_global_over_dp_ep_pp_and_sequence_parallel_tp(corpus_dir, tmp_path):
    run_ranks(_metrics, 2, str(corpus_dir), str(tmp_path))


@pytest.mark.slow
def test_moe_dp2_stop_and_resume_is_bit_identical_and_logs_router_metrics(corpus_dir, tmp_path):
    """A dp2 ZeRO-1 MoE run stopped at step 4 and resumed equals the straight run bit for bit (the
    balancing bias is in the checkpoint); resumed on one process it continues with the serial losses;
    metrics.jsonl carries the router metrics at every log step."""
    import json

    from megatron_lite.testing import tiny_overrides
    from tests.dist.test_tp_train import train, train_serial
    base = tiny_overrides(corpus_dir, *MOE, "train.steps=8", "checkpoint.interval=4", "train.eval_interval=4",
                          "train.eval_iters=2", "optim.warmup_steps=2", "optim.decay_steps=12", "log.interval=2",
                          "data.micro_batch_size=2")
    dp = ["parallel.dp=2", "optim.zero.stage=1", "train.grad_accum=2"]
    straight = train(tmp_path, "s", 2, *base, *dp, f"train.out_dir={tmp_path / 's'}")
    first = train(tmp_path, "a", 2, *base, *dp, f"train.out_dir={tmp_path / 'r'}", "train.exit_interval=4")
    second = train(tmp_path, "b", 2, *base, *dp, f"train.out_dir={tmp_path / 'r'}")
    assert second["resumed"] and first["train_loss"] + second["train_loss"] == straight["train_loss"]
    serial = ["train.grad_accum=4", "train.steps=12"]
    resumed = train_serial(tmp_path, "c", *base, *serial, f"train.out_dir={tmp_path / 'r'}")
    assert resumed["resumed"] and resumed["start"]["step"] == 8
    reference = train_serial(tmp_path, "d", *base, *serial, f"train.out_dir={tmp_path / 'd'}")
    losses = first["train_loss"] + second["train_loss"] + resumed["train_loss"]
    assert losses == pytest.approx(reference["train_loss"], rel=1e-5)
    rows = [json.loads(line) for line in (tmp_path / "s" / "metrics.jsonl").read_text().splitlines()]
    logged = [r for r in rows if "moe/load_max_over_mean" in r]
    assert len(logged) == 4 and all(r["moe/aux_loss"] > 0 and r["moe/dropped"] == 0 for r in logged)
    assert all(1.0 <= r["moe/layer0/load_max_over_mean"] <= 4.0 for r in logged)  # 2 blocks: MoE, MLP


@pytest.mark.slow
def test_moe_resume_reshards_ep4_to_ep2_to_serial_exactly(corpus_dir, tmp_path):
    """4 steps at ep4 (dp4, ZeRO-1), resumed at ep2 (dp2, ZeRO-3) for 4 more, then serially for the
    last 4: the 12 losses equal an uninterrupted serial run's (fp32, rel 1e-5), and each resume
    loads exactly what the previous layout saved (every expert once under its serial name, its AdamW
    moments and the balancing biases, consolidated: bit for bit). cp2 x ep2 stopped and resumed
    equals its straight run bit for bit, and the serial losses."""
    from megatron_lite.checkpoint import CheckpointManager
    from megatron_lite.testing import tiny_overrides
    from tests.dist.test_reshard import stored
    from tests.dist.test_tp_train import train, train_serial
    base = tiny_overrides(corpus_dir, *MOE, "train.steps=12", "checkpoint.interval=4", "train.eval_interval=100",
                          "train.eval_iters=2", "optim.warmup_steps=2", "optim.grad_clip=0.5", "log.interval=1",
                          "data.micro_batch_size=2")
    ep4 = ["parallel.dp=4", "parallel.ep=4", "optim.zero.stage=1", "train.grad_accum=1"]
    ep2 = ["parallel.dp=2", "parallel.ep=2", "optim.zero.stage=3", "train.grad_accum=2"]
    serial = ["train.grad_accum=4"]
    run = tmp_path / "run"
    reference = train_serial(tmp_path, "ref", *base, *serial, f"train.out_dir={tmp_path / 'ref'}")
    first = train(tmp_path, "a", 4, *base, *ep4, f"train.out_dir={run}", "train.exit_interval=4")
    saved4 = stored(run / "checkpoints" / "step_00000004")
    assert saved4["model/blocks.0.mlp.experts.fc1"].shape[0] == 4  # every expert, once
    second = train(tmp_path, "b", 2, *base, *ep2, f"train.out_dir={run}", "train.exit_interval=4",
                   f"--copy-to={tmp_path / 'loaded2'}")
    saved8 = stored(run / "checkpoints" / "step_00000008")
    third = train_serial(tmp_path, "c", *base, *serial, f"train.out_dir={run}", f"--copy-to={tmp_path / 'loaded1'}")
    for loaded, want in (("loaded2", saved4), ("loaded1", saved8)):
        got = stored(CheckpointManager(tmp_path / loaded / "checkpoints").latest())
        assert set(got) == set(want) and "optim/exp_avg/blocks.0.mlp.experts.fc2" in want
        for key, t in want.items():
            assert torch.equal(got[key], t), f"{loaded}: {key} changed by the reshard"
    assert second["start"] == {"step": 4, "cursor": 32} and third["start"] == {"step": 8, "cursor": 64}
    losses = first["train_loss"] + second["train_loss"] + third["train_loss"]
    assert losses == pytest.approx(reference["train_loss"], rel=1e-5)
    # context-parallel ranks holding different experts (ep carved from dp x cp): the writer of each
    # expert slice is its first holder, whatever its cp rank
    cp_ep = ["parallel.cp=2", "parallel.ep=2", "optim.zero.stage=1", "train.grad_accum=4"]
    straight = train(tmp_path, "s", 2, *base, *cp_ep, f"train.out_dir={tmp_path / 's'}")
    stop = train(tmp_path, "s1", 2, *base, *cp_ep, f"train.out_dir={tmp_path / 'r'}", "train.exit_interval=4")
    resume = train(tmp_path, "s2", 2, *base, *cp_ep, f"train.out_dir={tmp_path / 'r'}")
    assert resume["resumed"] and stop["train_loss"] + resume["train_loss"] == straight["train_loss"]
    assert straight["train_loss"] == pytest.approx(reference["train_loss"], rel=1e-5)


def _plan_state(rank, world, data_dir, out, extra):
    """plan's model state of this layout against what the distributed optimizer holds (rank 0)."""
    from megatron_lite.plan.memory import model_state
    got = {}
    for i, more in enumerate(extra):
        cfg = _config(data_dir, f"{out}/{i}", *MOE, "train.precision=bf16", "optim.zero.bucket_elements=3000",
                      *more)
        trainer, _ = _run(cfg, _env(rank, world))
        trainer.backend.settle()
        held = trainer.backend.optimizer.state_bytes()
        st = model_state(trainer.layout, 0, trainer.coord.dp, "cpu")
        got[" ".join(more)] = {"held": held, "plan": [st.weights, st.grads, st.optimizer]}
    return got


def test_plan_model_state_of_expert_parallel_layouts_is_the_optimizers(corpus_dir, tmp_path):
    """plan's weights, main gradients and optimizer bytes per rank (experts' buckets apart, sharded over
    the ranks holding the same experts) equal DistributedOptimizer.state_bytes() of the real layout,
    bf16, small buckets: ep2 over dp2 (experts held whole by their one holder) under ZeRO-1 and -3."""
    layouts = [("parallel.dp=2", "parallel.ep=2", "optim.zero.stage=1", "train.grad_accum=2"),
               ("parallel.dp=2", "parallel.ep=2", "optim.zero.stage=3", "train.grad_accum=2"),
               ("parallel.dp=2", "optim.zero.stage=2", "train.grad_accum=2")]
    for name, r in spawn_json(_plan_state, 2, str(corpus_dir), str(tmp_path), layouts).items():
        held, (weights, grads, optimizer) = r["held"], r["plan"]
        assert (weights, grads) == (held["weights"], held["grads"]), name
        assert optimizer == held["master"] + held["moments"], name
