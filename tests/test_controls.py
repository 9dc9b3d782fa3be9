"""Compute-matched controls, choosing alpha by compute, paired bootstrap intervals and the verdict."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from bh_helpers.experiments.bootstrap import paired_bootstrap
from bh_helpers.routing.patch import route
from bh_helpers.selection.budget import alpha_for_mean_k
from bh_helpers.selection.controls import MixedTopKSelector, ShuffledSelector
from bh_helpers.selection.reference import fdr_counts, select_experts, select_top_counts
from bh_helpers.selection.selectors import BHSelector


@pytest.fixture(scope="module")
def bank():
    from bh_helpers.app.paths import default_null_bank_dir
    from bh_helpers.nulls.bank import NullBank

    return NullBank.load(default_null_bank_dir("tiny"))


@pytest.fixture(scope="module")
def eval_ids(tiny_model_and_tokenizer):
    from bh_helpers.models.texts import evaluation_texts

    _, tok = tiny_model_and_tokenizer
    text = " ".join(evaluation_texts("prose", tok, max_tokens=4096))
    ids = tok(text, return_tensors="pt").input_ids[:, :2048]
    return ids.reshape(8, 256)  # 8 windows of 256 tokens, no padding


# ----------------------------------------------------------------------------------------------
# select_top_counts: top-k with a per-token k
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("weights", ["renorm", "softmax", "uniform"])
def test_select_top_counts_equals_topk_row_by_row(weights):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(300, 16, generator=g)
    counts = torch.randint(0, 7, (300,), generator=g)
    got = select_top_counts(x, counts, max_k=6, weights=weights)
    for c in range(1, 7):
        rows = counts == c
        if c > 6 or not rows.any():
            continue
        ref = select_experts(x[rows], method="topk", k=c, max_k=6, weights=weights)
        assert torch.equal(got.indices[rows], ref.indices) and torch.equal(got.counts[rows], ref.counts)
        torch.testing.assert_close(got.weights[rows], ref.weights)
    empty = counts == 0
    assert (got.indices[empty] == -1).all() and (got.weights[empty] == 0).all()


@pytest.mark.fault("bad arguments", "clear error")
def test_select_top_counts_and_controls_bad_input():
    x = torch.randn(4, 8)
    with pytest.raises(ValueError, match="`counts` must be integers"):
        select_top_counts(x, torch.ones(4), max_k=2)
    with pytest.raises(ValueError, match="mean_k"):
        MixedTopKSelector(float("nan"))
    with pytest.raises(ValueError, match=r"mean_k\[3\]"):
        MixedTopKSelector({3: -1.0})
    with pytest.raises(ValueError, match="raise max_k"):
        MixedTopKSelector(5.5, max_k=4)
    with pytest.raises(ValueError, match="no entry for layer 2"):
        MixedTopKSelector({0: 2.0})(x, 2)
    with pytest.raises(ValueError, match="`inner` must be a selector"):
        ShuffledSelector(inner=3)


# ----------------------------------------------------------------------------------------------
# The controls in the model
# ----------------------------------------------------------------------------------------------


def test_mixed_control_realises_its_target_per_layer_on_evaluation_text(tiny_model_and_tokenizer, eval_ids, bank):
    model, _ = tiny_model_and_tokenizer
    with torch.no_grad(), route(model, BHSelector(bank, alpha=0.5, max_k=8, weights="softmax")) as rec:
        model(eval_ids)
    target = {layer: s["mean_k"] for layer, s in rec.summary()["per_layer"].items()}
    assert len(set(round(v, 2) for v in target.values())) > 1  # layers differ: a per-layer target matters
    with torch.no_grad(), route(model, MixedTopKSelector(target, seed=1, max_k=8, weights="softmax")) as mixed:
        model(eval_ids)
    got = {layer: s["mean_k"] for layer, s in mixed.summary()["per_layer"].items()}
    for layer in target:
        assert abs(got[layer] - target[layer]) < 0.02, (layer, got[layer], target[layer])
        hist = mixed.summary()["per_layer"][layer]
        assert hist["min_k"] >= math.floor(target[layer]) and hist["max_k"] <= math.ceil(target[layer])


def test_shuffled_control_keeps_the_per_layer_histogram_exactly(tiny_model_and_tokenizer, eval_ids, bank):
    model, _ = tiny_model_and_tokenizer
    inner = BHSelector(bank, alpha=0.5, max_k=8, weights="softmax")
    with torch.no_grad(), route(model, ShuffledSelector(inner, seed=3, weights="softmax")) as rec:
        model(eval_ids)
    # Layer by layer, the counts the inner selector would give on the inputs the shuffled run saw.
    seen: dict[int, torch.Tensor] = {}
    from bh_helpers.models.families import find_moe_blocks, router_logits

    handles = [b.module.register_forward_pre_hook(
        lambda mod, args, layer=b.layer: seen.__setitem__(layer, router_logits(mod, args[0].reshape(-1, args[0].shape[-1]))))
        for b in find_moe_blocks(model)]
    try:
        with torch.no_grad(), route(model, ShuffledSelector(inner, seed=3, weights="softmax")) as again:
            model(eval_ids)
    finally:
        for h in handles:
            h.remove()
    shuffled = again.per_token_counts().matrix()  # (N, L)
    assert torch.equal(shuffled, rec.per_token_counts().matrix())  # seeded: reproducible
    for column, layer in enumerate(sorted(seen)):
        own = inner(seen[layer], layer).counts
        assert torch.equal(torch.bincount(shuffled[:, column].long(), minlength=9), torch.bincount(own, minlength=9))
        assert not torch.equal(shuffled[:, column].long(), own)  # the allocation did move


# ----------------------------------------------------------------------------------------------
# The mixed control holds its mean however the tokens are split into calls (issue 25, class 8)
# ----------------------------------------------------------------------------------------------


def _realised(selector, sizes, layer=0, experts=16, seed=0):
    """Counts of ``selector`` over calls of ``sizes`` tokens (random logits), concatenated ``(N,)``."""
    g = torch.Generator().manual_seed(seed)
    return torch.cat([selector(torch.randn(n, experts, generator=g), layer).counts.reshape(-1) for n in sizes])


@pytest.mark.fault("controls: realised compute", "recovered")
def test_mixed_control_holds_its_mean_over_one_token_calls():
    """200 one-token decode calls at 2.5 gave mean k 2.0 (each call rounded 0.5 x 1 token to 0)."""
    counts = _realised(MixedTopKSelector(2.5), [1] * 200)
    assert abs(float(counts.double().mean()) - 2.5) <= 0.01
    assert set(counts.tolist()) == {2, 3}


@pytest.mark.fault("controls: realised compute", "recovered")
@pytest.mark.parametrize("mean_k", [2.5, 1.3, 3.9, 0.2])
def test_mixed_control_holds_its_mean_over_calls_of_mixed_sizes(mean_k):
    """After every call, the ceilings given so far are round(frac * tokens so far): the running mean
    is within half a token of the target, whatever the call sizes."""
    sizes = [1, 3, 1, 1, 17, 2, 1, 64, 5, 1, 1, 9, 1, 2, 33] * 4
    selector = MixedTopKSelector(mean_k, max_k=5)
    counts = _realised(selector, sizes)
    low, frac = math.floor(mean_k), mean_k - math.floor(mean_k)
    ends = np.cumsum(sizes)
    running = np.cumsum((counts - low).numpy())[ends - 1]  # ceilings after each call
    assert np.abs(running - frac * ends).max() <= 0.5 + 1e-9  # error diffusion from one half: rounding
    assert abs(float(counts.double().mean()) - mean_k) <= 0.5 / ends[-1] + 1e-12
    assert set(counts.tolist()) <= {low, math.ceil(mean_k)}


@pytest.mark.fault("controls: realised compute", "recovered")
def test_mixed_control_keeps_one_remainder_per_layer():
    """Interleaved one-token calls of three layers with different targets: each layer's mean holds."""
    target = {0: 2.5, 1: 1.25, 2: 3.9}
    selector = MixedTopKSelector(target, max_k=4)
    g = torch.Generator().manual_seed(1)
    got: dict[int, list[int]] = {layer: [] for layer in target}
    for _ in range(200):
        for layer in target:
            got[layer].append(int(selector(torch.randn(1, 16, generator=g), layer).counts))
    for layer, m in target.items():
        assert abs(np.mean(got[layer]) - m) <= 0.01, (layer, np.mean(got[layer]), m)


