"""train.compile: torch.compile applied to each transformer block of a built stage, from outside
the model (the model holds no compile code, as it holds no distributed code).

Regional compilation, as torchtitan does it: each block's forward is compiled, not the whole
model. All blocks run the same code (Block.forward) with different parameters, and dynamo inlines
nn modules (torch >= 2.5: parameters become graph inputs instead of constants guarded by
identity), so the first block's compiled graph serves every block of the stage: compile time is
one block's, whatever num_layers is.

Only the block's forward is replaced (an instance attribute), never the module's __call__
(`module.compile()` compiles _call_impl, hooks included). The hooks registered on a block (ZeRO-3's
gather before the forward and release after it, the tensor hooks on its outputs that gather again
for the backward) run in _call_impl, so they stay eager code around the compiled forward, as does
full recompute's checkpoint(block, ...), which calls the block like any caller.

What dynamo does not trace becomes a graph break, run eagerly between compiled graphs, with the
same result as without compile:
  - Dropout (model/activations.py) reads and sets the generator state to replay its mask in
    backward, and the tensor-parallel RNG tracker forks its stream the same way: graph breaks, so
    every mask is drawn by eager code from the same stream as without compile.
  - The tensor-parallel collectives (parallel/mappings.py, layers.py) go through comm, which counts
    bytes and handles failures in Python: graph breaks at each collective.
Random ops traced into a graph (SDPA's attention dropout) would draw from inductor's own generator,
neither the stream nor the masks of an uncompiled run, so fallback_random keeps aten's random ops:
with compile on or off, a seed gives the same masks, and a resume replays them exactly.

Three paths stay eager:
  - a mixture-of-experts MLP (model/moe.py): its token counts per expert and, with a capacity, its
    kept assignments are data-dependent shapes, and it records its load and losses on Python objects
    (RouterStats) whose mutation a compiled graph would not replay on every call. It runs as a
    graph break, the attention and the norms around it compiled; its experts are one grouped GEMM
    each where torch has it, which compile would not fuse further.
  - decoding (a KV cache): one new shape per token and a cache updated in place; the decoding
    forward is cheap and runs once per sample, so it is not worth a recompile per length.
  - the attention under selective recompute where it checkpoints its core (attention dropout off
    CUDA, see CausalSelfAttention.forward): dynamo cannot trace checkpoint() with a context_fn,
    which our recompute needs to replay the tensor-parallel stream. The norms and the MLP of those
    blocks are still compiled.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from ..model.moe import MoE

# Dynamo inlines nn modules by default from 2.5 (inline_inbuilt_nn_modules): before it, each block
# is guarded by identity and compiled on its own, so num_layers blocks exhaust the recompile limit
# (8 per code object) and the rest silently run eagerly.
MIN_TORCH = (2, 5)


def torch_version() -> tuple[int, int]:
    major, minor = torch.__version__.split(".")[:2]
    return int(major), int(minor)


def unsupported() -> str | None:
    """Why train.compile cannot run with this torch (None: it can)."""
    if torch_version() < MIN_TORCH:
        return (f"train.compile=true needs torch >= {MIN_TORCH[0]}.{MIN_TORCH[1]} (it compiles one block "
                f"and reuses it for every block, which needs dynamo's inlining of nn modules), but torch "
                f"{torch.__version__} is installed; upgrade torch or set train.compile=false.")
    return None


def compile_blocks(model: nn.Module, device: torch.device) -> int:
    """Replace each block's forward of `model` (a GPT or one stage of it, built and parallelized,
    its recompute mode set) by a compiled one; returns how many blocks were compiled."""
    for block in model.blocks.values():
        attn = block.attn
        if attn.recompute_core and attn.dropout > 0 and torch.device(device).type != "cuda":
            # checkpoint(core, context_fn=...) inside the attention: not traceable (module docstring)
            attn.forward = torch._dynamo.disable(attn.forward)
        if isinstance(block.mlp, MoE):  # (module docstring)
            block.mlp.forward = torch._dynamo.disable(block.mlp.forward)
        block.forward = _compiled_forward(block.forward)
    return len(model.blocks)


def _compiled_forward(eager):
    """eager(x, rope, cache, attend) compiled for training and evaluation; decoding (cache) stays
    eager."""
    compiled = torch.compile(eager, options={"fallback_random": True})

    def forward(x, rope=None, cache=None, attend=None):
        if cache is not None:
            return eager(x, rope, cache, attend)
        return compiled(x, rope, None, attend)
    return forward
