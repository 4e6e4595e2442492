"""build_stage (meta device, then each parameter materialised from its sliced master value) equals
build_stage_unsliced (the whole serial stage, then parallelize) bit for bit, for every layout the
trainer builds; and its peak memory is one stage's shards plus one full parameter, not the serial
stage.

Parity: 4 gloo ranks build, on each rank, every (model, tp in 1/2/4, sequence parallel, pipeline
stage) both ways and compare names, order, values (torch.equal), attributes, ties and buffers.
The stages cover a whole model, two pipeline halves, interleaved chunks (non-adjacent blocks), and
the end pieces alone (embedding only; head only: the last stage's copy of a tied embedding).

Peak: 2 ranks (tp=2) build a ~100M-parameter stage in a fresh process each way and report the
growth of the resident set's high-water mark (VmHWM, reset through /proc/self/clear_refs), with
every allocation of 64 KiB or more its own mmap so freed tensors leave the resident set.
"""

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import torch

from megatron_lite.config import ModelConfig
from megatron_lite.testing import run_ranks

ROOT = Path(__file__).resolve().parents[2]

VARIANTS = {
    # GPT-2 style: learned positions, LayerNorm, GELU, biases, tied embeddings; vocab 101 is padded
    # at tp 2 and 4 (make_vocab_divisible_by=8)
    "gpt": dict(vocab_size=101, hidden_size=32, num_attention_heads=4, intermediate_size=64),
    # Llama style: RoPE (buffers), RMSNorm, SwiGLU ([gate | up]), GQA (8 q, 4 kv heads: 1 kv head per
    # rank at tp 4), untied, no bias
    "llama": dict(vocab_size=97, hidden_size=64, num_attention_heads=8, num_kv_heads=4,
                  intermediate_size=96, position_embedding="rope", norm="rmsnorm", activation="swiglu",
                  bias=False, tie_embeddings=False),
    # RoPE with tied embeddings (the head-only stage's copy beside RoPE's buffers), multi-head
    # attention, exact GELU, RMSNorm, no bias
    "rope_tied": dict(vocab_size=97, hidden_size=32, num_attention_heads=4, intermediate_size=64,
                      position_embedding="rope", norm="rmsnorm", activation="gelu_exact", bias=False,
                      tie_embeddings=True),
}
# (layers, embed, head): the whole model, pp=2 halves, interleaved chunks, end pieces alone
STAGES = [([0, 1, 2, 3], True, True), ([0, 1], True, False), ([2, 3], False, True),
          ([0, 2], True, False), ([1, 3], False, True), ([], True, False), ([], False, True),
          ([1, 2], False, False)]
MARKS = ("tensor_parallel", "sequence_parallel")


def _compare(old, new, where):
    """Everything a later step reads from the built model: the same either way."""
    old_p = list(old.named_parameters(remove_duplicate=False))
    new_p = list(new.named_parameters(remove_duplicate=False))
    assert [n for n, _ in new_p] == [n for n, _ in old_p], where
    for (name, a), (_, b) in zip(old_p, new_p, strict=True):
        at = f"{name} {where}"
        assert not b.is_meta and b.device == a.device, at
        assert b.dtype == a.dtype and b.shape == a.shape and b.stride() == a.stride(), at
        assert torch.equal(b, a), at
        assert b.requires_grad == a.requires_grad, at
        assert [getattr(b, k, None) for k in MARKS] == [getattr(a, k, None) for k in MARKS], at
    # ties: one object under two names exactly where the old build has one
    old_ids = [id(p) for _, p in old_p]
    new_ids = [id(p) for _, p in new_p]
    assert [old_ids.index(i) for i in old_ids] == [new_ids.index(i) for i in new_ids], where
    old_b, new_b = list(old.named_buffers()), list(new.named_buffers())
    assert [n for n, _ in new_b] == [n for n, _ in old_b], where
    for (name, a), (_, b) in zip(old_b, new_b, strict=True):
        assert not b.is_meta and torch.equal(b, a), f"buffer {name} {where}"
    assert list(new.state_dict()) == list(old.state_dict()), where
    assert [type(m) for m in new.modules()] == [type(m) for m in old.modules()], where
    for i, block in new.blocks.items():
        ref = old.blocks[i].attn
        assert (block.attn.n_head, block.attn.n_kv) == (ref.n_head, ref.n_kv), where


