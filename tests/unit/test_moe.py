"""The serial mixture-of-experts block (model/moe.py) against plain per-token references: routing,
grouped experts, shared experts, capacity dropping, the balancing and z losses and the way their
gradient enters backward, the auxiliary-loss-free bias; its config and layout rules; FLOPs."""

import dataclasses
import math

import pytest
import torch
import torch.nn.functional as F

from megatron_lite.config import Config, ModelConfig, MoEConfig
from megatron_lite.errors import ConfigError, LayoutError
from megatron_lite.layout import Layout
from megatron_lite.model import GPT
from megatron_lite.model.counts import flops_per_token, mlp_flops, param_count
from megatron_lite.model.gpt import MLP
from megatron_lite.model.moe import MoE, RouterStats, shared_config


def _mc(**moe) -> ModelConfig:
    base = dict(num_experts=4, top_k=2)
    return ModelConfig(vocab_size=64, hidden_size=16, num_layers=2, num_attention_heads=2,
                       intermediate_size=24, max_sequence_length=16, activation="swiglu", norm="rmsnorm",
                       bias=False, position_embedding="rope", moe=MoEConfig(**{**base, **moe}))


def _moe(**moe) -> MoE:
    torch.manual_seed(0)
    mc = _mc(**moe)
    shared = shared_config(mc)
    layer = MoE(mc, 0, RouterStats(), MLP(shared) if shared else None)
    for p in layer.parameters():
        if p.requires_grad:
            torch.nn.init.normal_(p, std=0.3)
    return layer


def _expert(layer: MoE, e: int, x: torch.Tensor) -> torch.Tensor:
    gate, up = F.linear(x, layer.experts.fc1[e]).chunk(2, dim=-1)
    return F.linear(F.silu(gate) * up, layer.experts.fc2[e])


def _reference(layer: MoE, x: torch.Tensor, keep=None) -> torch.Tensor:
    """Token by token: the top_k experts by score, weighted by their renormalised scores."""
    flat = x.reshape(-1, x.shape[-1])
    out = []
    for n, t in enumerate(flat):
        logits = layer.router.weight @ t
        scores = torch.sigmoid(logits) if layer.sigmoid else torch.softmax(logits, -1)
        chosen = torch.topk(scores + layer.expert_bias, layer.top_k).indices
        w = scores[chosen]
        w = w / w.sum() if layer.norm_topk else w
        y = sum(w[j] * _expert(layer, int(e), t) * (1 if keep is None else keep[n][j])
                for j, e in enumerate(chosen))
        if layer.shared is not None:
            s = layer.shared(t[None])[0]
            y = y + (torch.sigmoid(layer.shared_gate(t)) * s if layer.shared_gate is not None else s)
        out.append(y)
    return torch.stack(out).view_as(x)


@pytest.mark.parametrize("moe", [dict(), dict(router="sigmoid"), dict(norm_topk_prob=False),
                                 dict(num_shared_experts=2),
                                 dict(num_shared_experts=1, shared_expert_gate=True), dict(top_k=1)],
                         ids=["softmax", "sigmoid", "unnormalised", "shared", "gated-shared", "top1"])
def test_moe_equals_the_per_token_reference(moe):
    layer = _moe(**moe).eval()
    x = torch.randn(3, 5, 16)
    torch.testing.assert_close(layer(x), _reference(layer, x), rtol=1e-5, atol=1e-6)


def test_the_bias_chooses_but_never_weighs():
    layer = _moe(bias_update_rate=0.1).eval()
    x = torch.randn(2, 8, 16)
    with torch.no_grad():
        layer.expert_bias.copy_(torch.tensor([5.0, 0.0, 0.0, -5.0]))  # expert 0 always, 3 never
    _, scores, chosen, weights = layer.route(x.reshape(-1, 16))
    assert (chosen == 0).any(dim=1).all() and not (chosen == 3).any()
    picked = scores.gather(1, chosen)
    torch.testing.assert_close(weights, picked / picked.sum(-1, keepdim=True))
    torch.testing.assert_close(layer(x), _reference(layer, x), rtol=1e-5, atol=1e-6)


