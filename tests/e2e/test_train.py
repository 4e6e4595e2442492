"""The training loop end to end, in process and through the CLI."""

import math
from pathlib import Path

import pytest
import torch

from megatron_lite.checkpoint import CheckpointError, CheckpointManager
from megatron_lite.train import Trainer, TrainingError
from tests.conftest import cli
from tests.unit.test_checkpoint_integrity import rewrite_manifest


def test_resume_is_bit_exact(tiny_config, tmp_path):
    """20 steps in one run == 10 steps, stop, resume, 10 steps: identical losses, bit for bit.
    Dropout is on, so the RNG state must be restored too; grad accumulation exercises the cursor."""
    common = ["model.dropout=0.1", "train.grad_accum=2", "checkpoint.interval=100"]
    straight = Trainer(tiny_config(*common, f"train.out_dir={tmp_path / 'a'}"))
    full = straight.fit()["train_loss"]
    first = Trainer(tiny_config(*common, f"train.out_dir={tmp_path / 'b'}", "train.exit_interval=10"))
    part1 = first.fit()["train_loss"]
    assert len(part1) == 10 and first.state.step == 10
    second = Trainer(tiny_config(*common, f"train.out_dir={tmp_path / 'b'}"))
    assert second.resumed_from is not None and second.state.step == 10 and second.state.cursor == 80
    part2 = second.fit()["train_loss"]
    assert part1 + part2 == full  # exact float equality
    for a, b in zip(straight.model.parameters(), second.model.parameters(), strict=True):
        assert torch.equal(a, b)
    # A run resumed at its final step has nothing left to do.
    done = Trainer(tiny_config(*common, f"train.out_dir={tmp_path / 'b'}"))
    assert done.fit()["train_loss"] == []


def test_validation_loss_falls_and_grad_accum_matches_a_big_batch(tiny_config, tmp_path):
    hist = Trainer(tiny_config("train.steps=40", "train.eval_interval=40")).fit()
    (_, v0), (_, v1) = hist["val_loss"][0], hist["val_loss"][-1]
    assert v1 < v0 - 0.5, hist["val_loss"]
    # grad_accum=2 x micro 4 sees the same 8 samples as micro 8: same loss and update.
    short = ("train.steps=3", "optim.warmup_steps=1")
    a = Trainer(tiny_config("data.micro_batch_size=8", *short, f"train.out_dir={tmp_path / 'm8'}"))
    b = Trainer(tiny_config("train.grad_accum=2", *short, f"train.out_dir={tmp_path / 'm4'}"))
    la, lb = a.fit()["train_loss"], b.fit()["train_loss"]
    # Same math in another summation order: float32 rounding only (~1e-7 relative).
    assert la == pytest.approx(lb, rel=1e-5)
    for pa, pb in zip(a.model.parameters(), b.model.parameters(), strict=True):
        torch.testing.assert_close(pa, pb, rtol=1e-4, atol=1e-5)


def test_tensorboard_scalars_are_written(tiny_config):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    cfg = tiny_config()
    Trainer(cfg).fit()
    acc = EventAccumulator(str(Path(cfg.train.out_dir) / "tb"))
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    expected = {"train/loss", "train/lr", "train/grad_norm", "train/tokens_per_s", "train/mfu",
                "train/memory_gb", "val/loss", "val/perplexity"}
    assert expected <= tags, tags
    assert [e.step for e in acc.Scalars("train/loss")] == [5, 10, 15, 20]
    assert [e.step for e in acc.Scalars("val/loss")] == [0, 10, 20]
    assert all(e.value > 0 and math.isfinite(e.value) for e in acc.Scalars("train/tokens_per_s"))
    assert all(0 < e.value < 10 for e in acc.Scalars("train/mfu"))


def _poison(trainer, bad_steps):
    """Make the loss NaN on the given (1-based) optimizer steps."""
    real = trainer.model.forward
    calls = {"n": 0}

    def forward(ids, labels=None, cache=None, docs=None):
        logits, loss = real(ids, labels, cache, docs=docs)
        if labels is not None and trainer.model.training:
            calls["n"] += 1
            if trainer.state.step + 1 in bad_steps:
                loss = loss * float("nan")
        return logits, loss
    trainer.model.forward = forward


