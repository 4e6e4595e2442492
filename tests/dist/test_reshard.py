"""A checkpoint written at one layout resumes at another: weights and optimizer moments resharded,
the data cursor continued. Each case trains 4 steps at layout A (a checkpoint at step 4), resumes
at layout B and trains steps 5-8; its losses equal an uninterrupted serial run's (fp32, the same
global batch of 8 samples: only the summation order differs, rel 1e-5 as in every parity test),
and the state B loaded — every stored weight and AdamW moment, consolidated — equals what A saved,
bit for bit (resharding moves bytes, it does no arithmetic)."""

import importlib.util
import shutil
from pathlib import Path

import pytest
import torch

from megatron_lite.checkpoint import CheckpointManager, read_manifest
from megatron_lite.checkpoint.store import Store
from megatron_lite.testing import tiny_overrides
from tests.conftest import cli
from tests.dist.test_tp_train import train, train_serial

DS = "optim.zero.backend=deepspeed"
LAYOUTS = {  # name -> (processes, overrides): every layout's global batch is 2 x 4 = 8 samples
    "serial": (1, ["train.grad_accum=4"]),
    "tp2pp2": (4, ["parallel.tp=2", "parallel.pp=2", "parallel.microbatches=4"]),
    "tp2pp2dp2_zero1": (8, ["parallel.tp=2", "parallel.pp=2", "parallel.dp=2", "parallel.microbatches=2",
                            "optim.zero.stage=1"]),
    "pp2dp4": (8, ["parallel.pp=2", "parallel.dp=4", "parallel.microbatches=1"]),
    "dp2_ds_zero2": (2, ["parallel.dp=2", "train.grad_accum=2", DS, "optim.zero.stage=2"]),
    "dp2_ds_zero3": (2, ["parallel.dp=2", "train.grad_accum=2", DS, "optim.zero.stage=3"]),
    "tp2": (2, ["parallel.tp=2", "train.grad_accum=4"]),
    "pp2_interleaved": (2, ["parallel.pp=2", "parallel.schedule=interleaved", "parallel.virtual_stages=2",
                            "parallel.microbatches=4"]),
    "pp4": (4, ["parallel.pp=4", "parallel.microbatches=4"]),
    "dp4": (4, ["parallel.dp=4", "train.grad_accum=1"]),
    "dp2_zero1": (2, ["parallel.dp=2", "train.grad_accum=2", "optim.zero.stage=1"]),
    # the native distributed optimizer: ZeRO-2 under tp + sp (small buckets: parameters cut between
    # the shards), and bf16 weights with fp32 masters (what a checkpoint stores: the masters)
    "tp2dp2_zero2_sp": (4, ["parallel.tp=2", "parallel.dp=2", "parallel.sequence_parallel=true",
                            "train.grad_accum=2", "optim.zero.stage=2", "optim.zero.bucket_elements=5000"]),
    "dp2_zero2_bf16": (2, ["parallel.dp=2", "train.grad_accum=2", "optim.zero.stage=2", "train.precision=bf16"]),
    "pp2dp2_zero1_bf16": (4, ["parallel.pp=2", "parallel.dp=2", "parallel.microbatches=2", "optim.zero.stage=1",
                              "train.precision=bf16"]),
    "serial_bf16": (1, ["train.grad_accum=4", "train.precision=bf16"]),
    # native ZeRO-3 (weights sharded over dp, gathered per block) with tp, pp and sp
    "tp2pp2dp2_zero3": (8, ["parallel.tp=2", "parallel.pp=2", "parallel.dp=2", "parallel.microbatches=2",
                            "optim.zero.stage=3"]),
    "tp2dp2_zero3_sp_bf16": (4, ["parallel.tp=2", "parallel.dp=2", "parallel.sequence_parallel=true",
                                 "train.grad_accum=2", "optim.zero.stage=3", "train.precision=bf16"]),
}


def _base(corpus_dir):
    return tiny_overrides(corpus_dir, "model.num_layers=4", "model.hidden_size=64", "data.micro_batch_size=2",
                          "train.steps=8", "checkpoint.interval=4", "train.eval_interval=100", "train.eval_iters=2",
                          "optim.warmup_steps=2", "optim.grad_clip=0.5", "log.interval=1")


def stored(path: Path) -> dict[str, torch.Tensor]:
    """Every stored model/optimizer tensor of a checkpoint, whole (its RNG streams left out)."""
    index = read_manifest(path)["tensors"]
    store = Store(path, index)
    return {k: store.read(k, (0,) * len(e["shape"]), tuple(e["shape"])) for k, e in index.items()
            if not k.startswith("rng/")}


@pytest.fixture(scope="module")
def serial_reference(corpus_dir, tmp_path_factory):
    """The uninterrupted serial run of each precision (bf16 only when a case needs it)."""
    runs = {}

    def get(precision: str):
        if precision not in runs:
            name = "serial" if precision == "fp32" else "serial_bf16"
            out = tmp_path_factory.mktemp(f"reshard_ref_{precision}")
            runs[precision] = train_serial(out, name, *_base(corpus_dir), *LAYOUTS[name][1],
                                           f"train.out_dir={out / 'run'}")
        return runs[precision]
    return get


