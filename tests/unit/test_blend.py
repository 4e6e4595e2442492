"""Blended datasets: the schedule's shares and exactness, the blended sampler as a function of
(seed, cursor), each source's cursor, and every refusal in one sentence before any process group."""

import json
import random
import re

import numpy as np
import pytest
import yaml

from megatron_lite.config import Config, ConfigError
from megatron_lite.data import BlendedSampler, DataError, Sampler, prepare
from megatron_lite.data.blend import BlendSchedule
from megatron_lite.data.dataset import rank_micro_batch_starts
from megatron_lite.testing import tiny_overrides
from megatron_lite.train.trainer import Trainer, open_data, preflight

OFFSET = 10_000  # source k's tokens are OFFSET * k + position: a row names its source and window


def test_shares_of_10k_samples_follow_the_weights():
    schedule = BlendSchedule([0.6, 0.3, 0.1])
    picks = schedule.assign(0, 10_000)
    shares = np.bincount([k for k, _ in picks], minlength=3) / 10_000
    assert np.abs(shares - [0.6, 0.3, 0.1]).max() < 0.01, shares
    # The weights are read as the decimals written: 0.6/0.3/0.1 repeat every 10 samples exactly.
    assert shares.tolist() == [0.6, 0.3, 0.1]
    # Not only overall: every 100 consecutive samples, wherever they start, hold those shares within 1%.
    for start in random.Random(0).sample(range(10_000 - 100), 50):
        window = np.bincount([k for k, _ in picks[start:start + 100]], minlength=3) / 100
        assert np.abs(window - [0.6, 0.3, 0.1]).max() <= 0.01, (start, window)


@pytest.mark.parametrize("weights", [[0.6, 0.3, 0.1], [0.37, 0.5, 0.13], [3, 0, 2, 5, 1e-3], [1, 1],
                                     [0.123456789, 2.5, 7]])
def test_every_prefix_holds_its_shares_and_cursors_are_exact(weights):
    """Walking the schedule from 0 and the closed form for any cursor agree sample for sample, a
    source's samples are its own 0, 1, 2, ... in order, and every prefix holds each share p to within
    (1 + K p) / 2 samples (K sources: each source's count is within 1/2 of its emissions up to the
    prefix's last time, and so the prefix's length within K/2 of all of them); below 1 for three."""
    schedule, total, K = BlendSchedule(weights), sum(weights), len(weights)
    counts = [0] * K
    for n, (k, j) in enumerate(schedule.assign(0, 3000)):
        assert j == counts[k]  # the source's next own sample
        if n % 37 == 0:
            assert schedule.cursors(n) == counts, n
        counts[k] += 1
        for c, w in zip(counts, weights, strict=True):
            deviation = abs(c - (n + 1) * w / total)
            assert deviation <= (1 + K * w / total) / 2, (n, counts)
            assert K > 3 or deviation < 1, (n, counts)  # up to three sources: within one sample
    assert all(c == 0 for c, w in zip(counts, weights, strict=True) if w == 0)  # never drawn
    # Far into a run (a trillion samples), without walking there: the same arithmetic, exactly.
    for cursor in (10**12, 10**15 + 7):
        start = schedule.cursors(cursor)
        assert sum(start) == cursor
        walked = list(start)
        for k, j in schedule.assign(cursor, 40):
            assert j == walked[k]
            walked[k] += 1
        assert walked == schedule.cursors(cursor + 40)


def sources(sizes=(997, 1500, 2203), seq_len=10, seed=7):
    tokens = [np.arange(n, dtype=np.uint32) + OFFSET * k for k, n in enumerate(sizes)]
    return [Sampler(t, seq_len, seed + k) for k, t in enumerate(tokens)]


def test_blended_batches_are_a_function_of_seed_and_cursor():
    blend = BlendedSampler(sources(), [0.6, 0.3, 0.1], ["a", "b", "c"])
    x, y = blend.batch(1234, 20)
    assert x.shape == y.shape == (20, 10) and (y[:, :-1] == x[:, 1:]).all()
    # Each row is the sample the schedule names, taken from its source's own Sampler.
    for row, (k, j) in zip(x, blend.schedule.assign(1234, 20), strict=True):
        assert int(row[0]) // OFFSET == k
        assert (row == blend.samplers[k].batch(j, 1)[0][0]).all()
    # A fresh sampler with the same seed gives the same batch; cursor arithmetic (resume, dp slices).
    again = BlendedSampler(sources(), [0.6, 0.3, 0.1], ["a", "b", "c"])
    assert (again.batch(1234, 20)[0] == x).all()
    assert (np.concatenate([again.batch(1234, 7)[0], again.batch(1241, 13)[0]]) == x.numpy()).all()
    # Another seed reshuffles every source.
    other = BlendedSampler(sources(seed=8), [0.6, 0.3, 0.1], ["a", "b", "c"])
    assert not (other.batch(1234, 20)[0] == x).all()