def test_non_finite_steps_are_skipped_then_stop_the_run(tiny_config, tmp_path, caplog):
    trainer = Trainer(tiny_config("train.steps=8", "checkpoint.interval=4"))
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    _poison(trainer, bad_steps={1, 2})
    with caplog.at_level("INFO", logger="megatron_lite"):
        hist = trainer.fit()
    lines = [r.getMessage() for r in caplog.records]
    assert hist["skipped"] == [1, 2] and trainer.state.total_skips == 2
    assert sum("skipped: loss nan" in line for line in lines) == 2, lines
    assert all(math.isfinite(x) for x in hist["train_loss"][2:])
    # The two poisoned steps left the weights alone: step 3 is the first update, and a checkpoint
    # written at step 4 holds finite weights.
    for n, p in trainer.model.named_parameters():
        assert torch.isfinite(p).all(), n
    assert any(not torch.equal(before[n], p) for n, p in trainer.model.named_parameters())

    stopper = Trainer(tiny_config("train.steps=8", "train.max_skipped_steps=2",
                                  f"train.out_dir={tmp_path / 'stop'}"))
    _poison(stopper, bad_steps={2, 3, 4, 5})
    with pytest.raises(TrainingError, match="3 consecutive steps.*max_skipped_steps=2"):
        stopper.fit()
    assert CheckpointManager(tmp_path / "stop" / "checkpoints").latest() is None


def test_bf16_autocast_tracks_fp32(tiny_config, tmp_path):
    fp32 = Trainer(tiny_config("train.steps=10", f"train.out_dir={tmp_path / 'f'}")).fit()
    bf16 = Trainer(tiny_config("train.steps=10", "train.precision=bf16",
                               f"train.out_dir={tmp_path / 'b'}")).fit()
    # bf16 has an 8-bit mantissa (~0.4% relative rounding per op): losses agree to a few percent.
    for a, b in zip(fp32["train_loss"], bf16["train_loss"], strict=True):
        assert b == pytest.approx(a, rel=0.03)


def test_resuming_a_different_model_is_refused_in_one_sentence(tiny_config):
    from megatron_lite.config import ConfigError
    Trainer(tiny_config("train.steps=10")).fit()
    with pytest.raises(ConfigError, match="different model.*model.hidden_size.*new train.out_dir"):
        Trainer(tiny_config("train.steps=10", "model.hidden_size=64"))
    # Even past that check (config.yaml gone), DCP's own error becomes one sentence.
    trainer = Trainer(tiny_config("train.steps=10"))
    trainer.close()  # it holds the run directory until then
    ckpt = trainer.checkpoints.latest()
    (ckpt / "config.yaml").unlink()
    rewrite_manifest(ckpt, lambda m: m["files"].pop("config.yaml"))
    with pytest.raises(CheckpointError, match="does not fit this model"):
        Trainer(tiny_config("train.steps=10", "model.hidden_size=64"))


def test_vocab_smaller_than_the_tokenizer_is_refused(tiny_config):
    from megatron_lite.config import ConfigError
    with pytest.raises(ConfigError, match="model.vocab_size=100 is smaller.*512"):
        Trainer(tiny_config("model.vocab_size=100"))


