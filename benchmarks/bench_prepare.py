"""prepare-data at corpus scale: tokens/s with one worker and with every core, and the peak memory of
the whole process tree, on synthetic corpora of growing size.

The corpus is JSON Lines shards of `--shard-mb` MB of word-like English-ish text (a Zipf-distributed
vocabulary of 50k pseudo-words behind the common English words, sentences, paragraphs, numbers, a few
accented words; documents of log-normal length, median ~3 KB), generated deterministically from
`--seed`, shard by shard, so a smaller corpus is a prefix of a larger one and shards already in
`--work-dir` are reused. One BPE (`--vocab-size`) is trained once on the first shard's first 20 MB
and given to every run (`--tokenizer FILE`), so the runs time tokenization, not BPE training.

For each size and each worker count, `megatron-lite prepare-data` runs in a subprocess while this
process polls the resident memory (VmRSS) of it and all its descendants every 100 ms: `peak tree` is
the largest sum over the tree at one instant (shared library pages counted once per process, so it
overstates a little), `peak main` the reading/writing process alone. `tokenize` is the tokenizing
pass as prepare-data logs it; `wall` the whole command (process start, the scan pass, writing).
The outputs of the first and the last worker count are compared byte for byte.
Goals (the issue's): tokens/s with 2 workers >= 1.8x one worker on 2 cores; peak tree memory at the
largest size within 10% of the smallest.

    python benchmarks/bench_prepare.py --sizes-gb 1 2 --max-load 0.5    # the full benchmark: ~1.5 h
                                                                        # on 2 cores, ~4 GB of disk
    python benchmarks/bench_prepare.py --sizes-gb 0.05 0.1 --no-doc     # a quick look
"""

from __future__ import annotations

import argparse
import filecmp
import json
import os
import platform
import re
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.report import write_json, write_section  # noqa: E402
from megatron_lite.data.prepare import default_workers  # noqa: E402
from megatron_lite.distributed.env import child_environ, parent_pids  # noqa: E402

COMMON = ("the of and to a in is that it was for on are as with his they at be this from have or by "
          "one had not but what all were when we there can an your which their said if do will each "
          "about how up out them then she many some so these would other into has more her two like "
          "him see time could no make than first been its who now people my made over did down only "
          "way find use may water long little very after words called just where most know").split()
TOKENIZED = re.compile(r"tokenized ([\d,]+) documents .* into ([\d,]+) tokens in ([\d.]+)s")


def vocabulary(rng: np.random.Generator, n: int = 50_000) -> np.ndarray:
    """Common English words first, then pronounceable pseudo-words, roughly shortest first (frequent
    words are short), ~1% of them with an accented letter."""
    onsets = ["", "b", "c", "d", "f", "g", "h", "j", "k", "l", "m", "n", "p", "r", "s", "t", "v", "w",
              "th", "st", "tr", "pl", "gr", "ch", "sh", "br", "cl", "fr", "qu", "sp"]
    nuclei = ["a", "e", "i", "o", "u", "ou", "ea", "ai", "io", "y", "ee", "oo"]
    codas = ["", "", "", "n", "r", "s", "t", "l", "nd", "ng", "st", "rt", "m", "ck", "ght", "ss"]
    words, seen = list(COMMON), set(COMMON)
    while len(words) < n:
        syllables = 1 + min(rng.geometric(0.45) - 1, 4)
        w = "".join(onsets[rng.integers(len(onsets))] + nuclei[rng.integers(len(nuclei))]
                    + codas[rng.integers(len(codas))] for _ in range(syllables))
        if rng.random() < 0.01:
            i = rng.integers(len(w))
            w = w[:i] + "éèüçñ"[rng.integers(5)] + w[i + 1:]
        if w not in seen:
            seen.add(w)
            words.append(w)
    head, tail = words[:len(COMMON)], words[len(COMMON):]
    tail.sort(key=lambda w: len(w) + rng.normal(0, 2))
    return np.array(head + tail, dtype=object)


