"""benchmarks/bench_prepare.py's parts: the synthetic corpus is deterministic, sized and text-like; the
memory poller sees a process's children; a tiny end-to-end run (with the machine's ceiling) writes its
JSON and its section."""

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from benchmarks import bench_prepare


def test_shards_are_deterministic_sized_and_text_like(tmp_path):
    lang = bench_prepare.Language(0)
    paths = {}
    for name, index in (("a", 0), ("b", 0), ("c", 1)):
        paths[name] = tmp_path / f"{name}.jsonl"
        bench_prepare.write_shard(paths[name], lang, 0, index, 300_000)
    a, b, c = (paths[k].read_bytes() for k in "abc")
    assert a == b and a != c
    assert 300_000 <= len(a) < 300_000 + 2_000_000  # stops at the first document past the size
    docs = [json.loads(line)["text"] for line in a.decode().splitlines()]
    words = " ".join(docs).split()
    lengths = np.array([len(w.strip(".,?!")) for w in words])
    assert 3 < lengths.mean() < 8 and words.count("the") > len(words) / 100  # Zipf: common words lead
    assert not any(d != d.strip() for d in docs) and len(docs) > 20
    assert sum(d.count(". ") for d in docs) > len(words) / 40  # sentences


def test_tree_rss_adds_up_a_process_and_its_descendants():
    hold = "x = bytearray(50 * 2**20); import time; time.sleep(30)"
    parent = subprocess.Popen([sys.executable, "-c", f"import subprocess, sys; "
                               f"subprocess.Popen([sys.executable, '-c', {hold!r}]); {hold}"])
    try:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            total, mine, processes = bench_prepare.tree_rss(parent.pid)
            if processes == 2 and total - mine > 50 * 2**20:
                break
            time.sleep(0.1)
        assert processes == 2 and mine > 50 * 2**20 and total - mine > 50 * 2**20
    finally:
        for pid in bench_prepare.descendants(parent.pid):
            os.kill(pid, signal.SIGKILL)
        parent.kill()
        parent.wait()


@pytest.mark.slow
def test_tiny_run_writes_results_and_its_section(tmp_path):
    doc = tmp_path / "benchmarks.md"
    doc.write_text("# Benchmarks\n\n<!-- begin other -->\nkept\n<!-- end other -->\n")
    bench_prepare.main(["--sizes-gb", "0.0015", "0.003", "--shard-mb", "1", "--vocab-size", "1000",
                        "--work-dir", str(tmp_path / "work"), "--out", str(tmp_path / "prepare.json"),
                        "--doc", str(doc)])
    res = json.loads((tmp_path / "prepare.json").read_text())
    assert [(r["corpus_gb"], r["workers"]) for r in res["rows"]] == [
        (0.0015, 1), (0.0015, res["cores"]), (0.003, 1), (0.003, res["cores"])]
    for r in res["rows"]:
        assert r["identical_to_first"] and r["tokens"] > 200_000 and r["ceiling"] > 0
        # prepare-data and its workers (2 at most: 2 chunks), each seen holding memory
        # the tree's memory includes workers seen by the 100 ms polls (a tiny corpus's short-lived
        # second worker can fall between two polls, so at least one beside the main process)
        assert r["processes"] >= 2 and r["peak_tree_bytes"] > r["peak_main_bytes"]
    text = doc.read_text()
    assert "<!-- begin other -->\nkept\n<!-- end other -->" in text
    assert "<!-- begin prepare -->" in text and "| 1.5 MB | 1 |" in text
    assert "goal within 10%" in text and "ceiling measured" in text
