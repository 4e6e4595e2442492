"""Hugging Face interop: `checkpoint export --format hf` and `checkpoint import`.

Export reads a checkpoint of any layout (here tp2 x pp2, trained with 4 gloo ranks) into the serial
model and writes what transformers' from_pretrained loads; import turns such a directory back into a
step-0 checkpoint. Logits are compared in float32 with atol 1e-5 (rtol 0): both sides run the same
math (same RoPE convention, 1/sqrt(head_dim) scaling, GELU tanh form, norm eps), so only summation
order may differ between implementations (~1e-7 relative on logits of order 1; on this machine they
come out bit-identical). The export -> import round trip itself does no arithmetic (transposes and
splits), so its weights are compared bit for bit.
"""

import json
import shutil
import sys
from pathlib import Path

import pytest
import torch

from megatron_lite.checkpoint import (
    CheckpointManager,
    Stateful,
    TrainState,
    load_model_weights,
    read_manifest,
    resolve,
)
from megatron_lite.cli import main
from megatron_lite.config import Config
from megatron_lite.data import ByteTokenizer, load_tokenizer
from megatron_lite.data.tokenizer import EOT
from megatron_lite.model import GPT, generate
from tests.conftest import cli, tiny_overrides
from tests.dist.test_tp_train import torchrun
from tests.e2e.test_tokenizers import BOT, EOS, llama3_tokenizer, refused

transformers = pytest.importorskip("transformers")

ATOL = 1e-5
SAMPLE = "def main(argv):\n    return {'é': 1, \"漢字\": [x ** 2 for x in argv]}  # done" + EOT + "\n\tclass"
LLAMA = ["model.position_embedding=rope", "model.norm=rmsnorm", "model.activation=swiglu",
         "model.num_kv_heads=2", "model.tie_embeddings=false", "model.bias=false", "model.rope_theta=5000"]
ARCHS = {"gpt2": ([], "GPT2LMHeadModel"), "llama": (LLAMA, "LlamaForCausalLM")}


MOE = {  # our MoE overrides -> the transformers class that expresses them
    "mixtral": ([*LLAMA, "model.num_layers=3", "model.moe.num_experts=4", "model.moe.top_k=2",
                 "model.moe.intermediate_size=24", "model.moe.aux_loss_coeff=0.02"], "MixtralForCausalLM"),
    "qwen2_moe": ([*LLAMA, "model.num_layers=3", "model.moe.num_experts=4", "model.moe.top_k=2",
                   "model.moe.intermediate_size=24", "model.moe.num_shared_experts=1",
                   "model.moe.shared_intermediate_size=40", "model.moe.shared_expert_gate=true",
                   "model.moe.layer_freq=2", "model.moe.norm_topk_prob=false"], "Qwen2MoeForCausalLM"),
}


def _serial(path: Path) -> GPT:
    model = GPT(Config.from_yaml(path / "config.yaml").model, seed=None)
    load_model_weights(path, model)
    return model.eval()