def text_block(rng: np.random.Generator, vocab: np.ndarray, caps: np.ndarray, cdf: np.ndarray,
               words: int) -> str:
    """About `words` words of running text: sentences of 4-30 words, commas, numbers, paragraphs."""
    ids = np.searchsorted(cdf, rng.random(words))
    ends = np.cumsum(rng.integers(4, 31, size=words // 4 + 1))
    ends = ends[ends < words]
    starts = np.zeros(words, dtype=bool)
    starts[0] = True
    starts[ends] = True
    tokens = np.where(starts, caps[ids], vocab[ids])
    numbers = rng.random(words) < 0.01
    tokens[numbers] = [str(x) for x in rng.integers(0, 10_000, size=int(numbers.sum()))]
    seps = np.full(words, " ", dtype=object)
    seps[rng.random(words) < 0.07] = ", "
    last = np.nonzero(starts)[0][1:] - 1  # the word before each sentence start
    seps[last] = rng.choice(np.array([". ", "? ", "! ", ".\n\n"], dtype=object), size=len(last),
                            p=[0.78, 0.04, 0.02, 0.16])
    seps[-1] = ".\n\n"
    joined = np.empty(2 * words, dtype=object)
    joined[0::2], joined[1::2] = tokens, seps
    return "".join(joined.tolist())


class Language:
    """The vocabulary of corpus `seed`, its capitalised forms and Zipf's law over it (exponent 1.05)."""

    def __init__(self, seed: int):
        self.vocab = vocabulary(np.random.default_rng(seed))
        self.caps = np.array([w[:1].upper() + w[1:] for w in self.vocab], dtype=object)
        p = 1.0 / np.arange(1, len(self.vocab) + 1) ** 1.05
        self.cdf = np.cumsum(p / p.sum())


def write_shard(path: Path, lang: Language, seed: int, index: int, nbytes: int) -> None:
    """Shard `index` of the corpus: JSON Lines documents until `nbytes` bytes, deterministic in
    (seed, index). Written to a temporary name and renamed, so a shard that exists is complete."""
    rng = np.random.default_rng([seed, index])
    tmp = path.with_suffix(".tmp")
    written = 0
    with open(tmp, "w", encoding="utf-8") as f:
        while written < nbytes:
            text, pos = text_block(rng, lang.vocab, lang.caps, lang.cdf, 400_000), 0
            while pos < len(text) and written < nbytes:
                length = int(np.clip(rng.lognormal(np.log(3000), 1.0), 200, 200_000))
                end = text.find(" ", pos + length)
                end = len(text) if end < 0 else end
                line = json.dumps({"text": text[pos:end].strip()}, ensure_ascii=False) + "\n"
                f.write(line)
                written += len(line.encode("utf-8"))
                pos = end + 1
    os.replace(tmp, path)


def corpus(work: Path, seed: int, gigabytes: float, shard_mb: int) -> list[Path]:
    """The shards of a corpus of `gigabytes`, generated where missing."""
    total, shard = int(gigabytes * 1e9), shard_mb * 10**6
    paths, lang = [], None
    for i in range(-(-total // shard)):
        size = min(shard, total - i * shard)
        path = work / f"corpus-s{seed}-{shard_mb}mb" / f"shard-{i:05d}-{size}.jsonl"
        if not path.exists():
            path.parent.mkdir(parents=True, exist_ok=True)
            t0 = time.perf_counter()
            lang = lang or Language(seed)
            write_shard(path, lang, seed, i, size)
            print(f"  generated {path.name} in {time.perf_counter() - t0:.1f}s", flush=True)
        paths.append(path)
    return paths


def train_tokenizer(shard: Path, vocab_size: int, out: Path) -> Path:
    """A BPE trained on the first 20 MB of `shard` (the one all runs share)."""
    from megatron_lite.data.tokenizer import BPETokenizer
    if out.exists():
        return out

    def texts():
        seen = 0
        with open(shard, encoding="utf-8") as f:
            for line in f:
                seen += len(line)
                if seen > 20_000_000:
                    return
                yield json.loads(line)["text"]
    BPETokenizer.train(texts(), vocab_size).tok.save(str(out))
    return out


def descendants(root: int) -> set[int]:
    """The processes below `root` now (from /proc: Linux)."""
    parents = parent_pids()
    found, frontier = set(), [root]
    while frontier:
        pid = frontier.pop()
        kids = [c for c, p in parents.items() if p == pid and c not in found]
        found.update(kids)
        frontier += kids
    return found


def tree_rss(root: int, tree: set[int] | None = None) -> tuple[int, int, int]:
    """(bytes resident in `root` and its descendants, in `root` alone, number of processes) now; `tree`:
    the descendants if known (finding them scans all of /proc, ~4 ms: too much for every poll)."""
    total = mine = processes = 0
    for pid in {root} | (descendants(root) if tree is None else tree):
        try:
            status = Path(f"/proc/{pid}/status").read_text()
        except OSError:
            continue
        kb = re.search(r"VmRSS:\s+(\d+) kB", status)
        rss = int(kb.group(1)) * 1024 if kb else 0
        total, processes = total + rss, processes + 1
        mine += rss if pid == root else 0
    return total, mine, processes


def wait_for_quiet(max_load: float | None, patience_s: float) -> float:
    """The 1-minute load average once it is at most `max_load` (None: now), waiting up to `patience_s`."""
    deadline = time.monotonic() + patience_s
    while max_load is not None and os.getloadavg()[0] > max_load and time.monotonic() < deadline:
        time.sleep(5)
    return os.getloadavg()[0]


def run_prepare(shards: list[Path], tokenizer: Path, out: Path, workers: int, load: float) -> dict:
    """One prepare-data run, polled for memory; its timings, counts and peaks."""
    cmd = [sys.executable, "-m", "megatron_lite.cli", "prepare-data", "--source", *map(str, shards),
           "--out", str(out), "--tokenizer", str(tokenizer), "--workers", str(workers), "--force"]
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=ROOT, env=child_environ(OMP_NUM_THREADS="1"), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    peak_tree = peak_main = processes = polls = 0
    tree: set[int] = set()
    while proc.poll() is None:
        # processes start and end rarely: look for them once a second, and at every poll until the
        # workers have appeared (a small corpus's workers may live for less than a second)
        if polls % 10 == 0 or not tree:
            tree = descendants(proc.pid)
        total, main, n = tree_rss(proc.pid, tree)
        peak_tree, peak_main, processes = max(peak_tree, total), max(peak_main, main), max(processes, n)
        polls += 1
        time.sleep(0.1)
    wall = time.perf_counter() - t0
    log = proc.stdout.read()
    if proc.returncode != 0:
        raise SystemExit(f"prepare-data failed (exit {proc.returncode}):\n{log}")
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    found = TOKENIZED.search(log)
    if not found:
        raise SystemExit(f"prepare-data logged no 'tokenized ...' line:\n{log}")
    documents, tokens, seconds = (float(g.replace(",", "")) for g in found.groups())
    return {"workers": workers, "documents": int(documents), "tokens": int(tokens), "tokenize_s": seconds,
            "tokens_per_s": tokens / seconds, "wall_s": wall, "wall_tokens_per_s": tokens / wall,
            "peak_tree_bytes": peak_tree, "peak_main_bytes": peak_main, "processes": processes,
            "cpu_s": (after.ru_utime + after.ru_stime) - (before.ru_utime + before.ru_stime),
            "load_before": load}


# One independent tokenizer process of the ceiling: the first ~4 MB of a shard, encoded as prepare-data's
# workers do (one thread), from a common start time; prints its tokens and seconds.
CEILING_PROCESS = """
import json, os, sys, time
os.environ["TOKENIZERS_PARALLELISM"] = "false"
import numpy as np
from tokenizers import Tokenizer
from megatron_lite.data.tokenizer import BPETokenizer
tok = BPETokenizer(Tokenizer.from_file(sys.argv[1]))
texts, size = [], 0
with open(sys.argv[2], encoding="utf-8") as f:
    for line in f:
        texts.append(json.loads(line)["text"])
        size += len(texts[-1])
        if size > 4_000_000:
            break
time.sleep(max(0.0, float(sys.argv[3]) - time.time()))
t0 = time.perf_counter()
tokens = sum(len(a) for a in tok.encode_arrays(texts, np.uint16))
print(tokens, time.perf_counter() - t0)
"""


def ceiling(tokenizer: Path, shard: Path, workers: int) -> float:
    """Throughput of `workers` independent single-threaded tokenizer processes started together, over one
    process's alone: what this machine allows at best right now (below `workers` when its cores are
    busy with other work, or are hyperthreads of one core)."""
    def run(n: int) -> float:
        start = str(time.time() + 5)  # after every process has loaded the tokenizer and the text
        procs = [subprocess.Popen([sys.executable, "-c", CEILING_PROCESS, str(tokenizer), str(shard), start],
                                  cwd=ROOT, env=child_environ(OMP_NUM_THREADS="1"), stdout=subprocess.PIPE,
                                  text=True) for _ in range(n)]
        results = [tuple(map(float, p.communicate()[0].split())) for p in procs]
        return sum(t for t, _ in results) / max(s for _, s in results)
    return run(workers) / run(1)


def same_output(a: Path, b: Path) -> bool:
    names = sorted(p.name for p in a.iterdir())
    return names == sorted(p.name for p in b.iterdir()) and all(
        filecmp.cmp(a / n, b / n, shallow=False) for n in names)


def measure(work: Path, sizes: list[float], workers: list[int], seed: int, shard_mb: int,
            vocab_size: int, max_load: float | None = None, patience_s: float = 0) -> list[dict]:
    rows = []
    tokenizer = None
    for gb in sizes:
        print(f"corpus of {gb:g} GB", flush=True)
        shards = corpus(work, seed, gb, shard_mb)
        tokenizer = tokenizer or train_tokenizer(shards[0], vocab_size, work / f"tokenizer-{vocab_size}.json")
        wait_for_quiet(max_load, patience_s)
        limit = ceiling(tokenizer, shards[0], workers[-1])
        print(f"  ceiling: {workers[-1]} independent tokenizer processes give {limit:.2f}x one's tokens/s",
              flush=True)
        outputs = []
        for w in workers:
            out = work / f"out-{gb:g}gb-w{w}"
            row = {"corpus_gb": gb, "corpus_bytes": sum(p.stat().st_size for p in shards), "ceiling": limit,
                   **run_prepare(shards, tokenizer, out, w, wait_for_quiet(max_load, patience_s))}
            rows.append(row)
            outputs.append(out)
            print(f"  workers={w}: {row['tokens_per_s'] / 1e6:.3f}M tokens/s, tokenize "
                  f"{row['tokenize_s']:.1f}s, wall {row['wall_s']:.1f}s, peak tree "
                  f"{row['peak_tree_bytes'] / 2**20:.0f} MiB ({row['processes']} processes), load before "
                  f"{row['load_before']:.1f}", flush=True)
        identical = same_output(outputs[0], outputs[-1])
        for row in rows[-len(workers):]:
            row["identical_to_first"] = identical
        for out in outputs:
            shutil.rmtree(out)
    return rows


def summary(rows: list[dict], workers: list[int]) -> dict:
    """Speedup of each size's last worker count over its first; peak memory of the largest size over
    the smallest, per worker count."""
    by = {(r["corpus_gb"], r["workers"]): r for r in rows}
    sizes = sorted({r["corpus_gb"] for r in rows})
    first, last = workers[0], workers[-1]
    speedup = {gb: by[gb, last]["tokens_per_s"] / by[gb, first]["tokens_per_s"] for gb in sizes}
    memory = {w: by[sizes[-1], w]["peak_tree_bytes"] / by[sizes[0], w]["peak_tree_bytes"] for w in workers}
    return {"speedup": speedup, "memory_ratio": memory}


def table(res: dict) -> str:
    rows, s, w0, w1 = res["rows"], res["summary"], res["workers"][0], res["workers"][-1]
    lines = [f"`megatron-lite prepare-data` on synthetic JSON Lines corpora ({res['shard_mb']} MB shards, "
             f"seed {res['seed']}) with a given {res['vocab_size']}-token BPE, on {res['cores']} cores; one "
             "run each. `tokens/s` covers the tokenizing pass; `wall` the whole command; `peak tree` the "
             "largest resident memory of prepare-data and its workers together (100 ms polls), `peak main` "
             "the reading and writing process alone; `load` the 1-minute load average when the run "
             "started (other work on the machine).", "",
             f"| corpus | workers | documents | tokens | tokenize (s) | tokens/s | vs {w0} | wall (s) | "
             "peak tree (MiB) | peak main (MiB) | CPU (s) | load | output = first |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    base = {r["corpus_gb"]: r["tokens_per_s"] for r in rows if r["workers"] == w0}
    for r in rows:
        size = r["corpus_bytes"]
        cells = [f"{size / 1e9:.2f} GB" if size >= 1e9 else f"{size / 1e6:,.1f} MB", r["workers"],
                 f"{r['documents']:,}", f"{r['tokens']:,}",
                 f"{r['tokenize_s']:.1f}", f"{r['tokens_per_s'] / 1e6:.3f}M",
                 f"{r['tokens_per_s'] / base[r['corpus_gb']]:.2f}x", f"{r['wall_s']:.1f}",
                 f"{r['peak_tree_bytes'] / 2**20:,.0f}", f"{r['peak_main_bytes'] / 2**20:,.0f}",
                 f"{r['cpu_s']:.1f}", f"{r['load_before']:.1f}", "yes" if r["identical_to_first"] else "NO"]
        lines.append("| " + " | ".join(map(str, cells)) + " |")
    sizes = sorted(s["speedup"])
    speed = ", ".join(f"{s['speedup'][gb]:.2f}x at {gb:g} GB" for gb in sizes)
    mem = ", ".join(f"{s['memory_ratio'][w]:.3f} with {w} worker{'s' * (w > 1)}" for w in res["workers"])
    limits = ", ".join(f"{r['ceiling']:.2f}x at {r['corpus_gb']:g} GB" for r in rows if r["workers"] == w0)
    lines += ["", f"{w1} workers over {w0}: {speed} (goal >= 1.8x with 2 workers on 2 cores). The machine's "
              f"ceiling measured just before (the same encoding in {w1} independent processes started "
              f"together, over one alone, on 4 MB of the corpus): {limits}. Peak tree memory at "
              f"{sizes[-1]:g} GB over {sizes[0]:g} GB: {mem} (goal within 10%).", "",
              f"Machine: {res['cores']}-core {res['platform']} (the cores this process may use), Python "
              f"{res['python']} (recorded by the run)."]
    return "\n".join(lines)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--sizes-gb", type=float, nargs="+", default=[1.0, 2.0], help="corpus sizes (GB)")
    p.add_argument("--workers", type=int, nargs="+", default=[1, default_workers()],
                   help="worker counts to run (the first is the baseline)")
    p.add_argument("--shard-mb", type=int, default=128, help="size of each JSON Lines shard (MB)")
    p.add_argument("--seed", type=int, default=0, help="seed of the synthetic corpus")
    p.add_argument("--vocab-size", type=int, default=32768, help="the BPE every run is given")
    p.add_argument("--max-load", type=float, help="wait before each run until the 1-minute load average "
                                                  "is at most this (e.g. 0.5 on 2 cores)")
    p.add_argument("--wait-load-s", type=float, default=1800, help="how long to wait for --max-load")
    p.add_argument("--work-dir", help="where the corpus, tokenizer and outputs go (kept, so the corpus is "
                                      "reused); default: a temporary directory, removed")
    p.add_argument("--out", default=str(ROOT / "benchmarks/results/prepare.json"))
    p.add_argument("--doc", default=str(ROOT / "docs/benchmarks.md"))
    p.add_argument("--no-doc", action="store_true", help="print the table; write neither --out nor --doc")
    a = p.parse_args(argv)
    if min(a.workers) < 1 or min(a.sizes_gb) <= 0:
        p.error(f"--workers {a.workers} must all be >= 1 and --sizes-gb {a.sizes_gb} all > 0.")
    sizes = sorted(a.sizes_gb)
    with tempfile.TemporaryDirectory(prefix="bench_prepare-") as tmp:
        work = Path(a.work_dir or tmp)
        work.mkdir(parents=True, exist_ok=True)
        rows = measure(work, sizes, a.workers, a.seed, a.shard_mb, a.vocab_size, a.max_load, a.wait_load_s)
    res = {"sizes_gb": sizes, "workers": a.workers, "shard_mb": a.shard_mb, "seed": a.seed,
           "vocab_size": a.vocab_size, "cores": default_workers(), "platform": f"{platform.machine()} "
           f"{platform.system()}", "python": platform.python_version(), "rows": rows}
    res["summary"] = summary(rows, a.workers)
    text = table(res)
    print(text)
    if not a.no_doc:
        write_json(a.out, res)
        write_section(Path(a.doc), "prepare", text)


if __name__ == "__main__":
    main()
