"""The serial GPT: causality, shapes per preset, parameter counts, seeded init, KV cache, learning."""

import math

import pytest
import torch

from megatron_lite.config import Config, ModelConfig
from megatron_lite.model import GPT, generate, master_init
from megatron_lite.model.counts import param_count
from tests.conftest import ROOT

PRESETS = ["gpt2-125m", "gpt2-350m", "gpt-1.3b", "llama2-7b", "tiny"]
VARIANTS = {
    "gpt2": dict(),
    "llama_gqa": dict(position_embedding="rope", norm="rmsnorm", activation="swiglu", bias=False,
                      tie_embeddings=False, num_kv_heads=2),
    "rope_gelu": dict(position_embedding="rope"),
    "mqa_swiglu_learned": dict(activation="swiglu", num_kv_heads=1),
}


def small(**kw) -> ModelConfig:
    base = dict(vocab_size=97, hidden_size=32, num_layers=2, num_attention_heads=4, max_sequence_length=24)
    base.update(kw)
    return ModelConfig(**base)


@pytest.mark.parametrize("variant", VARIANTS)
def test_causality_changing_token_t_never_changes_earlier_logits(variant):
    model = GPT(small(**VARIANTS[variant]), seed=3).eval()
    ids = torch.randint(0, 97, (2, 16), generator=torch.Generator().manual_seed(0))
    base, _ = model(ids)
    for t in (0, 5, 15):
        changed = ids.clone()
        changed[:, t] = (changed[:, t] + 1) % 97
        out, _ = model(changed)
        torch.testing.assert_close(out[:, :t], base[:, :t], rtol=0, atol=0)  # bit-identical before t
        assert (out[:, t:] - base[:, t:]).abs().amax() > 1e-4  # and it does matter from t on


@pytest.mark.parametrize("preset", PRESETS)
def test_presets_at_tiny_scale_shapes_and_dtypes(preset):
    cfg = Config.from_yaml(ROOT / f"configs/{preset}.yaml")
    m = cfg.model
    # Keep the architecture switches, shrink the sizes.
    heads = 4
    kv = heads if m.num_kv_heads == m.num_attention_heads else 2
    shrunk = ModelConfig(vocab_size=101, hidden_size=32, num_layers=2, num_attention_heads=heads,
                         num_kv_heads=kv, intermediate_size=48, max_sequence_length=16,
                         position_embedding=m.position_embedding, norm=m.norm, activation=m.activation,
                         tie_embeddings=m.tie_embeddings, bias=m.bias)
    model = GPT(shrunk, seed=0)
    ids = torch.randint(0, 101, (3, 16))
    logits, _ = model(ids)
    assert logits.shape == (3, 16, 101) and logits.dtype == torch.float32
    none, loss = model(ids, ids)  # training path: fused loss, logits never materialised
    assert none is None and loss.shape == () and loss.dtype == torch.float32
    assert abs(loss.item() - math.log(101)) < 0.5  # an untrained model is near-uniform
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits, _ = model(ids)
        _, loss = model(ids, ids)
    assert logits.dtype == torch.bfloat16 and loss.dtype == torch.float32
    assert (model.lm_head.weight is model.tok_emb.weight) == m.tie_embeddings


def analytic_params(c: ModelConfig) -> int:
    """Count from the architecture, independently of the module code."""
    h, V, hd = c.hidden_size, c.vocab_size, c.hidden_size // c.num_attention_heads
    q, kv, inter = c.num_attention_heads * hd, c.num_kv_heads * hd, c.intermediate_size
    b = int(c.bias)
    norm = 2 * h if (c.norm == "layernorm" and c.bias) else h
    up = inter * (2 if c.activation == "swiglu" else 1)
    attn = h * (q + 2 * kv) + b * (q + 2 * kv) + q * h + b * h
    mlp = h * up + b * up + inter * h + b * h
    emb = V * h + (c.max_sequence_length * h if c.position_embedding == "learned" else 0)
    return emb + c.num_layers * (attn + mlp + 2 * norm) + norm + (0 if c.tie_embeddings else V * h)


