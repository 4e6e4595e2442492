"""`megatron-lite verify` under torchrun: every layout that fits the job matches the serial model on
the real code, and a planted bug (tests/e2e/verify_bug.py) fails exactly the layouts that run it."""

import json
import os
import re
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


def verify_bugs(tmp_path, nproc: int, bugs: list[str], *args: str):
    """verify_bug.py with several bugs: one torchrun launch, one verify per bug (each planted alone).
    Returns (process, {bug: (its JSON, its exit status, its part of rank 0's output)})."""
    out = tmp_path / f"verify_{nproc}_bugs.json"
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONFAULTHANDLER="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
           "tests/e2e/verify_bug.py", ",".join(bugs), "--json", str(out), *args]
    r = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    runs, rest = {}, r.stdout
    for bug in bugs:
        path = out.with_name(f"{out.name}.{bug}")
        m = re.search(rf"^==== bug {re.escape(bug)} \(exit (\d+)\)$", rest, re.M)
        assert path.is_file() and m, r.stdout[-5000:] + r.stderr[-10000:]
        runs[bug] = json.loads(path.read_text()), int(m.group(1)), rest[:m.start()]
        rest = rest[m.end():]
    return r, runs


def failed(report: dict) -> set[str]:
    return {row["layout"] for row in report["layouts"] if not row["passed"]}


# Which layouts run the code each bug breaks (names: tp2+sp.pp2:1f1b.dp2:ds-zero1, ...).
BUGS = {
    "row-allreduce": lambda name: "tp" in name and "+sp" not in name,  # the non-SP row-parallel path
    "sp-grad-sync": lambda name: "+sp" in name,
    "pp-drop-grad": lambda name: "pp" in name,
    # the data-parallel reduction, which context parallelism also runs (over dp x cp); DeepSpeed
    # reduces by itself
    "dp-sum": lambda name: ("dp" in name or "cp" in name) and "ds-zero" not in name,
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
    # Context parallelism: cp4 with both algorithms, composed with tp (+sp), pp and dp (ZeRO).
    for shape in ("cp4:allgather", "cp4:ring", "tp2.cp2:", "tp2+sp.cp2:", "cp2:ring.pp2:",
                  "cp2:ring.dp2:zero1"):
        assert any(n.startswith(shape) for n in names), (shape, names)
    assert len(names) == 38 and report["passed"] and not failed(report)
    assert all(row[k]["worst_ratio_to_tolerance"] < 0.2 for row in report["layouts"]
               for k in ("loss", "norm", "grad", "param")), report["layouts"]  # margin on the real code
    assert r.stdout.count("max|Δloss|") == 1 and r.stdout.count(" PASS") == 38  # rank 0 prints the table
    # Clipping engaged on every step (so parity covers the clipped updates).
    assert min(report["serial"]["grad_norms"]) > 0.3
    record_property("verify_wall_s_4_ranks", round(wall, 1))
    print(f"\nverify at 4 ranks: {len(names)} layouts, {report['wall_s']:.1f}s inside verify, {wall:.1f}s "
          f"wall with torchrun start-up")


FOUR_RANK_BUGS = ["row-allreduce", "pp-drop-grad"]
# 16 of the 38 default layouts (CI time): every tp and pp path these two bugs break, composed with
# each other axis, and layouts they must leave alone (SP, dp, cp, ZeRO, DeepSpeed)
FOUR_RANK_BUG_LAYOUTS = ["tp4", "tp2.dp2:ds-zero1", "tp2.pp2:gpipe", "tp2.pp2:interleaved", "tp2+sp.pp2:1f1b",
                         "tp2.cp2:allgather", "tp2+sp.cp2:ring", "pp4:", "pp2:gpipe.dp2:zero3",
                         "pp2:gpipe.dp2:ds-zero1", "cp2:ring.pp2:1f1b", "cp4:ring", "dp4:zero1"]


@pytest.fixture(scope="module")
def four_rank_bug_runs(tmp_path_factory):
    # one step: every planted bug shows in step 1's gradients (the clean run above checks three)
    r, runs = verify_bugs(tmp_path_factory.mktemp("verify_bugs_4"), 4, FOUR_RANK_BUGS, "--steps", "1",
                          "--layouts", *FOUR_RANK_BUG_LAYOUTS)
    assert r.returncode != 0, r.stdout[-5000:] + r.stderr[-10000:]
    return runs


@pytest.mark.slow
@pytest.mark.parametrize("bug", FOUR_RANK_BUGS)
def test_verify_four_ranks_fails_exactly_the_layouts_a_bug_touches(four_rank_bug_runs, bug):
    report, code, stdout = four_rank_bug_runs[bug]
    print(f"\nverify with {bug} planted:\n" + "\n".join(line for line in stdout.splitlines()
                                                       if " PASS" in line or " FAIL" in line))
    names = [row["layout"] for row in report["layouts"]]
    assert len(names) == 16 and stdout.count("max|Δloss|") == 1  # this bug's table alone
    expected = {n for n in names if BUGS[bug](n)}
    assert expected and expected != set(names)
    assert failed(report) == expected, (bug, sorted(failed(report)), sorted(expected))
    assert code != 0 and "FAIL" in stdout
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
                                    "dp2:ds-zero3", "cp2:allgather", "cp2:ring"])
    if bug is None:
        assert r.returncode == 0 and report["passed"], r.stdout[-5000:] + r.stderr[-10000:]
        record_property("verify_wall_s_2_ranks", round(wall, 1))
        print(f"\nverify at 2 ranks: {report['wall_s']:.1f}s inside verify, {wall:.1f}s wall")
        return
    expected = {n for n in names if BUGS[bug](n)}
    assert failed(report) == expected, (bug, sorted(failed(report)), sorted(expected))
    assert r.returncode != 0


