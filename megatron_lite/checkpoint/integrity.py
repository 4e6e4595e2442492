"""What makes a checkpoint directory trustworthy before a single tensor of it is read.

The manifest (written last, by rank 0) lists every file of the checkpoint with its size and an
xxh3-64 checksum; each rank hashes the files it wrote while they are still in the page cache. The
manifest's own checksum is in `manifest.xxh3`, written after it. Before loading, a checkpoint must:
  - have a manifest that matches manifest.xxh3, is of this version's format, and has every field
    with its type (a flipped byte, an edited or missing field, an unknown dtype: damaged);
  - list only plain relative file names inside the directory (no `..`, no absolute paths, no
    symbolic links anywhere in the tree), and hold exactly the listed files (a file the manifest
    does not vouch for is refused: it was planted, or left over by something that is not this code);
  - match every listed size and, for the files about to be read, every checksum;
  - name only listed files wherever a JSON of it names one: each chunk of the tensor index, and
    meta.json's tokenizer `file` (tokenizer.json, HF's own format, names none);
  - hold every tensor the index names in the file it names, with its dtype and shape (from the
    safetensors header: no tensor data is read).
xxh3 hashes at memory speed (~10 GB/s a core), so verification costs a fraction of the read.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Callable

import xxhash

from ..errors import CheckpointError

FORMAT = 4  # 4: manifest.xxh3 beside the manifest
STEP_DIR = re.compile(r"^step_(\d{8,})$")
SAFE_NAME = re.compile(r"^[A-Za-z0-9_.\-]+$")  # one path component, no separators
MANIFEST, DIGEST = "manifest.json", "manifest.xxh3"
HASH = "xxh3_64"
CHUNK = 8 * 2**20
MAX_HEADER = 100 * 2**20  # safetensors' own limit on a file's JSON header
# The dtypes a checkpoint stores, by the name the manifest uses, with their safetensors header code.
DTYPE_CODES = {"float32": "F32", "float64": "F64", "bfloat16": "BF16", "float16": "F16", "uint8": "U8",
               "int64": "I64", "int32": "I32"}

# The manifest's schema: every field and its type (optional ones listed apart). Nested tables are
# checked by _check_schema; a bool is never taken for an int.
FIELDS = {"format": int, "step": int, "time": (int, float), "hash": str, "layout": dict, "train": dict,
          "files": dict, "tensors": dict}
LAYOUT_FIELDS = {"tp": int, "pp": int, "dp": int, "order": str, "virtual_stages": int, "zero_stage": int,
                 "zero_backend": str, "make_vocab_divisible_by": int, "cp": int, "ep": int}
LAYOUT_OPTIONAL = ("virtual_stages", "zero_stage", "zero_backend", "make_vocab_divisible_by", "cp", "ep")
TRAIN_FIELDS = {"step": int, "cursor": int, "tokens": int, "consecutive_skips": int, "total_skips": int,
                "extra": dict}
FILE_FIELDS = {"size": int, HASH: str}
TENSOR_FIELDS = {"shape": list, "dtype": str, "chunks": list}
CHUNK_FIELDS = {"file": str, "name": str, "offsets": list, "sizes": list}


def file_digest(path: Path) -> str:
    h = xxhash.xxh3_64()
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK):
            h.update(chunk)
    return h.hexdigest()


def describe_files(root: Path, under: Path | None = None, skip=()) -> dict[str, dict]:
    """{relative name: {size, xxh3_64}} for every file below `under` (default: root), but `skip`."""
    out = {}
    for p in sorted((under or root).rglob("*")):
        name = p.relative_to(root).as_posix()
        if p.is_file() and name not in skip:
            out[name] = {"size": p.stat().st_size, HASH: file_digest(p)}
    return out


def manifest_digest(text: bytes) -> str:
    """What manifest.xxh3 holds for a manifest of these bytes."""
    return xxhash.xxh3_64(text).hexdigest() + "\n"


def chunk_name(key: str, offsets) -> str:
    """The name a chunk of stored tensor `key` starting at `offsets` has in its safetensors file."""
    return f"{key}@{','.join(map(str, offsets))}"


def safe_relative(name: str) -> bool:
    """A plain relative path: components of letters, digits, `_.-`, none of them `.` or `..`."""
    parts = name.split("/")
    return bool(name) and all(SAFE_NAME.match(p) and p not in (".", "..") for p in parts)


def _damaged(path: Path, what: str) -> CheckpointError:
    return CheckpointError(f"checkpoint manifest {str(Path(path) / MANIFEST)!r} is damaged ({what}); delete "
                           f"{str(path)!r} to fall back to an earlier checkpoint.")


def read_manifest(path: Path) -> dict:
    """The parsed manifest of checkpoint directory `path`: its checksum, format, schema and file
    names checked (the files themselves are verify()'s)."""
    path = Path(path)
    manifest_path = path / MANIFEST
    if not manifest_path.is_file():
        raise CheckpointError(f"{str(path)!r} is not a committed checkpoint (no manifest.json); point to "
                              f"a step_* directory or a run's checkpoints directory.")
    raw = manifest_path.read_bytes()
    digest = path / DIGEST
    matches = digest.is_file() and digest.read_text(errors="replace") == manifest_digest(raw)
    try:
        manifest = json.loads(raw)
    except ValueError:
        manifest = None
    fmt = manifest.get("format") if isinstance(manifest, dict) else None
    if (matches or not digest.is_file()) and _is(fmt, int) and fmt != FORMAT:  # older ones have no digest
        raise CheckpointError(f"checkpoint {str(path)!r} has format {fmt}, written by another version; this "
                              f"version reads format {FORMAT} (start a new train.out_dir).")
    if not matches:
        raise CheckpointError(f"checkpoint file {str(manifest_path)!r} is damaged (its xxh3 checksum does "
                              f"not match {DIGEST}); delete {str(path)!r} to fall back to an earlier "
                              f"checkpoint.")
    if not isinstance(manifest, dict):
        raise _damaged(path, "not a JSON object")
    _check_schema(path, manifest)
    for name in manifest["files"]:
        if not safe_relative(name):
            raise CheckpointError(f"{str(manifest_path)!r} lists {name!r}, which is not a plain file name "
                                  f"inside the checkpoint; the checkpoint is refused (delete {str(path)!r}).")
    return manifest


# ---- the manifest's schema ---------------------------------------------------------------------
def _is(value, kind) -> bool:
    return type(value) is not bool and isinstance(value, kind)


def _fields(path: Path, obj, schema: dict, where: str, optional=()) -> dict:
    """`obj` is an object holding every field of `schema` (but `optional`) with its type."""
    if not _is(obj, dict):
        raise _damaged(path, f"{where.rstrip('.') or 'the manifest'} is {_short(obj)}, not an object")
    for name, kind in schema.items():
        if name not in obj:
            if name in optional:
                continue
            raise _damaged(path, f"field {where}{name} is missing")
        if not _is(obj[name], kind):
            raise _damaged(path, f"field {where}{name} is {_short(obj[name])}, not {_kind(kind)}")
    return obj


def _counts(path: Path, values, where: str, n: int | None = None) -> list[int]:
    """A list of n non-negative integers (shape, offsets, sizes)."""
    if not all(_is(v, int) and v >= 0 for v in values) or (n is not None and len(values) != n):
        want = f"{n} non-negative integers" if n is not None else "non-negative integers"
        raise _damaged(path, f"field {where} is {_short(values)}, not {want}")
    return values


def _check_schema(path: Path, m: dict) -> None:
    _fields(path, m, FIELDS, "")
    if m["hash"] != HASH:
        raise _damaged(path, f"hash {_short(m['hash'])} is not {HASH!r}")
    _fields(path, m["layout"], LAYOUT_FIELDS, "layout.", LAYOUT_OPTIONAL)
    _fields(path, m["train"], TRAIN_FIELDS, "train.")
    for name, entry in m["files"].items():
        _fields(path, entry, FILE_FIELDS, f"files[{name!r}].")
    for key, entry in m["tensors"].items():
        where = f"tensors[{key!r}]"
        _fields(path, entry, TENSOR_FIELDS, where + ".")
        if entry["dtype"] not in DTYPE_CODES:
            raise _damaged(path, f"{where} has the unknown dtype {_short(entry['dtype'])}")
        shape = _counts(path, entry["shape"], where + ".shape")
        for i, chunk in enumerate(entry["chunks"]):
            at = f"{where}.chunks[{i}]"
            _fields(path, chunk, CHUNK_FIELDS, at + ".")
            offsets = _counts(path, chunk["offsets"], at + ".offsets", len(shape))
            sizes = _counts(path, chunk["sizes"], at + ".sizes", len(shape))
            if any(o + s > n for o, s, n in zip(offsets, sizes, shape, strict=True)):
                raise _damaged(path, f"{at} reaches past the shape {tuple(shape)}")
            want = chunk_name(key, offsets)
            if chunk["name"] != want:  # an index entry renamed without its chunks
                raise _damaged(path, f"{at} is named {_short(chunk['name'])}, not {want!r}")


def _kind(kind) -> str:
    names = {int: "an integer", float: "a number", str: "a string", dict: "an object", list: "a list"}
    return " or ".join(dict.fromkeys(names[k] for k in (kind if isinstance(kind, tuple) else (kind,))))


def _short(value, limit: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[:limit - 3] + "..."


# ---- the files ------------------------------------------------------------------------------------
def _files_on_disk(path: Path) -> set[str]:
    found = set()
    for dirpath, dirnames, filenames in os.walk(path, followlinks=False):
        for name in dirnames + filenames:
            full = Path(dirpath) / name
            if full.is_symlink():
                raise CheckpointError(f"checkpoint entry {str(full)!r} is a symbolic link; a checkpoint "
                                      f"holds plain files only, so it is refused (delete {str(path)!r}).")
        for name in filenames:
            found.add((Path(dirpath) / name).relative_to(path).as_posix())
    return found


def verify(path: Path, check: Callable[[str], bool] = lambda name: True) -> dict:
    """Check checkpoint `path` against its manifest: the manifest itself, names, the set of files,
    sizes, the checksums of the files `check(name)` selects (all by default), every file a JSON of
    it names, and every stored tensor against its file's header. Returns the manifest; raises
    CheckpointError naming the first bad file."""
    path = Path(path)
    if path.is_symlink():
        raise CheckpointError(f"checkpoint {str(path)!r} is a symbolic link; point to the directory itself.")
    manifest = read_manifest(path)
    files = manifest["files"]
    unexpected = sorted(_files_on_disk(path) - set(files) - {MANIFEST, DIGEST})
    if unexpected:
        raise CheckpointError(f"checkpoint file {str(path / unexpected[0])!r} is not listed in the manifest "
                              f"(planted or left over); the checkpoint is refused (delete it to fall back).")
    for name in sorted(files):
        size, digest = files[name]["size"], files[name][HASH]
        f = path / name
        if not f.is_file() or f.stat().st_size != size:
            raise CheckpointError(f"checkpoint file {str(f)!r} is missing or has the wrong size (manifest "
                                  f"says {size} bytes); delete {str(path)!r} to fall back to an earlier "
                                  f"checkpoint.")
        if check(name) and file_digest(f) != digest:
            raise CheckpointError(f"checkpoint file {str(f)!r} is damaged (its xxh3 checksum does not "
                                  f"match the manifest); delete {str(path)!r} to fall back to an earlier "
                                  f"checkpoint.")
    _check_named_files(path, files)
    _check_tensor_index(path, manifest)
    return manifest


def _unlisted(path: Path, where: str, name) -> CheckpointError:
    return CheckpointError(f"{where} names the file {_short(name, 300)}, which is not a file the manifest of "
                           f"{str(path)!r} lists; the checkpoint is refused (delete it to fall back to an "
                           f"earlier checkpoint).")


def _check_named_files(path: Path, files: dict) -> None:
    """meta.json names the tokenizer's file (and any other `file` it may record): each must be one
    of the listed files, never a path out of the checkpoint."""
    if "meta.json" not in files:
        return
    meta_path = path / "meta.json"
    try:
        meta = json.loads(meta_path.read_bytes())
    except ValueError:
        raise CheckpointError(f"checkpoint file {str(meta_path)!r} is not JSON; delete {str(path)!r} to fall "
                              f"back to an earlier checkpoint.") from None
    for name in _file_entries(meta):
        if name not in files:
            raise _unlisted(path, f"checkpoint file {str(meta_path)!r}", name)


def _file_entries(obj):
    """Every value under a key named `file`, at any depth of a JSON value."""
    if isinstance(obj, dict):
        for key, value in obj.items():
            if key == "file":
                yield value
            else:
                yield from _file_entries(value)
    elif isinstance(obj, list):
        for value in obj:
            yield from _file_entries(value)


def _check_tensor_index(path: Path, manifest: dict) -> None:
    """Each chunk in a listed file that holds it with the index's dtype and the chunk's shape."""
    files, headers = manifest["files"], {}
    for key, entry in manifest["tensors"].items():
        for chunk in entry["chunks"]:
            name = chunk["file"]
            if name not in files:
                raise _unlisted(path, f"checkpoint manifest {str(path / MANIFEST)!r} (tensor {key!r})", name)
            if name not in headers:
                headers[name] = safetensors_header(path / name, path)
            held = headers[name].get(chunk["name"])
            want = {"dtype": DTYPE_CODES[entry["dtype"]], "shape": chunk["sizes"]}
            if not isinstance(held, dict) or {k: held.get(k) for k in want} != want:
                raise CheckpointError(
                    f"checkpoint file {str(path / name)!r} holds no {entry['dtype']} tensor "
                    f"{chunk['name']!r} of shape {tuple(chunk['sizes'])} (the manifest's index of {key!r} "
                    f"says so); the checkpoint is damaged (delete {str(path)!r} to fall back to an earlier "
                    f"checkpoint).")


def safetensors_header(f: Path, checkpoint: Path) -> dict:
    """The JSON header of safetensors file `f` (8-byte little-endian length, then the JSON), read
    without any tensor data."""
    size = f.stat().st_size
    with open(f, "rb") as stream:
        n = int.from_bytes(stream.read(8), "little") if size >= 8 else 0
        try:
            header = json.loads(stream.read(n)) if 0 < n <= min(size - 8, MAX_HEADER) else None
        except ValueError:
            header = None
    if not isinstance(header, dict):
        raise CheckpointError(f"checkpoint file {str(f)!r} is not a safetensors file (no readable header); "
                              f"delete {str(checkpoint)!r} to fall back to an earlier checkpoint.")
    return header


def pointer_target(directory: Path) -> Path | None:
    """The step directory `checkpoints/latest` names, if the file exists; refused unless it names a
    step_NNNNNNNN directory directly inside `directory`."""
    pointer = Path(directory) / "latest"
    if not pointer.is_file():
        return None
    name = pointer.read_text().strip()
    if not STEP_DIR.match(name):
        raise CheckpointError(f"{str(pointer)!r} names {name[:80]!r}, not a step_NNNNNNNN directory inside "
                              f"{str(directory)!r}; the pointer is refused (delete it to use the newest "
                              f"checkpoint).")
    return Path(directory) / name