@pytest.mark.parametrize("preset, published", [
    ("gpt2-125m", 124_439_808),     # GPT-2 small as counted by HF GPT2LMHeadModel
    ("gpt2-350m", 354_823_168),     # GPT-2 medium
    ("gpt-1.3b", None),
    ("llama2-7b", 6_738_415_616),   # Llama-2-7b
])
def test_preset_parameter_counts(preset, published):
    cfg = Config.from_yaml(ROOT / f"configs/{preset}.yaml").model
    n = param_count(cfg)  # on the meta device: a 7B model is not materialised
    assert n == analytic_params(cfg)
    if published is not None:
        assert n == published
    if preset == "gpt-1.3b":
        assert 1.25e9 < n < 1.35e9


def test_seeded_init_is_reproducible_and_layout_independent():
    cfg = small(num_layers=4)
    a, b, c = GPT(cfg, seed=7), GPT(cfg, seed=7), GPT(cfg, seed=8)
    for (name, pa), pb, pc in zip(a.named_parameters(), b.parameters(), c.parameters(), strict=True):
        assert torch.equal(pa, pb), name
        # Every parameter is its own function of (seed, name): rebuildable on any rank alone.
        assert torch.equal(pa, master_init(name, pa.shape, cfg, 7)), name
        if pa.dim() >= 2:
            assert not torch.equal(pa, pc), name


def test_init_statistics():
    cfg = ModelConfig(vocab_size=2000, hidden_size=256, num_layers=8, num_attention_heads=4,
                      max_sequence_length=64)
    model = GPT(cfg, seed=0)
    resid = 0.02 / math.sqrt(2 * cfg.num_layers)
    for name, p in model.named_parameters():
        if name.endswith(("attn.proj.weight", "mlp.fc2.weight")):
            assert p.std().item() == pytest.approx(resid, rel=0.05), name
        elif p.dim() == 2:
            assert p.std().item() == pytest.approx(0.02, rel=0.05), name
            assert abs(p.mean().item()) < 1e-3
        elif "ln" in name and name.endswith("weight"):
            assert torch.all(p == 1), name
        else:
            assert torch.all(p == 0), name


@pytest.mark.parametrize("variant", VARIANTS)
def test_kv_cache_decoding_equals_full_recompute(variant):
    model = GPT(small(**VARIANTS[variant]), seed=1)
    prompt = torch.randint(0, 97, (2, 5), generator=torch.Generator().manual_seed(1))
    cached = generate(model, prompt, 15, temperature=0.0)
    full = generate(model, prompt, 15, temperature=0.0, use_cache=False)
    assert torch.equal(cached, full)
    # Sampling with the same generator seed is reproducible.
    s1 = generate(model, prompt, 10, temperature=1.0, top_k=5, generator=torch.Generator().manual_seed(0))
    s2 = generate(model, prompt, 10, temperature=1.0, top_k=5, generator=torch.Generator().manual_seed(0))
    assert torch.equal(s1, s2)


def test_chunked_prefill_matches_one_shot():
    from megatron_lite.model import KVCache
    cfg = small(**VARIANTS["llama_gqa"])
    model = GPT(cfg, seed=2).eval()
    ids = torch.randint(0, 97, (2, 12))
    full, _ = model(ids)
    cache = KVCache(cfg, 2, cfg.max_sequence_length, "cpu")
    a, _ = model(ids[:, :5], cache=cache)
    b, _ = model(ids[:, 5:], cache=cache)  # 7 queries against 12 keys: needs the offset mask
    torch.testing.assert_close(torch.cat([a, b], 1), full, rtol=1e-5, atol=1e-5)


