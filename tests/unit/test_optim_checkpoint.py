"""LR schedule, weight-decay groups, and atomic checkpoint commit/verify/prune."""

import pytest
import torch

from megatron_lite.checkpoint import CheckpointError, CheckpointManager, Stateful, TrainState, resolve, verify
from megatron_lite.config import ModelConfig, OptimConfig
from megatron_lite.model import GPT
from megatron_lite.optim import build_optimizer, lr_at


def test_lr_schedule_warmup_then_cosine_to_min():
    cfg = OptimConfig(lr=1.0, min_lr=0.1, warmup_steps=10)
    lrs = [lr_at(s, cfg, total_steps=110) for s in range(130)]
    assert lrs[0] == pytest.approx(0.1) and lrs[9] == pytest.approx(1.0)
    assert all(a < b for a, b in zip(lrs[:9], lrs[1:10], strict=True))  # warmup rises
    assert all(a >= b for a, b in zip(lrs[10:110], lrs[11:111], strict=True))  # cosine falls
    assert lrs[60] == pytest.approx(0.55)  # halfway through the decay: the midpoint
    assert lrs[110] == lrs[129] == pytest.approx(0.1)


def test_no_weight_decay_on_norms_and_biases():
    model = GPT(ModelConfig(vocab_size=50, hidden_size=16, num_layers=2, num_attention_heads=2,
                            max_sequence_length=8), seed=0)
    opt = build_optimizer(model, OptimConfig(weight_decay=0.1))
    names = {id(p): n for n, p in model.named_parameters()}
    decay, no_decay = ({names[id(p)] for p in g["params"]} for g in opt.param_groups)
    assert opt.param_groups[0]["weight_decay"] == 0.1 and opt.param_groups[1]["weight_decay"] == 0.0
    assert all(("ln" in n or n.endswith("bias")) for n in no_decay)
    assert {"tok_emb.weight", "blocks.0.attn.qkv.weight", "blocks.1.mlp.fc2.weight"} <= decay
    assert len(decay) + len(no_decay) == len(names)  # tied lm_head counted once


def test_adamw_is_fused_where_torch_has_the_kernel_and_a_checkpoint_keeps_that_choice():
    """optim/adamw.py: fused AdamW on this CPU (torch >= 2.4), the same update as torch's default
    loop to fp32 rounding; a checkpoint saved by the default implementation (an older run) loads into
    a fused optimizer that stays fused, and a fused run's into one without a kernel stays unfused."""
    from megatron_lite.optim.adamw import fused_adamw, make_adamw
    assert fused_adamw("cpu") and fused_adamw("cuda")
    weights = [torch.nn.Parameter(torch.randn(64, 32, generator=torch.Generator().manual_seed(i)))
               for i in range(2)]
    ours = make_adamw([{"params": [weights[0]]}], OptimConfig())
    default = torch.optim.AdamW([weights[1]], lr=OptimConfig().lr, betas=(0.9, 0.95), eps=1e-8)
    assert ours.param_groups[0]["fused"] and not default.param_groups[0]["fused"]
    with torch.no_grad():
        weights[1].copy_(weights[0])
    for step in range(3):
        g = torch.randn(64, 32, generator=torch.Generator().manual_seed(10 + step))
        weights[0].grad, weights[1].grad = g.clone(), g.clone()
        ours.step()
        default.step()
    torch.testing.assert_close(weights[0], weights[1], rtol=1e-6, atol=1e-7)
    ours.load_state_dict(default.state_dict())  # saved with fused None
    assert ours.param_groups[0]["fused"] is True
    ours.step()
    # a device without the kernel (meta stands in): unfused, and a fused run's state keeps it so
    meta = torch.nn.Parameter(torch.empty(64, 32, device="meta"))
    unfused = make_adamw([{"params": [meta]}], OptimConfig())
    assert unfused.param_groups[0]["fused"] is None
    unfused.load_state_dict(ours.state_dict())
    assert unfused.param_groups[0]["fused"] is None


def _setup(seed=0):
    model = GPT(ModelConfig(vocab_size=50, hidden_size=16, num_layers=1, num_attention_heads=2,
                            max_sequence_length=8), seed=seed)
    opt = build_optimizer(model, OptimConfig())
    ids = torch.randint(0, 50, (2, 8))
    model(ids, ids)[1].backward()
    opt.step()
    return model, opt


def test_save_load_round_trip_and_prune(tmp_path):
    model, opt = _setup()
    mgr = CheckpointManager(tmp_path / "ck", keep=2)
    for step in (1, 2, 3):
        mgr.save(step, Stateful(model, opt), TrainState(step=step, cursor=10 * step), "model: {}\n")
    assert [p.name for p in mgr.committed()] == ["step_00000002", "step_00000003"]
    assert mgr.latest().name == "step_00000003" and resolve(tmp_path / "ck") == mgr.latest()
    other, other_opt = _setup(seed=9)
    state = TrainState()
    mgr.load(mgr.latest(), Stateful(other, other_opt), state)
    assert state.step == 3 and state.cursor == 30
    for a, b in zip(model.parameters(), other.parameters(), strict=True):
        assert torch.equal(a, b)
    sa, sb = opt.state_dict()["state"], other_opt.state_dict()["state"]
    for k in sa:
        assert torch.equal(sa[k]["exp_avg_sq"], sb[k]["exp_avg_sq"])


def test_a_crash_mid_save_never_replaces_the_good_checkpoint(tmp_path, monkeypatch):
    model, opt = _setup()
    mgr = CheckpointManager(tmp_path / "ck")
    good = mgr.save(5, Stateful(model, opt), TrainState(step=5), "x: 1\n")
    import safetensors.torch

    def exploding_save(*a, **k):
        raise OSError("disk full")
    monkeypatch.setattr(safetensors.torch, "save_file", exploding_save)
    with pytest.raises(OSError, match="disk full"):
        mgr.save(6, Stateful(model, opt), TrainState(step=6), "x: 1\n")
    assert mgr.latest() == good
    # No temporary directory is left behind either.
    assert sorted(p.name for p in (tmp_path / "ck").iterdir()) == ["latest", "step_00000005"]


def test_corruption_is_reported_in_one_sentence(tmp_path):
    model, opt = _setup()
    mgr = CheckpointManager(tmp_path / "ck")
    path = mgr.save(1, Stateful(model, opt), TrainState(step=1), "x: 1\n")
    shard = next(path.glob("*.safetensors"))
    shard.write_bytes(shard.read_bytes()[:-7])
    with pytest.raises(CheckpointError, match="wrong size.*delete"):
        verify(path)
    with pytest.raises(CheckpointError, match="no committed checkpoint"):
        resolve(tmp_path / "elsewhere")


def test_cpu_checkpoint_resumes_where_cuda_rng_exists(tmp_path, monkeypatch):
    """A checkpoint saved without CUDA loads into a process that has CUDA RNG state."""
    model, opt = _setup()
    mgr = CheckpointManager(tmp_path / "ck")
    path = mgr.save(4, Stateful(model, opt), TrainState(step=4, cursor=8), "x: 1\n")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_rng_state", lambda: torch.zeros(16, dtype=torch.uint8))
    state = TrainState()
    mgr.load(path, Stateful(model, opt), state)
    assert (state.step, state.cursor) == (4, 8)