@pytest.mark.fault("controls: realised compute", "recovered")
def test_mixed_control_draws_over_real_tokens_only():
    """Padding rows (``valid`` False) get the floor and take no ceiling from the real tokens."""
    selector = MixedTopKSelector(2.5)
    g = torch.Generator().manual_seed(2)
    real = []
    for n in (4, 1, 7, 1, 1, 3) * 10:
        valid = torch.ones(n + 3, dtype=torch.bool)
        valid[:3] = False  # three left-padding rows per call
        counts = selector(torch.randn(n + 3, 16, generator=g), 0, valid=valid).counts
        assert (counts[:3] == 2).all()
        real.append(counts[3:])
    real = torch.cat(real)
    assert abs(float(real.double().mean()) - 2.5) <= 0.5 / real.numel()


def test_mixed_control_is_reproducible_and_reset_starts_again():
    sizes = [1, 5, 1, 2, 9, 1]
    a, b = MixedTopKSelector(2.5, seed=4), MixedTopKSelector(2.5, seed=4)
    first = _realised(a, sizes)
    assert torch.equal(first, _realised(b, sizes))  # same seed, same calls: same choices
    assert not torch.equal(first, _realised(a, sizes))  # the state moved on
    a.reset()
    assert torch.equal(first, _realised(a, sizes))
    other = torch.stack([_realised(MixedTopKSelector(2.5, seed=s), [64]) for s in range(4)])
    assert len({tuple(row.tolist()) for row in other}) > 1  # the seed chooses which tokens get the ceiling