def _logits(model, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(ids)[0] if isinstance(model, GPT) else model(ids).logits


def _hf(directory: Path):
    model = transformers.AutoModelForCausalLM.from_pretrained(str(directory), local_files_only=True).eval()
    model.generation_config.eos_token_id = None  # generate the full length, as ours does
    return model, transformers.AutoTokenizer.from_pretrained(str(directory), local_files_only=True)


def _checkpoint(directory: Path, data_dir: Path, *overrides: str) -> Path:
    """A step-0 checkpoint of a randomly initialised tiny model, written in process."""
    cfg = Config.from_yaml(None, tiny_overrides(data_dir, *overrides))
    model = Stateful(GPT(cfg.model, seed=1))
    return CheckpointManager(directory / "checkpoints").save(0, model, TrainState(), cfg.to_yaml(),
                                                            data_dir=data_dir)


@pytest.fixture(scope="module", params=list(ARCHS))
def tp2pp2_run(request, corpus_dir, tmp_path_factory):
    """A run trained 10 steps at tp2 x pp2 (4 gloo ranks): GPT-2-shaped, or Llama-shaped with GQA."""
    run = tmp_path_factory.mktemp(f"hf_{request.param}") / "run"
    torchrun(4, "-m", "megatron_lite.cli", "train", "--config", "configs/tiny.yaml",
             *tiny_overrides(corpus_dir, "parallel.tp=2", "parallel.pp=2", "parallel.microbatches=2",
                             "train.steps=10", "optim.warmup_steps=2", f"train.out_dir={run}",
                             *ARCHS[request.param][0]))
    return request.param, run


@pytest.mark.slow
def test_export_import_round_trip_from_tp2pp2(tp2pp2_run, corpus_dir, tmp_path, capsys):
    arch, run = tp2pp2_run
    src = resolve(run)
    assert read_manifest(src)["layout"]["tp"] == 2 and read_manifest(src)["layout"]["pp"] == 2
    out = tmp_path / "hf"
    assert main(["checkpoint", "export", str(run), "--format", "hf", "--out", str(out)]) == 0
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"} <= \
        {p.name for p in out.iterdir()}
    hf, hf_tok = _hf(out)
    assert type(hf).__name__ == ARCHS[arch][1]
    if arch == "llama":
        assert (hf.config.num_attention_heads, hf.config.num_key_value_heads) == (4, 2)
    ours, tok = _serial(src), load_tokenizer(src)

    # The tokenizer: a fast tokenizer with our ids and our decoding.
    assert isinstance(hf_tok, transformers.PreTrainedTokenizerFast)
    assert hf_tok(SAMPLE)["input_ids"] == tok.encode(SAMPLE)
    assert hf_tok.decode(tok.encode(SAMPLE), skip_special_tokens=True) == tok.decode(tok.encode(SAMPLE))

    # Logits on real text, and greedy generation decoded by each side's own tokenizer.
    text = Path(__file__).read_text()
    ids = torch.tensor([tok.encode(text)[:32], tok.encode(text)[32:64]])
    torch.testing.assert_close(_logits(hf, ids), _logits(ours, ids), atol=ATOL, rtol=0)
    prompt = torch.tensor([tok.encode("def ")])
    want = tok.decode(generate(ours, prompt, 24, temperature=0)[0].tolist())
    got_ids = hf.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=24, do_sample=False)
    assert got_ids.shape[1] == prompt.shape[1] + 24
    hf_text = hf_tok.decode(got_ids[0], skip_special_tokens=True)
    assert hf_text == want

    # Import it back: a verified step-0 checkpoint with the same weights, bit for bit.
    back = tmp_path / "imported"
    assert main(["checkpoint", "import", str(out), "--out", str(back)]) == 0
    assert main(["checkpoint", "verify", str(back)]) == 0
    imported = resolve(back)
    assert imported.name == "step_00000000" and read_manifest(imported)["layout"]["tp"] == 1
    assert Config.from_yaml(back / "config.yaml").model == Config.from_yaml(src / "config.yaml").model
    mine = _serial(imported)
    for (name, a), b in zip(ours.state_dict().items(), mine.state_dict().values(), strict=True):
        assert torch.equal(a, b), name
    torch.testing.assert_close(_logits(mine, ids), _logits(hf, ids), atol=ATOL, rtol=0)
    capsys.readouterr()
    assert main(["generate", "--checkpoint", str(back), "--prompt", "def ", "--max-new-tokens", "24",
                 "--temperature", "0"]) == 0
    assert capsys.readouterr().out == hf_text + "\n"

    # Training goes on from the imported checkpoint: at tp=2 for Llama (GQA heads resharded), serially
    # for GPT-2.
    extra = [f"data.dir={corpus_dir}", "train.steps=2", "optim.warmup_steps=1", "train.eval_iters=1",
             "train.device=cpu", "train.progress=false", "train.sample_tokens=0", "data.micro_batch_size=2"]
    if arch == "llama":
        r = torchrun(2, "-m", "megatron_lite.cli", "train", "--config", str(back / "config.yaml"), *extra,
                     "parallel.tp=2")
        assert "resumed from" in r.stdout + r.stderr and "resharded" in r.stdout + r.stderr
    else:
        from megatron_lite.train import Trainer
        trainer = Trainer(Config.from_yaml(back / "config.yaml", extra))
        assert trainer.resumed_from == imported and trainer.state.step == 0
        assert len(trainer.fit()["train_loss"]) == 2
    assert CheckpointManager(back / "checkpoints").latest().name == "step_00000002"