@pytest.mark.slow
def test_verify_two_ranks_packed_documents(tmp_path):
    """--document-mask: every run, the serial one too, trains on packed documents with attention kept
    inside each, restarted positions and ignored separator targets; every layout still matches."""
    r, report, _ = verify(tmp_path, 2, "--document-mask")
    assert r.returncode == 0 and report["passed"], r.stdout[-5000:] + r.stderr[-10000:]
    assert len(report["layouts"]) == 14 and not failed(report)
    assert all(row[k]["worst_ratio_to_tolerance"] < 0.2 for row in report["layouts"]
               for k in ("loss", "norm", "grad", "param")), report["layouts"]


@pytest.mark.slow
def test_verify_two_ranks_moe_expert_parallel(tmp_path):
    """--moe: every dp, tp and pp layout of the MoE model at 2 ranks (ep2 under each native ZeRO
    stage, tp2 with and without sp, each schedule) matches the serial MoE run."""
    r, report, wall = verify(tmp_path, 2, "--moe", "--layouts", "dp2", "tp2", "pp2")
    assert r.returncode == 0 and report["passed"], r.stdout[-5000:] + r.stderr[-10000:]
    assert sorted(row["layout"] for row in report["layouts"]) == sorted(
        ["dp2", "dp2:zero1", "dp2:zero2", "dp2:zero3", "dp2.ep2", "dp2:zero1.ep2", "dp2:zero2.ep2",
         "dp2:zero3.ep2", "tp2", "tp2+sp", "pp2:gpipe", "pp2:1f1b", "pp2:interleaved"])
    assert report["model"]["moe"]["num_experts"] == 4
    assert all(row[k]["worst_ratio_to_tolerance"] < 0.2 for row in report["layouts"]
               for k in ("loss", "norm", "grad", "param")), report["layouts"]
    print(f"\nverify --moe at 2 ranks: {report['wall_s']:.1f}s inside verify, {wall:.1f}s wall")


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


