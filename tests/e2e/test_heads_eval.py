"""Head quality against a plain computation from full logits; missing buckets are missing, not zero."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from helpers.models import tiny_llama

from wmtp.components.validate import head_quality
from wmtp.data.sequences import SequenceSet
from wmtp.loss import IGNORE_INDEX, mtp_labels
from wmtp.model.mtp import MTPModel


def sequences(n: int = 6, length: int = 40, seed: int = 0) -> SequenceSet:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 64, (n, length), generator=g)
    mask = torch.ones(n, length, dtype=torch.long)
    mask[0, 30:] = 0  # padding
    docs = torch.zeros(n, length, dtype=torch.long)
    docs[1, 20:] = 1  # a packed second document
    return SequenceSet(ids, mask, docs, torch.zeros(n, length, dtype=torch.bool))


def test_matches_a_plain_computation_from_logits():
    torch.manual_seed(0)
    model = MTPModel.from_base(tiny_llama(), n_heads=3).eval()
    data = sequences()
    report = head_quality(model, data, batch_size=4, edges=(0, 8, 24))
    labels = mtp_labels(data.input_ids, 3, attention_mask=data.attention_mask, document_ids=data.document_ids)
    with torch.no_grad():
        logits = model(data.input_ids, data.attention_mask, return_logits=True).logits  # [B, S, n, V]
    valid = labels != IGNORE_INDEX
    ce = F.cross_entropy(logits.flatten(0, 2).float(), labels.clamp_min(0).flatten(), reduction="none").view_as(labels)
    hit = (logits.argmax(-1) == labels)
    for h in range(3):
        m = valid[..., h]
        assert report["heads"][h]["pairs"] == int(m.sum())
        assert report["heads"][h]["ce"] == pytest.approx(float(ce[..., h][m].mean()), rel=1e-4)
        assert report["heads"][h]["ppl"] == pytest.approx(math.exp(float(ce[..., h][m].mean())), rel=1e-4)
        assert report["heads"][h]["acc"] == pytest.approx(float(hit[..., h][m].float().mean()))
        for bucket in report["buckets"]:
            lo, hi = bucket["positions"]
            mb = m.clone()
            mb[:, :lo] = False
            mb[:, hi:] = False
            assert bucket["heads"][h]["pairs"] == int(mb.sum())
            assert bucket["heads"][h]["ce"] == pytest.approx(float(ce[..., h][mb].mean()), rel=1e-4)
    assert [b["positions"] for b in report["buckets"]] == [[0, 8], [8, 24], [24, 40]]


def test_perplexity_is_exp_of_the_token_mean_not_a_mean_of_batch_perplexities():
    torch.manual_seed(1)
    model = MTPModel.from_base(tiny_llama(), n_heads=2).eval()
    data = sequences(n=5)
    one = head_quality(model, data, batch_size=5)
    split = head_quality(model, data, batch_size=2)  # batches of different sizes: same numbers
    for a, b in zip(one["heads"], split["heads"], strict=True):
        assert a["ppl"] == pytest.approx(b["ppl"], rel=1e-5) and a["ppl"] == pytest.approx(math.exp(a["ce"]))


def test_an_empty_bucket_is_missing():
    model = MTPModel.from_base(tiny_llama(), n_heads=2).eval()
    data = sequences(n=2, length=20)
    data.attention_mask[:, 10:] = 0
    report = head_quality(model, data, edges=(0, 12))
    assert report["buckets"][1]["heads"][0] == {"head": 0, "ce": None, "ppl": None, "acc": None, "pairs": 0}