def test_capacity_drops_in_token_order():
    """capacity = ceil(0.5 x 16 x 2 / 4) = 4 per expert: each expert takes its first 4 assignments
    in token order (then choice order); a dropped assignment adds nothing."""
    layer = _moe(capacity_factor=0.5).eval()
    x = torch.randn(2, 8, 16)
    _, _, chosen, _ = layer.route(x.reshape(-1, 16))
    seen, keep = {}, []
    for row in chosen.tolist():
        keep.append([])
        for e in row:
            seen[e] = seen.get(e, 0) + 1
            keep[-1].append(seen[e] <= 4)
    assert torch.equal(layer.keep_mask(chosen), torch.tensor(keep))
    assert not all(all(k) for k in keep)  # something was dropped
    torch.testing.assert_close(layer(x), _reference(layer, x, keep), rtol=1e-5, atol=1e-6)
    layer.train()
    layer(x)
    metrics = layer.stats.take()
    assert metrics["moe/dropped"] == pytest.approx(sum(not k for r in keep for k in r) / 32)


def test_balancing_and_z_losses_and_their_gradient():
    """aux = E sum_e f_e P_e (f: share of assignments, P: mean score), z = mean logsumexp^2; their
    weighted sum reaches the router's gradient as if added to the objective, scaled by
    RouterStats.scale (1 / micro-batches: the backend's)."""
    layer = _moe(aux_loss_coeff=0.1, z_loss_coeff=0.01).train()
    x = torch.randn(2, 8, 16)
    logits, scores, chosen, _ = layer.route(x.reshape(-1, 16))
    f = torch.bincount(chosen.flatten(), minlength=4) / 32
    aux = 4 * (f * scores.mean(0)).sum()
    z = torch.logsumexp(logits, -1).square().mean()
    got_aux, got_z = layer.losses(logits, scores, chosen)
    torch.testing.assert_close(got_aux, aux)
    torch.testing.assert_close(got_z, z)
    for scale in (1.0, 0.25):
        layer.stats.scale = scale
        layer.zero_grad()
        layer(x).mean().backward()  # a small main objective: the losses' share shows
        got = layer.router.weight.grad.clone()
        layer.zero_grad()  # the same forward without the attached losses, which are then added
        layer.aux_coeff = layer.z_coeff = 0.0
        out = layer(x)
        layer.aux_coeff, layer.z_coeff = 0.1, 0.01
        lg, sc, ch, _ = layer.route(x.reshape(-1, 16))
        a, zz = layer.losses(lg, sc, ch)
        (out.mean() + scale * (0.1 * a + 0.01 * zz)).backward()
        torch.testing.assert_close(got, layer.router.weight.grad, rtol=1e-4, atol=1e-6)
    metrics = layer.stats.take()
    assert set(metrics) >= {"moe/aux_loss", "moe/z_loss", "moe/load_max_over_mean", "moe/layer0/dropped"}


def test_bias_update_moves_towards_the_mean_load():
    layer = _moe(bias_update_rate=0.01)
    layer.update_bias(torch.tensor([10, 2, 4, 0]))  # mean 4
    assert layer.expert_bias.tolist() == pytest.approx([-0.01, 0.01, 0.0, 0.01])
    x = torch.randn(2, 8, 16)
    layer.train()(x)
    assert int(layer.load_since_update.sum()) == 32  # 16 tokens x top 2
    layer.update_bias()
    assert layer.load_since_update is None
    assert not layer.expert_bias.requires_grad


def test_recomputed_block_counts_its_tokens_once():
    mc = dataclasses.replace(_mc(aux_loss_coeff=0.01), num_layers=1)
    model = GPT(mc, seed=0).train()
    model.set_recompute("full")
    ids = torch.randint(0, 64, (2, 16))
    model(ids, ids)[1].backward()
    assert int(model.blocks["0"].mlp.load_since_update.sum()) == 2 * 16 * 2
    assert len(model.router_stats.losses["aux_loss"]) == 1


def test_recompute_modes_give_the_same_loss_and_gradients():
    mc = _mc(num_shared_experts=1, aux_loss_coeff=0.01, z_loss_coeff=0.001)
    ids = torch.randint(0, 64, (2, 16))
    grads = {}
    for mode in ("none", "selective", "full"):
        model = GPT(mc, seed=0).train()
        model.set_recompute(mode)
        loss = model(ids, ids)[1]
        loss.backward()
        grads[mode] = (loss.detach(), {n: p.grad for n, p in model.named_parameters() if p.grad is not None})
    for mode in ("selective", "full"):
        torch.testing.assert_close(grads[mode][0], grads["none"][0], rtol=0, atol=0)
        for n, g in grads["none"][1].items():
            torch.testing.assert_close(grads[mode][1][n], g, rtol=1e-6, atol=1e-8,
                                       msg=lambda e, n=n: f"{n} {e}")


