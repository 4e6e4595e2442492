"""`megatron-lite verify` under torchrun: every layout that fits the job matches the serial model on
the real code, and a planted bug (tests/e2e/verify_bug.py) fails exactly the layouts that run it."""

import json
import os
import subprocess
import sys
import time

import pytest

from tests.conftest import ROOT, cli


def verify(tmp_path, nproc: int, *args: str, bug: str | None = None):
    """Run verify on nproc torchrun ranks (with `bug` planted); returns (process, its JSON, wall s)."""
    out = tmp_path / f"verify_{nproc}_{bug or 'clean'}.json"
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONFAULTHANDLER="1")
    target = ["tests/e2e/verify_bug.py", bug] if bug else ["-m", "megatron_lite.cli", "verify"]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
           *target, "--json", str(out), *args]
    t0 = time.perf_counter()
    r = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    wall = time.perf_counter() - t0
    assert out.is_file(), r.stdout[-5000:] + r.stderr[-10000:]
    return r, json.loads(out.read_text()), wall


def failed(report: dict) -> set[str]:
    return {row["layout"] for row in report["layouts"] if not row["passed"]}


# Which layouts run the code each bug breaks (names: tp2+sp.pp2:1f1b.dp2:ds-zero1, ...).
BUGS = {
    "row-allreduce": lambda name: "tp" in name and "+sp" not in name,  # the non-SP row-parallel path
    "sp-grad-sync": lambda name: "+sp" in name,
    "pp-drop-grad": lambda name: "pp" in name,
    "dp-sum": lambda name: "dp" in name and "ds-zero" not in name,  # DeepSpeed reduces by itself
}


@pytest.mark.slow
def test_verify_four_ranks_every_layout_matches_serial(tmp_path, record_property):
    r, report, wall = verify(tmp_path, 4)
    assert r.returncode == 0, r.stdout[-5000:] + r.stderr[-10000:]
    names = [row["layout"] for row in report["layouts"]]
    # Every variant of every axis, alone and combined: tp4 (+sp), pp4 x 3 schedules, dp4 x 7 ZeRO
    # variants, and tp2.dp2 / tp2.pp2 / pp2.dp2 covering theirs.
    for expected in ("tp4", "tp4+sp", "pp4:gpipe", "pp4:1f1b", "pp4:interleaved", "dp4", "dp4:zero1",
                     "dp4:zero2", "dp4:zero3", "dp4:ds-zero1", "dp4:ds-zero2", "dp4:ds-zero3"):
        assert expected in names, names
    for shape in ("tp2.dp2", "tp2.pp2", "tp2+sp.dp2", "tp2+sp.pp2", "pp2:gpipe.dp2", "pp2:interleaved"):
        assert any(n.startswith(shape) for n in names), (shape, names)
    for shape in ("tp2.dp2:zero3", "pp2:gpipe.dp2:zero3"):  # ZeRO-3 composed with tp and with pp
        assert any(n.startswith(shape) for n in names), (shape, names)
    assert len(names) == 27 and report["passed"] and not failed(report)
    assert all(row[k]["worst_ratio_to_tolerance"] < 0.2 for row in report["layouts"]
               for k in ("loss", "norm", "grad", "param")), report["layouts"]  # margin on the real code
    assert r.stdout.count("max|Δloss|") == 1 and r.stdout.count(" PASS") == 27  # rank 0 prints the table
    # Clipping engaged on every step (so parity covers the clipped updates).
    assert min(report["serial"]["grad_norms"]) > 0.3
    record_property("verify_wall_s_4_ranks", round(wall, 1))
    print(f"\nverify at 4 ranks: {len(names)} layouts, {report['wall_s']:.1f}s inside verify, {wall:.1f}s "
          f"wall with torchrun start-up")


