"""Seeded, layout-independent initialisation.

Every parameter is drawn from its own generator, seeded by (seed, global parameter name), on its
full (unsharded) shape. Any rank can therefore rebuild exactly the master weight of any parameter
it holds — a pipeline stage builds only its own blocks, a tensor-parallel layer slices the master
tensor — and all layouts start from bit-identical weights.

Rules (GPT-2 / Megatron): weights ~ N(0, std); the two residual output projections of each block
(attn.proj, mlp.fc2; an MoE's experts' and shared experts' fc2) ~ N(0, std / sqrt(2 * num_layers))
so the residual stream's variance does not grow with depth; biases 0; norm scales 1.
"""

from __future__ import annotations

import math
import zlib

import torch

from ..config import ModelConfig

# (MoE: each expert's and the shared experts' down projections, model/moe.py)
RESIDUAL_OUTPUTS = ("attn.proj.weight", "mlp.fc2.weight", "mlp.experts.fc2", "mlp.shared.fc2.weight")
NORM_MODULES = ("ln1", "ln2", "ln_f")


def param_seed(seed: int, name: str) -> int:
    """A stable 63-bit seed for one parameter (crc32 is stable across runs and platforms)."""
    return (seed * 1_000_003 + zlib.crc32(name.encode())) % (2**63 - 1)


def master_init(name: str, shape: torch.Size | tuple[int, ...], cfg: ModelConfig, seed: int) -> torch.Tensor:
    """The full-shape float32 initial value of global parameter `name` (on CPU)."""
    owner = name.split(".")[-2] if "." in name else ""
    if owner in NORM_MODULES:
        return torch.ones(shape) if name.endswith("weight") else torch.zeros(shape)
    if name.endswith("bias"):
        return torch.zeros(shape)
    std = cfg.init_std
    if name.endswith(RESIDUAL_OUTPUTS):
        std = cfg.init_std / math.sqrt(2 * cfg.num_layers)
    g = torch.Generator().manual_seed(param_seed(seed, name))
    return torch.empty(shape).normal_(0.0, std, generator=g)


def init_source(name: str, cfg: ModelConfig, has_embed: bool) -> str:
    """The global name whose master value parameter `name` starts from: a stage that holds the head
    but not the embedding keeps its own copy of a tied embedding, drawn as tok_emb.weight so both
    copies start identical; every other parameter is drawn as itself."""
    if name == "lm_head.weight" and cfg.tie_embeddings and not has_embed:
        return "tok_emb.weight"
    return name


@torch.no_grad()
def init_weights(model: torch.nn.Module, cfg: ModelConfig, seed: int) -> None:
    """Initialise every (non-meta) parameter of `model` in place from its global name."""
    for name, p in model.named_parameters():
        if p.is_meta:
            continue
        p.copy_(master_init(name, p.shape, cfg, seed))