@pytest.mark.slow
def test_a_llama3_tokenizer_imports_trains_at_tp2_and_exports(tmp_path):
    """A Llama checkpoint with a Llama-3-style tokenizer (no <|endoftext|>; its vocabulary is the
    model's): import takes its eos token as the document separator, prepare-data takes it from the
    imported tokenizer, 3 steps train at tp=2, and the export's logits in transformers equal ours."""
    tok = llama3_tokenizer(384)
    hf_dir, run, data, out = (tmp_path / name for name in ("hf", "run", "data", "exported"))
    bos, eos = tok.token_to_id(BOT), tok.token_to_id(EOS)
    config = transformers.LlamaConfig(vocab_size=384, hidden_size=32, intermediate_size=48,
                                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                      max_position_embeddings=32, tie_word_embeddings=False, bos_token_id=bos,
                                      eos_token_id=eos)
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(config).save_pretrained(hf_dir)
    hf_tok = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=BOT, eos_token=EOS)
    hf_tok.save_pretrained(hf_dir)

    r = cli("checkpoint", "import", str(hf_dir), "--out", str(run))
    assert r.returncode == 0, r.stderr
    assert f"document separator: '{EOS}' (id {eos}; its eos token)" in r.stdout
    r = cli("prepare-data", "--source", "stdlib", "--max-bytes", "200000", "--tokenizer",
            str(resolve(run) / "tokenizer.json"), "--out", str(data))
    assert r.returncode == 0 and "recorded with the tokenizer" in r.stdout, r.stderr
    assert json.loads((data / "meta.json").read_text())["eot_id"] == eos
    torchrun(2, "-m", "megatron_lite.cli", "train", "--config", str(run / "config.yaml"), f"data.dir={data}",
             "parallel.tp=2", "train.steps=3", "optim.warmup_steps=1", "train.eval_iters=1",
             "train.device=cpu", "train.progress=false", "train.sample_tokens=0", "data.micro_batch_size=2")
    trained = resolve(run)
    assert trained.name == "step_00000003" and load_tokenizer(trained).separator == EOS

    assert cli("checkpoint", "export", str(run), "--out", str(out)).returncode == 0
    hf, hf_tok = _hf(out)
    ours, text = _serial(trained), Path(__file__).read_text()
    ids = load_tokenizer(trained).encode(text)
    assert hf_tok(text, add_special_tokens=False)["input_ids"] == ids and hf_tok.eos_token_id == eos
    ids = torch.tensor([ids[:32], ids[32:64]])
    torch.testing.assert_close(_logits(hf, ids), _logits(ours, ids), atol=ATOL, rtol=0)
    before = transformers.AutoModelForCausalLM.from_pretrained(str(hf_dir), local_files_only=True)
    assert not torch.equal(before.lm_head.weight, hf.lm_head.weight)  # the 3 steps trained it


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_import_a_model_written_by_transformers(arch, corpus_dir, tmp_path):
    """A model transformers built and saved itself (GPT-2's default gelu_new; Llama with biases, tied
    embeddings, GQA and another rope_theta) imports with equal logits and generates the same text."""
    torch.manual_seed(0)
    if arch == "gpt2":
        config = transformers.GPT2Config(vocab_size=512, n_positions=32, n_embd=32, n_layer=2, n_head=4,
                                         bos_token_id=0, eos_token_id=0)
    else:
        config = transformers.LlamaConfig(vocab_size=512, hidden_size=32, intermediate_size=48,
                                          num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                          max_position_embeddings=32, rope_theta=20000.0, rms_norm_eps=1e-6,
                                          attention_bias=True, mlp_bias=True, tie_word_embeddings=True,
                                          bos_token_id=0, eos_token_id=0)
    hf = transformers.AutoModelForCausalLM.from_config(config).eval()
    with torch.no_grad():  # non-trivial norms and biases, so a mapping mistake cannot hide
        for name, p in hf.named_parameters():
            if "norm" in name or "ln" in name or name.endswith("bias"):
                p.add_(torch.randn_like(p) * 0.2)
    hf_dir = tmp_path / "hf"
    hf.save_pretrained(hf_dir)
    tok = transformers.PreTrainedTokenizerFast(tokenizer_file=str(corpus_dir / "tokenizer.json"),
                                               bos_token=EOT, eos_token=EOT)
    tok.save_pretrained(hf_dir)

    path = resolve(_import(hf_dir, tmp_path / "run"))
    m = Config.from_yaml(path / "config.yaml").model
    if arch == "gpt2":
        assert (m.position_embedding, m.activation, m.tie_embeddings, m.bias) == \
            ("learned", "gelu", True, True)
    else:
        assert (m.num_kv_heads, m.rope_theta, m.norm_eps, m.bias, m.intermediate_size, m.tie_embeddings) == \
            (2, 20000.0, 1e-6, True, 48, True)
    ours = _serial(path)
    ids = torch.randint(0, 512, (2, 32), generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(_logits(ours, ids), _logits(hf, ids), atol=ATOL, rtol=0)
    hf.generation_config.eos_token_id = None
    prompt = torch.tensor([[5, 6, 7]])
    got = hf.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=20, do_sample=False)
    assert torch.equal(generate(ours, prompt, 20, temperature=0), got)
    assert load_tokenizer(path).encode(SAMPLE) == tok(SAMPLE)["input_ids"]


