"""docs/architecture.md stays true to the code: every module of the package is named in it, and
every module that writes the environment (through distributed/env.py's `export`, the one place
allowed to touch os.environ) is listed among the writes."""
from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PACKAGE = ROOT / "megatron_lite"
DOC = ROOT / "docs" / "architecture.md"


def _key(path: Path) -> str:
    """How the doc names a module: its path below the package, a package by its folder."""
    rel = path.relative_to(PACKAGE).as_posix()
    return rel[: -len("__init__.py")] if rel.endswith("__init__.py") else rel


def test_every_module_is_named_in_the_architecture_doc():
    doc = DOC.read_text()
    missing = [_key(p) for p in sorted(PACKAGE.rglob("*.py")) if _key(p) and _key(p) not in doc]
    assert not missing, f"docs/architecture.md does not name: {missing}"


def test_the_environment_is_touched_in_one_module_and_every_writer_is_listed():
    doc = DOC.read_text()
    writes = doc[doc.index("The writes (`export`)"):doc.index("## Decisions worth knowing")]
    touching, writers = [], []
    for path in sorted(PACKAGE.rglob("*.py")):
        text, key = path.read_text(), _key(path)
        if key == "distributed/env.py":
            continue
        if re.search(r"os\.environ|os\.putenv", text):
            touching.append(key)
        if re.search(r"from \.+distributed\.env import export\b", text) and f"`{key}`" not in writes:
            writers.append(key)
    assert not touching, f"only distributed/env.py may read or write os.environ: {touching}"
    assert not writers, f"environment writes not listed in docs/architecture.md: {writers}"
