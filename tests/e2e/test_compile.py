"""train.compile=true (parallel/compile.py): each transformer block's forward compiled by inductor
(gcc on CPU), against the same run uncompiled.

Tolerances. The compiled graphs compute the same ops in fp32, but inductor fuses them and may
reorder a reduction (the norms' means, the softmax sums, a bias gradient's sum over tokens): float32
rounding, ~1e-7 relative per op. Measured on the tiny model: gradients within 1.3e-6 of each
tensor's largest entry, losses equal or within 1 ulp, grad norms within 1e-7 relative. So 1e-5
relative (the data-parallel tests' bound for another summation order) on losses and norms, 1e-5 of a
tensor's largest entry on gradients. Weights after a few AdamW steps as the data-parallel tests
compare them (1e-4 relative, 1e-5 absolute): AdamW divides by the gradient's own scale, so an entry
whose gradient is rounding noise steps by a fraction of lr (3e-3) either way (measured: 2.5e-6 on a
bias). A lost or wrong dropout mask, a missed gradient or a hook that ran inside the graph moves
them by O(1): the norms by ~2x, the weights by lr per step. Dropout is on everywhere: compile must draw the
masks an uncompiled run draws (fallback_random; the masks' RNG code runs eagerly), and a resumed
compiled run must equal an uninterrupted one bit for bit, like every other run.

Compile time dominates (tens of seconds on one CPU core for a cold cache): inductor's compiled code
is cached on disk (TORCHINDUCTOR_CACHE_DIR, a fixed directory reused across runs, like DeepSpeed's
ops), and one compile serves every block and every trainer of a process (dynamo's cache is on the
block's code)."""

import contextlib
import os

import pytest
import torch

from megatron_lite.config import Config
from megatron_lite.errors import LayoutError
from megatron_lite.layout import Layout
from megatron_lite.testing import run_ranks, tiny_overrides
from megatron_lite.train import Trainer

CACHE = os.path.expanduser("~/.cache/megatron_lite/inductor")
REL = 1e-5  # see the module docstring


@pytest.fixture
def inductor(monkeypatch):
    """A fixed on-disk cache for inductor (spawned ranks inherit it), and a fresh dynamo: graphs
    compiled by earlier tests of the session would count against dynamo's recompile limit, past
    which it silently runs the block uncompiled."""
    if "TORCHINDUCTOR_CACHE_DIR" not in os.environ:
        monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", CACHE)
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    yield
    torch._dynamo.reset()


def _assert_close_to(got: torch.Tensor, want: torch.Tensor, what: str) -> None:
    """Within REL of the tensor's largest entry (module docstring)."""
    scale = want.abs().max().item()
    diff = (got.float() - want.float()).abs().max().item()
    assert diff <= REL * max(scale, 1e-12), f"{what}: {diff} against {scale}"


def test_compile_is_refused_on_a_torch_without_module_inlining(tiny_config, monkeypatch):
    monkeypatch.setattr(torch, "__version__", "2.4.1+cpu")
    with pytest.raises(LayoutError, match=r"^train\.compile=true needs torch >= 2\.5 .*torch 2\.4\.1\+cpu is "
                                          r"installed; upgrade torch or set train\.compile=false\.$"):
        Layout.build(tiny_config("train.compile=true"))
    Layout.build(tiny_config("train.compile=false"))  # without compile, torch 2.4 is fine


def _assert_compiled_resume_is_exact(tiny_config, common, out, stop: int, straight, losses) -> None:
    """A compiled run stopped after `stop` steps and resumed in a new Trainer: the same train losses
    (exact float equality) and weights as `straight`, the uninterrupted compiled run."""
    first = Trainer(tiny_config(*common, "train.compile=true", f"train.out_dir={out}",
                                f"train.exit_interval={stop}"))
    part1 = first.fit()["train_loss"]
    second = Trainer(tiny_config(*common, "train.compile=true", f"train.out_dir={out}"))
    assert second.resumed_from is not None and second.state.step == stop
    part2 = second.fit()["train_loss"]
    assert part1 + part2 == losses  # exact float equality
    for a, b in zip(straight.model.parameters(), second.model.parameters(), strict=True):
        assert torch.equal(a, b)