@pytest.mark.fault("controls: realised compute", "recovered")
def test_mixed_control_realises_its_target_under_generate(tiny_model_and_tokenizer):
    """Under ``generate`` (a padded prefill, then one-token decode steps per row) the realised mean
    k of every layer, over real tokens, is within half a token of the target (it was 2.045 at 2.5)."""
    model, tok = tiny_model_and_tokenizer
    tok.padding_side = "left"
    try:
        batch = tok(["a short prompt", "a much longer prompt with quite a few more tokens in it"],
                    return_tensors="pt", padding=True)
    finally:
        tok.padding_side = "right"
    assert (batch["attention_mask"] == 0).any()  # the first row is padded
    with torch.no_grad(), route(model, MixedTopKSelector(2.5, seed=0)) as rec:
        model.generate(**batch, max_new_tokens=40, min_new_tokens=40, do_sample=False,
                       pad_token_id=tok.pad_token_id)
    summary = rec.summary()
    tokens = summary["tokens"]
    assert tokens == int(batch["attention_mask"].sum()) + 2 * 39  # real tokens only (the last step is not run)
    for layer, stats in summary["per_layer"].items():
        assert abs(stats["mean_k"] - 2.5) <= 0.5 / tokens + 1e-12, (layer, stats["mean_k"])