def _check_builds(rank, world):
    import torch.distributed as dist

    from megatron_lite.parallel.random import RNGTracker
    from megatron_lite.parallel.tensor_parallel import build_stage, build_stage_unsliced

    pairs = [dist.new_group([0, 1]), dist.new_group([2, 3])]  # every rank creates every group
    groups = {1: None, 2: pairs[rank // 2], 4: dist.group.WORLD}
    ids = torch.randint(0, 97, (2, 16), generator=torch.Generator().manual_seed(3))
    for variant, kw in VARIANTS.items():
        cfg = ModelConfig(num_layers=4, max_sequence_length=16, **kw)
        for tp, group in groups.items():
            for sp in ((False, True) if tp > 1 else (False,)):
                for layers, embed, head in STAGES:
                    where = f"[{variant} tp={tp} sp={sp} {layers} embed={embed} head={head} rank={rank}]"
                    built = []
                    for build in (build_stage_unsliced, build_stage):
                        tracker = RNGTracker(7, rank % tp, torch.device("cpu")) if tp > 1 else None
                        built.append(build(cfg, 5, layers, embed, head, "cpu", group, sequence_parallel=sp,
                                           make_vocab_divisible_by=8, tracker=tracker))
                    (old, old_tp), (new, new_tp) = built
                    _compare(old, new, where)
                    if tp > 1:
                        assert new_tp.sharder.padded_vocab == old_tp.sharder.padded_vocab, where
                        assert new_tp.serial_shapes == old_tp.serial_shapes, where
                    if embed and head and len(layers) == cfg.num_layers:
                        with torch.no_grad():  # the whole model: the same logits (buffers in use)
                            assert torch.equal(new.eval()(ids)[0], old.eval()(ids)[0]), where


def test_build_stage_is_bit_identical_to_the_serial_build_then_parallelize():
    run_ranks(_check_builds, 4)


def _check_expert_builds(rank, world):
    import torch.distributed as dist

    from megatron_lite.parallel.expert_parallel import apply_expert_parallel
    from megatron_lite.parallel.tensor_parallel import build_stage, build_stage_unsliced
    cfg = ModelConfig(num_layers=4, max_sequence_length=16, **VARIANTS["llama"],
                      moe=dict(num_experts=4, top_k=2, intermediate_size=24, layer_freq=2,
                               num_shared_experts=1))
    for layers, embed, head in STAGES:
        where = f"[moe ep=2 {layers} embed={embed} head={head} rank={rank}]"
        old, _ = build_stage_unsliced(cfg, 5, layers, embed, head, "cpu")
        apply_expert_parallel(old, dist.group.WORLD)
        new, _ = build_stage(cfg, 5, layers, embed, head, "cpu", ep_group=dist.group.WORLD)
        _compare(old, new, where)
        experts = [p for n, p in new.named_parameters() if ".experts." in n]
        assert all(p.shape[0] == 2 and p.expert_parallel for p in experts), where  # this rank's 2 of 4
        assert len(experts) == 2 * sum(cfg.moe.is_moe(i) for i in layers), where


def test_build_stage_slices_the_experts_before_materialising_them():
    """Under expert parallelism build_stage slices each MoE layer's experts on the meta device and
    materialises only this rank's (from their sliced master values): bit-identical to building the
    serial stage and then apply_expert_parallel, for every stage shape."""
    run_ranks(_check_expert_builds, 2)


# ---- peak memory -----------------------------------------------------------------------------------
PEAK_MODEL = dict(vocab_size=8000, hidden_size=1024, num_layers=8, num_attention_heads=16,
                  max_sequence_length=128)  # 8 x 12.6M + 8.2M (tied) + 0.1M: ~109M fp32 parameters
PEAK_WORKER = textwrap.dedent("""
    import json, os, sys
    import torch
    import torch.distributed as dist
    from megatron_lite.config import ModelConfig
    from megatron_lite.parallel.tensor_parallel import build_stage, build_stage_unsliced

    def kib(field):
        for line in open("/proc/self/status"):
            if line.startswith(field + ":"):
                return int(line.split()[1])

    torch.set_num_threads(1)
    rank, world, store, how, out = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4], sys.argv[5]
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    cfg = ModelConfig(**json.loads(sys.argv[6]))
    build = build_stage if how == "meta" else build_stage_unsliced
    small = ModelConfig(vocab_size=256, hidden_size=64, num_layers=1, num_attention_heads=4,
                        max_sequence_length=16)
    for warm in (build_stage, build_stage_unsliced):  # torch's lazily loaded code, before the mark
        warm(small, 0, [0], True, True, "cpu", dist.group.WORLD, make_vocab_divisible_by=128)
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # VmHWM := VmRSS
    before = kib("VmRSS") * 1024
    model, _ = build(cfg, 0, range(cfg.num_layers), True, True, "cpu", dist.group.WORLD,
                     make_vocab_divisible_by=128)
    peak = kib("VmHWM") * 1024
    held = sum(p.numel() * p.element_size() for p in model.parameters())
    json.dump({"growth": peak - before, "held": held}, open(f"{out}.{rank}", "w"))
    dist.destroy_process_group()
""")


def _peak(how: str, tmp_path: Path) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MALLOC_MMAP_THRESHOLD_": "65536"}
    env["PYTHONPATH"] = f"{ROOT}{os.pathsep}{env.get('PYTHONPATH', '')}"
    store, out = tmp_path / f"store_{how}", tmp_path / f"peak_{how}"
    procs = [subprocess.Popen([sys.executable, "-c", PEAK_WORKER, str(r), "2", str(store), how, str(out),
                               json.dumps(PEAK_MODEL)], env=env) for r in range(2)]
    assert [p.wait(timeout=300) for p in procs] == [0, 0]
    return json.loads(Path(f"{out}.0").read_text())


def test_build_peak_is_the_shards_and_one_full_parameter(tmp_path):
    from megatron_lite.plan.stage import stage_params
    cfg = ModelConfig(**PEAK_MODEL)
    serial = stage_params(cfg, cfg.num_layers, True, True, 1, 128)
    shards = stage_params(cfg, cfg.num_layers, True, True, 2, 128)
    full = 4 * max(serial.sizes)  # the largest parameter, fp32 (fc1 / fc2: 4h x h)
    old, new = _peak("unsliced", tmp_path), _peak("meta", tmp_path)
    assert new["held"] == old["held"] == 4 * shards.total
    # the serial stage, then the shards sliced from it
    assert old["growth"] >= 4 * serial.total + 0.9 * 4 * shards.total, old
    # the shards and one full parameter at a time: what plan/memory.build_peak counts on CPU (the full
    # value and the padded copy slicing may make of it)
    assert 4 * shards.total <= new["growth"] <= 4 * shards.total + 2 * full, new
    print(f"build peak growth (tp=2, {serial.total / 1e6:.0f}M parameters): serial then slice "
          f"{old['growth'] / 2**20:.0f} MiB, meta then materialise {new['growth'] / 2**20:.0f} MiB "
          f"(shards {4 * shards.total / 2**20:.0f} MiB, largest parameter {full / 2**20:.0f} MiB)")


def test_plan_build_term_is_the_shards_not_the_serial_stage():
    """plan/memory's build term follows build_stage: Llama 3 405B at TP8 PP16 (interleaved v=4) builds
    in the fp32 shards of a stage plus the optimizer's bucket copy on the GPU (the full values stay on
    the host), ~14 GB instead of the serial stage's ~115 GB, so building is no longer the peak."""
    from megatron_lite import plan
    from megatron_lite.config import Config
    from megatron_lite.layout import Layout
    from megatron_lite.plan.memory import model_state
    cfg = Config.from_yaml(ROOT / "configs" / "llama3-405b.yaml", [
        "parallel.tp=8", "parallel.pp=16", "parallel.dp=128", "parallel.schedule=interleaved",
        "parallel.virtual_stages=4", "parallel.microbatches=16", "data.micro_batch_size=1",
        "data.global_batch_size=2048", "optim.zero.stage=1"])
    layout = Layout.build(cfg, 16384)
    for stage in (0, 7, 15):
        mem = plan.memory_of(layout, stage)
        shards = 4 * plan.rank_params(layout, stage).total
        assert mem.build == shards + model_state(layout, stage).build_transient
        assert mem.build < 16e9 and mem.phase != "build", mem
        # on CPU the full master value (and the padded copy slicing may make) sits beside the shards
        cpu = plan.memory_of(layout, stage, device="cpu").build
        blocks = sum(len(c.layers) for c in layout.chunks(stage))
        serial = plan.stage_params(cfg.model, blocks, stage == 0, stage == 15, 1)  # tp = 1: full shapes
        optimizer = model_state(layout, stage, 0, "cpu").build_transient
        assert cpu == shards + max(2 * 4 * max(serial.sizes), optimizer)