@pytest.mark.slow
def test_compiled_serial_matches_uncompiled_and_resumes_bit_exact(tiny_config, tmp_path, inductor, caplog):
    # selective recompute: the norms and the activation rerun (Recomputed), and the attention, which
    # checkpoints its core under dropout on CPU, stays eager inside the compiled block
    common = ["model.dropout=0.1", "train.grad_accum=2", "train.recompute=selective", "train.steps=6",
              "train.eval_interval=3", "optim.warmup_steps=2", "log.interval=3"]

    # One backward on the same batch: gradients
    grads = {}
    for flag in ("false", "true"):
        t = Trainer(tiny_config(*common, f"train.compile={flag}", f"train.out_dir={tmp_path / ('g' + flag)}"))
        x, y = t.train_data.batch(0, 4)
        torch.manual_seed(7)  # the same dropout masks in both
        _, loss = t.model(x, y)
        loss.backward()
        grads[flag] = loss.item(), {n: p.grad.clone() for n, p in t.model.named_parameters()}
        t.close()
    (loss_e, g_e), (loss_c, g_c) = grads["false"], grads["true"]
    assert loss_c == pytest.approx(loss_e, rel=REL)
    assert g_c.keys() == g_e.keys() and len(g_e) > 10
    for name in g_e:
        _assert_close_to(g_c[name], g_e[name], name)
    stats = torch._dynamo.utils.counters["stats"]
    assert stats["unique_graphs"] > 0  # compiled, not silently eager

    # Six steps: losses, norms (through the run) and the final weights
    eager = Trainer(tiny_config(*common, f"train.out_dir={tmp_path / 'eager'}"))
    want = eager.fit()
    with caplog.at_level("INFO", logger="megatron_lite"):
        straight = Trainer(tiny_config(*common, "train.compile=true", f"train.out_dir={tmp_path / 'a'}"))
    assert any("train.compile: torch.compile (inductor, cpu) on each of this rank's 2 transformer blocks"
               in r.getMessage() for r in caplog.records)
    got = straight.fit()
    assert got["train_loss"] == pytest.approx(want["train_loss"], rel=REL)
    assert [v for _, v in got["val_loss"]] == pytest.approx([v for _, v in want["val_loss"]], rel=REL)
    for (name, a), b in zip(eager.model.named_parameters(), straight.model.parameters(), strict=True):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-5, msg=lambda e, name=name: f"{name} {e}")

    # Resume: 3 steps, stop, 3 more == 6 straight, bit for bit (dropout RNG and cursor restored)
    _assert_compiled_resume_is_exact(tiny_config, common, tmp_path / "b", 3, straight, got["train_loss"])


MOE = ["model.moe.num_experts=4", "model.moe.top_k=2", "model.moe.intermediate_size=32",
       "model.moe.num_shared_experts=1", "model.moe.layer_freq=2", "model.moe.aux_loss_coeff=0.01",
       "model.moe.z_loss_coeff=0.001", "model.moe.bias_update_rate=0.01", "model.activation=swiglu"]