@pytest.mark.fault("controls: realised compute", "recovered")
def test_shuffled_control_permutes_real_tokens_only():
    """Padding rows keep their own counts; the real tokens' histogram is the inner selector's."""
    inner = MixedTopKSelector(2.5, seed=9)
    selector = ShuffledSelector(inner, seed=1)
    x = torch.randn(12, 16, generator=torch.Generator().manual_seed(3))
    valid = torch.tensor([False, False, False] + [True] * 9)
    inner.reset()
    own = inner(x, 0, valid=valid).counts  # (12,) what the inner selector gives (padding at the floor)
    inner.reset()
    got = selector(x, 0, valid=valid).counts
    assert torch.equal(got[:3], own[:3])
    assert torch.equal(got[3:].sort().values, own[3:].sort().values)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_mixed_and_shuffled_controls_do_not_synchronise_on_gpu():
    """The draws keep their state on the device: no host synchronisation per call."""
    x = torch.randn(5, 64, device="cuda")
    valid = torch.tensor([False, True, True, True, True], device="cuda")
    mixed, shuffled = MixedTopKSelector(2.5), ShuffledSelector(MixedTopKSelector(2.5, seed=1))
    mixed(x, 0, valid=valid), shuffled(x, 0, valid=valid)  # first calls make the generators and remainders
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for _ in range(3):
            mixed(x, 0, valid=valid), shuffled(x, 0, valid=valid)
    finally:
        torch.cuda.set_sync_debug_mode(0)
    counts = _realised(MixedTopKSelector(2.5), [1] * 200)
    assert abs(float(counts.double().mean()) - 2.5) <= 0.01


# ----------------------------------------------------------------------------------------------
# alpha_for_mean_k
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("method,target,min_k", [("bh", 2.0, 1), ("bh", 4.5, 2), ("by", 3.0, 1), ("holm", 1.5, 1)])
def test_alpha_for_mean_k_hits_its_target(bank, method, target, min_k):
    from bh_helpers.capture import CapturedLogits  # noqa: F401  (the type the demo passes)

    g = torch.Generator().manual_seed(5)
    logits = {layer: torch.randn(3000, 64, generator=g) * 1.6 for layer in bank}
    alpha = alpha_for_mean_k(bank, logits, target, method=method, min_k=min_k, max_k=8)
    counts = [fdr_counts(bank.pvalues(x, layer), alpha, method).clamp(min_k, 8) for layer, x in logits.items()]
    mean_k = float(torch.cat(counts).double().mean())
    assert abs(mean_k - target) < 0.05, (alpha, mean_k)
    per_layer = alpha_for_mean_k(bank, logits, target, method=method, min_k=min_k, max_k=8, per_layer=True)
    for layer, a in per_layer.items():
        k = float(fdr_counts(bank.pvalues(logits[layer], layer), a, method).clamp(min_k, 8).double().mean())
        assert abs(k - target) < 0.05


@pytest.mark.fault("bad arguments", "clear error")
def test_alpha_for_mean_k_refuses_unreachable_targets(bank):
    logits = {layer: torch.randn(200, 64) for layer in bank}
    with pytest.raises(ValueError, match="out of reach.*`min_k` 2"):
        alpha_for_mean_k(bank, logits, 1.5, min_k=2)
    with pytest.raises(ValueError, match="out of reach"):
        alpha_for_mean_k(bank, logits, 9.0)
    with pytest.raises(ValueError, match="target_mean_k"):
        alpha_for_mean_k(bank, logits, "2")


# ----------------------------------------------------------------------------------------------
# Paired bootstrap
# ----------------------------------------------------------------------------------------------


def test_paired_bootstrap_equals_a_direct_resampling_loop():
    rng = np.random.default_rng(0)
    tokens = rng.integers(100, 256, 40)
    nll_b = tokens * rng.normal(3.0, 0.3, 40)
    nll_a = nll_b + tokens * rng.normal(-0.02, 0.05, 40)
    got = paired_bootstrap(nll_a, tokens, nll_b, tokens, resamples=500, seed=7)
    # oracle: the same draws, one resample at a time in plain Python
    draws = np.random.default_rng(7).integers(0, 40, size=(500, 40))
    diffs = []
    for idx in draws:
        t = sum(tokens[i] for i in idx)
        diffs.append(math.exp(sum(nll_a[i] for i in idx) / t) - math.exp(sum(nll_b[i] for i in idx) / t))
    low, high = np.quantile(diffs, [0.025, 0.975])
    assert got.low == pytest.approx(low, rel=1e-12) and got.high == pytest.approx(high, rel=1e-12)
    assert got.delta == pytest.approx(math.exp(nll_a.sum() / tokens.sum()) - math.exp(nll_b.sum() / tokens.sum()))
    assert got.low < got.delta < got.high
    same = paired_bootstrap(nll_b, tokens, nll_b, tokens)
    assert same.delta == same.low == same.high == 0.0 and not same.excludes_zero