def test_moe_gpt_trains_every_parameter_but_the_bias_and_counts_active_flops():
    mc = dataclasses.replace(_mc(num_shared_experts=1, layer_freq=2, aux_loss_coeff=0.01), num_layers=3)
    model = GPT(mc, seed=0).train()
    assert [type(model.blocks[str(i)].mlp).__name__ for i in range(3)] == ["MoE", "MLP", "MoE"]
    ids = torch.randint(0, 64, (2, 16))
    model(ids, ids)[1].backward()
    no_grad = {n for n, p in model.named_parameters() if p.grad is None}
    assert no_grad == {"blocks.0.mlp.expert_bias", "blocks.2.mlp.expert_bias"}
    # active FLOPs: router + top_k experts + shared expert, per token
    N, h = 10, 16
    assert mlp_flops(mc, N, 0) == 2 * N * h * 24 * 3 * (2 + 1) + 2 * N * h * 4
    assert mlp_flops(mc, N, 1) == 2 * N * h * 24 * 3
    dense = dataclasses.replace(mc, moe=MoEConfig())
    assert flops_per_token(mc, 16) > flops_per_token(dense, 16)
    assert param_count(mc) == sum(p.numel() for p in model.parameters())


def test_global_names_and_layout_independent_init():
    model = GPT(_mc(num_shared_experts=1, shared_expert_gate=True), seed=0)
    names = {n for n, _ in model.named_parameters() if n.startswith("blocks.0.mlp.")}
    assert names == {"blocks.0.mlp.router.weight", "blocks.0.mlp.experts.fc1", "blocks.0.mlp.experts.fc2",
                     "blocks.0.mlp.shared.fc1.weight", "blocks.0.mlp.shared.fc2.weight",
                     "blocks.0.mlp.shared_gate.weight", "blocks.0.mlp.expert_bias"}
    again = GPT(_mc(num_shared_experts=1, shared_expert_gate=True), seed=0, layers=[1])
    torch.testing.assert_close(model.blocks["1"].mlp.experts.fc1, again.blocks["1"].mlp.experts.fc1)
    # residual outputs at std / sqrt(2 L)
    assert model.blocks["0"].mlp.experts.fc2.std().item() == pytest.approx(0.02 / math.sqrt(4), rel=0.2)
    assert model.blocks["0"].mlp.expert_bias.abs().sum() == 0


@pytest.mark.parametrize("overrides, words", [
    (["model.moe.num_experts=4", "model.moe.top_k=5"], "model.moe.top_k=5 must be between 1"),
    (["model.moe.num_experts=-1"], "model.moe.num_experts=-1"),
    (["model.moe.num_experts=4", "model.moe.capacity_factor=0"], "capacity_factor=0"),
    (["model.moe.num_experts=4", "model.moe.aux_loss_coeff=-1"], "aux_loss_coeff=-1"),
    (["model.moe.num_experts=4", "model.moe.shared_expert_gate=true"], "num_shared_experts=0"),
    (["model.moe.num_experts=4", "model.moe.router=top"], "model.moe.router='top' is not allowed"),
])
def test_moe_config_errors_are_one_sentence(overrides, words):
    with pytest.raises(ConfigError, match=None) as e:
        Config.from_yaml(None, overrides).validate()
    assert words in str(e.value) and str(e.value).count(". ") <= 1


@pytest.mark.parametrize("extra, words", [
    (["parallel.tp=2", "parallel.sequence_parallel=true", "model.moe.capacity_factor=1.5"],
     "model.moe.capacity_factor=1.5 with parallel.sequence_parallel=true"),
    (["parallel.cp=2", "model.moe.capacity_factor=1.5"], "model.moe.capacity_factor=1.5 with parallel.cp=2"),
    (["optim.zero.stage=1", "optim.zero.backend=deepspeed", "parallel.dp=2"], "deepspeed"),
    (["parallel.dp=2", "parallel.ep=4"], "parallel.ep=4 must divide parallel.dp=2"),
    (["parallel.dp=6", "parallel.ep=3"], "parallel.ep=3 must divide model.moe.num_experts=4"),
])
def test_moe_layout_rules_are_one_sentence(extra, words):
    cfg = Config.from_yaml(None, ["model.moe.num_experts=4", "model.num_layers=4",
                                  "model.max_sequence_length=64", *extra])
    with pytest.raises(LayoutError) as e:
        Layout.build(cfg)
    assert words in str(e.value) and str(e.value).count(". ") == 0