@pytest.mark.slow
def test_compiled_moe_matches_uncompiled_and_resumes_bit_exact(tiny_config, tmp_path, inductor):
    """A mixture of experts under train.compile: the MoE MLP stays eager inside the compiled block
    (data-dependent shapes, its router metrics), the attention and norms around it compiled; the
    same losses, norms, router metrics and weights (balancing bias included) as uncompiled, and a
    compiled resume equal to the uninterrupted run bit for bit."""
    common = [*MOE, "model.dropout=0.1", "train.grad_accum=2", "train.steps=4", "train.eval_interval=2",
              "optim.warmup_steps=2", "log.interval=2"]
    runs = {}
    for flag in ("false", "true"):
        t = Trainer(tiny_config(*common, f"train.compile={flag}", f"train.out_dir={tmp_path / flag}"))
        rows = [t.train_step() for _ in range(4)]
        runs[flag] = t, [(r.loss, r.grad_norm) for r in rows], t.backend.router_metrics()
    (eager, want, want_moe), (compiled, got, got_moe) = runs["false"], runs["true"]
    for (gl, gn), (wl, wn) in zip(got, want, strict=True):
        assert gl == pytest.approx(wl, rel=REL) and gn == pytest.approx(wn, rel=REL), (got, want)
    assert got_moe.keys() == want_moe.keys() and "moe/aux_loss" in got_moe
    for k in want_moe:
        assert got_moe[k] == pytest.approx(want_moe[k], rel=1e-4), k
    for (name, a), b in zip(eager.model.named_parameters(), compiled.model.parameters(), strict=True):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-5, msg=lambda e, name=name: f"{name} {e}")
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] > 0  # compiled, not silently eager
    straight = Trainer(tiny_config(*common, "train.compile=true", f"train.out_dir={tmp_path / 'a'}"))
    _assert_compiled_resume_is_exact(tiny_config, common, tmp_path / "b", 2, straight,
                                     straight.fit()["train_loss"])


STEPS = 3
# Each with dropout: tp=2 with sequence parallelism (collectives inside the block, the tp RNG
# stream), dp=2 with ZeRO-3 and full recompute (hooks gather and free the block's weights around
# the compiled forward, checkpoint() reruns it in backward), pp=2 (a stage's blocks).
LAYOUTS = [
    ("parallel.tp=2", "parallel.sequence_parallel=true"),
    ("parallel.dp=2", "optim.zero.stage=3", "train.recompute=full"),
    ("parallel.pp=2", "train.grad_accum=2"),
]


def _compare_layouts(rank, world, data_dir, out):
    from megatron_lite.distributed.env import RunEnv
    env = RunEnv(rank=rank, world_size=world, local_rank=rank, local_world_size=world, source="explicit")
    for layout in LAYOUTS:
        runs = {}
        for flag in ("false", "true"):
            cfg = Config.from_yaml(None, tiny_overrides(
                data_dir, "model.dropout=0.1", "train.steps=6", "optim.warmup_steps=2", *layout,
                f"train.compile={flag}", f"train.out_dir={out}/{'_'.join(layout)}_{flag}"))
            t = Trainer(cfg, env)
            runs[flag] = t, [(r.loss, r.grad_norm) for r in (t.train_step() for _ in range(STEPS))]
            t.backend.settle()
        (eager, want), (compiled, got) = runs["false"], runs["true"]
        where = f"{layout} rank {rank}"
        for (gl, gn), (wl, wn) in zip(got, want, strict=True):
            assert gl == pytest.approx(wl, rel=REL), (where, got, want)
            assert gn == pytest.approx(wn, rel=REL), (where, got, want)
        with contextlib.ExitStack() as held:  # ZeRO-3 holds shards between steps: gather them to compare
            for t in (eager, compiled):
                if t.cfg.optim.zero.stage == 3:
                    held.enter_context(t.backend.optimizer.full_weights())
            for (name, a), b in zip(eager.model.named_parameters(), compiled.model.parameters(), strict=True):
                torch.testing.assert_close(b.detach().float(), a.detach().float(), rtol=1e-4, atol=1e-5,
                                           msg=lambda e, name=name, where=where: f"{where} {name} {e}")
        eager.close()
        compiled.close()
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] > 0


@pytest.mark.slow
def test_compiled_tp2_dp2_zero3_pp2_match_uncompiled(corpus_dir, tmp_path, inductor):
    run_ranks(_compare_layouts, 2, str(corpus_dir), str(tmp_path))