def test_overfits_one_batch():
    """The model and AdamW really learn: one fixed batch is memorised to loss < 0.05."""
    model = GPT(ModelConfig(vocab_size=64, hidden_size=64, num_layers=2, num_attention_heads=4,
                            max_sequence_length=32), seed=0)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
    batch = torch.randint(0, 64, (4, 33), generator=torch.Generator().manual_seed(0))
    first = None
    for _ in range(300):
        _, loss = model(batch[:, :-1], batch[:, 1:])
        first = first if first is not None else loss.item()
        opt.zero_grad()
        loss.backward()
        opt.step()
        if loss.item() < 0.05:
            break
    assert first > 3.5 and loss.item() < 0.05


def test_sequence_longer_than_max_is_refused():
    model = GPT(small(), seed=0)
    with pytest.raises(ValueError, match="max_sequence_length"):
        model(torch.zeros(1, 25, dtype=torch.long))


def test_model_package_never_imports_torch_distributed():
    import ast
    for path in (ROOT / "megatron_lite/model").glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, (ast.Import, ast.ImportFrom)) else []
            mod = getattr(node, "module", None) or ""
            assert not any(n.startswith("torch.distributed") for n in names + [mod]), path


@pytest.mark.parametrize("variant", ["gpt2", "llama_gqa"])
def test_fused_linear_cross_entropy_equals_the_plain_head(variant):
    """Loss and every parameter gradient, in float64 (so any difference is a bug, not rounding)."""
    cfg = small(**VARIANTS[variant])
    ids = torch.randint(0, 97, (3, 20), generator=torch.Generator().manual_seed(4))
    labels = ids.roll(-1, dims=1)
    labels[0, 5:9] = -100  # ignored positions do not count in the mean
    grads = {}
    for fused in (True, False):
        model = GPT(cfg, seed=5).double()
        model.lm_head.fused_loss = fused
        _, loss = model(ids, labels)
        (3.0 * loss).backward()  # a non-unit upstream gradient must be honoured
        grads[fused] = (loss.detach(), {n: p.grad for n, p in model.named_parameters()})
    torch.testing.assert_close(grads[True][0], grads[False][0], rtol=1e-12, atol=1e-12)
    for name, g in grads[False][1].items():
        torch.testing.assert_close(grads[True][1][name], g, rtol=1e-10, atol=1e-12, msg=name)
    # In eval / no_grad the plain path runs and gives the same loss.
    with torch.no_grad():
        model = GPT(cfg, seed=5).double()
        _, plain = model(ids, labels)
    torch.testing.assert_close(plain, grads[True][0], rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
def test_fused_loss_over_a_padded_vocabulary(dtype):
    """The CUDA path (pad_to=64: the head's GEMMs over an odd vocabulary rounded up, on zero weight
    rows) gives the unpadded loss and gradients, several chunks and ignored rows included; in fp64 both
    equal torch's plain log-softmax cross-entropy."""
    from torch.nn import functional as F

    from megatron_lite.model.loss import linear_cross_entropy
    g = torch.Generator().manual_seed(0)
    V, N, C = 1001, 300, 48  # 1001 = 15 x 64 + 41: the last 23 padded rows
    x0, w0 = torch.randn(N, C, generator=g).to(dtype), (0.3 * torch.randn(V, C, generator=g)).to(dtype)
    labels = torch.randint(0, V, (N,), generator=g)
    labels[::11] = -100
    out = {}
    for pad in (1, 64, "plain"):
        x, w = x0.clone().requires_grad_(), w0.clone().requires_grad_()
        if pad == "plain":
            if dtype != torch.float64:
                continue
            loss = F.cross_entropy(x @ w.t(), labels, ignore_index=-100)
        else:
            loss = linear_cross_entropy(x, w, labels, chunk=128, pad_to=pad)
        (2.0 * loss).backward()
        out[pad] = (loss.detach(), x.grad, w.grad)
    assert out[64][2].shape == (V, C)
    tol = {torch.float64: 1e-12, torch.float32: 1e-6, torch.bfloat16: 1e-2}[dtype]
    for other in [k for k in out if k != 64]:
        for a, b in zip(out[64], out[other], strict=True):
            torch.testing.assert_close(a.double(), b.double(), rtol=tol, atol=tol)


@pytest.mark.parametrize("variant", ["gpt2", "llama_gqa"])
def test_recompute_gives_the_same_gradients(variant):
    """Activation checkpointing (full blocks or the attention core only) recomputes in backward:
    same loss and gradients as storing activations, dropout masks included (RNG replayed)."""
    cfg = small(dropout=0.2, **VARIANTS[variant])
    ids = torch.randint(0, 97, (2, 16), generator=torch.Generator().manual_seed(3))
    results = {}
    for mode in ("none", "full", "selective"):
        model = GPT(cfg, seed=4)
        model.set_recompute(mode)
        torch.manual_seed(99)
        _, loss = model(ids, ids)
        loss.backward()
        results[mode] = (loss.detach(), {n: p.grad for n, p in model.named_parameters()})
    for mode in ("full", "selective"):
        torch.testing.assert_close(results[mode][0], results["none"][0], rtol=0, atol=0)
        for name, g in results["none"][1].items():
            torch.testing.assert_close(results[mode][1][name], g, rtol=1e-6, atol=1e-7, msg=f"{mode} {name}")


def test_a_stage_builds_only_its_blocks_with_global_names():
    cfg = small(num_layers=4, tie_embeddings=True)
    full = GPT(cfg, seed=6)
    first = GPT(cfg, seed=6, layers=[0, 1], embed=True, head=False)
    last = GPT(cfg, seed=6, layers=[2, 3], embed=False, head=True)
    names = dict(full.named_parameters(remove_duplicate=False))
    for stage in (first, last):
        for name, p in stage.named_parameters():
            assert torch.equal(p, names[name]), name  # same global name, same initial value
    assert "blocks.2.attn.qkv.weight" not in dict(first.named_parameters())
    assert torch.equal(last.lm_head.weight, first.tok_emb.weight)  # the tied copy starts equal
    ids = torch.randint(0, 97, (2, 8))
    h = first.run(ids, [0, 1], first=True, last=False)
    torch.testing.assert_close(last.run(h, [2, 3], ids, first=False, last=True)[1], full(ids, ids)[1])


def test_gelu_variants_tanh_for_gpt2_and_exact_erf():
    """activation=gelu is GPT-2's tanh approximation, gelu_exact the erf form (BERT, HF "gelu");
    they differ by up to ~1e-3 per element, so a converted model must name the right one."""
    import torch.nn.functional as F

    from megatron_lite.model.gpt import MLP
    x = torch.randn(2, 5, 16, generator=torch.Generator().manual_seed(0))
    outs = {}
    for act, approximate in (("gelu", "tanh"), ("gelu_exact", "none")):
        mlp = MLP(ModelConfig(hidden_size=16, num_attention_heads=2, activation=act))
        torch.manual_seed(1)
        for p in mlp.parameters():
            torch.nn.init.normal_(p, std=0.5)
        want = mlp.fc2(F.gelu(mlp.fc1(x), approximate=approximate))
        outs[act] = mlp(x)
        torch.testing.assert_close(outs[act], want, rtol=0, atol=0)
    assert (outs["gelu"] - outs["gelu_exact"]).abs().max() > 1e-5


def test_rmsnorm_function_gradcheck_in_float64():
    """The hand-written backward of model/gpt.py's RMSNorm against finite differences (x and weight)."""
    from megatron_lite.model.gpt import _RMSNormFunction
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, 8, dtype=torch.float64, generator=g).requires_grad_()
    w = (1 + 0.5 * torch.randn(8, dtype=torch.float64, generator=g)).requires_grad_()
    assert torch.autograd.gradcheck(lambda x, w: _RMSNormFunction.apply(x, w, 1e-5, False), (x, w))


