"""Hugging Face interop: a checkpoint of any layout exported as a transformers model directory, and a
transformers model directory imported as a step-0 checkpoint that any layout trains on.

    export_hf(checkpoint, out)  -> out/config.json, model.safetensors, generation_config.json,
                                   tokenizer.json, tokenizer_config.json, special_tokens_map.json
    import_hf(hf_dir, run)      -> run/config.yaml and run/checkpoints/step_00000000 (serial layout)

Four architectures express our models exactly (every other combination is refused, naming the key):

    ours                                              transformers
    learned positions, layernorm, gelu | gelu_exact   GPT2LMHeadModel (gelu_pytorch_tanh | gelu)
    rope, rmsnorm, swiglu (GQA, tied or not)          LlamaForCausalLM (hidden_act silu)
    the same with MoE in every block (softmax router, MixtralForCausalLM
      top-k renormalised, no shared experts)
    the same with MoE in every layer_freq-th block    Qwen2MoeForCausalLM (mlp_only_layers = the dense
      and one gated shared expert (no biases)           blocks, no qkv bias)

MoE experts are stored per expert, as the hub's files hold them (Mixtral's block_sparse_moe.experts.
{e}.w1 | w3 | w2, Qwen2-MoE's mlp.experts.{e}.gate_proj | up_proj | down_proj): our stacked (E, 2I, C)
[gate | up] and (E, C, I) tensors are cut per expert (transformers >= 5 fuses them again on load).
A router with the auxiliary-loss-free bias, or capacity dropping, would compute something else there:
refused.

The mapping is by serial-model name (the checkpoint is read into a serial GPT first, whatever layout
wrote it): GPT-2's Conv1D layers hold the transposed weight (in, out) and keep qkv fused (c_attn);
Llama splits qkv into q/k/v_proj and SwiGLU's [gate | up] into gate/up_proj. Our RoPE is the
rotate-half convention with inv_freq = theta^(-2i/D), the one HF's Llama implements, so q/k rows
need no permutation. Attention scales by 1/sqrt(head_dim) in all three. A model without biases
exports to GPT-2 with zero biases (exact: adding 0.0 changes nothing).

Import reads the weights itself (safetensors, sharded or not, or pytorch_model.bin) and takes every
tensor the model needs from them: the names and shapes are checked against what the config needs
before anything is read, so a missing, extra or misshapen tensor is refused by name (transformers'
from_pretrained would fill a missing one with random values). The tokenizer must encode text within
the model's vocabulary; its document separator (eos, else bos, else <|endoftext|>, or --separator)
is recorded with it, and export makes it transformers' bos and eos token.

transformers is optional (the `hf` extra): it is imported here, lazily, and only by these two
functions; without it they raise one sentence naming the extra.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import re
import shutil
import tempfile
import warnings
from collections import Counter
from pathlib import Path
from typing import Callable

import torch

from ..config import Config, ModelConfig, TrainConfig
from ..data import BPETokenizer, ByteTokenizer, load_tokenizer
from ..data.tokenizer import EOT
from ..errors import CheckpointError, ConfigError, UsageError
from ..model import GPT
from . import CheckpointManager, TrainState, load_model_weights, serial_tensors, write_single

__all__ = ["export_hf", "import_hf", "hf_architecture"]

GPT2, LLAMA, MIXTRAL, QWEN2_MOE = "gpt2", "llama", "mixtral", "qwen2_moe"
CLASSES = {GPT2: "GPT2LMHeadModel", LLAMA: "LlamaForCausalLM", MIXTRAL: "MixtralForCausalLM",
           QWEN2_MOE: "Qwen2MoeForCausalLM"}
# the hub's per-expert tensors of our stacked fc1 ([gate | up]) and fc2, per architecture
EXPERT_NAMES = {MIXTRAL: (("w1", "w3"), ("w2",)), QWEN2_MOE: (("gate_proj", "up_proj"), ("down_proj",))}
GPT2_ACT = {"gelu": "gelu_pytorch_tanh", "gelu_exact": "gelu"}  # ours -> transformers (the same functions)
GPT2_ACT_IN = {"gelu_pytorch_tanh": "gelu", "gelu_new": "gelu", "gelu": "gelu_exact"}  # gelu_new: tanh form


def _transformers():
    try:
        import transformers
    except ImportError:
        raise UsageError("Hugging Face export/import needs transformers, which is not installed; run "
                         "`pip install megatron_lite[hf]`.") from None
    return transformers


# ---- which transformers architecture expresses a model ---------------------------------------------
def hf_architecture(m: ModelConfig) -> str:
    """'gpt2', 'llama', 'mixtral' or 'qwen2_moe', or ConfigError naming the key transformers cannot
    express."""
    if m.moe.num_experts:
        return _moe_architecture(m)
    if m.position_embedding == "learned":
        for key, value, want in (("norm", m.norm, ["layernorm"]), ("activation", m.activation, [*GPT2_ACT])):
            if value not in want:
                raise ConfigError(f"model.{key}={value} with model.position_embedding=learned has no "
                                  f"transformers equivalent (GPT-2 needs model.{key}={' or '.join(want)}); "
                                  f"this checkpoint cannot be exported.")
        if m.num_kv_heads != m.num_attention_heads:
            raise ConfigError(f"model.num_kv_heads={m.num_kv_heads} (grouped-query attention) with learned "
                              f"positions has no transformers equivalent (GPT-2 has none; Llama uses "
                              f"model.position_embedding=rope); this checkpoint cannot be exported.")
        return GPT2
    for key, value, want in (("norm", m.norm, "rmsnorm"), ("activation", m.activation, "swiglu")):
        if value != want:
            raise ConfigError(f"model.{key}={value} with model.position_embedding=rope has no transformers "
                              f"equivalent (Llama needs model.{key}={want}); this checkpoint cannot be "
                              f"exported.")
    return LLAMA


def _moe_architecture(m: ModelConfig) -> str:
    """Mixtral or Qwen2-MoE for a Llama-shaped MoE model, or ConfigError naming the key."""
    e, shared = m.moe, m.moe.num_shared_experts > 0
    arch = QWEN2_MOE if shared else MIXTRAL
    name = "Qwen2-MoE" if shared else "Mixtral"
    rules = [
        (m.position_embedding != "rope", f"model.position_embedding={m.position_embedding}",
         "model.position_embedding=rope"),
        (m.norm != "rmsnorm", f"model.norm={m.norm}", "model.norm=rmsnorm"),
        (m.activation != "swiglu", f"model.activation={m.activation}", "model.activation=swiglu"),
        (e.router != "softmax", f"model.moe.router={e.router}", "model.moe.router=softmax"),
        (e.bias_update_rate > 0, f"model.moe.bias_update_rate={e.bias_update_rate}",
         "model.moe.bias_update_rate=0 (its routers have no balancing bias)"),
        (e.capacity_factor is not None, f"model.moe.capacity_factor={e.capacity_factor}",
         "dropless routing (model.moe.capacity_factor unset)"),
        (m.bias, "model.bias=true", "model.bias=false"),
        (not shared and e.layer_freq != 1, f"model.moe.layer_freq={e.layer_freq}",
         "model.moe.layer_freq=1 (every block MoE), or a gated shared expert for Qwen2-MoE"),
        (not shared and not e.norm_topk_prob, "model.moe.norm_topk_prob=false",
         "model.moe.norm_topk_prob=true"),
        (shared and not e.shared_expert_gate, "model.moe.shared_expert_gate=false",
         "model.moe.shared_expert_gate=true"),
    ]
    for bad, what, need in rules:
        if bad:
            raise ConfigError(f"{what} in a mixture of experts has no transformers equivalent ({name} needs "
                              f"{need}); this checkpoint cannot be exported.")
    return arch


def _hf_config(tf, m: ModelConfig, arch: str, eot_id: int | None):
    common = dict(vocab_size=m.vocab_size, initializer_range=m.init_std, tie_word_embeddings=m.tie_embeddings,
                  bos_token_id=eot_id, eos_token_id=eot_id, architectures=[CLASSES[arch]],
                  torch_dtype="float32")
    if arch == GPT2:
        return tf.GPT2Config(n_positions=m.max_sequence_length, n_embd=m.hidden_size, n_layer=m.num_layers,
                             n_head=m.num_attention_heads, n_inner=m.intermediate_size,
                             activation_function=GPT2_ACT[m.activation], resid_pdrop=m.dropout,
                             embd_pdrop=m.dropout, attn_pdrop=m.dropout, layer_norm_epsilon=m.norm_eps,
                             scale_attn_weights=True, scale_attn_by_inverse_layer_idx=False,
                             reorder_and_upcast_attn=False, **common)
    return tf.LlamaConfig(hidden_size=m.hidden_size, intermediate_size=m.intermediate_size,
                          num_hidden_layers=m.num_layers, num_attention_heads=m.num_attention_heads,
                          num_key_value_heads=m.num_kv_heads, head_dim=m.head_dim, hidden_act="silu",
                          max_position_embeddings=m.max_sequence_length, rms_norm_eps=m.norm_eps,
                          rope_theta=m.rope_theta, attention_bias=m.bias, mlp_bias=m.bias,
                          attention_dropout=m.dropout, **common) if arch == LLAMA else \
        _hf_moe_config(tf, m, arch, common)


def _hf_moe_config(tf, m: ModelConfig, arch: str, common: dict):
    e = m.moe
    shape = dict(hidden_size=m.hidden_size, num_hidden_layers=m.num_layers,
                 num_attention_heads=m.num_attention_heads, num_key_value_heads=m.num_kv_heads,
                 hidden_act="silu", max_position_embeddings=m.max_sequence_length, rms_norm_eps=m.norm_eps,
                 rope_theta=m.rope_theta, attention_dropout=m.dropout, num_experts_per_tok=e.top_k,
                 router_aux_loss_coef=e.aux_loss_coeff, **common)
    if arch == MIXTRAL:
        return tf.MixtralConfig(intermediate_size=e.intermediate_size, num_local_experts=e.num_experts,
                                head_dim=m.head_dim, sliding_window=None, **shape)
    return tf.Qwen2MoeConfig(intermediate_size=m.intermediate_size, moe_intermediate_size=e.intermediate_size,
                             shared_expert_intermediate_size=e.shared_intermediate_size,
                             num_experts=e.num_experts, norm_topk_prob=e.norm_topk_prob,
                             decoder_sparse_step=1, qkv_bias=False, use_sliding_window=False,
                             mlp_only_layers=[i for i in range(m.num_layers) if not e.is_moe(i)], **shape)


def _model_config(hf, src: Path) -> ModelConfig:
    """Our ModelConfig for a transformers config, or CheckpointError naming what does not map."""
    def refuse(what: str) -> CheckpointError:
        return CheckpointError(f"{str(src)!r}: {what} has no megatron_lite equivalent; it cannot be "
                               f"imported.")

    t = hf.model_type
    if t == GPT2:
        if hf.activation_function not in GPT2_ACT_IN:
            raise refuse(f"activation_function={hf.activation_function!r}")
        if not hf.scale_attn_weights or hf.scale_attn_by_inverse_layer_idx:
            raise refuse("scale_attn_weights=false or scale_attn_by_inverse_layer_idx=true")
        if getattr(hf, "add_cross_attention", False):
            raise refuse("add_cross_attention=true")
        return ModelConfig(vocab_size=hf.vocab_size, hidden_size=hf.n_embd, num_layers=hf.n_layer,
                           num_attention_heads=hf.n_head, intermediate_size=hf.n_inner or 4 * hf.n_embd,
                           dropout=hf.resid_pdrop, max_sequence_length=hf.n_positions,
                           position_embedding="learned", norm="layernorm", norm_eps=hf.layer_norm_epsilon,
                           activation=GPT2_ACT_IN[hf.activation_function], bias=True,
                           tie_embeddings=hf.tie_word_embeddings, init_std=hf.initializer_range)
    if t == LLAMA:
        if hf.hidden_act != "silu":
            raise refuse(f"hidden_act={hf.hidden_act!r}")
        head_dim = getattr(hf, "head_dim", None) or hf.hidden_size // hf.num_attention_heads
        if head_dim * hf.num_attention_heads != hf.hidden_size:
            raise refuse(f"head_dim={head_dim} (not hidden_size / num_attention_heads)")
        rope = dict(getattr(hf, "rope_parameters", None) or getattr(hf, "rope_scaling", None) or {})
        if rope.get("rope_type", rope.get("type", "default")) != "default":
            raise refuse(f"rope scaling {rope.get('rope_type', rope.get('type'))!r}")
        attn_bias, mlp_bias = bool(hf.attention_bias), bool(getattr(hf, "mlp_bias", False))
        if attn_bias != mlp_bias:
            raise refuse(f"attention_bias={attn_bias} with mlp_bias={mlp_bias}")
        return ModelConfig(vocab_size=hf.vocab_size, hidden_size=hf.hidden_size,
                           num_layers=hf.num_hidden_layers, num_attention_heads=hf.num_attention_heads,
                           num_kv_heads=hf.num_key_value_heads or hf.num_attention_heads,
                           intermediate_size=hf.intermediate_size, dropout=float(hf.attention_dropout or 0.0),
                           max_sequence_length=hf.max_position_embeddings, position_embedding="rope",
                           rope_theta=float(rope.get("rope_theta", getattr(hf, "rope_theta", 10000.0))),
                           norm="rmsnorm", norm_eps=hf.rms_norm_eps, activation="swiglu",
                           tie_embeddings=hf.tie_word_embeddings, bias=attn_bias,
                           init_std=hf.initializer_range)
    if t in (MIXTRAL, QWEN2_MOE):
        return _moe_model_config(hf, refuse)
    raise refuse(f"model_type={t!r} (supported: gpt2, llama, mixtral, qwen2_moe)")


def _moe_model_config(hf, refuse) -> ModelConfig:
    """Our ModelConfig for a Mixtral or Qwen2-MoE config (a Llama body, MoE MLPs)."""
    t, n = hf.model_type, hf.num_hidden_layers
    if hf.hidden_act != "silu":
        raise refuse(f"hidden_act={hf.hidden_act!r}")
    rope = dict(getattr(hf, "rope_parameters", None) or getattr(hf, "rope_scaling", None) or {})
    if rope.get("rope_type", rope.get("type", "default")) != "default":
        raise refuse(f"rope scaling {rope.get('rope_type', rope.get('type'))!r}")
    head_dim = getattr(hf, "head_dim", None) or hf.hidden_size // hf.num_attention_heads
    if head_dim * hf.num_attention_heads != hf.hidden_size:
        raise refuse(f"head_dim={head_dim} (not hidden_size / num_attention_heads)")
    window = getattr(hf, "sliding_window", None) if getattr(hf, "use_sliding_window", True) else None
    if window and window < hf.max_position_embeddings:
        raise refuse(f"sliding_window={window}")
    if t == MIXTRAL:
        width = hf.intermediate_size  # each expert's (all blocks are MoE)
        moe = dict(num_experts=hf.num_local_experts, intermediate_size=width, norm_topk_prob=True)
    else:
        if getattr(hf, "qkv_bias", False):
            raise refuse("qkv_bias=true")
        if not hf.shared_expert_intermediate_size:
            raise refuse("shared_expert_intermediate_size=0")
        sparse = [i for i in range(n) if i not in (hf.mlp_only_layers or [])
                  and hf.num_experts > 0 and (i + 1) % hf.decoder_sparse_step == 0]
        freq = sparse[1] if len(sparse) > 1 else n
        if not sparse or sparse != list(range(0, n, freq)):
            raise refuse(f"MoE layers {sparse} (only every k-th layer from the first one can be MoE)")
        width, moe = hf.intermediate_size, dict(
            num_experts=hf.num_experts, intermediate_size=hf.moe_intermediate_size, layer_freq=freq,
            num_shared_experts=1, shared_intermediate_size=hf.shared_expert_intermediate_size,
            shared_expert_gate=True, norm_topk_prob=bool(hf.norm_topk_prob))
    return ModelConfig(vocab_size=hf.vocab_size, hidden_size=hf.hidden_size, num_layers=n,
                       num_attention_heads=hf.num_attention_heads,
                       num_kv_heads=hf.num_key_value_heads or hf.num_attention_heads, intermediate_size=width,
                       dropout=float(hf.attention_dropout or 0.0),
                       max_sequence_length=hf.max_position_embeddings, position_embedding="rope",
                       rope_theta=float(rope.get("rope_theta", getattr(hf, "rope_theta", None) or 10000.0)),
                       norm="rmsnorm", norm_eps=hf.rms_norm_eps, activation="swiglu",
                       tie_embeddings=hf.tie_word_embeddings, bias=False, init_std=hf.initializer_range,
                       moe=dict(moe, top_k=hf.num_experts_per_tok,
                                aux_loss_coeff=float(hf.router_aux_loss_coef)))


# ---- the name map -----------------------------------------------------------------------------------
def _pairs(m: ModelConfig, arch: str) -> list[tuple[str, tuple[str, ...], str]]:
    """(our serial name, its transformers names, how): 'copy'; 'conv1d' (GPT-2 stores W^T); 'split'
    (our fused rows = the transformers tensors concatenated along dim 0)."""
    out: list[tuple[str, tuple[str, ...], str]] = []

    def add(ours, theirs, how="copy", bias=True):
        out.append((f"{ours}.weight", tuple(f"{t}.weight" for t in theirs), how))
        if bias:  # a vector: split like the weight's rows, never transposed
            bias_how = "copy" if how == "conv1d" else how
            out.append((f"{ours}.bias", tuple(f"{t}.bias" for t in theirs), bias_how))

    if arch == GPT2:
        add("tok_emb", ["transformer.wte"], bias=False)
        add("pos_emb", ["transformer.wpe"], bias=False)
        for i in range(m.num_layers):
            b, h = f"blocks.{i}", f"transformer.h.{i}"
            add(f"{b}.ln1", [f"{h}.ln_1"])
            add(f"{b}.attn.qkv", [f"{h}.attn.c_attn"], "conv1d")
            add(f"{b}.attn.proj", [f"{h}.attn.c_proj"], "conv1d")
            add(f"{b}.ln2", [f"{h}.ln_2"])
            add(f"{b}.mlp.fc1", [f"{h}.mlp.c_fc"], "conv1d")
            add(f"{b}.mlp.fc2", [f"{h}.mlp.c_proj"], "conv1d")
        add("ln_f", ["transformer.ln_f"])
    else:
        add("tok_emb", ["model.embed_tokens"], bias=False)
        for i in range(m.num_layers):
            b, h = f"blocks.{i}", f"model.layers.{i}"
            add(f"{b}.ln1", [f"{h}.input_layernorm"], bias=False)
            add(f"{b}.attn.qkv", [f"{h}.self_attn.{x}_proj" for x in "qkv"], "split", bias=m.bias)
            add(f"{b}.attn.proj", [f"{h}.self_attn.o_proj"], bias=m.bias)
            add(f"{b}.ln2", [f"{h}.post_attention_layernorm"], bias=False)
            if not m.moe.is_moe(i):
                add(f"{b}.mlp.fc1", [f"{h}.mlp.gate_proj", f"{h}.mlp.up_proj"], "split", bias=m.bias)
                add(f"{b}.mlp.fc2", [f"{h}.mlp.down_proj"], bias=m.bias)
                continue
            moe = f"{h}.block_sparse_moe" if arch == MIXTRAL else f"{h}.mlp"
            add(f"{b}.mlp.router", [f"{moe}.gate"], bias=False)
            for ours, names in zip(("fc1", "fc2"), EXPERT_NAMES[arch], strict=True):
                out.append((f"{b}.mlp.experts.{ours}", tuple(f"{moe}.experts.{e}.{n}.weight"
                                                            for e in range(m.moe.num_experts) for n in names),
                            "experts"))
            if m.moe.num_shared_experts:
                add(f"{b}.mlp.shared.fc1", [f"{moe}.shared_expert.gate_proj", f"{moe}.shared_expert.up_proj"],
                    "split", bias=False)
                add(f"{b}.mlp.shared.fc2", [f"{moe}.shared_expert.down_proj"], bias=False)
                add(f"{b}.mlp.shared_gate", [f"{moe}.shared_expert_gate"], bias=False)
        add("ln_f", ["model.norm"], bias=False)
    if not m.tie_embeddings:
        add("lm_head", ["lm_head"], bias=False)
    return out


def _split_sizes(m: ModelConfig, name: str) -> list[int]:
    if name.endswith(("attn.qkv.weight", "attn.qkv.bias")):
        return [m.num_attention_heads * m.head_dim] + [m.num_kv_heads * m.head_dim] * 2
    if name.endswith("shared.fc1.weight"):
        return [m.moe.shared_intermediate_size] * 2
    return [m.intermediate_size] * 2  # SwiGLU's [gate | up]


def _expert_parts(t: torch.Tensor, per_expert: int) -> list[torch.Tensor]:
    """A stacked expert tensor (E, rows, cols) -> the hub's tensors, expert by expert: each expert's
    rows cut in `per_expert` equal parts (fc1's [gate | up]: 2; fc2: 1)."""
    return [part for e in t.unbind(0) for part in e.chunk(per_expert, dim=0)]


def to_hf_state(sd: dict[str, torch.Tensor], m: ModelConfig, arch: str) -> dict[str, torch.Tensor]:
    """Our serial state dict -> transformers tensors (tied lm_head left out: transformers ties it).
    A GPT-2 export of a model without biases gets zero biases."""
    out = {}
    for ours, theirs, how in _pairs(m, arch):
        t = sd.get(ours)
        if t is None:  # GPT-2 always has biases; ours has none (bias=false): zeros are exact
            weight = sd[ours.removesuffix(".bias") + ".weight"]
            t = torch.zeros(weight.shape[0], dtype=weight.dtype)
        if how == "experts":
            parts = _expert_parts(t, len(theirs) // t.shape[0])
        else:
            parts = t.split(_split_sizes(m, ours)) if how == "split" else [t.t() if how == "conv1d" else t]
        for name, part in zip(theirs, parts, strict=True):
            out[name] = part.detach().float().contiguous().clone()  # no shared storage (safetensors)
    return out


def from_hf_state(sd: dict[str, torch.Tensor], m: ModelConfig, arch: str) -> dict[str, torch.Tensor]:
    """transformers tensors -> our serial state dict (lm_head = tok_emb when tied)."""
    out = {}
    for ours, theirs, how in _pairs(m, arch):
        parts = [sd[n].detach().float() for n in theirs]
        if how == "experts":  # the hub's per-expert tensors -> (E, rows, cols)
            k = len(theirs) // m.moe.num_experts
            out[ours] = torch.stack([torch.cat(parts[e * k:(e + 1) * k]) for e in range(m.moe.num_experts)])
            continue
        out[ours] = torch.cat(parts) if how == "split" else parts[0].t() if how == "conv1d" else parts[0]
    for i in range(m.num_layers):
        if m.moe.is_moe(i):  # the balancing bias: transformers' routers have none (export refuses one)
            out[f"blocks.{i}.mlp.expert_bias"] = torch.zeros(m.moe.num_experts)
    if m.tie_embeddings:
        out["lm_head.weight"] = out["tok_emb.weight"]
    return {k: v.contiguous() for k, v in out.items()}


def _check_against(tf, hf_config, tensors: dict[str, torch.Tensor]) -> None:
    """Every tensor name and shape is what transformers' own model (built on the meta device) expects."""
    with torch.device("meta"):
        ref = tf.AutoModelForCausalLM.from_config(hf_config)
    want = _on_disk({k: tuple(v.shape) for k, v in ref.state_dict().items()}, hf_config.model_type)
    if hf_config.tie_word_embeddings:
        want.pop("lm_head.weight", None)
    got = {k: tuple(v.shape) for k, v in tensors.items()}
    if want != got:
        diff = sorted(set(want.items()) ^ set(got.items()))[:4]
        raise CheckpointError(f"transformers {tf.__version__} expects other tensors for "
                              f"{CLASSES[hf_config.model_type]} (first differences: {diff}); upgrade "
                              f"transformers (`pip install -U megatron_lite[hf]`).")


EXPERTS_FUSED = re.compile(r"^(.*\.layers\.\d+\.)mlp\.(?:experts\.(gate_up_proj|down_proj)|(gate)\.weight)$")


def _on_disk(shapes: dict[str, tuple[int, ...]], arch: str) -> dict[str, tuple[int, ...]]:
    """transformers >= 5 holds an MoE layer's experts fused in memory (gate_up_proj (E, 2I, C),
    down_proj (E, C, I); Mixtral's block renamed mlp) and converts when it loads and saves files;
    the names and shapes its files hold, one tensor per expert (older versions: unchanged)."""
    if arch not in EXPERT_NAMES:
        return shapes
    out = {}
    for k, shape in shapes.items():
        m = EXPERTS_FUSED.match(k)
        if m is None:
            out[k] = shape
            continue
        block = m.group(1) + ("block_sparse_moe." if arch == MIXTRAL else "mlp.")
        if m.group(3):
            out[block + "gate.weight"] = shape
            continue
        names = EXPERT_NAMES[arch][0 if m.group(2) == "gate_up_proj" else 1]
        for e in range(shape[0]):
            for n in names:
                out[f"{block}experts.{e}.{n}.weight"] = (shape[1] // len(names), shape[2])
    return out


# ---- tokenizers -------------------------------------------------------------------------------------
def _byte_tokenizer():
    """Our bytes tokenizer (ids 0..255 = the bytes, 256 = <|endoftext|>) as an HF `tokenizers` one: a
    byte-level BPE without merges whose vocabulary lists the 256 byte symbols in byte order."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers
    alphabet = _bytes_to_unicode()
    tok = Tokenizer(models.BPE(vocab={alphabet[b]: b for b in range(256)}, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([AddedToken(EOT, special=True, normalized=False)])
    return tok


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character table (what the ByteLevel pre-tokenizer maps bytes to)."""
    bs = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    cs, n = bs[:], 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {b: chr(c) for b, c in zip(bs, cs, strict=True)}


def _write_tokenizer(src: Path, out: Path, max_len: int) -> int | None:
    """tokenizer.json (+ config, special tokens) of the checkpoint's tokenizer, whose document
    separator becomes transformers' bos and eos token; its id, or None when the checkpoint carries no
    tokenizer."""
    if not (src / "meta.json").is_file():
        return None
    tok = load_tokenizer(src)
    backend = _byte_tokenizer() if isinstance(tok, ByteTokenizer) else tok.tok
    backend.save(str(out / "tokenizer.json"))
    special = {"bos_token": tok.separator, "eos_token": tok.separator}
    (out / "special_tokens_map.json").write_text(json.dumps(special, indent=2))
    (out / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", **special, "model_max_length": max_len,
        "clean_up_tokenization_spaces": False, "add_prefix_space": False}, indent=2))
    return tok.eot_id


# ---- export -----------------------------------------------------------------------------------------
def export_hf(src: str | Path, out: str | Path) -> dict:
    """Write a transformers model directory for checkpoint `src` (a verified step directory of any
    layout) into the new directory `out`, atomically. Returns {class, tokenizer, path}."""
    src, out = Path(src), Path(out)
    cfg = Config.from_yaml(src / "config.yaml")
    m = cfg.model
    arch = hf_architecture(m)
    tf = _transformers()
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise UsageError(f"--out {str(out)!r} already exists and is not empty; choose a new directory.")
    model = GPT(m, seed=None)
    load_model_weights(src, model)  # verifies every file, reads any layout into the serial model
    tensors = to_hf_state(model.state_dict(), m, arch)
    del model
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        eot = _write_tokenizer(src, tmp, m.max_sequence_length)
        hf_config = _hf_config(tf, m, arch, eot)
        _check_against(tf, hf_config, tensors)
        hf_config.save_pretrained(tmp)
        tf.GenerationConfig.from_model_config(hf_config).save_pretrained(tmp)
        from safetensors.torch import save_file
        save_file(tensors, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        if out.exists():
            out.rmdir()  # empty (checked above)
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return {"path": str(out), "class": CLASSES[arch], "tokenizer": eot is not None}


# ---- import -----------------------------------------------------------------------------------------
WEIGHTS = (("model.safetensors", "model.safetensors.index.json"),
           ("pytorch_model.bin", "pytorch_model.bin.index.json"))
PREFIX = {GPT2: "transformer.", LLAMA: "model.", MIXTRAL: "model.", QWEN2_MOE: "model."}  # a base model lacks
LAYERS = {GPT2: "n_layer", LLAMA: "num_hidden_layers", MIXTRAL: "num_hidden_layers",
          QWEN2_MOE: "num_hidden_layers"}
# Buffers older transformers versions saved with the weights (GPT-2's causal mask, Llama's RoPE
# frequencies): recomputed, never learned, so they are skipped when present.
BUFFERS = re.compile(r"\.attn\.(bias|masked_bias)$|\.rotary_emb\.inv_freq$")
LAYER = re.compile(r"^(.*?\.(?:h|layers)\.(\d+)\.)")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "tokenizer.model", "vocab.txt")


@contextlib.contextmanager
def _quiet(tf):
    """transformers' own log lines and warnings (advice on the config, tokenizer conversion notes)
    would print before, or instead of, our one sentence: silenced while it reads config and tokenizer.
    (Its load report never prints: the weights are read by _Weights, not by from_pretrained.)"""
    level = tf.utils.logging.get_verbosity()
    tf.utils.logging.set_verbosity_error()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        tf.utils.logging.set_verbosity(level)


def _read_tokenizer(tf, src: Path, vocab_size: int, separator: str | None) -> BPETokenizer:
    """The HF tokenizer of `src`, with its document separator (see data/tokenizer.py), refused unless
    it encodes text within the model's vocabulary."""
    if not any((src / name).is_file() for name in TOKENIZER_FILES):
        raise CheckpointError(f"{str(src)!r} holds no tokenizer (no tokenizer.json or "
                              f"tokenizer_config.json); add the model's tokenizer (its save_pretrained "
                              f"files) to import it.")
    try:
        with _quiet(tf):
            hf_tok = tf.AutoTokenizer.from_pretrained(str(src), local_files_only=True)
    except Exception as e:  # noqa: BLE001 - transformers raises many kinds for a missing/odd tokenizer
        raise CheckpointError(f"{str(src)!r} holds no tokenizer transformers can load as a fast tokenizer "
                              f"({' '.join(str(e).split())[:160]}); add its tokenizer.json.") from None
    backend = getattr(hf_tok, "backend_tokenizer", None)
    if backend is None:
        raise CheckpointError(f"{str(src)!r} holds only a slow (Python) tokenizer; add its tokenizer.json "
                              f"(a fast tokenizer) to import it.")
    named = {"eos": getattr(hf_tok, "eos_token", None), "bos": getattr(hf_tok, "bos_token", None)}
    tok = BPETokenizer.choosing(backend, separator, named, f"the tokenizer in {str(src)!r}")
    if tok.vocab_size > vocab_size:
        raise CheckpointError(f"the tokenizer in {str(src)!r} has {tok.vocab_size} tokens, more than the "
                              f"model's vocab_size={vocab_size}; it does not belong to this model.")
    return tok


def _load_config(tf, src: Path):
    """transformers' config of `src`, its failure as one sentence instead of a traceback."""
    try:
        with _quiet(tf):
            return tf.AutoConfig.from_pretrained(str(src), local_files_only=True)
    except Exception as e:  # noqa: BLE001 - transformers raises OSError, ValueError, KeyError, ...
        raise CheckpointError(f"transformers cannot load the config in {str(src)!r} "
                              f"({' '.join(str(e).split())[:200]}); pass a directory written by "
                              f"save_pretrained.") from None


class _Weights:
    """The tensors of a transformers model directory by name, read by us (never by transformers, which
    fills what is missing with random values): shapes from the file headers first, values on demand.
    safetensors (one file, or the shards model.safetensors.index.json lists), else pytorch_model.bin
    (weights_only: nothing but tensors is unpickled)."""

    def __init__(self, src: Path, arch: str):
        self.src = src
        self.shapes: dict[str, tuple[int, ...]] = {}
        self._get: dict[str, Callable[[], torch.Tensor]] = {}
        for file in self._files():
            self._open(file)
        prefix = PREFIX[arch]
        if not any(n.startswith(prefix) for n in self.shapes):  # a base model saved alone
            rename = {n: n if n.startswith("lm_head.") else prefix + n for n in self.shapes}
            self.shapes = {rename[n]: s for n, s in self.shapes.items()}
            self._get = {rename[n]: g for n, g in self._get.items()}
        for n in [n for n in self.shapes if BUFFERS.search(n)]:
            del self.shapes[n], self._get[n]

    def _files(self) -> list[Path]:
        for single, index in WEIGHTS:
            if (self.src / single).is_file():
                return [self.src / single]
            if (self.src / index).is_file():
                return self._shards(index)
        raise CheckpointError(f"{str(self.src)!r} holds no model weights (model.safetensors, "
                              f"pytorch_model.bin or a sharded index of either); pass a directory written by "
                              f"save_pretrained.")

    def _shards(self, index: str) -> list[Path]:
        try:
            shards = json.loads((self.src / index).read_text())["weight_map"].values()
            names = sorted({str(n) for n in shards})
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            raise CheckpointError(f"{str(self.src / index)!r} is corrupt (no weight_map of tensor names to "
                                  f"files); save the model again with save_pretrained.") from None
        # A shard must be a plain file beside the index: a path leading elsewhere is not followed.
        bad = [n for n in names if Path(n).name != n or not (self.src / n).is_file()]
        if bad:
            raise CheckpointError(f"{str(self.src / index)!r} lists the shard {bad[0]!r}, which is not a "
                                  f"file in that directory; copy every shard next to it.")
        return [self.src / n for n in names]

    def _open(self, file: Path) -> None:
        try:
            if file.name.endswith(".safetensors"):
                from safetensors import safe_open
                handle = safe_open(str(file), "pt")
                for n in handle.keys():
                    self.shapes[n] = tuple(handle.get_slice(n).get_shape())
                    self._get[n] = functools.partial(handle.get_tensor, n)
            else:
                sd = torch.load(file, map_location="cpu", weights_only=True, mmap=True)
                for n, t in sd.items():
                    self.shapes[n], self._get[n] = tuple(t.shape), functools.partial(sd.__getitem__, n)
        except Exception as e:  # noqa: BLE001 - safetensors and torch.load raise many kinds
            raise CheckpointError(f"cannot read the weights file {str(file)!r} "
                                  f"({' '.join(str(e).split())[:160]}); save the model again with "
                                  f"save_pretrained.") from None

    def check(self, want: dict[str, tuple[int, ...]], layers: str, n_layers: int, optional=()) -> None:
        """Exactly the tensors `want` names, with its shapes (`optional` ones may be present too)."""
        where = f"the weights in {str(self.src)!r}"
        extra = _natural(set(self.shapes) - set(want) - set(optional))
        beyond = sorted({i for n in extra if (i := _layer(n)) is not None and i >= n_layers})
        if beyond:
            raise CheckpointError(f"{where} hold layers {_spans(beyond)} beyond config.json's "
                                  f"{layers}={n_layers}, which importing would drop; set {layers}="
                                  f"{beyond[-1] + 1} in config.json (or remove those layers' tensors).")
        missing = _natural(set(want) - set(self.shapes))
        if missing:
            raise CheckpointError(f"{where} lack {len(missing)} tensors config.json's model needs "
                                  f"({_names(missing, want)}); pass the complete weights (every shard), or "
                                  f"the config.json they belong to.")
        if extra:
            raise CheckpointError(f"{where} hold {len(extra)} tensors config.json's model does not have "
                                  f"({_names(extra, self.shapes)}); remove them, or pass the config.json "
                                  f"they belong to.")
        wrong = [f"{n} {list(self.shapes[n])} (needs {list(need)})" for n, need in want.items()
                 if self.shapes[n] != need]
        if wrong:
            more = f", and {len(wrong) - 3} more" if len(wrong) > 3 else ""
            raise CheckpointError(f"{where} do not have the shapes config.json's model needs: "
                                  f"{', '.join(wrong[:3])}{more}; pass the config.json they belong to.")

    def read(self, name: str) -> torch.Tensor:
        t = self._get[name]()
        if not t.is_floating_point():
            raise CheckpointError(f"{name} in {str(self.src)!r} has dtype {t.dtype} (quantized weights?); "
                                  f"import float weights (float32, bfloat16 or float16).")
        return t.float()


def _natural(names) -> list[str]:
    """Sorted with numbers by value (layer 10 after layer 9)."""
    return sorted(names, key=lambda n: [int(p) if p.isdigit() else p for p in re.split(r"(\d+)", n)])


def _names(names: list[str], universe, limit: int = 6) -> str:
    """`names` for a message, a layer all of whose tensors (in `universe`) are among them as
    'model.layers.3.*'; at most `limit` items."""
    def prefix(n):
        m = LAYER.match(n)
        return m.group(1) if m else None
    listed, everywhere = Counter(map(prefix, names)), Counter(map(prefix, universe))
    items: list[str] = []
    for n in names:
        p = prefix(n)
        item = p + "*" if p is not None and listed[p] == everywhere[p] else n
        if item not in items:
            items.append(item)
    more = f", and {len(items) - limit} more" if len(items) > limit else ""
    return ", ".join(items[:limit]) + more


def _layer(name: str) -> int | None:
    m = LAYER.match(name)
    return int(m.group(2)) if m else None


def _spans(ids: list[int]) -> str:
    """'2', '2-5' (a run) or '2, 4, 7'."""
    if len(ids) > 1 and ids == list(range(ids[0], ids[-1] + 1)):
        return f"{ids[0]}-{ids[-1]}"
    return ", ".join(map(str, ids))


def _hf_weights(src: Path, m: ModelConfig, arch: str) -> dict[str, torch.Tensor]:
    """Every tensor the model needs, from the files: names and shapes checked before anything is read.
    A tied model may carry lm_head.weight too, if it is the embedding."""
    weights = _Weights(src, arch)
    with torch.device("meta"):
        want = {k: tuple(v.shape) for k, v in to_hf_state(GPT(m, seed=None).state_dict(), m, arch).items()}
    tied = ("lm_head.weight",) if m.tie_embeddings else ()
    weights.check(want, LAYERS[arch], m.num_layers, optional=tied)
    tensors = {n: weights.read(n) for n in want}
    embedding = next(n for n in want if n.endswith(("wte.weight", "embed_tokens.weight")))
    if tied and "lm_head.weight" in weights.shapes and not torch.equal(weights.read("lm_head.weight"),
                                                                        tensors[embedding]):
        raise CheckpointError(f"the weights in {str(src)!r} hold an lm_head.weight that differs from "
                              f"{embedding}, but config.json ties them; set tie_word_embeddings=false in "
                              f"config.json.")
    return tensors


def import_hf(src: str | Path, run: str | Path, separator: str | None = None) -> Path:
    """A step-0 checkpoint (serial layout; no optimizer state) and run/config.yaml from a transformers
    model directory on disk; any layout trains on from it. `separator` as in prepare-data (default: the
    tokenizer's eos token, else its bos token, else <|endoftext|>). Returns the checkpoint directory."""
    src, run = Path(src), Path(run)
    tf = _transformers()
    if not (src / "config.json").is_file():
        raise CheckpointError(f"{str(src)!r} holds no config.json; pass a directory written by transformers' "
                              f"save_pretrained (or `megatron-lite checkpoint export`).")
    hf_config = _load_config(tf, src)
    m = _model_config(hf_config, src)
    m.validate()
    tok = _read_tokenizer(tf, src, m.vocab_size, separator)
    cfg = Config(model=m, train=TrainConfig(out_dir=str(run.resolve()))).validate()
    serial = {"tp": 1, "pp": 1, "dp": 1, "order": cfg.parallel.order, "virtual_stages": 1, "zero_stage": 0,
              "zero_backend": "native", "make_vocab_divisible_by": cfg.parallel.make_vocab_divisible_by}
    manager = CheckpointManager(run / "checkpoints", layout=serial)
    if manager.committed():
        raise CheckpointError(f"{str(run)!r} already holds checkpoints; choose an empty run directory.")
    tensors = _hf_weights(src, m, hf_config.model_type)
    model = GPT(m, seed=None)
    model.load_state_dict(from_hf_state(tensors, m, hf_config.model_type), strict=True)
    del tensors
    config_yaml = cfg.to_yaml()
    with tempfile.TemporaryDirectory() as d:  # what a prepared data directory carries about its tokenizer
        meta = {"tokenizer": tok.save(Path(d)), "eot_id": tok.eot_id, "vocab_size": tok.vocab_size,
                "sources": [f"hf:{src}"]}
        (Path(d) / "meta.json").write_text(json.dumps(meta, indent=2))
        with torch.random.fork_rng(devices=[]):  # the stored RNG stream: the run's seed, not ours
            torch.manual_seed(cfg.train.seed)
            path = write_single(run, 0, serial_tensors(model), TrainState(), config_yaml, data_dir=d,
                                layout=serial)
    (run / "config.yaml").write_text(config_yaml)
    tok.log_separator()
    return path
