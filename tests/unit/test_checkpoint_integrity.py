"""Checkpoint integrity: every file carries a checksum in the manifest, the manifest its own in
manifest.xxh3, and everything is verified before a tensor is read; a flipped byte or a truncation
anywhere is named; planted files, escaping names, paths out of the checkpoint, symlinks and
manifests of the wrong shape are refused in one sentence; a resume falls back to the newest
checkpoint that verifies; debris of interrupted saves is removed at the next save; a full disk
leaves the previous checkpoint chosen and says how much space is missing."""

import errno
import json
import os
import shutil

import pytest

from megatron_lite.checkpoint import CheckpointError, CheckpointManager, Stateful, TrainState, verify
from megatron_lite.checkpoint.integrity import DIGEST, file_digest, manifest_digest
from tests.conftest import cli
from tests.unit.test_optim_checkpoint import _setup

QKV = "model/blocks.0.attn.qkv.weight:q"


def _two_checkpoints(tmp_path, data_dir=None):
    model, opt = _setup()
    mgr = CheckpointManager(tmp_path / "ck", keep=3)
    for step in (1, 2):
        mgr.save(step, Stateful(model, opt), TrainState(step=step, cursor=4 * step), "model: {}\n",
                 data_dir=data_dir)
    return mgr


def rewrite_manifest(path, change) -> None:
    """Edit checkpoint `path`'s manifest with change(manifest) and write it back with a matching
    manifest.xxh3, as a tool (or an attacker) that knows the format would."""
    manifest = json.loads((path / "manifest.json").read_text())
    change(manifest)
    text = json.dumps(manifest, indent=1)
    (path / "manifest.json").write_text(text)
    (path / DIGEST).write_text(manifest_digest(text.encode()))


def test_manifest_lists_every_file_with_size_and_checksum(tmp_path):
    path = _two_checkpoints(tmp_path).latest()
    raw = (path / "manifest.json").read_bytes()
    manifest = json.loads(raw)
    on_disk = {p.relative_to(path).as_posix() for p in path.rglob("*") if p.is_file()}
    assert set(manifest["files"]) == on_disk - {"manifest.json", DIGEST} and manifest["format"] == 4
    for name, entry in manifest["files"].items():
        assert entry["size"] == (path / name).stat().st_size and entry["xxh3_64"] == file_digest(path / name)
    assert (path / DIGEST).read_text() == manifest_digest(raw)
    assert verify(path) == manifest


@pytest.mark.parametrize("damage", ["flip", "truncate"])
def test_damage_in_any_file_is_named(tmp_path, damage):
    path = _two_checkpoints(tmp_path).latest()
    names = sorted(json.loads((path / "manifest.json").read_text())["files"]) + ["manifest.json", DIGEST]
    assert len(names) >= 4  # the tensors (safetensors), config.yaml, the manifest and its checksum
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
        named = work / ("manifest.json" if name == DIGEST else name)
        assert str(named) in str(e.value) and ("damaged" in str(e.value) or "wrong size" in str(e.value))
        assert "\n" not in str(e.value)


def test_planted_files_escaping_names_and_symlinks_are_refused(tmp_path):
    mgr = _two_checkpoints(tmp_path)
    path = mgr.latest()
    (path / "payload.pkl").write_bytes(b"not listed")
    with pytest.raises(CheckpointError, match="payload.pkl.*not listed in the manifest"):
        verify(path)
    (path / "payload.pkl").unlink()
    original = (path / "manifest.json").read_text()
    for evil in ("../../outside", "/etc/passwd", "sub/../../x"):
        rewrite_manifest(path, lambda m, evil=evil: m["files"].update({evil: {"size": 1, "xxh3_64": "0"}}))
        with pytest.raises(CheckpointError, match="not a plain file name inside the checkpoint"):
            verify(path)
    rewrite_manifest(path, lambda m: m.update(json.loads(original)))
    os.symlink("/etc/hostname", path / "config.yaml.link")
    with pytest.raises(CheckpointError, match="symbolic link"):
        verify(path)
    (path / "config.yaml.link").unlink()
    verify(path)
    for pointer in ("../../elsewhere", "/tmp", "step_00000002/../../x"):
        (mgr.dir / "latest").write_text(pointer)
        with pytest.raises(CheckpointError, match="not a step_NNNNNNNN directory"):
            mgr.latest()


def _chunk(m: dict, key: str = QKV) -> dict:
    return m["tensors"][key]["chunks"][0]