@pytest.mark.slow
@pytest.mark.parametrize("bug", ["row-allreduce", "pp-drop-grad"])
def test_verify_four_ranks_fails_exactly_the_layouts_a_bug_touches(tmp_path, bug):
    # one step: every planted bug shows in step 1's gradients (the clean run above checks three)
    r, report, _ = verify(tmp_path, 4, "--steps", "1", bug=bug)
    print(f"\nverify with {bug} planted:\n" + "\n".join(line for line in r.stdout.splitlines()
                                                       if " PASS" in line or " FAIL" in line))
    names = [row["layout"] for row in report["layouts"]]
    expected = {n for n in names if BUGS[bug](n)}
    assert expected and expected != set(names)
    assert failed(report) == expected, (bug, sorted(failed(report)), sorted(expected))
    assert r.returncode != 0 and "FAIL" in r.stdout
    for row in report["layouts"]:
        if row["layout"] in expected:  # far outside the tolerance, not at its edge
            assert max(row[k]["worst_ratio_to_tolerance"] for k in ("norm", "grad")) > 100, row
    if bug == "pp-drop-grad":  # the dropped micro-batch still counts in step 1's loss: the gradients tell
        for row in report["layouts"]:
            if row["layout"] in expected:
                assert row["grad"]["worst_ratio_to_tolerance"] > 100, row


@pytest.mark.slow
@pytest.mark.parametrize("bug", [None, "sp-grad-sync", "dp-sum"])
def test_verify_two_ranks(tmp_path, bug, record_property):
    r, report, wall = verify(tmp_path, 2, *(("--steps", "1") if bug else ()), bug=bug)
    names = [row["layout"] for row in report["layouts"]]
    assert sorted(names) == sorted(["tp2", "tp2+sp", "pp2:gpipe", "pp2:1f1b", "pp2:interleaved", "dp2",
                                    "dp2:zero1", "dp2:zero2", "dp2:zero3", "dp2:ds-zero1", "dp2:ds-zero2",
                                    "dp2:ds-zero3"])
    if bug is None:
        assert r.returncode == 0 and report["passed"], r.stdout[-5000:] + r.stderr[-10000:]
        record_property("verify_wall_s_2_ranks", round(wall, 1))
        print(f"\nverify at 2 ranks: {report['wall_s']:.1f}s inside verify, {wall:.1f}s wall")
        return
    expected = {n for n in names if BUGS[bug](n)}
    assert failed(report) == expected, (bug, sorted(failed(report)), sorted(expected))
    assert r.returncode != 0


@pytest.mark.slow
def test_verify_layout_filter_and_steps(tmp_path):
    r, report, _ = verify(tmp_path, 2, "--layouts", "pp2:*leaved", "ds-zero3", "--steps", "1")
    assert r.returncode == 0, r.stdout[-5000:] + r.stderr[-10000:]
    assert [row["layout"] for row in report["layouts"]] == ["dp2:ds-zero3", "pp2:interleaved"]
    assert report["steps"] == 1 and len(report["serial"]["losses"]) == 1


def test_verify_needs_several_processes_and_valid_arguments():
    r = cli("verify")
    assert r.returncode == 2 and "needs >= 2 processes" in r.stderr and "Traceback" not in r.stderr
    # Argument errors come before any process group: one sentence per rank (here a lone rank 0 of 2).
    two = {"RANK": "0", "WORLD_SIZE": "2", "LOCAL_RANK": "0", "LOCAL_WORLD_SIZE": "2"}
    r = cli("verify", "--layouts", "tp2.dp2", env=two)
    assert r.returncode == 2 and "no valid layout at world size 2 matches" in r.stderr, r.stderr
    r = cli("verify", "model.dropout=0.1", env=two)
    assert r.returncode == 2 and "model.dropout=0" in r.stderr, r.stderr
    r = cli("verify", "optim.lr=1", env=two)
    assert r.returncode == 2 and "model.* (and parallel.order) overrides only" in r.stderr, r.stderr
    r = cli("verify", "--precision", "fp16", env=two)
    assert r.returncode == 2 and "invalid choice: 'fp16'" in r.stderr, r.stderr