@pytest.mark.parametrize("norm", ["rmsnorm", "layernorm", "layernorm_no_bias"])
def test_output_saving_norms_gradcheck_in_float64(norm):
    """model.norm_saves_output's backward (x_hat recovered from the saved output, (y - b) / w) against
    finite differences, for x, weight and bias; weights away from 0 (no clamp), of both signs."""
    from megatron_lite.model.gpt import _LayerNormFunction, _RMSNormFunction
    g = torch.Generator().manual_seed(3)
    x = torch.randn(2, 3, 8, dtype=torch.float64, generator=g).requires_grad_()
    sign = torch.tensor([1.0, -1.0] * 4, dtype=torch.float64)
    w = (sign * (0.5 + torch.rand(8, dtype=torch.float64, generator=g))).requires_grad_()
    b = (0.3 * torch.randn(8, dtype=torch.float64, generator=g)).requires_grad_()
    if norm == "rmsnorm":
        assert torch.autograd.gradcheck(lambda x, w: _RMSNormFunction.apply(x, w, 1e-5, True), (x, w))
    elif norm == "layernorm":
        assert torch.autograd.gradcheck(lambda x, w, b: _LayerNormFunction.apply(x, w, b, 1e-5), (x, w, b))
    else:
        assert torch.autograd.gradcheck(lambda x, w: _LayerNormFunction.apply(x, w, None, 1e-5), (x, w))