def _rename(m: dict, new: str) -> None:
    m["tensors"][new] = m["tensors"].pop(QKV)


# Each edit leaves a manifest whose checksum matches (rewrite_manifest): what verify must still see.
MANIFEST_DAMAGE = {
    # 4a: a chunk read from outside the step directory, or from a listed file that is not its own
    "chunk file ../": (lambda m: _chunk(m).update(file="../step_00000001/rank_00000.safetensors"),
                       "names the file '../step_00000001/rank_00000.safetensors'"),
    "chunk file absolute": (lambda m: _chunk(m).update(file="/tmp/elsewhere/rank_00000.safetensors"),
                            "names the file '/tmp/elsewhere/rank_00000.safetensors'"),
    "chunk file not safetensors": (lambda m: _chunk(m).update(file="config.yaml"),
                                   "is not a safetensors file"),
    # 4b: the index edited or of the wrong shape
    "tensor renamed": (lambda m: _rename(m, "model/blocks.0.attn.qkvnweight:q"),
                       "is named 'model/blocks.0.attn.qkv.weight:q@0,0', not"),
    "chunk renamed": (lambda m: _chunk(m).update(name="model/blocks.0.attn.qkvnweight:q@0,0"), "is named"),
    "chunk name and tensor renamed": (
        lambda m: (_chunk(m).update(name="model/x@0,0"), _rename(m, "model/x")),
        "holds no float32 tensor 'model/x@0,0'"),
    "dtype unknown": (lambda m: m["tensors"][QKV].update(dtype="float8_e4m3"), "unknown dtype 'float8_e4m3'"),
    "dtype wrong": (lambda m: m["tensors"][QKV].update(dtype="float64"), "holds no float64 tensor"),
    "shape wrong": (lambda m: (m["tensors"][QKV].update(shape=[8, 16]), _chunk(m).update(sizes=[8, 16])),
                    "of shape (8, 16)"),
    "chunk past the shape": (lambda m: _chunk(m).update(offsets=[4, 0]), "reaches past the shape"),
    "step a string": (lambda m: m.update(step="2"), "field step is '2', not an integer"),
    "step a bool": (lambda m: m.update(step=True), "field step is True, not an integer"),
    "train field missing": (lambda m: m["train"].pop("cursor"), "field train.cursor is missing"),
    "layout missing": (lambda m: m.pop("layout"), "field layout is missing"),
    "size a string": (lambda m: m["files"]["config.yaml"].update(size="7"),
                      "field files['config.yaml'].size is '7', not an integer"),
    "shape negative": (lambda m: m["tensors"][QKV].update(shape=[-16, 16]), "not non-negative integers"),
    "tensors a list": (lambda m: m.update(tensors=[]), "field tensors is [], not an object"),
    "chunk not an object": (lambda m: m["tensors"][QKV]["chunks"].append(7), "is 7, not an object"),
    "unknown hash": (lambda m: m.update(hash="md5"), "hash 'md5' is not 'xxh3_64'"),
}


@pytest.mark.parametrize("kind", list(MANIFEST_DAMAGE))
def test_a_manifest_of_the_wrong_shape_is_refused_in_one_sentence_and_the_resume_falls_back(
        tmp_path, kind, caplog):
    change, message = MANIFEST_DAMAGE[kind]
    mgr = _two_checkpoints(tmp_path)
    newest = mgr.latest()
    rewrite_manifest(newest, change)
    with pytest.raises(CheckpointError) as e:
        verify(newest)
    text = str(e.value)
    assert message in text and str(newest) in text and "\n" not in text, text
    with caplog.at_level("WARNING", logger="megatron_lite"):
        assert mgr.choose().name == "step_00000001"
    assert any(message in r.getMessage() for r in caplog.records)