def test_data_parallel_ranks_take_the_global_blended_batch_once():
    blend = BlendedSampler(sources(), [0.6, 0.3, 0.1], ["a", "b", "c"])
    cursor, mb, m, dp = 500, 3, 2, 2
    whole = blend.batch(cursor, mb * m * dp)[0]
    starts = [s for r in range(dp) for s in rank_micro_batch_starts(cursor, mb, m, dp, r)]
    parts = {s: blend.batch(s, mb)[0] for s in starts}
    assert (np.concatenate([parts[s] for s in sorted(parts)]) == whole.numpy()).all()


def test_each_source_cursor_and_epochs():
    """A source's cursor counts its samples; a small source with a large weight starts new epochs
    (reshuffled) while the others are still in their first."""
    blend = BlendedSampler(sources(sizes=(50, 5000, 5000)), [0.8, 0.1, 0.1], ["small", "b", "c"])
    assert blend.cursors(0) == {"small": 0, "b": 0, "c": 0}
    assert blend.cursors(1000) == {"small": 800, "b": 100, "c": 100}
    windows = blend.samplers[0].num_windows  # 4 windows of 10 tokens + 1 in 50 tokens
    rows = blend.batch(0, 1000)[0]
    small = [int(r[0]) // 10 for r in rows if int(r[0]) < OFFSET]
    assert len(small) == 800 and all(sorted(small[e * windows:(e + 1) * windows]) == list(range(windows))
                                     for e in range(800 // windows))


def test_a_blend_of_one_source_is_data_dir():
    tokens = np.arange(3000, dtype=np.uint16)
    one = BlendedSampler([Sampler(tokens, 16, 1234)], [2.5], ["only"])
    assert (one.batch(77, 9)[0] == Sampler(tokens, 16, 1234).batch(77, 9)[0]).all()


# ---- configuration and opening the data: one sentence each, before any process group -------------

def blend_config(*extra: str) -> Config:
    return Config.from_yaml(None, tiny_overrides("unused", *extra))


def test_both_forms_of_data_blend_load_and_round_trip():
    short = blend_config("data.blend=[[0.6, data/web], [0.4, data/code]]")
    long = blend_config("data.blend=[{dir: data/web, weight: 0.6}, {dir: data/code, weight: 0.4}]")
    assert short == long and [s.label for s in short.data.sources] == ["web", "code"]
    assert short.data.tokenizer_dir == "data/web"
    named = blend_config("data.blend=[{dir: x/data, weight: 1, name: web}, {dir: y/data, weight: 2}]")
    assert [s.label for s in named.data.sources] == ["web", "data"]
    assert Config.from_dict(yaml.safe_load(named.to_yaml())) == named  # as checkpoints store it
    assert blend_config().data.sources[0].dir == "unused"  # no blend: data.dir with all the weight


@pytest.mark.parametrize("blend, words", [
    ("[[0, a], [0, b]]", ["data.blend weights (0, 0) sum to 0", "not to a positive number",
                          "at least one source a weight above 0"]),
    ("[[0.5, a], [-0.5, b]]", ["data.blend[1].weight=-0.5 (b) is negative", "use 0 or more"]),
    ("[]", ["data.blend=[] lists no source", "remove data.blend"]),
    ("[{dir: a}]", ["data.blend[0] (a) has no weight"]),
    ("[{weight: 1}]", ["data.blend[0] names no dir"]),
    ("[[1, x/a], [1, y/a]]", ["data.blend[0] and data.blend[1] are both named 'a'", "distinct name",
                              "name: a_1"]),
    ("[{dir: a, weight: 1, name: 'w/x'}]", ["data.blend[0].name='w/x' (a)", "without '/'"]),
    ("[0.5, a, 0.5, b]", ["data.blend[0]=0.5 must be {dir: DIR, weight: W}", "or [W, DIR]"]),
    ("[[a, 0.5]]", ["data.blend[0].weight='a'", "must be a number"]),
    ("[{dir: a, weight: 1, wieght: 2}]", ["unknown config key data.blend[0].wieght",
                                          "did you mean data.blend[0].weight"]),
])
def test_bad_blends_are_one_sentence(blend, words):
    with pytest.raises(ConfigError) as e:
        blend_config(f"data.blend={blend}")
    msg = str(e.value)
    for w in words:
        assert w in msg, msg
    assert "\n" not in msg and msg.endswith((".", "?")) and msg.count(". ") == 0, msg


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    """Three byte-tokenized sources, one BPE-tokenized one, one too short for a sequence."""
    root = tmp_path_factory.mktemp("blend")
    out = {}
    for name, tokenizer, docs in [("a", "bytes", 8), ("b", "bytes", 6), ("c", "bytes", 4),
                                  ("bpe", "bpe", 8), ("tiny", "bytes", 2)]:
        src = root / f"src_{name}"
        src.mkdir()
        length = 1 if name == "tiny" else 400
        for i in range(docs):
            (src / f"{i}.txt").write_text(f"{name} document {i} " * length)
        out[name] = prepare([str(src)], root / name, tokenizer=tokenizer, vocab_size=300, val_fraction=0.25)
    return out


def test_missing_unprepared_and_mismatched_sources_are_refused_before_any_group(prepared, tmp_path):
    def refused(blend: str, *extra: str) -> str:
        cfg = blend_config(f"data.blend={blend}", f"train.out_dir={tmp_path / 'run'}", *extra)
        with pytest.raises(DataError) as e:
            open_data(cfg)
        msg = str(e.value)
        assert "\n" not in msg, msg
        # What a launcher runs once before it starts any worker, at a 2-rank layout: the same sentence.
        with pytest.raises(DataError, match="^" + re.escape(msg) + "$"):
            preflight(blend_config(f"data.blend={blend}", f"train.out_dir={tmp_path / 'run'}",
                                   "parallel.dp=2", *extra), world_size=2)
        return msg

    a, b, bpe, tiny = prepared["a"], prepared["b"], prepared["bpe"], prepared["tiny"]
    nowhere, empty = tmp_path / "nowhere", tmp_path / "empty"
    msg = refused(f"[[0.5, {a}], [0.5, {nowhere}]]")
    assert msg.startswith(f"data.blend[1] ('nowhere') dir '{nowhere}' does not exist; prepare it "
                          f"with `megatron-lite prepare-data --out {nowhere}`"), msg
    empty.mkdir()
    msg = refused(f"[[0.5, {a}], [0.5, {empty}]]")
    assert msg.startswith(f"data.blend[1] ('empty') dir '{empty}' holds no prepared data"), msg
    msg = refused(f"[[0.5, {a}], [0.3, {b}], [0.2, {bpe}]]")
    assert msg.startswith(f"data.blend[2] ('bpe') dir '{bpe}' was tokenized by a tokenizer of "), msg
    assert f"but data.blend[0] ('a') dir '{a}' by the bytes tokenizer; prepare every source with one" in msg
    assert "--tokenizer bytes" in msg
    # A source too short for one sequence is named (Trainer: the samplers, still before any group).
    cfg = blend_config(f"data.blend=[[0.5, {a}], [0.5, {tiny}]]", f"train.out_dir={tmp_path / 'r'}")
    with pytest.raises(DataError, match=r"^data.blend source 'tiny' \(.*tiny'\), train split: a split of \d+ "
                                        r"tokens is too short for one sequence of 33 tokens"):
        Trainer(cfg)


def test_three_sources_evaluate_and_checkpoint_their_cursors(prepared, tmp_path):
    """A few steps on a real blend: per-source validation losses (the overall one is their weighted
    mean), each source's samples in metrics.jsonl and in the checkpoint."""
    a, b, c = prepared["a"], prepared["b"], prepared["c"]
    cfg = blend_config(f"data.blend=[[0.6, {a}], [0.3, {b}], [0.1, {c}]]",
                       f"train.out_dir={tmp_path / 'run'}", "train.steps=5", "optim.warmup_steps=1",
                       "train.eval_interval=5", "log.interval=5", "log.tensorboard=false",
                       "checkpoint.interval=5")
    trainer = Trainer(cfg)
    history = trainer.fit()
    step, losses = history["val_loss_sources"][-1]
    assert step == 5 and set(losses) == {"a", "b", "c"}
    mean = 0.6 * losses["a"] + 0.3 * losses["b"] + 0.1 * losses["c"]
    assert history["val_loss"][-1][1] == pytest.approx(mean, rel=1e-12)
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    val = [r for r in rows if "val/loss" in r][-1]
    assert {k: val[f"val/{k}/loss"] for k in "abc"} == losses
    # 5 steps of 4 samples: 20 samples, 12/6/2 by the weights.
    train = [r for r in rows if "train/loss" in r][-1]
    assert [train[f"data/{k}/samples"] for k in "abc"] == [12, 6, 2]
    manifest = json.loads((trainer.checkpoints.latest() / "manifest.json").read_text())
    assert manifest["train"]["extra"]["data_sources"] == {
        "a": {"weight": 0.6, "samples": 12}, "b": {"weight": 0.3, "samples": 6},
        "c": {"weight": 0.1, "samples": 2}}
