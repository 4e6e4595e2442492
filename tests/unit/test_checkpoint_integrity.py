"""Checkpoint integrity: every file carries a checksum in the manifest and is verified before it is
read; a flipped byte or a truncation anywhere is named; planted files, escaping names and symlinks
are refused; a resume falls back to the newest checkpoint that verifies; debris of interrupted
saves is removed at the next save."""

import json
import os
import shutil

import pytest

from megatron_lite.checkpoint import CheckpointError, CheckpointManager, TrainState, verify
from megatron_lite.checkpoint.integrity import file_digest
from tests.conftest import cli
from tests.unit.test_optim_checkpoint import _setup


def _two_checkpoints(tmp_path):
    model, opt = _setup()
    mgr = CheckpointManager(tmp_path / "ck", keep=3)
    for step in (1, 2):
        mgr.save(step, model, opt, TrainState(step=step, cursor=4 * step), "model: {}\n")
    return mgr


def test_manifest_lists_every_file_with_size_and_checksum(tmp_path):
    path = _two_checkpoints(tmp_path).latest()
    manifest = json.loads((path / "manifest.json").read_text())
    on_disk = {p.relative_to(path).as_posix() for p in path.rglob("*") if p.is_file()} - {"manifest.json"}
    assert set(manifest["files"]) == on_disk and manifest["format"] == 3
    for name, entry in manifest["files"].items():
        assert entry["size"] == (path / name).stat().st_size and entry["xxh3_64"] == file_digest(path / name)
    assert verify(path) == manifest


@pytest.mark.parametrize("damage", ["flip", "truncate"])
def test_damage_in_any_file_is_named(tmp_path, damage):
    path = _two_checkpoints(tmp_path).latest()
    names = sorted(json.loads((path / "manifest.json").read_text())["files"])
    assert len(names) >= 2  # the tensors (safetensors) and config.yaml
    for name in names:
        work = tmp_path / f"copy_{damage}"
        shutil.rmtree(work, ignore_errors=True)
        shutil.copytree(path, work)
        f = work / name
        data = bytearray(f.read_bytes())
        if damage == "flip":
            data[len(data) // 2] ^= 0x01  # one bit, the size unchanged: only the checksum sees it
        else:
            data = data[:-1]
        f.write_bytes(bytes(data))
        with pytest.raises(CheckpointError) as e:
            verify(work)
        assert str(f) in str(e.value) and ("damaged" in str(e.value) or "wrong size" in str(e.value))
        assert "\n" not in str(e.value)


def test_planted_files_escaping_names_and_symlinks_are_refused(tmp_path):
    mgr = _two_checkpoints(tmp_path)
    path = mgr.latest()
    (path / "payload.pkl").write_bytes(b"not listed")
    with pytest.raises(CheckpointError, match="payload.pkl.*not listed in the manifest"):
        verify(path)
    (path / "payload.pkl").unlink()
    manifest = json.loads((path / "manifest.json").read_text())
    for evil in ("../../outside", "/etc/passwd", "sub/../../x"):
        bad = dict(manifest, files={**manifest["files"], evil: {"size": 1, "xxh3_64": "0"}})
        (path / "manifest.json").write_text(json.dumps(bad))
        with pytest.raises(CheckpointError, match="not a plain file name inside the checkpoint"):
            verify(path)
    (path / "manifest.json").write_text(json.dumps(manifest))
    os.symlink("/etc/hostname", path / "config.yaml.link")
    with pytest.raises(CheckpointError, match="symbolic link"):
        verify(path)
    (path / "config.yaml.link").unlink()
    verify(path)
    for pointer in ("../../elsewhere", "/tmp", "step_00000002/../../x"):
        (mgr.dir / "latest").write_text(pointer)
        with pytest.raises(CheckpointError, match="not a step_NNNNNNNN directory"):
            mgr.latest()


def test_resume_choice_falls_back_past_a_damaged_newest_checkpoint(tmp_path, caplog):
    mgr = _two_checkpoints(tmp_path)
    newest = mgr.latest()
    data_file = next(p for p in newest.rglob("*.safetensors"))
    data = bytearray(data_file.read_bytes())
    data[10] ^= 0xFF
    data_file.write_bytes(bytes(data))
    with caplog.at_level("WARNING", logger="megatron_lite"):
        chosen = mgr.choose()
    assert chosen.name == "step_00000001"
    assert any(str(data_file) in r.getMessage() for r in caplog.records)
    model, opt = _setup(seed=1)
    state = TrainState()
    mgr.load(chosen, model, opt, state)
    assert state.step == 1
    with pytest.raises(CheckpointError, match="damaged"):
        mgr.load(newest, model, opt, state)  # never deserialized


def test_debris_of_interrupted_saves_is_removed_at_the_next_save(tmp_path):
    mgr = _two_checkpoints(tmp_path)
    debris = [mgr.dir / ".step_00000099.tmp", mgr.dir / "step_00000001.old-4242"]
    for d in debris:
        d.mkdir()
        (d / "junk").write_text("x")
    (mgr.dir / "latest.tmp").write_text("step_00000002")
    model, opt = _setup()
    mgr.save(3, model, opt, TrainState(step=3), "model: {}\n")
    assert not any(d.exists() for d in debris) and not (mgr.dir / "latest.tmp").exists()
    assert [p.name for p in mgr.committed()] == ["step_00000001", "step_00000002", "step_00000003"]


def test_cli_verify_and_inspect(tmp_path):
    path = _two_checkpoints(tmp_path).latest()
    ok = cli("checkpoint", "verify", str(path))
    assert ok.returncode == 0 and "every size and checksum matches" in ok.stdout, ok.stderr
    shown = cli("checkpoint", "inspect", str(tmp_path / "ck"))
    assert shown.returncode == 0, shown.stderr
    assert "step 2" in shown.stdout and "model/blocks.0.attn.qkv.weight:q" in shown.stdout
    assert "(16, 16)" in shown.stdout and "float32" in shown.stdout  # the q block of the fused qkv
    f = path / "config.yaml"
    f.write_text(f.read_text().replace("{}", "[]"))  # same size, other bytes
    bad = cli("checkpoint", "verify", str(path))
    assert bad.returncode == 2 and str(f) in bad.stderr and len(bad.stderr.strip().splitlines()) == 1