def test_meta_json_naming_a_file_outside_is_refused(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    (data / "tokenizer.json").write_text("{}")
    (data / "meta.json").write_text(json.dumps({"tokenizer": {"type": "bpe", "file": "tokenizer.json"}}))
    path = _two_checkpoints(tmp_path, data_dir=data).latest()
    verify(path)
    for outside in ("../../data/tokenizer.json", str(data / "tokenizer.json"), "config.yaml.missing"):
        meta = path / "meta.json"
        meta.write_text(json.dumps({"tokenizer": {"type": "bpe", "file": outside}}))
        entry = {"size": meta.stat().st_size, "xxh3_64": file_digest(meta)}  # checksummed, so it verifies
        rewrite_manifest(path, lambda m, entry=entry: m["files"].update({"meta.json": entry}))
        with pytest.raises(CheckpointError, match=f"meta.json' names the file {outside!r}, which is not"):
            verify(path)


def test_an_older_format_and_a_missing_digest_are_told_apart(tmp_path):
    path = _two_checkpoints(tmp_path).latest()
    (path / DIGEST).unlink()
    with pytest.raises(CheckpointError, match="manifest.json' is damaged .*does not match manifest.xxh3"):
        verify(path)
    manifest = json.loads((path / "manifest.json").read_text())
    (path / "manifest.json").write_text(json.dumps(dict(manifest, format=3)))  # as version 3 wrote it
    with pytest.raises(CheckpointError, match="has format 3, written by another version; this version reads "
                                              "format 4"):
        verify(path)


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
    mgr.load(chosen, Stateful(model, opt), state)
    assert state.step == 1
    with pytest.raises(CheckpointError, match="damaged"):
        mgr.load(newest, Stateful(model, opt), state)  # never deserialized


def test_debris_of_interrupted_saves_is_removed_at_the_next_save(tmp_path):
    mgr = _two_checkpoints(tmp_path)
    debris = [mgr.dir / ".step_00000099.tmp", mgr.dir / "step_00000001.old-4242"]
    for d in debris:
        d.mkdir()
        (d / "junk").write_text("x")
    (mgr.dir / "latest.tmp").write_text("step_00000002")
    model, opt = _setup()
    mgr.save(3, Stateful(model, opt), TrainState(step=3), "model: {}\n")
    assert not any(d.exists() for d in debris) and not (mgr.dir / "latest.tmp").exists()
    assert [p.name for p in mgr.committed()] == ["step_00000001", "step_00000002", "step_00000003"]


def _no_space_in_safetensors(*a, **k):
    from safetensors import SafetensorError
    raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")


def _no_space_in_python(*a, **k):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


@pytest.mark.parametrize("where", ["tensors (safetensors)", "manifest (python)", "checked before writing"])
@pytest.mark.parametrize("background", [False, True])
def test_a_full_disk_is_one_sentence_and_the_previous_checkpoint_stays_chosen(tmp_path, monkeypatch, where,
                                                                               background):
    import safetensors.torch

    import megatron_lite.checkpoint.manager as manager
    mgr = _two_checkpoints(tmp_path)
    model, opt = _setup()
    if where.startswith("tensors"):
        monkeypatch.setattr(safetensors.torch, "save_file", _no_space_in_safetensors)
    elif where.startswith("manifest"):
        monkeypatch.setattr(manager, "_write_synced", _no_space_in_python)
    else:
        real = shutil.disk_usage
        monkeypatch.setattr(shutil, "disk_usage", lambda p: real(p)._replace(free=1000))
    with pytest.raises(CheckpointError) as e:
        mgr.save(3, Stateful(model, opt), TrainState(step=3), "model: {}\n", background=background)
        mgr.finish()
    text = str(e.value)
    assert text.startswith(f"the disk of {str(mgr.dir)!r} is full: checkpoint step 3 needs about ")
    assert f"the previous checkpoint {str(mgr.dir / 'step_00000002')!r} is intact and stays the one" in text
    assert "free at least" in text and " KiB" in text and "\n" not in text
    monkeypatch.undo()
    assert mgr.latest().name == "step_00000002" and mgr.choose().name == "step_00000002"
    assert sorted(p.name for p in mgr.dir.iterdir()) == ["latest", "step_00000001", "step_00000002"]


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


def test_cli_inspect_escapes_terminal_sequences_in_names(tmp_path):
    import torch

    from megatron_lite.checkpoint import write_single
    evil = "model/\x1b]0;owned\x07\x1b[2J\x1b[31mred\nnext"
    write_single(tmp_path / "run", 0, [(evil, torch.zeros(2)), ("rng/cpu/rank_00000", torch.get_rng_state())],
                 TrainState(), "model: {}\n")
    shown = cli("checkpoint", "inspect", str(tmp_path / "run"))
    assert shown.returncode == 0, shown.stderr
    assert "\x1b" not in shown.stdout and "\x07" not in shown.stdout
    assert "model/\\x1b]0;owned\\x07\\x1b[2J\\x1b[31mred\\nnext" in shown.stdout
