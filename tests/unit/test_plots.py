"""benchmarks/plots.py: every plot function draws a PNG from a small synthetic result JSON, and main()
puts the machine line and the image link into the sections of a docs file (once, however often run)."""

import json

import pytest

pytest.importorskip("matplotlib", reason="matplotlib is in the dev and bench extras; plots need it")

from benchmarks import plots  # noqa: E402

PNG = b"\x89PNG\r\n\x1a\n"


def _pipeline():
    rows = []
    for sched, v in (("gpipe", 1), ("1f1b", 1), ("interleaved", 2)):
        for pp in (2, 4):
            for m in (4, 8):
                for stage in range(pp):
                    theory = (pp - 1) / (v * m + pp - 1)
                    rows.append({"schedule": sched, "v": v, "pp": pp, "m": m, "stage": stage,
                                 "idle": theory * 1.2, "idle_no_prefetch": theory * 1.3, "theory": theory,
                                 "peak_inflight": 2, "activation_bytes_per_mb": 1000})
    return {"shape": {}, "torch": "2.13.0+cpu", "rows": rows}


def _zero():
    rows = []
    for dp in (2, 4):
        for name, sr, gr in (("stage 0 (AdamW)", 1.0, 1.0), ("stage 1 native", 1.0, 1.0),
                             ("stage 3 DeepSpeed", 1.0, 2.0)):
            for rank in range(dp):
                rows.append({"variant": name, "dp": dp, "rank": rank, "params": 1000,
                             "state_bytes": 8000 // dp, "grad_bytes": 4000, "state_ratio": sr,
                             "grad_ratio": gr, "step_s": 0.1})
    return {"shape": {}, "torch": "2.13.0+cpu", "rows": rows}


def _checkpoint():
    def row(model, params, nbytes, t):
        return {"model": model, "params": params, "bytes": nbytes,
                "median_s": {"save": t, "raw": t / 2, "checksum": t / 10, "load": t / 2,
                             "async_blocked": t / 3, "snapshot": t / 5}}
    return {"torch": "2.13.0+cpu", "rounds": 1, "rows": [row("tiny", 10**6, 10**7, 0.02),
                                                         row("big", 10**8, 10**9, 0.8)], "parallel": []}


def _plan():
    rows = [{"params_b": p, "tp": tp, "pp": pp, "published_tflops": pub, "predicted_tflops": pred,
             "error": pred / pub - 1} for p, tp, pp, pub, pred in ((1.7, 1, 1, 137, 137.1),
                                                                  (39.1, 8, 2, 138, 134.0))]
    return {"throughput": {"gemm_efficiency": 0.61, "rows": rows}}


def _parity():
    serial = [5.0, 4.5, 4.1]
    return {"torch": "2.13.0+cpu", "platform": "Linux-test", "cpu_count": 2, "device": "cpu",
            "verify": {"world_size": 2, "device": "cpu", "steps": 3, "tolerances": {"loss": 1e-5},
                       "serial": {"losses": serial},
                       "layouts": [{"layout": "tp2", "losses": serial},
                                   {"layout": "pp2", "losses": [x + 1e-7 for x in serial]},
                                   {"layout": "dp2", "losses": []}]}}


SYNTHETIC = {"pipeline.json": _pipeline, "zero.json": _zero, "checkpoint.json": _checkpoint,
             "plan.json": _plan, "parity.json": _parity}


@pytest.mark.parametrize("name", list(plots.PLOTS))
def test_plot_writes_png(tmp_path, name):
    src, fn, png, _, _ = plots.PLOTS[name]
    path = tmp_path / src
    path.write_text(json.dumps(SYNTHETIC[src]()))
    out = fn(path, tmp_path / "img" / png)
    assert out.exists() and out.read_bytes()[:8] == PNG
    assert 2_000 < out.stat().st_size < 200_000


def test_main_links_each_section_once(tmp_path):
    results = tmp_path / "results"
    results.mkdir()
    for src, make in SYNTHETIC.items():
        (results / src).write_text(json.dumps(make()))
    doc = tmp_path / "benchmarks.md"
    doc.write_text("# Benchmarks\n\n" + "".join(f"<!-- begin {n} -->\nbody of {n}\n<!-- end {n} -->\n\n"
                                                   for n in plots.PLOTS))
    args = ["--results", str(results), "--img", str(tmp_path / "img"), "--doc", str(doc)]
    plots.main(args)
    plots.main(args)  # idempotent: replaces its lines, does not repeat them
    text = doc.read_text()
    for name, (_, _, png, _, _) in plots.PLOTS.items():
        assert (tmp_path / "img" / png).exists()
        assert text.count(f"(img/{png})") == 1
        section = text.split(f"<!-- begin {name} -->")[1].split(f"<!-- end {name} -->")[0]
        assert f"body of {name}" in section and f"img/{png}" in section
        assert section.count("Machine: ") == 1
    assert "Machine: 2-core Linux-test, CPU only" in text
