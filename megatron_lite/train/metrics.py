"""Throughput, MFU and memory numbers, and the TensorBoard writer."""

from __future__ import annotations

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
    """TensorBoard scalars (if enabled) under out_dir/tb."""

    def __init__(self, out_dir: str | Path, enabled: bool):
        self.writer = None
        if enabled:
            from torch.utils.tensorboard import SummaryWriter
            os.makedirs(out_dir, exist_ok=True)
            self.writer = SummaryWriter(log_dir=str(Path(out_dir) / "tb"))

    def scalars(self, step: int, values: dict[str, float]) -> None:
        if self.writer is not None:
            for k, v in values.items():
                self.writer.add_scalar(k, v, step)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.flush()
            self.writer.close()