def test_expert_parallelism_needs_experts_and_builds_from_dp():
    with pytest.raises(LayoutError, match="parallel.ep=2 splits the experts of MoE blocks"):
        Layout.build(Config.from_yaml(None, ["parallel.dp=2", "parallel.ep=2"]))
    cfg = Config.from_yaml(None, ["model.moe.num_experts=4", "model.num_layers=4", "parallel.dp=4",
                                  "parallel.ep=2", "parallel.tp=2", "parallel.pp=2",
                                  "model.max_sequence_length=64"])
    layout = Layout.build(cfg)
    topo = layout.topology
    assert layout.ep == 2 and "(ep 2)" in layout.describe() and layout.as_dict()["ep"] == 2
    # dp ranks of tp rank 0, stage 0: world ranks 0, 2, 4, 6; ep groups {0, 2}, {4, 6}; edp {0, 4}, {2, 6}
    dp_ranks = [topo.rank_of(tp=0, pp=0, dp=d) for d in range(4)]
    assert dp_ranks == [0, 2, 4, 6]
    assert [topo.ep_rank(topo.coord(r)) for r in dp_ranks] == [0, 1, 0, 1]


def test_dense_config_roundtrips_and_moe_fills_its_widths():
    mc = _mc(num_shared_experts=2)
    assert mc.moe.intermediate_size == 24 and mc.moe.shared_intermediate_size == 48
    again = ModelConfig(**dataclasses.asdict(mc))
    assert again == mc and isinstance(again.moe, MoEConfig)
    assert ModelConfig().moe.num_experts == 0 and not ModelConfig().moe.is_moe(0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("sizes", [[5, 0, 9, 2], [0, 0, 0, 0]], ids=["an-empty-expert", "no-rows"])
@pytest.mark.parametrize("swiglu", [True, False], ids=["swiglu", "gelu"])
def test_grouped_gemm_equals_the_loop_over_experts(dtype, sizes, swiglu):
    """torch._grouped_mm's path (forward, input and weight gradients) against the per-expert loop,
    including an expert without rows (an exact zero gradient) and a call without any rows."""
    from megatron_lite.model.moe import _grouped_mm_usable, grouped_mlp

    torch.manual_seed(0)
    E, C, inter = 4, 16, 24
    x = torch.randn(sum(sizes), C, dtype=dtype)
    fc1 = (0.3 * torch.randn(E, inter * (2 if swiglu else 1), C)).to(dtype)
    fc2 = (0.3 * torch.randn(E, C, inter)).to(dtype)
    counts = torch.tensor(sizes)
    assert _grouped_mm_usable(x, fc1, fc2) or not sum(sizes)  # the grouped path really runs here
    results = []
    for grouped in (True, False):
        leaves = [t.clone().requires_grad_() for t in (x, fc1, fc2)]
        y = grouped_mlp(*leaves, counts, swiglu, "tanh", grouped=grouped)
        y.backward(torch.randn(y.shape, generator=torch.Generator().manual_seed(1)).to(dtype))
        results.append([y] + [t.grad for t in leaves])
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=2e-2, atol=2e-2)
    for got, want in zip(*results, strict=True):
        torch.testing.assert_close(got, want, **tol)
    empty = counts == 0
    assert not results[0][2][empty].any() and not results[0][3][empty].any()


def test_grouped_gemm_falls_back_to_the_loop_on_unaligned_widths():
    from megatron_lite.model.moe import _grouped_mm_usable

    assert not _grouped_mm_usable(torch.randn(4, 6), torch.randn(2, 6, 6), torch.randn(2, 6, 6))
    assert not _grouped_mm_usable(torch.randn(4, 8), torch.randn(2, 8, 8),
                                  torch.randn(2, 8, 8, dtype=torch.bfloat16))  # mixed dtypes
    layer = _moe(grouped_gemm=False).eval()  # the loop is a config switch and computes the same
    x = torch.randn(2, 5, 16)
    torch.testing.assert_close(layer(x), _reference(layer, x), rtol=1e-5, atol=1e-6)