@pytest.mark.slow
@pytest.mark.parametrize("config", ["tiny", "tiny-moe"])
def test_cli_prepare_train_generate(tmp_path, config):
    """`make train`'s path, for the dense demo and its mixture-of-experts twin (configs/tiny-moe.yaml)."""
    data, run = tmp_path / "data", tmp_path / "run"
    r = cli("prepare-data", "--source", "stdlib", "--out", str(data), "--max-bytes", "1500000",
            "--vocab-size", "1024")
    assert r.returncode == 0, r.stderr
    r = cli("train", "--config", f"configs/{config}.yaml", f"data.dir={data}", f"train.out_dir={run}",
            "model.vocab_size=1024", "train.steps=120", "train.eval_interval=60", "train.progress=false",
            "train.sample_tokens=30", "checkpoint.interval=60")
    assert r.returncode == 0, r.stderr[-3000:]
    out = r.stdout
    assert "validation loss: first" in out and "---- sample ----" in out
    assert ("expert load max/mean" in r.stderr + out) == (config == "tiny-moe")  # the router's metrics
    first, last = (float(x.split()[0]) for x in out.split("validation loss: first ")[1].split("-> last ")[:2])
    assert last < first - 2.0, out
    assert (sorted(p.name for p in (run / "checkpoints").iterdir())
            == ["latest", "step_00000060", "step_00000120"])
    r = cli("generate", "--checkpoint", str(run), "--prompt", "import os\n", "--max-new-tokens", "20",
            "--temperature", "0")
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("import os\n") and len(r.stdout) > len("import os\n") + 10


def test_a_stop_hook_ends_the_run_with_a_checkpoint_and_the_rerun_finishes_it(tiny_config, tmp_path):
    """The seam the launcher's preemption handling plugs into: a hook that answers "stop" ends the
    loop at a step boundary with a checkpoint; rerunning resumes and ends exactly where an
    uninterrupted run ends."""
    common = ("train.steps=12", "checkpoint.interval=100")
    straight = Trainer(tiny_config(*common, f"train.out_dir={tmp_path / 'a'}")).fit()["train_loss"]
    stop_at_5 = lambda t: "preempted (test)" if t.state.step >= 5 else None
    first = Trainer(tiny_config(*common, f"train.out_dir={tmp_path / 'b'}"), stop_hooks=(stop_at_5,))
    assert first.should_stop() is None
    part1 = first.fit()["train_loss"]
    assert len(part1) == 5 and first.should_stop() == "preempted (test)"
    assert first.checkpoints.latest().name == "step_00000005"
    second = Trainer(tiny_config(*common, f"train.out_dir={tmp_path / 'b'}"))
    part2 = second.fit()["train_loss"]
    assert second.resumed_from is not None and part1 + part2 == straight


