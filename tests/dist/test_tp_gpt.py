"""The whole GPT under tensor parallelism equals the serial GPT built from the same seed:
logits, loss, every parameter-gradient slice, and three optimizer steps (with clipping engaged).

The parallel model sums the same products in a different order (partial sums over tp), so the
differences are pure rounding. In float64 (~1e-16 per op) tolerances of 1e-9 leave room for that
accumulation; in float32 (~6e-8 per op, a few hundred ops deep, then AdamW's division by
sqrt(v) amplifying tiny-gradient noise) 2e-4 relative / 1e-5 absolute. Any real slicing or
reduction bug shows up at >= 1e-2.
"""

import copy

import pytest
import torch

from megatron_lite.config import ModelConfig
from megatron_lite.model import GPT
from megatron_lite.testing import run_ranks

VARIANTS = {
    # GPT-2 style, vocab 101 divisible by neither tp=2 nor tp=4 (padding must be invisible)
    "gpt2": dict(vocab_size=101, hidden_size=32, num_attention_heads=4, intermediate_size=64),
    # Llama style: RoPE, RMSNorm, SwiGLU, GQA (8 q heads, 4 kv heads), untied, no bias
    "gpt2_50257": dict(vocab_size=50257, hidden_size=32, num_attention_heads=4, intermediate_size=64),
    "llama_gqa": dict(vocab_size=97, hidden_size=64, num_attention_heads=8, num_kv_heads=4,
                      intermediate_size=96, position_embedding="rope", norm="rmsnorm",
                      activation="swiglu", bias=False, tie_embeddings=False),
}
TOLS = {torch.float64: dict(rtol=1e-9, atol=1e-11), torch.float32: dict(rtol=2e-4, atol=1e-5)}


def _check_gpt(rank, world, variant, sp, dtype=torch.float64):
    import torch.distributed as dist

    from megatron_lite.parallel.grads import GradSync
    from megatron_lite.parallel.tensor_parallel import parallelize
    group = dist.group.WORLD
    sync = GradSync(tp_group=group)
    TOL = TOLS[dtype]
    cfg = ModelConfig(num_layers=2, max_sequence_length=16, **VARIANTS[variant])
    serial = GPT(cfg, seed=11).to(dtype)
    tpm = parallelize(copy.deepcopy(serial), group, sequence_parallel=sp, make_vocab_divisible_by=8)
    par = tpm.model
    g = torch.Generator().manual_seed(5)
    ids = torch.randint(0, cfg.vocab_size, (3, 16), generator=g)
    labels = torch.randint(0, cfg.vocab_size, (3, 16), generator=g)
    labels[1, 3:7] = -100
    where = f"[{variant} tp={world} sp={sp} {dtype} rank={rank}]"

    with torch.no_grad():
        torch.testing.assert_close(par(ids)[0], serial(ids)[0], **TOL, msg=lambda m: f"logits {where} {m}")

    opt_s = torch.optim.AdamW(serial.parameters(), lr=1e-2, weight_decay=0.1)
    opt_p = torch.optim.AdamW(par.parameters(), lr=1e-2, weight_decay=0.1)
    for step in range(3):
        opt_s.zero_grad()
        opt_p.zero_grad()
        _, ls = serial(ids, labels)
        _, lp = par(ids, labels)
        ls.backward()
        lp.backward()
        sync.finish(par)
        torch.testing.assert_close(lp, ls, **TOL, msg=lambda m: f"loss step {step} {where} {m}")
        if step == 0:  # every gradient slice, before any clipping
            serial_grads = {n: p.grad for n, p in serial.named_parameters(remove_duplicate=False)}
            for name, p in par.named_parameters():
                want = tpm.sharder(name, serial_grads[name])
                torch.testing.assert_close(p.grad, want, **TOL, msg=lambda m: f"grad {name} {where} {m}")
        # Clipping at a low max-norm engages, and the clipped result matches serial clipping.
        ns = torch.nn.utils.clip_grad_norm_(serial.parameters(), 0.5).item()
        npar = sync.clip(par, 0.5)
        assert ns > 0.5 and abs(npar - ns) < TOL["rtol"] * ns, (npar, ns, where)
        opt_s.step()
        opt_p.step()
    for name, p in par.named_parameters():
        serial_params = dict(serial.named_parameters(remove_duplicate=False))
        want = tpm.sharder(name, serial_params[name])
        torch.testing.assert_close(p, want, **TOL, msg=lambda m: f"weight after 3 steps {name} {where} {m}")


def _all_cases(rank, world):
    for variant in VARIANTS:
        for sp in (False, True):
            _check_gpt(rank, world, variant, sp)
    # float32, and GPT-2's real vocabulary (50257 = 3 x 11 x 1523: divisible by no tp)
    _check_gpt(rank, world, "gpt2_50257", True, torch.float32)
    _check_gpt(rank, world, "llama_gqa", False, torch.float32)


@pytest.mark.parametrize("tp", [2, 4])
def test_gpt_tensor_parallel_matches_serial(tp):
    run_ranks(_all_cases, tp)
