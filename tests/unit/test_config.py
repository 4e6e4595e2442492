import os

import pytest

from megatron_lite.config import Config, ConfigError
from megatron_lite.layout import Layout
from tests.conftest import ROOT, cli


def test_tiny_yaml_loads_with_typed_overrides():
    cfg = Config.from_yaml(ROOT / "configs/tiny.yaml",
                           ["train.steps=200", "optim.lr=1e-3", "model.dropout=0.1"])
    assert cfg.train.steps == 200 and isinstance(cfg.train.steps, int)
    assert cfg.optim.lr == pytest.approx(1e-3) and isinstance(cfg.optim.lr, float)
    assert cfg.model.dropout == pytest.approx(0.1)
    assert cfg.model.num_kv_heads == cfg.model.num_attention_heads  # derived default
    # The round trip through YAML gives the same tree (checkpoints store it this way).
    again = Config.from_dict(__import__("yaml").safe_load(cfg.to_yaml()))
    assert again == cfg


def test_zero3_composes_with_tensor_and_pipeline_parallelism():
    """Native ZeRO-3 with tp, pp and sp; DeepSpeed's ZeRO-3 with tp (its partitions are of the
    tensor-parallel shards): layouts a 175B-on-1000-GPUs user needs (OPT-175B's TP8 + FSDP)."""
    native = ["optim.zero.stage=3", "parallel.dp=2", "parallel.tp=2", "parallel.pp=2",
              "parallel.sequence_parallel=true", "parallel.microbatches=2"]
    assert Layout.build(Config.from_yaml(ROOT / "configs/tiny.yaml", native)).dp == 2
    ds = ["optim.zero.stage=3", "optim.zero.backend=deepspeed", "parallel.dp=2", "parallel.tp=2"]
    assert Layout.build(Config.from_yaml(ROOT / "configs/tiny.yaml", ds)).tp == 2


@pytest.mark.parametrize("override, words", [
    (["train.stepz=3"], ["unknown config key train.stepz", "did you mean train.steps"]),
    (["modle.hidden_size=3"], ["unknown config key modle", "did you mean model"]),
    (["train.steps=ten"], ["train.steps='ten'", "must be an integer"]),
    (["train.steps=2.5"], ["train.steps=2.5", "must be an integer"]),
    (["model.norm=batchnorm"], ["model.norm='batchnorm'", "layernorm, rmsnorm"]),
    (["model.tie_embeddings=3"], ["model.tie_embeddings=3", "true or false"]),
    (["model.hidden_size=100", "model.num_attention_heads=3"],
     ["model.hidden_size=100", "num_attention_heads=3"]),
    (["model.num_attention_heads=4", "model.num_kv_heads=3", "model.hidden_size=64"],
     ["model.num_kv_heads=3"]),
    (["data.seq_length=4096"], ["data.seq_length=4096", "max_sequence_length"]),
    (["optim.min_lr=1.0"], ["optim.min_lr=1.0"]),
    (["train.steps=0"], ["train.steps=0", ">= 1"]),
    (["model.dropout=1.5"], ["model.dropout=1.5"]),
    (["optim.weight_decay=nan"], ["optim.weight_decay='nan'", "must be a number"]),
    (["optim.lr=.inf"], ["optim.lr=inf", "must be a number"]),
    (["optim.lr=1e39"], ["optim.lr=1e+39", "overflows float32"]),
    (["optim.lr=1e38", "optim.min_lr=0"], ["optim.lr=1e+38", "overflows float32", "1e+39 > 3.4e+38"]),
    (["train.steps=40", "optim.warmup_steps=50"], ["optim.warmup_steps=50", "decay horizon (40"]),
    (["steps=3"], ["section.key"]),
    (["train.steps"], ["section.key=value"]),
])
def test_bad_values_name_the_key_and_fix_in_one_sentence(override, words):
    with pytest.raises(ConfigError) as e:
        Config.from_yaml(ROOT / "configs/tiny.yaml", override)
    msg = str(e.value)
    for w in words:
        assert w in msg, msg
    assert "\n" not in msg