def test_moe_selection_adds_expert_parallel_layouts():
    """--moe: every ep dividing dp and the experts, composed with tp (with and without sp), pp and
    native ZeRO; nothing the layout rules refuse MoE (DeepSpeed; cp as they have it); a dense model has no ep
    layout; and every run, the serial one too, takes micro-batches of the same size (the balancing
    loss is per micro-batch)."""
    from megatron_lite.verify import select
    from megatron_lite.verify.select import MOE, candidates, default_selection, make_config
    cands, unfit = candidates(4, MOE)
    names = {v.name for v in cands}
    assert {"dp4.ep2", "dp4.ep4", "dp4:zero1.ep2", "dp4:zero3.ep4", "tp2.dp2.ep2", "tp2.dp2:zero3.ep2",
            "pp2:1f1b.dp2.ep2", "pp2:interleaved.dp2:zero2.ep2", "tp4", "pp4:interleaved"} <= names, names
    assert {v.ep for v in cands} == {1, 2, 4} and all(v.dp * v.cp % v.ep == 0 for v in cands)
    assert not any((v.zero or "").startswith("ds-") for v in cands), names
    assert {"tp4+sp", "tp2+sp.dp2:zero3.ep2", "tp2+sp.pp2:1f1b", "tp2+sp.cp2:ring.ep2"} <= names, names
    # cp as the MoE rules have it: refused, every cp shape reported with the rule's sentence; or
    # accepted (dropless), the experts then split over the dp x cp ranks
    cp = {"cp4", "tp2.cp2", "cp2.pp2", "cp2.dp2"}
    assert (set(unfit) == cp and "parallel.cp=" in unfit["cp4"] and not any(v.cp > 1 for v in cands)) or \
        (not unfit and "cp4:ring.ep4" in names), (unfit, names)
    chosen = {v.name for v in default_selection(cands)}
    assert {"dp4", "dp4:zero1.ep2", "dp4:zero2.ep4"} <= chosen, chosen
    assert any(n.startswith(("tp2.dp2", "tp2+sp.dp2")) and n.endswith(".ep2") for n in chosen), chosen
    assert any("+sp" in n for n in chosen), chosen
    assert any(n.startswith("pp2:") and n.endswith(".ep2") for n in chosen), chosen
    two, _ = candidates(2, MOE)
    assert {"dp2", "dp2.ep2", "dp2:zero1.ep2", "dp2:zero3.ep2", "tp2", "tp2+sp", "pp2:gpipe"} <= \
        {v.name for v in two}
    # the overrides after --moe apply on top: 2 experts cannot be split 4 ways
    assert {v.ep for v in candidates(4, MOE + ["model.moe.num_experts=2"])[0]} == {1, 2}
    dense, _ = candidates(4, [])
    assert all(v.ep == 1 and ".ep" not in v.name for v in dense)
    sel = select.select_layouts(4, moe=True, patterns=["dp4.ep4", "dp4:*.ep4"])
    assert sel.probe.model.moe.num_experts == 4 and sel.model_overrides[:len(MOE)] == MOE
    assert {v.name for v in sel.layouts} == {"dp4.ep4", "dp4:zero1.ep4", "dp4:zero2.ep4", "dp4:zero3.ep4"}
    for v in (None, *sel.layouts, next(v for v in cands if v.name == "tp2.pp2:interleaved")):
        cfg = make_config(v, 4, 1, "d", "o", sel.model_overrides, micro_batch=sel.micro_batch)
        assert cfg.data.micro_batch_size == select.MOE_MICRO_BATCH, v
    assert select.select_layouts(4, patterns=["dp4"]).micro_batch is None  # dense: 2 micro-batches per stage


@pytest.mark.slow
@pytest.mark.parametrize("bug", [None, "dp-sum"])
def test_verify_two_ranks_bf16(tmp_path, bug):
    """--precision bf16: every layout's bf16 weights + fp32 main gradients and masters against the
    serial bf16 run, under bf16's wider (explained) tolerances, which a planted bug still breaks."""
    from megatron_lite.verify.compare import BF16_TOLERANCES
    r, report, _ = verify(tmp_path, 2, "--precision", "bf16", bug=bug)
    assert report["precision"] == "bf16" and report["tolerances"] == BF16_TOLERANCES
    names = [row["layout"] for row in report["layouts"]]
    assert len(names) == 14
    assert {"cp2:allgather", "cp2:ring", "dp2:zero1", "dp2:zero2", "dp2:zero3", "dp2:ds-zero3", "tp2+sp",
            "pp2:1f1b"} <= set(names)
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