def _perturbed(model) -> None:
    """Non-trivial norms, and routers that prefer some experts, so a mapping mistake cannot hide."""
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name or "ln" in name or name.endswith(("router.weight", "gate.weight")):
                p.add_(torch.randn(p.shape, generator=g) * 0.2)


@pytest.mark.parametrize("arch", list(MOE))
def test_moe_exports_and_imports_with_transformers_logits(arch, corpus_dir, tmp_path):
    """A mixture of experts (Mixtral: every block, no shared expert; Qwen2-MoE: every other block, a
    gated shared expert, top-k weights not renormalised) exported: transformers loads it as its MoE
    class with our logits (atol 1e-5) and greedy text; imported back bit for bit. And a model
    transformers built and saved itself imports with its logits and greedy text."""
    overrides, cls = MOE[arch]
    cfg = Config.from_yaml(None, tiny_overrides(corpus_dir, *overrides))
    model = GPT(cfg.model, seed=1)
    _perturbed(model)
    run = tmp_path / "run"
    CheckpointManager(run / "checkpoints").save(0, Stateful(model), TrainState(), cfg.to_yaml(),
                                                data_dir=corpus_dir)
    out = tmp_path / "hf"
    assert main(["checkpoint", "export", str(run), "--format", "hf", "--out", str(out)]) == 0
    hf, _ = _hf(out)
    assert type(hf).__name__ == cls
    ours = _serial(resolve(run))
    ids = torch.randint(0, 512, (2, 32), generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(_logits(hf, ids), _logits(ours, ids), atol=ATOL, rtol=0)
    prompt = torch.tensor([[5, 6, 7]])
    got = hf.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=20, do_sample=False)
    assert torch.equal(generate(ours, prompt, 20, temperature=0), got)
    back = resolve(_import(out, tmp_path / "imported"))
    assert Config.from_yaml(back / "config.yaml").model.moe == cfg.model.moe.__class__(
        **{**cfg.model.moe.__dict__, "z_loss_coeff": 0.0})  # (transformers has no z-loss coefficient)
    for (name, a), b in zip(ours.state_dict().items(), _serial(back).state_dict().values(), strict=True):
        assert torch.equal(a, b), name

    # transformers' own model, saved by it (its files hold the experts one by one)
    torch.manual_seed(0)
    theirs = transformers.AutoModelForCausalLM.from_config(hf.config).eval()
    _perturbed(theirs)
    theirs.save_pretrained(tmp_path / "theirs")
    shutil.copy(out / "tokenizer.json", tmp_path / "theirs")
    shutil.copy(out / "tokenizer_config.json", tmp_path / "theirs")
    mine = _serial(resolve(_import(tmp_path / "theirs", tmp_path / "run2")))
    torch.testing.assert_close(_logits(mine, ids), _logits(theirs, ids), atol=ATOL, rtol=0)
    theirs.generation_config.eos_token_id = None
    got = theirs.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=20, do_sample=False)
    assert torch.equal(generate(mine, prompt, 20, temperature=0), got)


