"""Plots of the benchmark results (benchmarks/results/*.json) for docs/benchmarks.md.

One function per plot: each reads its JSON and writes a small PNG (6 x 3.5 in, 100 dpi) to
docs/img/. main() draws every plot whose JSON exists and, inside each benchmark's marked section of
docs/benchmarks.md, puts a line naming the machine the numbers came from and the image link (both
replaced, not repeated, on the next run). `make bench` runs it last.

    python benchmarks/plots.py [--results benchmarks/results --img docs/img --doc docs/benchmarks.md]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
from pathlib import Path

import matplotlib
import matplotlib.ticker

matplotlib.use("Agg")  # files only, no display; before pyplot is imported
import matplotlib.pyplot as plt  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.report import write_section  # noqa: E402

FIGSIZE = (6, 3.5)
DPI = 100
MIB = 2**20
MACHINE_PREFIX = "Machine: "
IMAGE_PREFIX = "!["


def _load(path: str | Path) -> dict:
    return json.loads(Path(path).read_text())


def _save(fig, out: str | Path) -> Path:
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(out, dpi=DPI)
    plt.close(fig)
    return out


# ---- the plots ----------------------------------------------------------------------------------
def plot_pipeline(json_path: str | Path, out: str | Path) -> Path:
    """Measured bubble (worst stage) vs micro-batches m per schedule, against (p-1)/(v·m+p-1)."""
    rows = _load(json_path)["rows"]
    pps = sorted({r["pp"] for r in rows})
    fig, axes = plt.subplots(1, len(pps), figsize=FIGSIZE, sharey=True, squeeze=False)
    colors = {"gpipe": "tab:blue", "1f1b": "tab:orange", "interleaved": "tab:green"}
    for ax, p in zip(axes[0], pps, strict=True):
        ms = sorted({r["m"] for r in rows if r["pp"] == p})
        grid = [ms[0] + (ms[-1] - ms[0]) * i / 100 for i in range(101)]
        vs = sorted({r["v"] for r in rows if r["pp"] == p})
        for v in vs:
            label = "theory (p-1)/(m+p-1)" if v == 1 else f"theory (p-1)/({v}m+p-1)"
            ax.plot(grid, [(p - 1) / (v * m + p - 1) for m in grid], ls="--" if v == 1 else ":",
                    color="gray" if v == 1 else colors["interleaved"], lw=1, label=label)
        for sched in dict.fromkeys(r["schedule"] for r in rows if r["pp"] == p):
            pts = []
            for m in ms:
                rs = [r for r in rows if r["pp"] == p and r["m"] == m and r["schedule"] == sched]
                if rs:
                    pts.append((m, max(r["idle"] for r in rs)))
            v = next(r["v"] for r in rows if r["schedule"] == sched)
            name = sched + (f" (v={v})" if v > 1 else "")
            ax.plot(*zip(*pts, strict=True), marker="o", ms=4, color=colors.get(sched), label=name)
        ax.set_xscale("log", base=2)
        ax.set_xticks(ms, [str(m) for m in ms])
        ax.set_xlabel("micro-batches m")
        ax.set_title(f"pp = {p}", fontsize=10)
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("bubble (idle fraction, worst stage)")
    axes[0][-1].legend(fontsize=7)
    fig.suptitle("Pipeline bubble: measured vs theory", fontsize=11)
    return _save(fig, out)


def plot_zero(json_path: str | Path, out: str | Path) -> Path:
    """Optimizer-state and gradient MiB per rank (worst rank) by ZeRO variant, with the ideal."""
    rows = _load(json_path)["rows"]
    dps = sorted({r["dp"] for r in rows})
    variants = list(dict.fromkeys(r["variant"] for r in rows))
    fig, axes = plt.subplots(1, len(dps), figsize=FIGSIZE, sharey=True, squeeze=False)
    width = 0.38
    for ax, dp in zip(axes[0], dps, strict=True):
        kinds = (("state_bytes", "state_ratio", "tab:blue", "optimizer state"),
                 ("grad_bytes", "grad_ratio", "tab:orange", "gradients"))
        for j, (key, ratio, color, label) in enumerate(kinds):
            xs, got, ideal = [], [], []
            for i, name in enumerate(variants):
                rs = [r for r in rows if r["dp"] == dp and r["variant"] == name]
                if not rs:
                    continue
                w = max(rs, key=lambda r, k=key: r[k])
                xs.append(i + (j - 0.5) * width)
                got.append(w[key] / MIB)
                ideal.append(w[key] / w[ratio] / MIB if w[ratio] else math.nan)
            ax.bar(xs, got, width, color=color, label=label)
            ax.scatter(xs, ideal, marker="_", s=120, color="black", zorder=3,
                       label="ideal" if j == 1 else None)
        ax.set_xticks(range(len(variants)), [v.replace(" DeepSpeed", "\nDS").replace(" native", "\nnative")
                                             .replace(" (AdamW)", "\nAdamW") for v in variants], fontsize=7)
        ax.set_title(f"dp = {dp}", fontsize=10)
        ax.grid(axis="y", alpha=0.3)
    axes[0][0].set_ylabel("MiB per rank (worst rank)")
    axes[0][-1].legend(fontsize=7)
    fig.suptitle("ZeRO: bytes held per rank by stage", fontsize=11)
    return _save(fig, out)


def plot_checkpoint(json_path: str | Path, out: str | Path) -> Path:
    """Save, raw write, checksum, verified load and async blocked time vs checkpoint bytes."""
    rows = sorted(_load(json_path)["rows"], key=lambda r: r["bytes"])
    fig, ax = plt.subplots(figsize=FIGSIZE)
    gb = [r["bytes"] / 1e9 for r in rows]
    series = (("save", "save (write + fsync + checksums + commit)", "o-"),
              ("raw", "raw write + fsync, same bytes", "s--"), ("load", "verified load", "^-"),
              ("checksum", "xxh3 checksums", "v:"), ("async_blocked", "async save: training blocked", "d-."))
    for key, label, style in series:
        if all(key in r["median_s"] for r in rows):
            ax.plot(gb, [r["median_s"][key] for r in rows], style, ms=5, label=label)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlim(min(gb) / 2, max(gb) * 4)  # room for the labels
    for r, x in zip(rows, gb, strict=True):
        ax.annotate(f"{r['model']}\n{r['params'] / 1e6:.1f}M params", (x, r["median_s"]["save"]),
                    textcoords="offset points", xytext=(6, 8), fontsize=7)
    ax.set_xlabel("checkpoint size (GB, model + AdamW state)")
    ax.set_ylabel("seconds (median)")
    ax.set_title(f"Checkpoint cost vs model size ({len(rows)} sizes measured)", fontsize=11)
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=7)
    return _save(fig, out)


def plot_plan(json_path: str | Path, out: str | Path) -> Path:
    """The planner's predicted TFLOP/s per GPU vs the published figure, per row of the table."""
    t = _load(json_path)["throughput"]
    rows = t["rows"]
    fig, ax = plt.subplots(figsize=FIGSIZE)
    xs = range(len(rows))
    width = 0.4
    ax.bar([x - width / 2 for x in xs], [r["published_tflops"] for r in rows], width, label="published",
           color="tab:gray")
    ax.bar([x + width / 2 for x in xs], [r["predicted_tflops"] for r in rows], width, label="predicted",
           color="tab:blue")
    for x, r in zip(xs, rows, strict=True):
        ax.annotate(f"{100 * r['error']:+.1f}%", (x + width / 2, r["predicted_tflops"]),
                    textcoords="offset points", xytext=(0, 2), ha="center", fontsize=6)
    ax.set_xticks(list(xs), [f"{r['params_b']:g}B\nt{r['tp']} p{r['pp']}" for r in rows], fontsize=7)
    top = max(max(r["published_tflops"], r["predicted_tflops"]) for r in rows)
    ax.set_ylim(0, top * 1.12)
    ax.set_ylabel("TFLOP/s per GPU")
    ax.set_title(f"Planner vs Megatron-LM Table 1 (GEMM efficiency {t['gemm_efficiency']:g}, "
                 f"fitted on row 1)", fontsize=9)
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=7, loc="lower right")
    return _save(fig, out)