def test_default_selection_covers_every_variant():
    from megatron_lite.verify.select import SCHEDULES, ZERO, candidates, default_selection
    for world in (2, 4, 8):
        cands, unfit = candidates(world, [])
        chosen = default_selection(cands)
        assert not unfit and set(chosen) <= set(cands)
        for shape in {(v.tp, v.pp, v.dp) for v in cands}:
            mine = [v for v in chosen if (v.tp, v.pp, v.dp) == shape]
            assert set().union(*(v.features() for v in mine)) == \
                set().union(*(v.features() for v in cands if (v.tp, v.pp, v.dp) == shape)), shape
    cands, _ = candidates(4, [])
    assert {v.schedule for v in cands if v.pp == 4} == set(SCHEDULES)
    assert {v.zero for v in cands if v.dp == 4} == set(ZERO)
    assert not any(v.sp and v.zero and v.zero.startswith("ds-") for v in cands)  # the Layout's rules
    _, unfit = candidates(8, ["model.num_attention_heads=4", "model.hidden_size=32"])
    assert "tp8" in unfit and "num_attention_heads=4" in unfit["tp8"]


@pytest.mark.slow
@pytest.mark.parametrize("bug", [None, "dp-sum"])
def test_verify_two_ranks_bf16(tmp_path, bug):
    """--precision bf16: every layout's bf16 weights + fp32 main gradients and masters against the
    serial bf16 run, under bf16's wider (explained) tolerances, which a planted bug still breaks."""
    from megatron_lite.verify.compare import BF16_TOLERANCES
    r, report, _ = verify(tmp_path, 2, "--precision", "bf16", bug=bug)
    assert report["precision"] == "bf16" and report["tolerances"] == BF16_TOLERANCES
    names = [row["layout"] for row in report["layouts"]]
    assert len(names) == 12
    assert {"dp2:zero1", "dp2:zero2", "dp2:zero3", "dp2:ds-zero3", "tp2+sp", "pp2:1f1b"} <= set(names)
    if bug is None:
        assert r.returncode == 0 and report["passed"], r.stdout[-5000:] + r.stderr[-10000:]
        assert "tolerances (bf16)" in r.stdout, r.stdout[-3000:]
        # A margin on the real code, and serial bf16 is not serial fp32 (the comparison is bf16's own).
        assert all(row[k]["worst_ratio_to_tolerance"] < 0.6 for row in report["layouts"]
                   for k in ("loss", "norm", "grad", "param")), report["layouts"]
        return
    expected = {n for n in names if BUGS[bug](n)}
    assert failed(report) == expected, (bug, sorted(failed(report)), sorted(expected))
    for row in report["layouts"]:
        if row["layout"] in expected:  # far outside even bf16's tolerance
            assert row["norm"]["worst_ratio_to_tolerance"] > 10, row
    assert r.returncode != 0


@pytest.mark.slow
def test_verify_eight_ranks_zero3_with_tp_and_pp_in_bf16(tmp_path):
    """ZeRO-3 composed with tp (and SP) and pp on 8 ranks (tp2.pp2.dp2), in bf16 against the serial
    bf16 run: the layout a 175B-on-1000-GPUs user runs, at the smallest size that has every axis."""
    names = ["tp2.pp2:1f1b.dp2:zero3", "tp2+sp.pp2:interleaved.dp2:zero3"]
    r, report, _ = verify(tmp_path, 8, "--precision", "bf16", "--layouts", *names)
    assert r.returncode == 0 and report["passed"], r.stdout[-5000:] + r.stderr[-10000:]
    assert sorted(row["layout"] for row in report["layouts"]) == sorted(names)
    assert all(row[k]["worst_ratio_to_tolerance"] < 0.7 for row in report["layouts"]
               for k in ("loss", "norm", "grad", "param")), report["layouts"]