def _import(hf_dir: Path, run: Path) -> Path:
    assert main(["checkpoint", "import", str(hf_dir), "--out", str(run)]) == 0
    return run


def test_bytes_tokenizer_exports_as_a_fast_tokenizer(tmp_path):
    data = tmp_path / "bytes"
    data.mkdir()
    (data / "meta.json").write_text(json.dumps({"tokenizer": {"type": "bytes"}}))
    _checkpoint(tmp_path / "run", data, "model.vocab_size=257")
    out = tmp_path / "hf"
    assert main(["checkpoint", "export", str(tmp_path / "run"), "--out", str(out)]) == 0
    hf_tok = transformers.AutoTokenizer.from_pretrained(str(out), local_files_only=True)
    ours = ByteTokenizer()
    text = SAMPLE.replace(EOT, "")
    assert hf_tok(text)["input_ids"] == ours.encode(text) and hf_tok.eos_token_id == ours.eot_id == 256
    # The one difference: the literal text <|endoftext|> is the end-of-text token there (as in every HF
    # tokenizer and our BPE ones); our bytes tokenizer spells it out in bytes.
    assert hf_tok.encode(EOT) == [256]
    ids = ours.encode(text)[:-3] + [256] + list(range(256))  # a cut UTF-8 sequence, EOT, every byte
    assert hf_tok.decode(ids, skip_special_tokens=True) == ours.decode(ids)


