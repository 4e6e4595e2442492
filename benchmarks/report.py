"""Keeps docs/benchmarks.md in step with the JSON results: each benchmark owns one marked section."""

from __future__ import annotations

import json
from pathlib import Path

HEADER = ("# Benchmarks\n\nEach section is written by the script named in it; the raw numbers are in "
          "benchmarks/results/.\n")


def write_json(path: str | Path, obj) -> None:
    """A benchmark's raw results (benchmarks/results/*.json)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj, indent=2) + "\n")


def write_section(path: Path, name: str, body: str) -> None:
    begin, end = f"<!-- begin {name} -->", f"<!-- end {name} -->"
    text = path.read_text() if path.exists() else HEADER
    block = f"{begin}\n{body.strip()}\n{end}"
    if begin in text and end in text:
        head, rest = text.split(begin, 1)
        text = head + block + rest.split(end, 1)[1]
    else:
        text = text.rstrip() + "\n\n" + block + "\n"
    path.write_text(text)

