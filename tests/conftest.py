import os
import sys
from pathlib import Path

import pytest

from megatron_lite.testing import tiny_overrides  # shared with the benchmarks; also used below

os.environ.setdefault("OMP_NUM_THREADS", "1")
# DeepSpeed on CPU, reusing the ops `make warm` compiled (the same defaults as the Makefile's).
os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("TORCH_EXTENSIONS_DIR", os.path.expanduser("~/.cache/megatron_lite/torch_extensions"))
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def corpus_dir(tmp_path_factory) -> Path:
    """A small prepared slice of the embedded stdlib corpus (BPE 512), shared by the session."""
    from megatron_lite.data import prepare
    out = tmp_path_factory.mktemp("data") / "stdlib_small"
    prepare(["stdlib"], out, tokenizer="bpe", vocab_size=512, max_bytes=400_000)
    return out


@pytest.fixture
def tiny_config(corpus_dir, tmp_path):
    """A fast training config on the small corpus; returns a builder taking dotted overrides."""
    from megatron_lite.config import Config

    def build(*overrides: str) -> Config:
        base = tiny_overrides(corpus_dir, f"train.out_dir={tmp_path / 'run'}", "checkpoint.interval=10")
        return Config.from_yaml(None, base + list(overrides))
    return build


def cli(*args: str, cwd=None, env=None, timeout=600):
    """Run the megatron-lite CLI in a subprocess (the way a user does)."""
    import subprocess
    e = dict(os.environ, OMP_NUM_THREADS="1", PYTHONFAULTHANDLER="1")
    e.update(env or {})
    return subprocess.run([sys.executable, "-m", "megatron_lite.cli", *args], cwd=cwd or ROOT,
                          env=e, capture_output=True, text=True, timeout=timeout)