@pytest.mark.parametrize("overrides, key", [
    (["model.position_embedding=rope"], "model.norm=layernorm"),
    (["model.activation=swiglu"], "model.activation=swiglu"),
    (["model.position_embedding=rope", "model.norm=rmsnorm"], "model.activation=gelu"),
    (["model.num_kv_heads=2"], "model.num_kv_heads=2"),
    ([*MOE["mixtral"][0], "model.moe.router=sigmoid"], "model.moe.router=sigmoid"),
    ([*MOE["mixtral"][0], "model.moe.bias_update_rate=0.001"], "model.moe.bias_update_rate=0.001"),
    ([*MOE["mixtral"][0], "model.moe.layer_freq=2"], "model.moe.layer_freq=2"),
    ([*MOE["qwen2_moe"][0], "model.moe.shared_expert_gate=false"], "model.moe.shared_expert_gate=false"),
    (["model.moe.num_experts=4"], "model.position_embedding=learned"),
])
def test_a_model_transformers_cannot_express_is_refused(overrides, key, corpus_dir, tmp_path, capsys):
    _checkpoint(tmp_path / "run", corpus_dir, *overrides)
    assert main(["checkpoint", "export", str(tmp_path / "run"), "--out", str(tmp_path / "hf")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and key in err and err.count("\n") == 1, err
    assert not (tmp_path / "hf").exists()


def test_a_transformers_model_we_cannot_express_is_refused(corpus_dir, tmp_path, capsys):
    config = transformers.LlamaConfig(vocab_size=512, hidden_size=32, intermediate_size=48,
                                      num_hidden_layers=1, num_attention_heads=4, max_position_embeddings=32,
                                      rope_scaling={"rope_type": "linear", "factor": 2.0})
    transformers.AutoModelForCausalLM.from_config(config).save_pretrained(tmp_path / "hf")
    capsys.readouterr()  # transformers' progress bars
    assert main(["checkpoint", "import", str(tmp_path / "hf"), "--out", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    assert "rope scaling 'linear'" in err and err.count("\n") == 1, err
    assert not (tmp_path / "run").exists()


@pytest.fixture(scope="module")
def hf_dirs(corpus_dir, tmp_path_factory) -> dict[str, Path]:
    """A tiny GPT-2 and a tiny Llama (GQA, untied) written by transformers, with the corpus tokenizer."""
    root = tmp_path_factory.mktemp("hf_dirs")
    small = dict(vocab_size=512, hidden_size=32, num_hidden_layers=2, num_attention_heads=4)
    llama = dict(intermediate_size=48, num_key_value_heads=2, max_position_embeddings=32,
                 tie_word_embeddings=False)
    configs = {"gpt2": transformers.GPT2Config(n_positions=32, **small),
               "llama": transformers.LlamaConfig(**llama, **small)}
    tok = transformers.PreTrainedTokenizerFast(tokenizer_file=str(corpus_dir / "tokenizer.json"),
                                               eos_token=EOT)
    for arch, config in configs.items():
        transformers.AutoModelForCausalLM.from_config(config).save_pretrained(root / arch)
        tok.save_pretrained(root / arch)
    return {arch: root / arch for arch in configs}


def _edit_weights(directory: Path, drop: str = "", add: str = "") -> None:
    from safetensors.torch import load_file, save_file
    sd = load_file(directory / "model.safetensors")
    sd = {k: v for k, v in sd.items() if not (drop and k.startswith(drop))}
    if add:
        sd[add] = torch.zeros(4)
    save_file(sd, directory / "model.safetensors", metadata={"format": "pt"})


def _edit_config(directory: Path, **changes) -> None:
    config = json.loads((directory / "config.json").read_text())
    (directory / "config.json").write_text(json.dumps({**config, **changes}))


def _shard_outside(directory: Path) -> None:
    """An index naming a shard outside the model directory (it is not followed)."""
    (directory / "model.safetensors").rename(directory.parent / "elsewhere.safetensors")
    weight_map = {"transformer.wte.weight": "../elsewhere.safetensors"}
    (directory / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))


def _tokenizer(directory: Path, kind: str) -> None:
    """No tokenizer files at all, or one whose only known token is <|endoftext|>."""
    from tokenizers import Tokenizer, models
    for p in directory.glob("*token*"):
        p.unlink()
    if kind == "none":
        return
    model = models.BPE() if kind == "empty" else models.WordLevel({"[UNK]": 0}, unk_token="[UNK]")
    tok = Tokenizer(model)
    tok.add_special_tokens([EOT])
    transformers.PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=EOT).save_pretrained(directory)


BAD_IMPORTS = {  # what is wrong -> (architecture, how to break it, what the one sentence names)
    "no tokenizer": ("gpt2", lambda d: _tokenizer(d, "none"), ["holds no tokenizer"]),
    "a tokenizer encoding text to nothing": (
        "gpt2", lambda d: _tokenizer(d, "empty"), ["cannot encode text", "becomes nothing"]),
    "a tokenizer encoding text to unknowns": (
        "gpt2", lambda d: _tokenizer(d, "unknown"), ["cannot encode text", "becomes unknown tokens only"]),
    "a tokenizer larger than the model": (
        "gpt2", lambda d: _edit_config(d, vocab_size=500),
        ["has 512 tokens, more than the model's vocab_size=500"]),
    "a layer missing": (
        "gpt2", lambda d: _edit_weights(d, drop="transformer.h.1."),
        ["lack 12 tensors", "(transformer.h.1.*)"]),
    "k_proj removed": (
        "llama", lambda d: _edit_weights(d, drop="model.layers.0.self_attn.k_proj"),
        ["lack 1 tensors", "(model.layers.0.self_attn.k_proj.weight)"]),
    "ln_f removed": (
        "gpt2", lambda d: _edit_weights(d, drop="transformer.ln_f"),
        ["(transformer.ln_f.bias, transformer.ln_f.weight)"]),
    "config n_layer larger than the weights": (
        "gpt2", lambda d: _edit_config(d, n_layer=4),
        ["lack 24 tensors", "(transformer.h.2.*, transformer.h.3.*)"]),
    "config n_layer smaller than the weights": (
        "llama", lambda d: _edit_config(d, num_hidden_layers=1),
        ["hold layers 1 beyond config.json's num_hidden_layers=1", "set num_hidden_layers=2"]),
    "an extra tensor": (
        "gpt2", lambda d: _edit_weights(d, add="transformer.h.0.attn.rotary.weight"),
        ["hold 1 tensors config.json's model does not have (transformer.h.0.attn.rotary.weight)"]),
    "a shard outside the directory": (
        "gpt2", _shard_outside, ["lists the shard '../elsewhere.safetensors', which is not a file in that"]),
    "a shape mismatch": (
        "llama", lambda d: _edit_config(d, intermediate_size=40),
        ["do not have the shapes", "model.layers.0.mlp.gate_proj.weight [48, 32] (needs [40, 32])",
         "and 3 more"]),
}


@pytest.mark.parametrize("case", list(BAD_IMPORTS))
def test_import_refuses_in_one_sentence(case, hf_dirs, tmp_path):
    """Only our sentence is printed (transformers' own warnings and load report never are), and nothing
    is written: every tensor comes from the files, none from transformers' random initialisation."""
    arch, breaks, needles = BAD_IMPORTS[case]
    src = tmp_path / "hf"
    shutil.copytree(hf_dirs[arch], src)
    breaks(src)
    r = cli("checkpoint", "import", str(src), "--out", str(tmp_path / "run"))
    refused(r, *needles)
    assert r.stdout == "" and not (tmp_path / "run").exists()


@pytest.mark.parametrize("files", ["shards", "old bin"])
def test_import_reads_sharded_safetensors_and_old_bin_files(files, hf_dirs, tmp_path):
    """Weights in several safetensors shards, or an older GPT-2 pytorch_model.bin (names without the
    `transformer.` prefix, its causal-mask buffers, a copy of the tied lm_head), import with logits equal
    to transformers'."""
    src = tmp_path / "hf"
    shutil.copytree(hf_dirs["gpt2"], src)
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(src), local_files_only=True).eval()
    (src / "model.safetensors").unlink()
    if files == "shards":
        hf.save_pretrained(src, max_shard_size="40KB")
        index = json.loads((src / "model.safetensors.index.json").read_text())
        assert len(set(index["weight_map"].values())) > 1
    else:
        sd = {k.removeprefix("transformer."): v for k, v in hf.state_dict().items()}
        assert "lm_head.weight" in sd
        torch.save({**sd, **{f"h.{i}.attn.bias": torch.ones(1, 1, 32, 32).tril() for i in range(2)}},
                   src / "pytorch_model.bin")
    ours = _serial(resolve(_import(src, tmp_path / "run")))
    ids = torch.randint(0, 512, (2, 32), generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(_logits(ours, ids), _logits(hf, ids), atol=ATOL, rtol=0)


def test_without_transformers_both_commands_name_the_extra(corpus_dir, tmp_path, monkeypatch, capsys):
    _checkpoint(tmp_path / "run", corpus_dir)
    monkeypatch.setitem(sys.modules, "transformers", None)  # `import transformers` now raises ImportError
    for argv in (["export", str(tmp_path / "run"), "--out", str(tmp_path / "hf")],
                 ["import", str(tmp_path / "hf"), "--out", str(tmp_path / "run2")]):
        assert main(["checkpoint", *argv]) == 2
        err = capsys.readouterr().err
        assert "pip install megatron_lite[hf]" in err and err.count("\n") == 1, err


def test_export_refuses_a_non_empty_out_directory(corpus_dir, tmp_path, capsys):
    _checkpoint(tmp_path / "run", corpus_dir)
    (tmp_path / "hf").mkdir()
    (tmp_path / "hf" / "keep.txt").write_text("mine")
    assert main(["checkpoint", "export", str(tmp_path / "run"), "--out", str(tmp_path / "hf")]) == 2
    assert "not empty" in capsys.readouterr().err and (tmp_path / "hf" / "keep.txt").read_text() == "mine"
    shutil.rmtree(tmp_path / "hf")
