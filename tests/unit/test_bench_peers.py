"""benchmarks/bench_peers.py's helpers: the alternating run order and the tokens/s ratio from seconds
per step; and the vendored nanoGPT stays out of the package."""

from pathlib import Path

from benchmarks import bench_peers


def test_rounds_alternate_so_drift_hits_every_variant_alike():
    order = list(bench_peers.alternate(("ours", "ours_no_overlap", "ddp"), 3))
    assert order == ["ours", "ours_no_overlap", "ddp", "ddp", "ours_no_overlap", "ours",
                     "ours", "ours_no_overlap", "ddp"]


def test_ratio_is_median_tokens_per_s_ours_over_peer():
    # seconds per step: ours 1.0 (median of 0.9, 1.0, 5.0: an outlier does not count), peer 1.5
    assert bench_peers.ratio([0.9, 1.0, 5.0], [1.5, 1.4, 1.6]) == 1.5


def test_nanogpt_copy_is_never_imported_by_the_package():
    root = Path(bench_peers.__file__).resolve().parents[1] / "megatron_lite"
    assert not [p for p in root.rglob("*.py") if "nanogpt" in p.read_text()]
