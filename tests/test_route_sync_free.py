"""The host-sync-free recorder and the cached float32 router weight of ``route`` (CPU)."""

from __future__ import annotations

import pytest
import torch

import bh_helpers.patching as patching
from bh_helpers.moe_adapters import find_moe_blocks, router_logits
from bh_helpers.patching import TopKSelector, TopPSelector, route

from test_patching import batch, random_model


@pytest.fixture(scope="module")
def model():
    return random_model("olmoe", num_experts=8, top_k=2, seed=7)


@pytest.mark.parametrize("cap", [0, 5, 27, 30, 31, 33, 59, 60, 1000])
@pytest.mark.parametrize("flush", [1, 1 << 23])
def test_per_token_counts_cap_and_flush(model, cap, flush, monkeypatch):
    monkeypatch.setattr(patching, "_FLUSH_ELEMENTS", flush)
    inputs = batch(model, rows=3, length=12, seed=3)  # 30 valid tokens of 36 rows
    mask = inputs["attention_mask"].bool()
    n = int(mask.sum())
    with torch.no_grad(), route(model, TopPSelector(0.6, max_k=4), max_tokens_per_layer=cap) as rec:
        model(**inputs)
        model(**inputs)
    s = rec.summary()
    assert s["tokens"] == 2 * n
    assert s["truncated"] == (cap < 2 * n)
    per_token = rec.per_token_counts()
    keep = min(cap, 2 * n)
    ids = torch.cat([inputs["input_ids"][mask]] * 2)[:keep]
    assert torch.equal(per_token.token_ids, ids)
    assert per_token.truncated == s["truncated"]
    for layer, counts in per_token.counts.items():
        assert counts.numel() == keep
        if keep == 2 * n:
            assert int(counts.sum()) == s["per_layer"][layer]["activations"]


def test_gate_weight_cache_follows_in_place_updates_and_is_dropped(model):
    inputs = batch(model, rows=2, length=8, seed=5)
    block = find_moe_blocks(model)[0].module
    seen = []

    def selector(logits, layer):
        if layer == 0:
            seen.append(logits.clone())
        return TopKSelector(2)(logits, layer)

    hidden = torch.randn(16, model.config.hidden_size)
    with torch.no_grad(), route(model, selector):
        model(**inputs)
        original = block.gate.weight.detach().clone()
        block.gate.weight.mul_(2.0)  # in place: bumps the version counter
        block(hidden.reshape(2, 8, -1))
        expected = router_logits(block, hidden)
        block.gate.weight.copy_(original)
    torch.testing.assert_close(seen[-1], expected)
    # grad flows to the router weight when autograd is on (no detached cache then)
    block.gate.weight.grad = None
    with route(model, TopKSelector(2, weights="renorm")):
        model(**inputs).logits.float().sum().backward()
    assert block.gate.weight.grad is not None and torch.isfinite(block.gate.weight.grad).all()
    block.gate.weight.grad = None