def test_a_damaged_newest_checkpoint_is_named_and_the_run_falls_back(tiny_config, tmp_path, caplog):
    run = tmp_path / "run"
    Trainer(tiny_config("train.steps=20", "checkpoint.interval=10")).fit()  # step_10, step_20
    newest = run / "checkpoints" / "step_00000020"
    shard = next(newest.rglob("*.safetensors"))
    data = bytearray(shard.read_bytes())
    data[len(data) // 3] ^= 0x10  # one bit: the size is unchanged
    shard.write_bytes(bytes(data))
    # Offline tools refuse it in one sentence instead of loading damaged tensors.
    for args in (("checkpoint", "verify", str(run)), ("generate", "--checkpoint", str(run))):
        r = cli(*args)
        assert r.returncode == 2 and str(shard) in r.stderr and "Traceback" not in r.stderr, r.stderr
    with caplog.at_level("WARNING", logger="megatron_lite"):
        trainer = Trainer(tiny_config("train.steps=20", "checkpoint.interval=10"))
    assert trainer.resumed_from.name == "step_00000010" and trainer.state.step == 10
    assert any(str(shard) in r.getMessage() for r in caplog.records)
    trainer.fit()  # trains 10 -> 20 again and replaces the damaged step_20
    assert cli("checkpoint", "verify", str(run)).returncode == 0


class _Payload:
    """Unpickling this runs a shell command that creates `marker`."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        import os
        return os.system, (f"touch {self.marker}",)


def test_nothing_in_a_checkpoint_runs_code_when_loaded(tiny_config, tmp_path, capsys):
    """An attacker replaces each file of a checkpoint with a pickle payload (a YAML python-object
    tag for config.yaml) and even fixes the manifest's checksum: resume, generate, inspect and
    convert refuse it in one sentence or ignore it, and the payload never runs (nothing unpickles)."""
    import json
    import pickle
    import shutil

    from megatron_lite.checkpoint.integrity import file_digest
    from megatron_lite.cli import main
    from megatron_lite.errors import UserError
    Trainer(tiny_config("train.steps=2", "checkpoint.interval=2", "optim.warmup_steps=1")).fit()
    good = tmp_path / "run" / "checkpoints" / "step_00000002"
    marker = tmp_path / "pwned"
    pickle.loads(pickle.dumps(_Payload(marker)))  # the payload is live: unpickling it runs the command
    assert marker.exists()
    marker.unlink()
    names = [n for n in json.loads((good / "manifest.json").read_text())["files"]] + ["manifest.json"]
    assert {"config.yaml", "tokenizer.json", "meta.json", "rank_00000.safetensors"} <= set(names)
    for name in names:
        run = tmp_path / f"evil_{name}"
        shutil.copytree(good.parent.parent, run)
        ck = run / "checkpoints" / "step_00000002"
        evil = (f"!!python/object/apply:os.system ['touch {marker}']\n".encode() if name == "config.yaml"
                else pickle.dumps(_Payload(marker)))
        (ck / name).write_bytes(evil)
        if name != "manifest.json":  # the attacker also makes the checksums match
            entry = {"size": len(evil), "xxh3_64": file_digest(ck / name)}
            rewrite_manifest(ck, lambda m, name=name, entry=entry: m["files"].update({name: entry}))
        try:
            Trainer(tiny_config("train.steps=4", "optim.warmup_steps=1", f"train.out_dir={run}")).fit()
        except UserError:
            pass
        for args in (["generate", "--checkpoint", str(run), "--max-new-tokens", "2"],
                     ["checkpoint", "inspect", str(run)],
                     ["checkpoint", "convert", str(run), str(tmp_path / f"conv_{name}")]):
            assert main(args) in (0, 2), (name, args)
        assert not marker.exists(), f"a payload in {name} ran"
    capsys.readouterr()


def test_convert_consolidates_into_one_file_that_resumes_exactly(tiny_config, tmp_path):
    from megatron_lite.checkpoint import convert, read_manifest
    common = ("train.steps=8", "checkpoint.interval=4", "model.dropout=0.1")
    straight = Trainer(tiny_config(*common, f"train.out_dir={tmp_path / 'a'}")).fit()["train_loss"]
    Trainer(tiny_config(*common, f"train.out_dir={tmp_path / 'b'}", "train.exit_interval=4")).fit()
    out = convert(tmp_path / "b" / "checkpoints" / "step_00000004", tmp_path / "c")
    assert [p.name for p in out.glob("*.safetensors")] == ["rank_00000.safetensors"]
    assert read_manifest(out)["layout"]["tp"] == 1 and cli("checkpoint", "verify", str(out)).returncode == 0
    resumed = Trainer(tiny_config(*common, f"train.out_dir={tmp_path / 'c'}"))
    assert resumed.state.step == 4
    assert resumed.fit()["train_loss"] == straight[4:]  # bit for bit, dropout RNG included
    with pytest.raises(CheckpointError, match="already holds checkpoints"):
        convert(out, tmp_path / "c")


def test_async_save_writes_the_same_checkpoint_while_training_goes_on(tiny_config, tmp_path, monkeypatch):
    """checkpoint.async_save: the step-4 checkpoint written in the background while steps 5.. run
    holds exactly what a synchronous save holds (a snapshot, not the live tensors); the losses are
    the same; a background write that fails leaves the previous checkpoint the chosen one."""
    from megatron_lite.checkpoint import read_manifest
    from tests.dist.test_reshard import stored
    common = ("train.steps=8", "checkpoint.interval=4", "model.dropout=0.1")
    sync = Trainer(tiny_config(*common, f"train.out_dir={tmp_path / 's'}")).fit()["train_loss"]

    from megatron_lite.checkpoint.store import ShardWriter
    real_write = ShardWriter.write

    def slow_write(self, directory):  # the next optimizer step surely runs before the bytes are written
        import time
        time.sleep(0.3)
        return real_write(self, directory)
    monkeypatch.setattr(ShardWriter, "write", slow_write)
    background = Trainer(tiny_config(*common, "checkpoint.async_save=true",
                                     f"train.out_dir={tmp_path / 'a'}"))
    assert background.fit()["train_loss"] == sync
    monkeypatch.setattr(ShardWriter, "write", real_write)
    for step in ("step_00000004", "step_00000008"):
        a, s = (tmp_path / d / "checkpoints" / step for d in ("a", "s"))
        want, got = stored(s), stored(a)
        assert set(got) == set(want) and all(torch.equal(got[k], want[k]) for k in want), step
        assert read_manifest(a)["train"] == read_manifest(s)["train"]
    # A background write that fails: the error surfaces at the commit, nothing is committed.
    import safetensors.torch
    failing = Trainer(tiny_config("train.steps=12", "checkpoint.interval=4", "model.dropout=0.1",
                                  "checkpoint.async_save=true", f"train.out_dir={tmp_path / 'a'}"))

    def disk_full(*a, **k):
        raise OSError("disk full")
    monkeypatch.setattr(safetensors.torch, "save_file", disk_full)
    with pytest.raises(OSError, match="disk full"):
        failing.fit()
    assert CheckpointManager(tmp_path / "a" / "checkpoints").latest().name == "step_00000008"


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["sync", "async"])
def test_sigkill_during_a_save_leaves_the_previous_checkpoint_chosen(corpus_dir, tmp_path, mode):
    """SIGKILL while step 4's files are written (its tensors on disk, nothing committed): step 2
    stays the newest checkpoint, verifies and resumes; the half-written step is removed at the next
    save."""
    import os
    import signal
    import subprocess
    import sys
    import time

    from tests.conftest import ROOT
    ready, out = tmp_path / "ready", tmp_path / "run"
    proc = subprocess.Popen([sys.executable, "-m", "tests.e2e.kill_during_save", str(ready), str(out),
                             str(corpus_dir), mode], cwd=ROOT, env=dict(os.environ, OMP_NUM_THREADS="1"),
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 120
    while not ready.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.1)
    assert ready.exists(), proc.stderr.read().decode()[-2000:] if proc.poll() is not None else "timed out"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    ckpts = out / "checkpoints"
    assert (ckpts / ".step_00000004.tmp").is_dir()  # the interrupted save's debris
    assert CheckpointManager(ckpts).latest().name == "step_00000002"
    assert cli("checkpoint", "verify", str(out)).returncode == 0
    from megatron_lite.config import Config
    from megatron_lite.testing import tiny_overrides
    again = Trainer(Config.from_yaml(None, tiny_overrides(corpus_dir, f"train.out_dir={out}",
                                                          "train.steps=8", "checkpoint.interval=2",
                                                          "optim.warmup_steps=1")))
    assert again.resumed_from.name == "step_00000002" and again.state.step == 2
    again.fit()
    assert not (ckpts / ".step_00000004.tmp").exists()
    assert CheckpointManager(ckpts).latest().name == "step_00000008"


@pytest.fixture(scope="module")
def run_with_two_checkpoints(corpus_dir, tmp_path_factory):
    """A run directory trained through the CLI: step_10 and step_20."""
    from megatron_lite.testing.faults import overrides, train_argv
    from tests.e2e.faults import run
    out = tmp_path_factory.mktemp("fallback") / "run"
    argv = train_argv(*overrides(corpus_dir, out, "train.steps=20", "checkpoint.interval=10"))
    code, text = run(argv, out.parent / "train.log")
    assert code == 0, text[-3000:]
    return out, argv


def _flip_manifest(ck):  # the fault run's flipped byte: `qkv.weight` became `qkvnweight`
    text = (ck / "manifest.json").read_text()
    (ck / "manifest.json").write_text(text.replace("qkv.weight", "qkvnweight", 1))
    return ck / "manifest.json"


def _chunk_elsewhere(ck):  # a chunk read from the previous checkpoint's file
    def change(m):
        m["tensors"]["model/tok_emb.weight"]["chunks"][0]["file"] = "../step_00000010/rank_00000.safetensors"
    rewrite_manifest(ck, change)
    return ck / "manifest.json"


def _tokenizer_elsewhere(ck):  # meta.json's tokenizer file outside the checkpoint, checksums fixed
    import json

    from megatron_lite.checkpoint.integrity import file_digest
    meta = json.loads((ck / "meta.json").read_text())
    meta["tokenizer"]["file"] = "../step_00000010/tokenizer.json"
    (ck / "meta.json").write_text(json.dumps(meta))
    entry = {"size": (ck / "meta.json").stat().st_size, "xxh3_64": file_digest(ck / "meta.json")}
    rewrite_manifest(ck, lambda m: m["files"].update({"meta.json": entry}))
    return ck / "meta.json"


def _unknown_dtype(ck):
    rewrite_manifest(ck, lambda m: m["tensors"]["model/tok_emb.weight"].update(dtype="float8_e4m3"))
    return ck / "manifest.json"


@pytest.mark.slow
@pytest.mark.parametrize("damage", [_flip_manifest, _chunk_elsewhere, _tokenizer_elsewhere, _unknown_dtype],
                         ids=lambda f: f.__name__.strip("_"))
def test_a_checkpoint_naming_files_elsewhere_or_with_a_bad_manifest_is_refused_and_resume_falls_back(
        run_with_two_checkpoints, tmp_path, damage):
    """4a/4b through the CLI: `checkpoint verify` and `generate` refuse in one sentence naming the
    file (no traceback, nothing read from another checkpoint); `train` warns naming it and resumes
    from the previous good checkpoint."""
    import shutil

    from tests.e2e.faults import run
    src, argv = run_with_two_checkpoints
    out = tmp_path / "run"
    shutil.copytree(src, out)
    argv = [a if not a.startswith("train.out_dir=") else f"train.out_dir={out}" for a in argv]
    named = damage(out / "checkpoints" / "step_00000020")
    for args in (("checkpoint", "verify", str(out)), ("generate", "--checkpoint", str(out))):
        r = cli(*args)
        lines = r.stderr.strip().splitlines()
        assert r.returncode == 2 and len(lines) == 1 and lines[0].startswith("error: "), r.stderr
        assert str(named) in r.stderr and "Traceback" not in r.stderr + r.stdout
    code, text = run(argv, tmp_path / "resume.log")
    assert code == 0 and "Traceback" not in text, text[-3000:]
    assert any(line.startswith("warning: ") and str(named) in line for line in text.splitlines()), text
    assert f"resumed from {out / 'checkpoints' / 'step_00000010'}" in text


@pytest.mark.slow
def test_a_full_disk_stops_the_run_in_one_sentence_and_keeps_the_previous_checkpoint(run_with_two_checkpoints,
                                                                                      tmp_path):
    """train.out_dir on a tmpfs with room for one checkpoint (root only): step 10 is saved, step 20
    does not fit; one sentence says so and how much space is missing, step_10 stays the one chosen."""
    import os
    import subprocess

    from tests.e2e.faults import run
    src, argv = run_with_two_checkpoints
    size = sum(f.stat().st_size for f in (src / "checkpoints" / "step_00000010").iterdir())
    disk = tmp_path / "disk"
    disk.mkdir()
    if os.geteuid() != 0 or subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size * 3 // 2 + 2**17}",
                                            "tmpfs", str(disk)], capture_output=True).returncode != 0:
        pytest.skip("needs root to mount a small tmpfs")
    try:
        out = disk / "run"
        argv = [a if not a.startswith("train.out_dir=") else f"train.out_dir={out}" for a in argv]
        code, text = run(argv, tmp_path / "full.log")
        errors = [line for line in text.splitlines() if line.startswith("error: ")]
        assert code == 2 and len(errors) == 1 and "Traceback" not in text, text[-3000:]
        ckpts = out / "checkpoints"
        error = errors[0]
        assert error.startswith(f"error: the disk of {str(ckpts)!r} is full: checkpoint step 20 needs about ")
        assert f"the previous checkpoint {str(ckpts / 'step_00000010')!r} is intact and stays" in error
        assert sorted(p.name for p in ckpts.iterdir()) == ["latest", "step_00000010"]
        assert cli("checkpoint", "verify", str(out)).returncode == 0
    finally:
        subprocess.run(["umount", str(disk)], check=True)