def _family(layout: str) -> str:
    """The parallelism a verify layout name uses, coarsely: tensor > pipeline > data only."""
    if layout.startswith("tp") or ".tp" in layout:
        return "with tensor parallel"
    if layout.startswith("pp") or ".pp" in layout:
        return "with pipeline (no TP)"
    return "data parallel / ZeRO only"


def plot_parity(json_path: str | Path, out: str | Path) -> Path:
    """Training loss per step of the serial run and each layout (left) and |layout - serial| (right)."""
    v = _load(json_path)["verify"]
    serial = v["serial"]["losses"]
    steps = list(range(1, len(serial) + 1))
    fig, (ax, ax2) = plt.subplots(1, 2, figsize=FIGSIZE)
    ax.plot(steps, serial, color="black", lw=5, alpha=0.25, label="serial")
    colors = {"data parallel / ZeRO only": "tab:blue", "with pipeline (no TP)": "tab:orange",
              "with tensor parallel": "tab:green"}
    floor = 1e-9  # identical losses are drawn on the floor of the log axis
    seen: set[str] = set()
    layouts = [r for r in v["layouts"] if r.get("losses")]
    for k, r in enumerate(layouts):
        losses, fam = r["losses"], _family(r["layout"])
        label = None if fam in seen else f"{fam} ({sum(_family(x['layout']) == fam for x in layouts)})"
        seen.add(fam)
        ax.plot(steps[:len(losses)], losses, lw=0.8, color=colors[fam], label=label)
        jitter = (k / max(len(layouts) - 1, 1) - 0.5) * 0.4  # side by side, not on top of each other
        ax2.scatter([x + jitter for x in steps[:len(losses)]],
                    [max(abs(a - b), floor) for a, b in zip(losses, serial, strict=False)],
                    s=6, color=colors[fam])
    ax.set_xlabel("step")
    ax.set_ylabel("training loss")
    ax.set_title(f"loss: {len(layouts)} layouts on {v['world_size']} ranks vs serial", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=6)
    ax2.set_yscale("log")
    tol = v["tolerances"]["loss"] * min(serial)
    ax2.axhline(tol, color="red", ls="--", lw=1, label="tolerance")
    ax2.set_ylim(floor / 3, tol * 5)
    ax2.set_xlabel("step")
    ax2.set_ylabel("|loss - serial loss|")
    ax2.set_title(f"difference (equal: drawn at {floor:g})", fontsize=9)
    for a in (ax, ax2):
        a.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
    ax2.grid(alpha=0.3, which="both")
    ax2.legend(fontsize=6, loc="center right")
    return _save(fig, out)


