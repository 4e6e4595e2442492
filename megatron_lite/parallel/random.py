"""RNG for dropout under tensor parallelism (Megatron's CUDA RNG tracker, for CPU and CUDA).

Dropout in *replicated* regions (full activations every tp rank holds identically) must draw the
same mask on every tp rank, so it uses the default generator, seeded identically. Dropout inside
*TP regions* (attention probabilities of the local heads, sequence-parallel shards) must draw
different masks per tp rank, or the ranks would drop correlated elements: it runs inside
tracker.fork(), which swaps in a per-rank generator state (seed + 2718 + tp_rank) and back.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch

TP_SEED_OFFSET = 2718  # Megatron's offset, so the TP stream never equals the default stream


class RNGTracker:
    def __init__(self, seed: int, tp_rank: int, device: torch.device):
        self.device = torch.device(device)
        self.seed = seed + TP_SEED_OFFSET + tp_rank
        saved = self._get()
        self._manual_seed(self.seed)
        self.state = self._get()
        self._set(saved)

    def _get(self) -> torch.Tensor:
        return torch.cuda.get_rng_state(self.device) if self.device.type == "cuda" else torch.get_rng_state()

    def _set(self, state: torch.Tensor) -> None:
        if self.device.type == "cuda":
            torch.cuda.set_rng_state(state, self.device)
        else:
            torch.set_rng_state(state)

    def _manual_seed(self, seed: int) -> None:
        if self.device.type == "cuda":
            with torch.cuda.device(self.device):
                torch.cuda.manual_seed(seed)
        else:
            torch.manual_seed(seed)

    @contextmanager
    def fork(self):
        """Run the body on the tensor-parallel RNG stream; the default stream is untouched."""
        outer = self._get()
        self._set(self.state)
        try:
            yield
        finally:
            self.state = self._get()
            self._set(outer)

    def state_dict(self) -> dict:
        return {"tp_rng": self.state.clone()}

    def load_state_dict(self, sd: dict) -> None:
        self.state = sd["tp_rng"].clone()


def recompute_context_fn(tracker: RNGTracker):
    """A torch.utils.checkpoint context_fn that replays the tensor-parallel dropout stream when an
    activation-checkpointed region is recomputed (torch itself only replays the default stream),
    so recomputed dropout masks equal the original ones."""
    def context_fn():
        saved = {}

        @contextmanager
        def on_forward():
            saved["state"] = tracker.state.clone()
            yield

        @contextmanager
        def on_recompute():
            current = tracker.state
            tracker.state = saved["state"].clone()
            try:
                yield
            finally:
                tracker.state = current
        return on_forward(), on_recompute()
    return context_fn
