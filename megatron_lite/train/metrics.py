"""Throughput, MFU and memory numbers, and the TensorBoard writer."""

from __future__ import annotations

import json
import os
import resource
import sys
from pathlib import Path

import torch

# Dense bf16 tensor-core peaks (FLOP/s) of common accelerators, for MFU.
GPU_PEAK_BF16 = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "L40S": 362e12, "A10": 125e12,
                 "V100": 125e12}


def cpu_core_peak() -> float:
    """A CPU core's nominal fp32 peak: 2 FMA units x (16 lanes with AVX-512, else 8) x 2 FLOP at
    ~2.5 GHz. An estimate only; set train.peak_tflops for a measured number."""
    lanes = 8
    try:
        with open("/proc/cpuinfo") as f:
            if "avx512f" in f.read():
                lanes = 16
    except OSError:
        pass
    return 2 * lanes * 2 * 2.5e9


def peak_flops(device: torch.device, override_tflops: float | None) -> float:
    if override_tflops:
        return override_tflops * 1e12
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        for key, value in GPU_PEAK_BF16.items():
            if key in name:
                return value
        return 100e12
    return torch.get_num_threads() * cpu_core_peak()


def memory_gb(device: torch.device) -> float:
    """Peak memory: allocated device memory on GPU, peak resident set size on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    return rss / (2**30 if sys.platform == "darwin" else 2**20)


class ScalarLog:
    """The main rank's scalars: TensorBoard under out_dir/tb (if enabled), and one JSON line per call
    in out_dir/metrics.jsonl, floats exact (repr round-trips). The file is appended across resumes;
    a step logged again after a crash between checkpoints supersedes its earlier line."""

    def __init__(self, out_dir: str | Path, main: bool, tensorboard: bool = True):
        self.writer = None
        self.jsonl = None
        if not main:
            return
        os.makedirs(out_dir, exist_ok=True)
        self.jsonl = open(Path(out_dir) / "metrics.jsonl", "a")
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter
            self.writer = SummaryWriter(log_dir=str(Path(out_dir) / "tb"))

    def scalars(self, step: int, values: dict[str, float]) -> None:
        if self.jsonl is not None:
            self.jsonl.write(json.dumps({"step": step, **values}) + "\n")
            self.jsonl.flush()
        if self.writer is not None:
            for k, v in values.items():
                self.writer.add_scalar(k, v, step)

    def close(self) -> None:
        if self.jsonl is not None:
            self.jsonl.close()
            self.jsonl = None
        if self.writer is not None:
            self.writer.flush()
            self.writer.close()
            self.writer = None


def read_metrics(out_dir: str | Path, key: str) -> dict[int, float]:
    """step -> value of one scalar from out_dir/metrics.jsonl (a later line for a step wins). A run
    may be writing the file: a last line not yet ended by its newline is not read."""
    out: dict[int, float] = {}
    path = Path(out_dir) / "metrics.jsonl"
    if path.is_file():
        text = path.read_text()
        for line in text[:text.rfind("\n") + 1].splitlines():
            row = json.loads(line)
            if key in row:
                out[row["step"]] = row[key]
    return out