# docs section -> (results JSON, plot function, image file, alt text, note on the machine line)
PLOTS = {
    "pipeline": ("pipeline.json", plot_pipeline, "pipeline_bubble.png",
                 "Pipeline bubble vs micro-batches, measured and theory", ""),
    "zero": ("zero.json", plot_zero, "zero_bytes.png", "ZeRO bytes per rank by stage", ""),
    "checkpoint": ("checkpoint.json", plot_checkpoint, "checkpoint_times.png",
                   "Checkpoint save and load times vs size", ""),
    "plan": ("plan.json", plot_plan, "plan_throughput.png", "Planner predicted vs published TFLOP/s",
             "the memory rows; the throughput rows are A100 predictions"),
    "parity": ("parity.json", plot_parity, "parity_loss.png",
               "Loss per step of each layout and the serial run", ""),
}
# sections without a plot still get the machine line
OTHER_SECTIONS = {"throughput": "throughput.json", "tp_comm": "tp_comm.json", "launch": "launch.json"}


# ---- docs/benchmarks.md -------------------------------------------------------------------------
def machine_line(res: dict, note: str = "") -> str:
    """Where the numbers were measured: from the JSON where it records it, else this machine."""
    torch_v = res.get("torch")
    device = res.get("device") or (res.get("verify") or {}).get("device") or \
        ("cpu" if str(torch_v).endswith("+cpu") else None)
    dev = "CPU only" if device == "cpu" else (device or "device not recorded")
    if note:
        dev += f" for {note}"
    if "platform" in res:
        cores = f"{res['cpu_count']}-core " if "cpu_count" in res else ""
        threads = f", {res['threads']} threads" if "threads" in res else ""
        return (f"{MACHINE_PREFIX}{cores}{res['platform']}, {dev}{threads}, torch {torch_v} "
                f"(recorded by the run).")
    here = f"{os.cpu_count()}-core {platform.machine()} {platform.system()}"
    if "torch" not in res:
        return f"{MACHINE_PREFIX}{here}, {dev} (read when the plots were drawn; the JSON records no machine)."
    return (f"{MACHINE_PREFIX}{here}, {dev}, torch {res['torch']} (torch from the JSON; cores and OS read "
            f"when the plots were drawn).")


def _section_body(text: str, name: str) -> str | None:
    begin, end = f"<!-- begin {name} -->", f"<!-- end {name} -->"
    if begin not in text or end not in text:
        return None
    return text.split(begin, 1)[1].split(end, 1)[0].strip("\n")


def annotate_section(doc: Path, name: str, machine: str, image: str | None, alt: str = "plot") -> bool:
    """Replace this module's lines (machine, image) at the end of section `name`; False if absent."""
    body = _section_body(doc.read_text(), name) if doc.exists() else None
    if body is None:
        return False
    lines = [ln for ln in body.split("\n")
             if not ln.startswith(MACHINE_PREFIX) and not (ln.startswith(IMAGE_PREFIX) and "img/" in ln)]
    while lines and not lines[-1].strip():
        lines.pop()
    lines += ["", machine]
    if image:
        lines += ["", f"{IMAGE_PREFIX}{alt}]({image})"]
    write_section(doc, name, "\n".join(lines))
    return True


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--results", default=str(ROOT / "benchmarks/results"))
    ap.add_argument("--img", default=str(ROOT / "docs/img"))
    ap.add_argument("--doc", default=str(ROOT / "docs/benchmarks.md"))
    a = ap.parse_args(argv)
    results, img, doc = Path(a.results), Path(a.img), Path(a.doc)
    for name, (src, fn, png, alt, note) in PLOTS.items():
        if not (results / src).exists():
            print(f"plots: {name}: no {results / src}, skipped")
            continue
        out = fn(results / src, img / png)
        rel = os.path.relpath(out, doc.parent)
        res = _load(results / src)
        if name == "plan" and "device" not in res:
            res = dict(res, device="cpu")  # its memory rows run on this CPU (fp32, gloo)
        placed = annotate_section(doc, name, machine_line(res, note), rel, alt)
        print(f"plots: {out} ({out.stat().st_size / 1024:.0f} KB)"
              + ("" if placed else f"; no '{name}' section in {doc}, link not added"))
    for name, src in OTHER_SECTIONS.items():
        if (results / src).exists():
            annotate_section(doc, name, machine_line(_load(results / src)), None)


if __name__ == "__main__":
    main()
