"""The run environment (read from a launcher's variables in one place) and the Layout (every
layout rule, checked before any process group): both built here without starting anything."""

import os

import pytest
import torch.distributed as dist

from megatron_lite.config import Config
from megatron_lite.distributed.env import RunEnv, export, first_host, launched_world_size
from megatron_lite.errors import ConfigError, DataError, LaunchError, LayoutError, UserError
from megatron_lite.layout import Layout


def test_single_process_when_no_launcher_is_present():
    env = RunEnv.from_environ({})
    assert (env.rank, env.world_size, env.local_rank, env.source) == (0, 1, 0, "single")
    assert not env.distributed


def test_torchrun_variables():
    env = RunEnv.from_environ({"RANK": "5", "WORLD_SIZE": "8", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "4",
                               "GROUP_RANK": "1", "MASTER_ADDR": "10.0.0.7", "MASTER_PORT": "29600"})
    assert (env.rank, env.world_size, env.local_rank, env.num_nodes, env.node_rank) == (5, 8, 1, 2, 1)
    assert env.source == "torchrun" and env.url == "env://"  # joins torchrun's own store


def test_slurm_tasks_without_torchrun():
    env = RunEnv.from_environ({"SLURM_PROCID": "3", "SLURM_NTASKS": "4", "SLURM_LOCALID": "1",
                               "SLURM_NNODES": "2", "SLURM_NODEID": "1", "SLURM_NTASKS_PER_NODE": "2(x2)",
                               "SLURM_JOB_NODELIST": "gpu[07-08]", "SLURM_JOB_ID": "4242"})
    assert (env.rank, env.world_size, env.local_rank, env.local_world_size) == (3, 4, 1, 2)
    assert (env.num_nodes, env.node_rank, env.source) == (2, 1, "slurm")
    assert env.url == "tcp://gpu07:24242"  # head node, a port derived from the job id
    assert first_host("node3,node4") == "node3" and first_host("a[1,5-7]") == "a1" and first_host("x") == "x"


@pytest.mark.parametrize("environ, words", [
    ({"RANK": "two", "WORLD_SIZE": "4"}, ["RANK='two'", "not an integer"]),
    ({"RANK": "4", "WORLD_SIZE": "4"}, ["rank 4", "world of 4"]),
    ({"SLURM_PROCID": "0", "SLURM_NTASKS": "2", "SLURM_LOCALID": "3", "SLURM_NTASKS_PER_NODE": "2"},
     ["local rank 3"]),
])
def test_inconsistent_launcher_variables_are_one_sentence(environ, words):
    with pytest.raises(LaunchError) as e:
        RunEnv.from_environ(environ)
    assert all(w in str(e.value) for w in words) and "\n" not in str(e.value)


def _cfg(*overrides):
    return Config.from_yaml(None, ["model.num_layers=4", "model.num_attention_heads=4",
                                   "model.hidden_size=64", "data.micro_batch_size=2", *overrides])


def test_layout_facts_for_a_3d_run():
    layout = Layout.build(_cfg("parallel.tp=2", "parallel.pp=2", "parallel.dp=2", "parallel.microbatches=4",
                               "parallel.sequence_parallel=true", "model.max_sequence_length=64"),
                          world_size=8)
    assert layout.micro_batches == 4 and layout.global_batch_size == 2 * 4 * 2
    assert layout.act_shape == (2, 32, 64)  # the sequence-parallel shard travels between stages
    assert [c.layers for c in layout.chunks(1)] == [(2, 3)] and layout.chunks(0)[0].first
    assert layout.pieces == [2, 2]
    assert len(layout.schedule) == 2 and layout.backend == "pipeline"
    assert layout.as_dict()["tp"] == 2 and "tp 2 +sp pp 2 (1f1b) dp 2" in layout.describe()
    assert Layout.build(_cfg("parallel.dp=2", "optim.zero.stage=1", "optim.zero.backend=deepspeed")).backend \
        == "deepspeed"
    assert Layout.build(_cfg()).backend == "local"
    # Config validates fields only: it no longer rewrites train.grad_accum.
    cfg = _cfg("parallel.microbatches=4")
    assert cfg.train.grad_accum == 1 and Layout.build(cfg).micro_batches == 4


def test_layout_rules_one_sentence_each_and_no_process_group():
    cases = [
        (("parallel.tp=2", "parallel.dp=2"), 3, "= 4 but the job has 3 processes"),
        (("parallel.microbatches=4", "train.grad_accum=2"), None, "set only one of them"),
        (("parallel.tp=3",), None, "num_attention_heads=4 is not divisible by parallel.tp=3"),
    ]
    for overrides, world, words in cases:
        with pytest.raises(LayoutError, match=words):
            Layout.build(_cfg(*overrides), world_size=world)
    # evaluation runs forward-only lists: any train.eval_iters, whatever the schedule
    Layout.build(_cfg("parallel.pp=2", "parallel.schedule=interleaved", "parallel.virtual_stages=2",
                      "parallel.microbatches=4", "train.eval_iters=3"))
    assert not dist.is_initialized()
    assert issubclass(LayoutError, ConfigError) and issubclass(ConfigError, UserError)


