"""Packed documents (data.document_mask): a packed row of k documents computes what the k documents
compute run one by one (per-token losses and gradients), and the data side finds the documents."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from megatron_lite.config import ModelConfig
from megatron_lite.data.documents import mask_separator_targets, window_documents
from megatron_lite.model import GPT, Documents

LENGTHS = [5, 9, 1, 7]  # one document of a single token: it attends to itself only
VARIANTS = {
    "learned": dict(),
    "rope_gqa_swiglu": dict(position_embedding="rope", norm="rmsnorm", activation="swiglu", bias=False,
                            tie_embeddings=False, num_kv_heads=2),
}


def small(**kw) -> ModelConfig:
    base = dict(vocab_size=97, hidden_size=32, num_layers=2, num_attention_heads=4, max_sequence_length=32)
    base.update(kw)
    return ModelConfig(**base)


def packed(lengths, reset_positions=True):
    """Row 0 holds the documents back to back; row 1 the same documents in reverse order."""
    rows = []
    for order in (lengths, lengths[::-1]):
        seg = torch.cat([torch.full((n,), i) for i, n in enumerate(order)])  # (T,)
        pos = torch.cat([torch.arange(n) for n in order])  # (T,)
        rows.append((seg, pos))
    segments = torch.stack([s for s, _ in rows])  # (2, T)
    positions = torch.stack([p for _, p in rows]) if reset_positions else None  # (2, T)
    return Documents(segments, positions)


def per_token_losses(model, ids, docs=None):
    logits, _ = model(ids[:, :-1], docs=docs)  # (B, T, V)
    return F.cross_entropy(logits.transpose(1, 2), ids[:, 1:], reduction="none")  # (B, T)


@pytest.mark.parametrize("variant", VARIANTS)
def test_packed_documents_equal_the_documents_run_separately(variant):
    torch.manual_seed(0)
    model = GPT(small(**VARIANTS[variant]), seed=3).eval()
    docs = [torch.randint(0, 97, (n + 1,)) for n in LENGTHS]  # n inputs + the next token each
    # The packed row: each document's n inputs; its targets are the document's own next tokens.
    ids = torch.cat([d[:-1] for d in docs])[None]  # (1, T)
    targets = torch.cat([d[1:] for d in docs])[None]  # (1, T)
    row = Documents(*(t[:1] for t in packed(LENGTHS)))
    logits, _ = model(ids, docs=row)
    got = F.cross_entropy(logits.transpose(1, 2), targets, reduction="none")[0]  # (T,)
    want = torch.cat([per_token_losses(model, d[None])[0] for d in docs])  # (T,)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-6)
    # Without the mask the documents see each other: the test can tell.
    logits, _ = model(ids)
    unmasked = F.cross_entropy(logits.transpose(1, 2), targets, reduction="none")[0]
    assert (unmasked - want)[LENGTHS[0]:].abs().amax() > 1e-3


@pytest.mark.parametrize("variant", VARIANTS)
def test_packed_gradients_equal_the_sum_over_separate_documents(variant):
    cfg = small(**VARIANTS[variant])
    docs = [torch.randint(0, 97, (n + 1,), generator=torch.Generator().manual_seed(n)) for n in LENGTHS]
    total = sum(LENGTHS)
    packed_model, separate = GPT(cfg, seed=5), GPT(cfg, seed=5)
    ids = torch.cat([d[:-1] for d in docs])[None]  # (1, T)
    targets = torch.cat([d[1:] for d in docs])[None]
    _, loss = packed_model(ids, targets, docs=Documents(*(t[:1] for t in packed(LENGTHS))))
    loss.backward()  # mean over the T tokens
    for d in docs:  # each document's mean, weighted by its share of the tokens
        _, part = separate(d[None, :-1], d[None, 1:])
        (part * (len(d) - 1) / total).backward()
    for (name, a), (_, b) in zip(packed_model.named_parameters(), separate.named_parameters(), strict=True):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-5, atol=1e-7, msg=name)


@pytest.mark.parametrize("mode", ["full", "selective"])
def test_recompute_keeps_the_document_mask(mode):
    cfg = small(position_embedding="rope", dropout=0.0)
    ids = torch.randint(0, 97, (2, sum(LENGTHS) + 1), generator=torch.Generator().manual_seed(1))
    docs = packed(LENGTHS)
    ref, model = GPT(cfg, seed=2), GPT(cfg, seed=2)
    model.set_recompute(mode)
    _, a = ref(ids[:, :-1], ids[:, 1:], docs=docs)
    _, b = model(ids[:, :-1], ids[:, 1:], docs=docs)
    a.backward()
    b.backward()
    assert a.item() == b.item()
    for p, q in zip(ref.parameters(), model.parameters(), strict=True):
        torch.testing.assert_close(p.grad, q.grad, rtol=0, atol=0)


def test_window_documents_segments_and_positions():
    starts = np.array([0, 4, 6, 13])  # documents [0,4) [4,6) [6,13) [13,...)
    docs = window_documents(starts, [2, 6, 12], seq_len=5, reset_positions=True)
    assert docs.segments.tolist() == [[0, 0, 1, 1, 2],   # tokens 2..6: doc 0 (begun before), 1, 2
                                      [0, 0, 0, 0, 0],   # tokens 6..10: inside doc 2
                                      [0, 1, 1, 1, 1]]   # tokens 12..16: the end of doc 2, doc 3
    assert docs.positions.tolist() == [[0, 1, 0, 1, 0],
                                       [0, 1, 2, 3, 4],
                                       [0, 0, 1, 2, 3]]
    assert window_documents(starts, [2], 5, reset_positions=False).positions is None


def test_separator_targets_are_ignored():
    ids = torch.tensor([[5, 0, 7, 8, 0]])  # 0 = the separator
    labels = torch.tensor([[0, 7, 8, 0, 9]])
    assert mask_separator_targets(ids, labels, 0).tolist() == [[0, -100, 8, 0, -100]]
