"""Tests of bh_helpers.capture: rows, values, alignment of the subsample, and hook hygiene."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import bh_helpers
from bh_helpers.capture import CapturedLogits, _Reservoir, capture_router_logits, forward_inputs
from bh_helpers.models.families import find_moe_blocks

EMBEDDED = Path(bh_helpers.__file__).parent / "data" / "tiny_olmoe" / "model.safetensors"


@pytest.fixture(scope="module")
def model() -> nn.Module:
    """The embedded tiny OLMoE when present, else a random tiny OLMoE with spread-out routers."""
    if EMBEDDED.exists():
        from bh_helpers.models.loading import load_model

        m, _ = load_model("tiny")
        return m.float().eval()
    from transformers import OlmoeConfig, OlmoeForCausalLM

    torch.manual_seed(0)
    config = OlmoeConfig(vocab_size=128, hidden_size=32, intermediate_size=16, num_hidden_layers=3,
                         num_attention_heads=2, num_key_value_heads=2, num_experts=16, num_experts_per_tok=4,
                         norm_topk_prob=False, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    m = OlmoeForCausalLM(config).eval()
    with torch.no_grad():
        for b in find_moe_blocks(m):
            b.module.gate.weight.normal_(0.0, 3.0 / math.sqrt(32))
    return m


def make_batches(model: nn.Module, n: int = 3, rows: int = 3, length: int = 10) -> list[dict]:
    """Left-padded random batches (row r has 2r padding tokens)."""
    out = []
    for s in range(n):
        g = torch.Generator().manual_seed(100 + s)
        ids = torch.randint(3, model.config.vocab_size, (rows, length), generator=g)
        mask = torch.ones(rows, length, dtype=torch.long)
        for r in range(1, rows):
            mask[r, : 2 * r] = 0
        out.append({"input_ids": ids.masked_fill(mask == 0, 0), "attention_mask": mask})
    return out


def hook_ids(model: nn.Module) -> dict[str, tuple]:
    """Hook handles per module. transformers 5.23 installs its own output-capturing forward hooks
    the first time a model records outputs (e.g. ``output_hidden_states=True``), so "no hooks" is not
    the invariant: "the same hooks as before" is."""
    return {n: (tuple(m._forward_pre_hooks), tuple(m._forward_hooks)) for n, m in model.named_modules()}


def test_rows_are_non_padding_tokens_with_aligned_metadata(model):
    batches = make_batches(model)
    captured = capture_router_logits(model, batches, progress=False)
    valid = [b["attention_mask"].bool() for b in batches]
    expected_ids = torch.cat([b["input_ids"][v] for b, v in zip(batches, valid)])
    assert torch.equal(captured.token_ids, expected_ids)
    assert captured.num_tokens == captured.total_tokens == int(sum(v.sum() for v in valid))
    # Positions restart at 0 at the first real token of each (left-padded) sequence.
    expected_pos = torch.cat([(v.long().cumsum(-1) - 1)[v] for v in valid])
    assert torch.equal(captured.positions, expected_pos)
    assert captured.sequence_index.unique().numel() == sum(len(v) for v in valid)
    num_experts = model.config.num_experts
    assert captured.layers == [b.layer for b in find_moe_blocks(model)]
    for layer, logits in captured.items():
        assert logits.dtype == torch.float32 and logits.device.type == "cpu"
        assert logits.shape == (captured.num_tokens, num_experts)
    assert isinstance(captured, CapturedLogits) and len(captured) == len(captured.layers)
    assert "tokens=" in repr(captured)


def test_logits_equal_linear_of_the_moe_input_not_hidden_states(model):
    batch = make_batches(model, n=1)[0]
    captured = capture_router_logits(model, [batch], progress=False)
    blocks = find_moe_blocks(model)
    moe_inputs: dict[int, torch.Tensor] = {}
    layers = model.model.layers
    handles = [
        layers[b.layer].post_attention_layernorm.register_forward_hook(
            lambda mod, args, out, layer=b.layer: moe_inputs.__setitem__(layer, out)
        )
        for b in blocks
    ]
    try:
        with torch.no_grad():
            out = model(**batch, output_hidden_states=True)
    finally:
        for h in handles:
            h.remove()
    valid = batch["attention_mask"].bool().reshape(-1)
    for b in blocks:
        h = moe_inputs[b.layer].reshape(-1, model.config.hidden_size)[valid]  # (N, H)
        expected = F.linear(h.float(), b.module.gate.weight.float())  # (N, E)
        torch.testing.assert_close(captured[b.layer], expected, rtol=0, atol=1e-6)
        # output_hidden_states is the residual stream, not the router input.
        residual = out.hidden_states[b.layer].reshape(-1, model.config.hidden_size)[valid]
        assert not torch.allclose(captured[b.layer], F.linear(residual.float(), b.module.gate.weight.float()))


def test_subsample_is_capped_uniform_and_aligned_across_layers(model):
    batches = make_batches(model, n=4)
    full = capture_router_logits(model, batches, progress=False)
    cap = 17
    sub = capture_router_logits(model, batches, max_tokens_per_layer=cap, seed=3, progress=False)
    again = capture_router_logits(model, batches, max_tokens_per_layer=cap, seed=3, progress=False)
    other = capture_router_logits(model, batches, max_tokens_per_layer=cap, seed=4, progress=False)
    assert sub.num_tokens == cap and sub.total_tokens == full.num_tokens
    assert torch.equal(sub.token_ids, again.token_ids) and torch.equal(sub[0], again[0])
    assert not torch.equal(sub[0], other[0])
    # Find each kept row in the full capture by its layer-0 logits ...
    first = sub.layers[0]
    match = (sub[first][:, None, :] == full[first][None, :, :]).all(-1)  # (cap, N)
    assert bool((match.sum(1) == 1).all())
    rows = match.float().argmax(1)  # (cap,)
    assert bool((rows.diff() > 0).all())  # stream order
    # ... and every other layer and the metadata must be that same token.
    for layer in sub.layers:
        assert torch.equal(sub[layer], full[layer][rows])
    assert torch.equal(sub.token_ids, full.token_ids[rows])
    assert torch.equal(sub.positions, full.positions[rows])
    assert torch.equal(sub.sequence_index, full.sequence_index[rows])


def test_reservoir_keeps_a_uniform_aligned_subset_over_many_pruning_rounds():
    # The reservoir alone (no model): 40 calls of 6 tokens, cap 5, so it prunes about every other call.
    n_calls, rows, cap, trials = 40, 6, 5, 400
    n_total = n_calls * rows
    hits = torch.zeros(n_total)
    for seed in range(trials):
        reservoir = _Reservoir([0, 1], cap, seed)
        for call in range(n_calls):
            ids = torch.arange(call * rows, (call + 1) * rows)  # token id = stream position
            reservoir.start_call(forward_inputs(call, (ids[None, :],), {}))
            reservoir.add(0, ids[:, None].float())  # layer 0 row = its token id
            reservoir.add(1, -ids[:, None].float())  # layer 1 row = minus its token id
            reservoir.end_call()
        out = reservoir.result()
        assert torch.equal(out[0][:, 0].long(), out.token_ids) and torch.equal(out[1][:, 0].long(), -out.token_ids)
        assert bool((out.token_ids.diff() > 0).all())  # stream order
        hits[out.token_ids] += 1
    # Each token is kept with probability cap / n_total; the first and last quarters alike.
    expected = trials * cap / n_total
    quarter = n_total // 4
    assert hits.sum() == trials * cap
    for part in (hits[:quarter], hits[-quarter:]):
        assert abs(float(part.mean()) - expected) < 0.25 * expected


@pytest.mark.fault("bad arguments", "clear error")
def test_layers_argument_and_validation(model):
    batches = make_batches(model, n=1)
    assert capture_router_logits(model, batches, layers=1, progress=False).layers == [1]
    assert capture_router_logits(model, batches, layers=lambda l: l != 1, progress=False).layers == [
        b.layer for b in find_moe_blocks(model) if b.layer != 1
    ]
    before = hook_ids(model)
    with pytest.raises(ValueError, match="max_tokens_per_layer"):
        capture_router_logits(model, batches, max_tokens_per_layer=0, progress=False)
    with pytest.raises(ValueError, match="not MoE layers"):
        capture_router_logits(model, batches, layers=[99], progress=False)
    assert hook_ids(model) == before


@pytest.mark.fault("interrupted and resumed runs", "recovered")
def test_hooks_are_removed_after_an_exception(model):
    good = make_batches(model, n=1)[0]
    before = hook_ids(model)
    with pytest.raises(ValueError, match="input_ids"):
        capture_router_logits(model, [good, {"attention_mask": good["attention_mask"]}], progress=False)
    assert hook_ids(model) == before
    bad_ids = {"input_ids": torch.full((1, 4), model.config.vocab_size + 10)}  # out of vocabulary
    with pytest.raises((IndexError, RuntimeError)):
        capture_router_logits(model, [good, bad_ids], progress=False)
    assert hook_ids(model) == before

    def exploding():
        yield good
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        capture_router_logits(model, exploding(), progress=False)
    assert hook_ids(model) == before


def test_capture_feeds_fit_null_bank(model):
    nulls = pytest.importorskip("bh_helpers.nulls")
    if not hasattr(nulls, "fit_null_bank"):
        pytest.skip("bh_helpers.nulls.fit.fit_null_bank not available yet")
    captured = capture_router_logits(model, make_batches(model), progress=False)
    bank = nulls.fit_null_bank(captured.logits)
    for layer in captured:
        p = bank.pvalues(captured[layer], layer)
        assert p.shape == captured[layer].shape and bool(((p >= 0) & (p <= 1)).all())


def test_the_router_fingerprint_travels_capture_save_load_fit(model, tmp_path):
    """The model's fingerprint rides on the capture into every bank fitted from it, in memory or
    through a file, so that ``route`` can check the bank (a bank without one routed any model)."""
    from bh_helpers.models.families import router_fingerprint
    from bh_helpers.nulls.fit import fit_captured, fit_null_bank

    captured = capture_router_logits(model, make_batches(model), progress=False)
    assert captured.router_fingerprint == router_fingerprint(model) != {}
    captured.save(tmp_path / "c.safetensors")
    loaded, header = CapturedLogits.load(tmp_path / "c.safetensors")
    assert loaded.router_fingerprint == captured.router_fingerprint and "router_fingerprint" in header
    assert fit_null_bank(loaded).metadata.router_fingerprint == captured.router_fingerprint
    assert fit_captured(tmp_path / "c.safetensors").metadata.router_fingerprint == captured.router_fingerprint
    assert fit_null_bank(dict(captured.logits)).metadata.router_fingerprint is None  # a plain dict has none


@pytest.mark.fault("damaged files", "clear error")
def test_a_capture_holding_a_logit_beyond_float16_is_refused_naming_the_file(model, tmp_path):
    """Saved with a valid checksum (through the API), a capture with one 3e38 logit reached the fit, whose
    message named a Python argument (`logits`) on the command line: the file itself is refused, by name."""
    captured = capture_router_logits(model, make_batches(model), progress=False)
    captured.logits[1][3, 5] = 3e38
    path = captured.save(tmp_path / "huge.safetensors")
    with pytest.raises(ValueError, match=r"huge.safetensors' holds router logits beyond \+-65504 \(layer 1: 1\)"):
        CapturedLogits.load(path)