def test_dp_auto_follows_the_world_and_the_global_batch_fixes_the_micro_batches():
    """An elastic job's invariant: whatever the world, the optimizer sees global batches of 16."""
    cfg = Config.from_yaml(None, ["parallel.tp=2", "data.micro_batch_size=2", "data.global_batch_size=16"])
    assert cfg.parallel.dp == "auto"  # the default
    for world, dp, micro in ((2, 1, 8), (4, 2, 4), (8, 4, 2), (16, 8, 1)):
        layout = Layout.build(cfg, world)
        assert (layout.dp, layout.micro_batches, layout.global_batch_size) == (dp, micro, 16)
        assert layout.config.parallel.dp == dp and cfg.parallel.dp == "auto"  # resolved in a copy
    assert Layout.build(cfg).dp == 1  # no world given: one replica
    with pytest.raises(LayoutError, match=r"parallel.dp=auto: the job's 3 processes are not a multiple of "
                                          r"parallel.tp=2 x cp=1 x pp=1 = 2 \(one data-parallel replica\)"):
        Layout.build(cfg, 3)
    with pytest.raises(LayoutError, match=r"data.global_batch_size=16 is not a multiple of "
                                          r"data.micro_batch_size=2 x parallel.dp=3 \(auto: 6 processes / "
                                          r"\(tp x cp x pp\)\) = 6"):
        Layout.build(cfg, 6)
    # Micro-batches set explicitly stay a check of the global batch.
    fixed = Config.from_yaml(None, ["parallel.tp=2", "data.micro_batch_size=2", "data.global_batch_size=16",
                                    "train.grad_accum=2"])
    assert Layout.build(fixed, 8).micro_batches == 2
    with pytest.raises(LayoutError, match=r"not data.micro_batch_size=2 x 2 micro-batches x parallel.dp=2"):
        Layout.build(fixed, 4)
    # A fixed dp is still checked against the world.
    with pytest.raises(LayoutError, match="the job has 4 processes"):
        Layout.build(Config.from_yaml(None, ["parallel.tp=2", "parallel.dp=1"]), 4)
    with pytest.raises(ConfigError, match=r"parallel.dp='many' has the wrong type; it must be an integer or "
                                          r"auto"):
        Config.from_yaml(None, ["parallel.dp=many"])
    with pytest.raises(ConfigError, match="parallel.dp=0 must be a positive integer"):
        Config.from_yaml(None, ["parallel.dp=0"])


def test_a_missing_data_dir_fails_before_the_process_group_exists(tmp_path):
    """Under a launcher (world of 2) the data check runs before init_process_group would block
    waiting for the peer that never comes."""
    from megatron_lite.train import Trainer
    env = RunEnv(rank=0, world_size=2, init_method=f"file://{tmp_path / 'store'}")
    with pytest.raises(DataError, match="no prepared data"):
        Trainer(_cfg("parallel.dp=2", f"data.dir={tmp_path / 'nodata'}", "train.device=cpu"), env)
    assert not dist.is_initialized()


@pytest.fixture
def restore_package_logger():
    import logging
    logger = logging.getLogger("megatron_lite")
    saved = (list(logger.handlers), logger.propagate, logger.level)
    yield
    logger.handlers[:], logger.propagate, logger.level = saved[0], saved[1], saved[2]


def test_only_rank_zero_logs_unless_a_record_is_for_all_ranks(capsys, restore_package_logger):
    import logging

    from megatron_lite.logs import setup_logging
    log = logging.getLogger("megatron_lite.test")
    for rank in (0, 1):
        setup_logging(rank)  # replaces the previous handler: one per process
        log.info("hello from %d", rank)
        log.warning("fallback on %d", rank)
        log.warning("stalled peer", extra={"all_ranks": True})
    got = capsys.readouterr()
    # information on stdout, warnings on stderr (with the CLI's errors); other ranks only all_ranks ones
    assert got.out.splitlines() == ["hello from 0"]
    assert got.err.splitlines() == ["fallback on 0", "stalled peer", "[rank 1] stalled peer"]


def test_launched_world_size_never_raises():
    assert launched_world_size({}) == 1
    assert launched_world_size({"WORLD_SIZE": "4"}) == 4
    assert launched_world_size({"SLURM_NTASKS": "8"}) == 8
    assert launched_world_size({"WORLD_SIZE": "four"}) == 1  # the exit path reads it after any error


def test_export_keeps_what_the_user_set_unless_told(monkeypatch):
    monkeypatch.setenv("DS_ACCELERATOR", "cuda")
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    export({"DS_ACCELERATOR": "cpu", "LOCAL_RANK": "3"}, overwrite=False)
    assert os.environ["DS_ACCELERATOR"] == "cuda" and os.environ["LOCAL_RANK"] == "3"
    export({"DS_ACCELERATOR": "cpu"})
    assert os.environ["DS_ACCELERATOR"] == "cpu"