@pytest.mark.parametrize("norm", ["rmsnorm", "layernorm"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_output_saving_norms_equal_the_input_saving_ones_and_keep_only_rstd_beyond_the_gemm(norm, dtype):
    """model.norm_saves_output: same outputs and gradients as the input-saving norm (RMSNorm's own
    Function, nn.LayerNorm) to rounding (fp32 1e-5 relative), same parameter names, and norm + the
    following linear keep the linear's input (the norm's output, one storage) plus one fp32 1/std per
    row: the norm's input is not kept."""
    import torch.nn as nn

    from megatron_lite.model.gpt import make_norm
    from megatron_lite.testing.activations import saved_bytes
    gen = torch.Generator().manual_seed(4)
    mc = dict(hidden_size=16, num_attention_heads=2, norm=norm)
    ours, ref = make_norm(ModelConfig(**mc, norm_saves_output=True)), make_norm(ModelConfig(**mc))
    with torch.no_grad():
        ours.weight.copy_(1 + 0.3 * torch.randn(16, generator=gen))
        if norm == "layernorm":
            ours.bias.copy_(0.2 * torch.randn(16, generator=gen))
    ref.load_state_dict(ours.state_dict())  # same keys
    ours, ref = ours.to(dtype), ref.to(dtype)
    lin = nn.Linear(16, 8, bias=False).to(dtype)
    x = torch.randn(2, 5, 16, generator=gen).to(dtype).requires_grad_()
    grad = torch.randn(2, 5, 8, generator=gen).to(dtype)
    weights = [*ours.parameters(), *lin.parameters()]
    y, kept = saved_bytes(lambda: lin(ours(x)), exclude=weights)
    n = x.numel() * x.element_size()
    assert kept == n + 2 * 5 * 4  # the linear's input (the norm's output) + fp32 1/std per row
    _, kept_ref = saved_bytes(lambda: lin(ref(x)), exclude=weights)
    assert kept_ref > 2 * n  # the input-saving norm keeps x besides the linear's input
    params = lambda m: (x, *m.parameters(), lin.weight)  # noqa: E731
    got = torch.autograd.grad(y, params(ours), grad)
    want_y = lin(ref(x))
    want = torch.autograd.grad(want_y, params(ref), grad)
    tol = dict(rtol=1e-5, atol=1e-6) if dtype == torch.float32 else dict(rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(y, want_y, **tol)
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b, **tol)


def test_output_saving_norm_with_a_zero_weight_stays_finite():
    """A weight of exactly 0 leaves y with nothing of that channel's x_hat: the clamped divisor keeps
    backward finite, and the other channels' weight gradients (each channel's own x_hat) exact."""
    from megatron_lite.model.gpt import _RMSNormFunction
    g = torch.Generator().manual_seed(5)
    x = torch.randn(3, 4, 8, dtype=torch.float64, generator=g).requires_grad_()
    w = (1 + 0.2 * torch.randn(8, dtype=torch.float64, generator=g))
    w[2] = 0.0
    w.requires_grad_()
    grad = torch.randn(3, 4, 8, dtype=torch.float64, generator=g)
    got = torch.autograd.grad(_RMSNormFunction.apply(x, w, 1e-5, True), (x, w), grad)
    want = torch.autograd.grad(_RMSNormFunction.apply(x, w, 1e-5, False), (x, w), grad)
    assert all(t.isfinite().all() for t in got)
    keep = torch.arange(8) != 2
    torch.testing.assert_close(got[1][keep], want[1][keep])
    assert got[1][2] == 0 and want[1][2] != 0  # that channel's x_hat is lost: its gradient approximate


def test_swiglu_function_gradcheck_in_float64():
    """SwiGLU's backward (silu(gate) recomputed, not saved) against finite differences."""
    from megatron_lite.model.gpt import _SwiGLU
    h = torch.randn(2, 3, 2 * 6, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    assert torch.autograd.gradcheck(_SwiGLU.apply, (h.requires_grad_(),))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rmsnorm_and_swiglu_equal_torchs_composites(dtype):
    """Outputs and gradients equal nn.RMSNorm's and F.silu(gate) * up's (fp32 to ~1e-6 relative), the
    parameter keeps nn.RMSNorm's name, and autograd keeps only the input (in its own dtype) plus one
    fp32 1/rms per row for the norm, only [gate | up] for SwiGLU."""
    import torch.nn.functional as F

    from megatron_lite.model.gpt import MLP, RMSNorm
    from megatron_lite.testing.activations import saved_bytes
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(2, 5, 16, generator=gen).to(dtype).requires_grad_()
    ours, ref = RMSNorm(16, eps=1e-5).to(dtype), torch.nn.RMSNorm(16, eps=1e-5).to(dtype)
    with torch.no_grad():
        ours.weight.copy_(1 + 0.3 * torch.randn(16, generator=gen))
    ref.load_state_dict(ours.state_dict())  # same keys: {"weight"}
    grad = torch.randn(2, 5, 16, generator=gen).to(dtype)
    y, kept = saved_bytes(lambda: ours(x), exclude=[ours.weight])
    assert kept == x.numel() * x.element_size() + 2 * 5 * 4
    got = torch.autograd.grad(y, (x, ours.weight), grad)
    want = torch.autograd.grad(ref(x), (x, ref.weight), grad)
    tol = dict(rtol=2e-6, atol=1e-6) if dtype == torch.float32 else dict(rtol=1e-2, atol=1e-2)
    torch.testing.assert_close(y, ref(x), **tol)
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b, **tol)

    mlp = MLP(ModelConfig(hidden_size=16, num_attention_heads=2, activation="swiglu", bias=False)).to(dtype)
    h = mlp.fc1(x)  # (B, T, 2I)
    out, kept = saved_bytes(lambda: mlp.act(h))
    assert kept == h.numel() * h.element_size()  # gate and up are views of h; no silu(gate)
    gate, up = h.chunk(2, dim=-1)
    grad = torch.randn(out.shape, generator=gen).to(dtype)
    torch.testing.assert_close(out, F.silu(gate) * up, **tol)
    torch.testing.assert_close(torch.autograd.grad(out, h, grad)[0],
                               torch.autograd.grad(F.silu(gate) * up, h, grad)[0], **tol)


def test_norm_saves_output_must_be_a_bool():
    from megatron_lite.config import ConfigError
    with pytest.raises(ConfigError, match="model.norm_saves_output"):
        Config.from_yaml(None, ["model.norm_saves_output=maybe"])
    with pytest.raises(ConfigError, match="must be true or false"):
        ModelConfig(norm_saves_output=1).validate()
    assert Config.from_yaml(None, ["model.norm_saves_output=true"]).model.norm_saves_output is True