def test_bad_files(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        Config.from_yaml(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: [1, 2\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        Config.from_yaml(bad)
    bad.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="must hold a mapping"):
        Config.from_yaml(bad)
    bad.write_text("model: 3\n")
    with pytest.raises(ConfigError, match="model must be a mapping"):
        Config.from_yaml(bad)


def test_cli_reports_user_errors_in_one_line_without_traceback(tmp_path):
    cases = [
        ["train", "--config", str(tmp_path / "missing.yaml")],
        ["train", "--config", str(ROOT / "configs/tiny.yaml"), "train.stepz=1"],
        ["train", "--config", str(ROOT / "configs/tiny.yaml"), f"data.dir={tmp_path / 'nodata'}"],
        ["prepare-data", "--source", str(tmp_path / "nothing_here"), "--out", str(tmp_path / "o")],
        ["generate", "--checkpoint", str(tmp_path)],
        ["train", "--config", str(ROOT / "configs/tiny.yaml"), "optim.lr=1e39"],
        ["generate", "--checkpoint", str(tmp_path), "--temperature", "-1"],
        ["generate", "--checkpoint", str(tmp_path), "--top-k", "-5"],
        ["generate", "--checkpoint", str(tmp_path), "--temperature", "nan"],
        ["generate", "--checkpoint", str(tmp_path), "--temperature", "inf"],
        ["generate", "--checkpoint", str(tmp_path), "--seed", str(2**63)],
        ["generate", "--checkpoint", str(tmp_path), "--seed", "-1"],
        ["generate", "--checkpoint", str(tmp_path), "--max-new-tokens", str(10**12)],
        ["prepare-data", "--out", str(tmp_path / "o"), "--seed", "-1"],
        ["prepare-data", "--out", str(tmp_path / "o"), "--max-bytes", "-1"],
        ["generate", "--checkpoint", str(tmp_path), "--prompt", os.fsdecode(b"def \xff(")],  # not UTF-8
    ]
    for args in cases:
        r = cli(*args)
        assert r.returncode == 2, (args, r.stdout, r.stderr)
        lines = r.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: "), r.stderr
        assert "Traceback" not in r.stderr
    assert not (tmp_path / "o").exists()  # nothing written
    # Under a launcher only the first process of each node says it (every rank runs the same checks).
    bad = ["train", "--config", str(ROOT / "configs/tiny.yaml"), "optim.lr=-1"]
    second = {"RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "2"}
    r = cli(*bad, env=second)
    assert r.returncode == 2 and r.stderr == "" and r.stdout == "", r.stderr
    r = cli(*bad, env=dict(second, RANK="0", LOCAL_RANK="0"))
    assert r.returncode == 2 and r.stderr == "error: optim.lr=-1.0 must be positive.\n", r.stderr


INTERLEAVED = ["parallel.pp=2", "parallel.schedule=interleaved", "parallel.virtual_stages=2",
               "parallel.microbatches=2"]


@pytest.mark.parametrize("override, words", [
    (["optim.zero.stage=4"], ["optim.zero.stage=4"]),
    (["optim.zero.backend=deepspeed", "optim.zero.stage=1"], ["parallel.dp=1", "dp >= 2"]),
    (["optim.zero.backend=deepspeed", "optim.zero.stage=2", "parallel.dp=2", "parallel.pp=2"],
     ["ZeRO-2", "parallel.pp=2", "optim.zero.backend=native"]),
    (["optim.zero.backend=deepspeed", "optim.zero.stage=2", "parallel.dp=2", "parallel.tp=2",
      "parallel.sequence_parallel=true"], ["sequence_parallel", "optim.zero.backend=native"]),
    (["optim.zero.backend=deepspeed", "optim.zero.stage=1", "parallel.dp=2", "parallel.pp=2",
      "train.precision=bf16", "parallel.microbatches=2"], ["bf16", "parallel.pp=2", "backend=native"]),
    (["parallel.pp=8"], ["parallel.pp=8", "model.num_layers=4"]),
    (["parallel.pp=2", "parallel.schedule=interleaved", "parallel.virtual_stages=2",
      "parallel.microbatches=3"], ["micro-batches (3)", "multiple of parallel.pp=2"]),
    ([*INTERLEAVED, "parallel.pp_layers=[1,0,2,1]"],
     ["parallel.pp_layers=[1, 0, 2, 1]", "piece 1 with no blocks", "move a block into piece 1"]),
    ([*INTERLEAVED, "parallel.pp_layers=[2,2]"], ["parallel.pp_layers=[2, 2]", "4 block counts"]),
    ([*INTERLEAVED, "parallel.pp=4", "parallel.microbatches=4"],
     ["parallel.pp=4 x parallel.virtual_stages=2 = 8 pipeline pieces", "model.num_layers=4",
      "parallel.partition=balanced"]),
    ([*INTERLEAVED, "parallel.pp=4", "parallel.microbatches=4", "parallel.partition=balanced",
      "model.num_layers=5"], ["8 pipeline pieces exceed model.num_layers + 2 = 7"]),
    (["parallel.pp_layers=[2,-1]"], ["parallel.pp_layers=[2, -1]", ">= 0"]),
    (["parallel.pp_layers=[]"], ["parallel.pp_layers=[]", "null"]),
    (["data.global_batch_size=20", "parallel.microbatches=2"], ["global_batch_size=20", "= 32"]),
])
def test_impossible_layouts_fail_in_one_sentence_before_any_process_group(override, words):
    import torch.distributed as dist
    with pytest.raises(ConfigError) as e:
        Layout.build(Config.from_yaml(ROOT / "configs/tiny.yaml", override))
    for w in words:
        assert w in str(e.value), str(e.value)
    assert "\n" not in str(e.value) and not dist.is_initialized()


def test_uneven_interleaved_layouts_are_accepted():
    """Interleaving no longer needs num_layers divisible by pp x v; explicit counts may leave the end
    pieces to the embedding alone and the head alone; balanced counts both as a block each."""
    tiny = ROOT / "configs/tiny.yaml"
    inter = ["parallel.pp=2", "parallel.schedule=interleaved", "parallel.microbatches=2"]
    assert Layout.build(Config.from_yaml(tiny, [*inter, "parallel.virtual_stages=3", "model.num_layers=8"])
                        ).pieces == [2, 2, 1, 1, 1, 1]
    layout = Layout.build(Config.from_yaml(tiny, [*inter, "parallel.virtual_stages=2",
                                                  "parallel.pp_layers=[0,2,2,0]"]))
    assert [c.layers for c in layout.chunks(0)] == [(), (2, 3)] and layout.chunks(0)[0].first
    assert [c.layers for c in layout.chunks(1)] == [(0, 1), ()] and layout.chunks(1)[1].last
    balanced = [*inter, "parallel.virtual_stages=3", "parallel.partition=balanced"]
    # 4 blocks + the embedding + the head = 6 units: one per piece
    assert Layout.build(Config.from_yaml(tiny, balanced)).pieces == [0, 1, 1, 1, 1, 0]


def test_the_lr_bound_is_where_adamw_really_overflows():
    """Just below the bound AdamW takes its first step; just above, torch raises inside the step —
    which the config refuses first, in one sentence."""
    import torch
    below, above = 0.99 * 3.4028234663852886e38 * 0.1, 1.01 * 3.4028234663852886e38 * 0.1  # beta1 = 0.9
    Config.from_yaml(None, [f"optim.lr={below}", "optim.weight_decay=0"])
    with pytest.raises(ConfigError, match="overflows float32"):
        Config.from_yaml(None, [f"optim.lr={above}", "optim.weight_decay=0"])
    for lr, fails in ((below, False), (above, True)):
        p = torch.nn.Parameter(torch.ones(2))
        p.grad = torch.ones(2)
        opt = torch.optim.AdamW([p], lr=lr, betas=(0.9, 0.95), weight_decay=0)
        if fails:
            with pytest.raises(RuntimeError, match="overflow"):
                opt.step()
        else:
            opt.step()


def test_every_preset_loads_lays_out_and_has_its_published_size():
    """configs/*.yaml are the models they name: each loads, lays out on one process, and counts the
    parameters its paper or model card gives (millions, rounded)."""
    from megatron_lite.model.counts import param_count
    published = {"tiny": None, "tiny-moe": None, "gpt2-125m": 124, "gpt2-350m": 355, "gpt-1.3b": 1316,
                 "llama2-7b": 6738, "llama3-405b": 405853, "mixtral-8x7b": 46703}
    presets = {p.stem: p for p in (ROOT / "configs").glob("*.yaml")}
    assert set(presets) == set(published), "a new preset: add its published size here"
    for name, path in presets.items():
        cfg = Config.from_yaml(path)
        assert Layout.build(cfg).world_size >= 1
        if published[name] is not None:
            assert round(param_count(cfg.model) / 1e6) == published[name], name
    assert Config.from_yaml(presets["tiny-moe"]).model.moe.num_experts == 8