@pytest.mark.fault("bad arguments", "clear error")
def test_paired_bootstrap_refuses_unpaired_arms():
    with pytest.raises(ValueError, match="same windows"):
        paired_bootstrap([1.0, 2.0], [10, 10], [1.0, 2.0], [10, 11])
    with pytest.raises(ValueError, match="equal-length"):
        paired_bootstrap([1.0], [10, 10], [1.0], [10])
    with pytest.raises(ValueError, match="level"):
        paired_bootstrap([1.0], [10], [1.0], [10], level=95)


# ----------------------------------------------------------------------------------------------
# Comparison and verdict, from hand-built results
# ----------------------------------------------------------------------------------------------


def _rows(adaptive_nll: float, mixed_nll: float, shuffled_nll: float):
    """A results frame of one BH row and its two controls on 30 windows of 100 tokens."""
    import json

    import pandas as pd

    from bh_helpers.experiments.sweep import SweepConfig, with_controls

    rng = np.random.default_rng(1)
    noise = rng.normal(0, 0.02, 30)
    configs = with_controls([SweepConfig("bh", alpha=0.5, max_k=8, min_k=1, kernel="gaussian")])
    records = []
    for config, nll in zip(configs, (adaptive_nll, mixed_nll, shuffled_nll)):
        rec = {"key": config.key(), "dataset": "prose", "label": config.label(), **config.to_dict(),
               "mean_experts_per_token": 3.0, "perplexity": math.exp(nll + noise.mean()),
               "window_nll": list((nll + noise) * 100), "window_tokens": [100] * 30}
        records.append(rec)
    assert json.loads(configs[1].control_of)["alpha"] == 0.5
    return pd.DataFrame.from_records(records)


def test_verdict_says_yes_only_with_an_interval_below_zero():
    from bh_helpers.experiments.comparison import compare_with_controls
    from bh_helpers.report.verdict import verdict_markdown

    better = compare_with_controls(_rows(3.00, 3.05, 3.04))
    assert better["ci_high"].iloc[0] < 0 and better["shuffled_ci_high"].iloc[0] < 0
    text = verdict_markdown(better)
    assert "? Yes, in some configurations**" in text and "1 had lower perplexity" in text
    assert "bh a=0.5 k=1..8 gaussian on prose at mean k 3.00" in text
    worse = verdict_markdown(compare_with_controls(_rows(3.05, 3.00, 3.05)))
    assert "? No**" in worse and "0 had lower perplexity" in worse and "1 had higher perplexity" in worse
    tie = compare_with_controls(_rows(3.00, 3.00, 3.00))
    assert tie["delta_vs_mixed"].iloc[0] == 0.0 and "1 were undecided" in verdict_markdown(tie)
    # 1 win among 41 pairs is what chance gives (41 x 2.5% ~ 1): not a "yes"
    import pandas as pd
    from scipy.stats import binom

    many = pd.concat([better] + [compare_with_controls(_rows(3.0, 3.0, 3.0))] * 40, ignore_index=True)
    many.attrs.update(better.attrs)
    assert "? Not clearly (no more wins than chance would plausibly give)**" in verdict_markdown(many)
    assert f"1 or more with probability {binom.sf(0, 41, 0.025):.2g}" in verdict_markdown(many)
    # 3 wins among 41 (p = 0.08) are still not a "yes"; 4 (p = 0.02) are
    for wins, answer in ((3, "Not clearly"), (4, "Yes, in some configurations")):
        mixed = pd.concat([better] * wins + [compare_with_controls(_rows(3.0, 3.0, 3.0))] * (41 - wins),
                          ignore_index=True)
        mixed.attrs.update(better.attrs)
        assert f"? {answer}" in verdict_markdown(mixed), wins