CASES = [("tp2pp2", "serial"), ("serial", "tp2pp2"), ("tp2pp2dp2_zero1", "pp2dp4"), ("dp2_ds_zero2", "tp2"),
         ("dp2_ds_zero3", "serial"), ("pp2_interleaved", "pp4"), ("tp2dp2_zero2_sp", "dp2_zero1"),
         ("pp2dp2_zero1_bf16", "tp2dp2_zero3_sp_bf16"), ("tp2pp2dp2_zero3", "dp2_zero1")]


@pytest.mark.slow
@pytest.mark.parametrize("src, dst", CASES, ids=[f"{a}->{b}" for a, b in CASES])
def test_reshard(src, dst, corpus_dir, tmp_path, serial_reference):
    if DS in LAYOUTS[src][1] + LAYOUTS[dst][1] and importlib.util.find_spec("deepspeed") is None:
        pytest.skip("needs the DeepSpeed extra")
    base = _base(corpus_dir)
    run = tmp_path / "run"
    (n_src, o_src), (n_dst, o_dst) = LAYOUTS[src], LAYOUTS[dst]
    first = train(tmp_path, "a", n_src, *base, *o_src, f"train.out_dir={run}", "train.exit_interval=4")
    saved = run / "checkpoints" / "step_00000004"
    keep = tmp_path / "saved"
    shutil.copytree(saved, keep)  # what layout A wrote, before layout B's run adds its own checkpoints
    second = train(tmp_path, "b", n_dst, *base, *o_dst, f"train.out_dir={run}", f"--copy-to={tmp_path / 'loaded'}")
    assert second["resumed"] and second["start"] == {"step": 4, "cursor": 32}  # 4 steps x 8 samples
    # bf16 against the serial bf16 run: test_data_parallel's tolerance (rounding differences of bf16)
    bf16 = "train.precision=bf16" in o_src
    reference = serial_reference("bf16" if bf16 else "fp32")["train_loss"]
    assert first["train_loss"] + second["train_loss"] == pytest.approx(reference, rel=5e-3 if bf16 else 1e-5)
    want = stored(keep)
    got = stored(CheckpointManager(tmp_path / "loaded" / "checkpoints").latest())
    assert set(got) == set(want) and any(k.startswith("optim/exp_avg/") for k in want)
    for key, t in want.items():
        assert torch.equal(got[key], t), f"{src}->{dst}: {key} changed by the reshard"
    # Every backend's checkpoint (DeepSpeed ZeRO-3's included) generates single-process.
    g = cli("generate", "--checkpoint", str(keep), "--prompt", "def ", "--max-new-tokens", "5", "--temperature", "0")
    assert g.returncode == 0 and g.stdout.startswith("def "), g.stderr


@pytest.mark.slow
def test_data_parallel_replicas_are_stored_once(corpus_dir, tmp_path):
    """Bytes on disk: a dp=4 checkpoint holds the same tensors as a serial one, written once."""
    base = _base(corpus_dir) + ["train.steps=2", "checkpoint.interval=2", "optim.warmup_steps=1"]
    sizes = {}
    for name in ("serial", "dp4"):
        n, o = LAYOUTS[name]
        train(tmp_path, name, n, *base, *o, f"train.out_dir={tmp_path / name}")
        path = tmp_path / name / "checkpoints" / "step_00000002"
        sizes[name] = sum(f.stat().st_size for f in path.glob("rank_*.safetensors"))
        index = read_manifest(path)["tensors"]
        assert "model/lm_head.weight" not in index  # the tied embedding is stored once
    assert sizes["dp4"] / sizes["serial"] <= 1.02, sizes


EXACT = ["pp2_interleaved", "dp2_zero1", "dp2_ds_zero2", "tp2pp2dp2_zero1", "dp2_zero2_bf16"]


@pytest.mark.slow
@pytest.mark.parametrize("layout", EXACT)
def test_exact_resume_at_the_same_layout(layout, corpus_dir, tmp_path):
    """8 straight steps == 4, stop, resume, 4 — bit for bit (weights, moments, step counts, every
    rank's RNG streams and the data cursor come back exactly; dropout on)."""
    n, o = LAYOUTS[layout]
    if DS in o and importlib.util.find_spec("deepspeed") is None:
        pytest.skip("needs the DeepSpeed extra")
    base = _base(corpus_dir) + ["model.dropout=0.1", *o]
    straight = train(tmp_path, "s", n, *base, f"train.out_dir={tmp_path / 's'}")
    first = train(tmp_path, "a", n, *base, f"train.out_dir={tmp_path / 'r'}", "train.exit_interval=4")
    second = train(tmp_path, "b", n, *base, f"train.out_dir={tmp_path / 'r'}")
    assert second["resumed"] and first["train_loss"] + second["train_loss"] == straight["train_loss"]
