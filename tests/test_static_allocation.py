"""The strongest static control: StaticLayerSelector, the fitted allocation path, the static chord,
the document-level bootstrap and the tune/confirm split, against brute force on the embedded model."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from bh_helpers.evaluation.scoring import PerplexityResult, perplexity
from bh_helpers.experiments.bootstrap import paired_bootstrap
from bh_helpers.experiments.static_allocation import (
    StaticAllocationPath,
    fit_static_allocation,
    mix_windows,
    static_allocation_path,
)
from bh_helpers.routing.patch import route
from bh_helpers.selection.selectors import NativeSelector, TopKSelector
from bh_helpers.selection.static import StaticLayerSelector

TEXTS = ["The river ran past the old mill and into the town.", "def add(a, b):\n    return a + b\n"] * 3


def _ppl(model, tok, selector, texts=TEXTS):
    with route(model, selector) as rec:
        result = perplexity(model, tok, texts, window=32, stride=32, batch_size=4, progress=False)
    return result, rec.summary()


def test_static_layer_selector_runs_its_k_in_every_layer(tiny_model_and_tokenizer):
    model, tok = tiny_model_and_tokenizer
    ks = (3, 2, 2, 1, 4, 8)
    result, summary = _ppl(model, tok, StaticLayerSelector(ks, weights="softmax"))
    assert [summary["per_layer"][layer]["mean_k"] for layer in range(6)] == [float(k) for k in ks]
    assert summary["mean_k"] == pytest.approx(sum(ks) / 6)
    # uniform ks are top-k: the same perplexity, window by window
    uniform, _ = _ppl(model, tok, StaticLayerSelector((4,) * 6, weights="softmax"))
    topk, _ = _ppl(model, tok, TopKSelector(4, weights="softmax"))
    assert uniform.window_nll == topk.window_nll
    native, _ = _ppl(model, tok, NativeSelector.for_model(model))
    all8, _ = _ppl(model, tok, StaticLayerSelector({layer: 8 for layer in range(6)}, weights="softmax"))
    assert all8.window_nll == pytest.approx(native.window_nll, rel=1e-6)


def test_static_layer_selector_refuses_bad_ks(tiny_model_and_tokenizer):
    model, _ = tiny_model_and_tokenizer
    with pytest.raises(ValueError, match=r"ks\[1\]"):
        StaticLayerSelector((2, 0, 2))
    with pytest.raises(ValueError, match="`ks` is empty"):
        StaticLayerSelector(())
    with pytest.raises(ValueError, match="`ks` must be a sequence"):
        StaticLayerSelector("3,2")
    with pytest.raises(ValueError, match=r"no k for MoE layers \[3, 4, 5\]"):
        with route(model, StaticLayerSelector((2, 2, 2))):
            pass
    with pytest.raises(ValueError, match="more experts than the 64"):
        with route(model, StaticLayerSelector((65, 2, 2, 2, 2, 2))):
            pass
    assert StaticLayerSelector((2, 2, 2)).mean_k == 2.0


@pytest.fixture(scope="module")
def short_path(tiny_model_and_tokenizer):
    model, tok = tiny_model_and_tokenizer
    return static_allocation_path(model, tok, texts=TEXTS, max_k=3, window=32, batch_size=4)


def _nll(model, tok, ks):
    result, _ = _ppl(model, tok, StaticLayerSelector(ks, weights="softmax"))
    return result.nll


def test_greedy_path_against_brute_force(tiny_model_and_tokenizer, short_path):
    model, tok = tiny_model_and_tokenizer
    path = short_path
    assert sorted(path.allocations) == list(range(6, 19)) and path.layers == tuple(range(6))
    assert all(sum(ks) == total and max(ks) <= 3 and min(ks) >= 1 for total, ks in path.allocations.items())
    # the first greedy step: the single increment with the lowest calibration NLL, scored independently
    options = [tuple(2 if i == j else 1 for i in range(6)) for j in range(6)]
    scores = [_nll(model, tok, ks) for ks in options]
    assert path.allocations[7] == options[int(np.argmin(scores))]
    assert path.nll[7] == pytest.approx(min(scores), rel=1e-9)
    # never worse than uniform top-k on its own calibration text
    for k in (2, 3):
        assert path.nll[6 * k] <= _nll(model, tok, (k,) * 6) + 1e-12
    # the path states it: both NLLs at each k strictly between the floor and the ceiling, measured
    assert list(path.versus_uniform) == [2]
    static, uniform = path.versus_uniform[2]
    assert static == pytest.approx(_nll(model, tok, path.allocations[12]), rel=1e-9)
    assert uniform == pytest.approx(_nll(model, tok, (2,) * 6), rel=1e-9)
    assert static <= uniform


def test_chord_and_allocation(short_path):
    path = short_path
    assert path.chord(2.0) == [(path.allocations[12], 1.0)]
    (low, p_low), (high, p_high) = path.chord(13.5 / 6)
    assert (sum(low), sum(high)) == (13, 14) and p_low == pytest.approx(0.5) and p_high == pytest.approx(0.5)
    assert sum(p * sum(ks) for ks, p in path.chord(2.3)) / 6 == pytest.approx(2.3)  # compute matched exactly
    assert path.allocation(2.0) == path.allocations[12]
    with pytest.raises(ValueError, match=r"needs 13\.5 experts over 6 layers.*static chord"):
        path.allocation(2.25)
    with pytest.raises(ValueError, match="`mean_k`=3.5 is outside"):
        path.chord(3.5)
    again = StaticAllocationPath.from_dict(path.to_dict())
    assert again == path


def test_path_saves_and_loads(short_path, tmp_path):
    short_path.save(tmp_path / "static.json")
    assert StaticAllocationPath.load(tmp_path / "static.json") == short_path
    (tmp_path / "bad.json").write_text("{")
    with pytest.raises(ValueError, match="not valid JSON"):
        StaticAllocationPath.load(tmp_path / "bad.json")
    with pytest.raises(ValueError, match="not a static allocation path"):
        StaticAllocationPath.from_dict({})


@pytest.mark.fault("damaged files", "clear error")
def test_an_edited_or_inconsistent_allocation_is_refused(short_path, tmp_path):
    """A demo folder's static_allocation.json edited by hand ran the static controls at another compute than
    their label, without a word: the file carries a checksum now, and no allocation whose k's do not add up
    to its total (or that routes a layer to 0 experts) can be built at all."""
    path = short_path.save(tmp_path / "static.json")
    data = json.loads(path.read_text())
    total = max(short_path.allocations)
    data["allocations"][str(total)][0] -= 1  # one expert fewer in layer 0, under the same label
    path.write_text(json.dumps(data))
    with pytest.raises(ValueError, match=r"does not match its checksum \(an allocation or a field was edited.*"
                                         r"delete it to refit"):
        StaticAllocationPath.load(path)
    del data["allocation_sha256"]
    path.write_text(json.dumps(data))
    with pytest.raises(ValueError, match="has no checksum.*delete it to refit"):
        StaticAllocationPath.load(path)
    with pytest.raises(ValueError, match=f"the allocation of {total} experts is .*add up to {total}"):
        StaticAllocationPath.from_dict(data)
    zero = {**short_path.to_dict(), "allocations": {"6": [0, 1, 1, 1, 1, 2]}, "nll": {"6": 1.0}}
    with pytest.raises(ValueError, match="at least 1 expert"):
        StaticAllocationPath.from_dict(zero)
    with pytest.raises(ValueError, match="`layers` must be distinct"):
        StaticAllocationPath.from_dict({**short_path.to_dict(), "layers": [0, 0, 1, 2, 3, 4]})


def test_fit_static_allocation_refuses_targets_before_any_run(tiny_model_and_tokenizer):
    model, tok = tiny_model_and_tokenizer
    for bad in (0.5, 9, float("nan"), True):
        with pytest.raises(ValueError, match="`target_mean_k` must be a number in"):
            fit_static_allocation(model, tok, bad)
    with pytest.raises(ValueError, match=r"needs 13\.2 experts over 6 layers"):
        fit_static_allocation(model, tok, 2.2)
    ks = fit_static_allocation(model, tok, 1.5, texts=TEXTS, max_k=3, window=32, batch_size=4)
    assert len(ks) == 6 and sum(ks) == 9


def test_separable_proxy_path(tiny_model_and_tokenizer):
    model, tok = tiny_model_and_tokenizer
    path = static_allocation_path(model, tok, texts=TEXTS, max_k=2, method="separable", window=32, batch_size=4)
    assert path.method == "separable" and sorted(path.allocations) == list(range(6, 13))
    # the proxy's first step gives the extra expert to the layer whose drop to k=1 costs most
    full = _nll(model, tok, (2,) * 6)
    rise = [_nll(model, tok, tuple(1 if i == j else 2 for i in range(6))) - full for j in range(6)]
    assert path.allocations[7] == tuple(2 if i == int(np.argmax(rise)) else 1 for i in range(6))
    # against uniform top-k the proxy path reports measured NLLs, not its proxy cost
    wide = static_allocation_path(model, tok, texts=TEXTS, max_k=3, method="separable", window=32, batch_size=4)
    static, uniform = wide.versus_uniform[2]
    assert static == pytest.approx(_nll(model, tok, wide.allocations[12]), rel=1e-9)
    assert uniform == pytest.approx(_nll(model, tok, (2,) * 6), rel=1e-9)


def test_static_versus_uniform_section(short_path):
    from bh_helpers.report.verdict import static_versus_uniform_markdown

    static, uniform = short_path.versus_uniform[2]
    text = static_versus_uniform_markdown(short_path)
    beats = int(static < uniform)
    assert f"lower perplexity at {beats} of 1 values of k strictly between 1 and 3" in text
    row = [line for line in text.splitlines() if line.startswith("| 2 |")]
    assert row == [f"| 2 | {' '.join(map(str, short_path.allocations[12]))} | {math.exp(static):.3f} | "
                   f"{math.exp(uniform):.3f} | {math.exp(static - uniform) - 1:+.2%} |"]
    old = StaticAllocationPath.from_dict({k: v for k, v in short_path.to_dict().items() if k != "versus_uniform"})
    assert "predates the comparison" in static_versus_uniform_markdown(old)  # an older file still loads


def test_mix_windows_is_the_probability_weighted_window_nll():
    a = PerplexityResult(perplexity=0, nll=0, n_tokens=10, window_nll=[4.0, 6.0], window_tokens=[4, 6],
                         window_docs=[0, 1])
    b = PerplexityResult(perplexity=0, nll=0, n_tokens=10, window_nll=[2.0, 3.0], window_tokens=[4, 6],
                         window_docs=[0, 1])
    mixed = mix_windows([(a, 0.25), (b, 0.75)])
    assert mixed.window_nll == [2.5, 3.75] and mixed.window_docs == [0, 1]
    assert mixed.perplexity == pytest.approx(math.exp(6.25 / 10))
    with pytest.raises(ValueError, match="sum to 1"):
        mix_windows([(a, 0.5), (b, 0.6)])
    c = PerplexityResult(perplexity=0, nll=0, n_tokens=10, window_nll=[1.0], window_tokens=[10])
    with pytest.raises(ValueError, match="different windows"):
        mix_windows([(a, 0.5), (c, 0.5)])


def test_document_bootstrap_against_brute_force():
    rng = np.random.default_rng(3)
    w = 12
    nll_a, nll_b = rng.uniform(1, 3, w), rng.uniform(1, 3, w)
    tok = rng.integers(5, 20, w).astype(float)
    docs = [0, 0, 0, 1, 1, 2, 2, 2, 2, 3, 4, 4]
    got = paired_bootstrap(nll_a, tok, nll_b, tok, clusters=docs, resamples=500, seed=7)
    # brute force: draw documents with the same generator, take all their windows
    draws = np.random.default_rng(7).integers(0, 5, size=(500, 5))
    groups = [np.flatnonzero(np.asarray(docs) == d) for d in range(5)]
    diffs = []
    for row in draws:
        idx = np.concatenate([groups[d] for d in row])
        t = tok[idx].sum()
        diffs.append(math.exp(nll_a[idx].sum() / t) - math.exp(nll_b[idx].sum() / t))
    low, high = np.quantile(diffs, [0.025, 0.975])
    assert (got.unit, got.units, got.windows) == ("document", 5, 12)
    assert got.low == pytest.approx(low, rel=1e-12) and got.high == pytest.approx(high, rel=1e-12)
    # one window per document is the window-level bootstrap
    by_window = paired_bootstrap(nll_a, tok, nll_b, tok, resamples=500, seed=7)
    own = paired_bootstrap(nll_a, tok, nll_b, tok, clusters=list(range(w)), resamples=500, seed=7)
    assert (own.low, own.high, own.delta) == (by_window.low, by_window.high, by_window.delta)
    with pytest.raises(ValueError, match="single document"):
        paired_bootstrap(nll_a, tok, nll_b, tok, clusters=[0] * w)
    with pytest.raises(ValueError, match="one document id per window"):
        paired_bootstrap(nll_a, tok, nll_b, tok, clusters=[0, 1])


def test_perplexity_records_the_document_of_each_window(tiny_model_and_tokenizer):
    from bh_helpers.models.texts import encode

    model, tok = tiny_model_and_tokenizer
    texts = ["one two three " * 20, "", "four five six " * 5, "seven eight " * 30]
    result = perplexity(model, tok, texts, window=16, stride=16, batch_size=4, progress=False)
    sizes = [len(encode(tok, t)) if t else 0 for t in texts]
    owner = []  # the document of every stream position (an EOS belongs to the document it ends)
    for i, n in enumerate(sizes):
        if n:
            owner += ([owner[-1]] if owner else []) + [i] * n
    first = [0] + list(range(16, len(owner), 16))  # window w scores positions first..end-1 (1 in the first)
    want = []
    for w, begin in enumerate(first):
        scored = owner[max(begin, 1): begin + 16]
        want.append(max(set(scored), key=lambda d: (scored.count(d), -d)))
    assert result.window_docs == want and set(want) == {0, 2, 3}


def test_dataset_halves_are_disjoint_and_cover_the_data_set():
    from bh_helpers.models.texts import _dataset_documents, split_name

    for name in ("prose", "code"):
        docs, _ = _dataset_documents(name)
        tune, desc = _dataset_documents(split_name(name, "tune"))
        confirm, _ = _dataset_documents(split_name(name, "confirm"))
        assert tune == docs[0::2] and confirm == docs[1::2] and "tune half" in desc
    with pytest.raises(ValueError, match="`split` must be one of"):
        split_name("prose", "test")


def test_pick_on_tuning_keeps_the_best_per_family_and_target():
    import pandas as pd

    from bh_helpers.experiments.configs import SweepConfig
    from bh_helpers.experiments.tune_confirm import family_of, pick_on_tuning

    same = dict(max_k=8, min_k=1, kernel="gaussian")
    configs = [SweepConfig("bh", alpha=0.1, **same), SweepConfig("bh", alpha=0.2, statistic="zscore", **same),
               SweepConfig("bh", alpha=0.5, **same),
               SweepConfig("bh", layer_alphas=(0.1, 0.2), budget="static", **same)]
    results = pd.DataFrame([{"key": c.key(), **c.to_dict()} for c in configs])
    # relative deltas: config 1 beats config 0 near k=2; config 2 alone near k=4; the budget family apart
    rows = [(0, "a", 2.1, -0.1), (0, "b", 1.9, +0.3), (1, "a", 2.0, -0.2), (1, "b", 2.2, +0.0),
            (2, "a", 4.1, +0.5), (2, "b", 3.9, +0.5), (3, "a", 2.0, +1.0), (3, "b", 2.0, +1.0)]
    comparison = pd.DataFrame([{"key": configs[i].key(), "dataset": d, "mean_k": k, "delta_vs_strongest": delta,
                                "strongest_perplexity": 10.0} for i, d, k, delta in rows])
    picks = pick_on_tuning(comparison, results, targets=(2.0, 4.0))
    assert picks == [configs[1], configs[2], configs[3]]
    assert family_of(configs[3]) == "bh, static budget" and family_of(configs[0]) == "bh, one alpha"
    with pytest.raises(ValueError, match="`targets` is empty"):
        pick_on_tuning(comparison, results, targets=())


def test_budget_alpha_at_the_floor_is_the_smallest_level(tiny_model_and_tokenizer):
    from bh_helpers.app.paths import default_null_bank_dir
    from bh_helpers.nulls.bank import NullBank
    from bh_helpers.selection.budget import ComputeBudget

    bank = NullBank.load(default_null_bank_dir("tiny"))
    g = torch.Generator().manual_seed(0)
    logits = {layer: torch.randn(256, 64, generator=g) for layer in bank}
    found = ComputeBudget(bank, logits).alpha({layer: (1 if layer % 2 else 3) for layer in bank})
    assert all(found[layer] == 1e-12 for layer in bank if layer % 2)
    assert all(found[layer] > 1e-12 for layer in bank if not layer % 2)


def test_static_sweep_configs_validate():
    from bh_helpers.experiments.configs import SweepConfig

    static = SweepConfig("static", ks=[3, 2, 1])
    assert static.ks == (3, 2, 1) and static.label() == "static 3/2/1"
    with pytest.raises(ValueError, match="`ks` must be integers >= 1"):
        SweepConfig("static", ks=(2, 0))
    with pytest.raises(ValueError, match="needs `ks`"):
        SweepConfig("static")
    with pytest.raises(ValueError, match="does not use `budget`"):
        SweepConfig("bh", alpha=0.1, max_k=8, min_k=1, kernel="gaussian", budget="static")
    with pytest.raises(ValueError, match="`budget` must be one of"):
        SweepConfig("bh", layer_alphas=(0.1,), max_k=8, min_k=1, kernel="gaussian", budget="dynamic")


def test_document_jackknife_against_a_hand_computation():
    from scipy.stats import t as student_t

    from bh_helpers.experiments.bootstrap import paired_jackknife

    rng = np.random.default_rng(5)
    nll_a, nll_b = rng.uniform(1, 3, 9), rng.uniform(1, 3, 9)
    tok = rng.integers(5, 20, 9).astype(float)
    docs = [4, 4, 1, 1, 1, 7, 7, 9, 9]
    got = paired_jackknife(nll_a, tok, nll_b, tok, clusters=docs)

    def delta(keep):
        t = tok[keep].sum()
        return math.exp(nll_a[keep].sum() / t) - math.exp(nll_b[keep].sum() / t)

    everything = np.ones(9, bool)
    leave = [delta(np.asarray(docs) != d) for d in (1, 4, 7, 9)]
    se = math.sqrt(3 / 4 * sum((x - np.mean(leave)) ** 2 for x in leave))
    half = student_t.ppf(0.975, 3) * se
    assert got.delta == pytest.approx(delta(everything), rel=1e-12)
    assert (got.low, got.high) == pytest.approx((delta(everything) - half, delta(everything) + half), rel=1e-12)
    assert (got.unit, got.units) == ("document", 4)
    with pytest.raises(ValueError, match="needs at least 3"):
        paired_jackknife(nll_a, tok, nll_b, tok, clusters=[0] * 5 + [1] * 4)


def test_alpha_solved_on_routed_logits_reaches_the_target(tiny_model_and_tokenizer):
    import warnings

    from bh_helpers.app.paths import default_null_bank_dir
    from bh_helpers.capture import capture_router_logits, window_batches
    from bh_helpers.experiments.k_matching import match_alpha_routed
    from bh_helpers.models.texts import calibration_token_ids
    from bh_helpers.nulls.bank import NullBank
    from bh_helpers.selection.budget import ComputeBudget
    from bh_helpers.selection.selectors import BHSelector

    model, tok = tiny_model_and_tokenizer
    bank = NullBank.load(default_null_bank_dir("tiny"))
    batches = window_batches(calibration_token_ids(tok, max_tokens=1024), window=128, batch_size=8)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        matched = match_alpha_routed(model, bank, batches, 3.0, tolerance=0.03, steps=6)
        # the native-logit solve misses the target once routed; the routed solve does not
        first_alpha, first_realised = matched.history[0]
        assert first_alpha == ComputeBudget(bank, capture_router_logits(model, batches, progress=False)).alpha(3.0)
        with route(model, BHSelector(bank, alpha=matched.alpha, weights="softmax")) as rec:
            capture_router_logits(model, batches, progress=False)
        assert abs(rec.summary()["mean_k"] - 3.0) <= 0.03
        assert abs(matched.realised - 3.0) <= 0.03 < abs(first_realised - 3.0)
        per_layer = match_alpha_routed(model, bank, batches, {layer: 2.0 + (layer % 2) for layer in range(6)},
                                       tolerance=0.05, steps=6)
        assert all(abs(per_layer.realised[layer] - (2.0 + layer % 2)) <= 0.05 for layer in range(6))
        with pytest.raises(ValueError, match="did not settle within 1e-06"):
            match_alpha_routed(model, bank, batches, 3.0, tolerance=1e-6, steps=1)


def test_routed_budget_keeps_the_closest_step_when_a_target_does_not_settle(tiny_model_and_tokenizer):
    from bh_helpers.app.paths import default_null_bank_dir
    from bh_helpers.capture import window_batches
    from bh_helpers.experiments.k_matching import RoutedBudget, match_alpha_routed
    from bh_helpers.models.texts import calibration_token_ids
    from bh_helpers.nulls.bank import NullBank

    model, tok = tiny_model_and_tokenizer
    bank = NullBank.load(default_null_bank_dir("tiny"))
    batches = window_batches(calibration_token_ids(tok, max_tokens=512), window=128, batch_size=4)
    with pytest.warns(UserWarning, match="did not settle within 1e-09.*closest step"):
        got = match_alpha_routed(model, bank, batches, 3.0, tolerance=1e-9, steps=2, strict=False)
    gaps = [abs(realised - 3.0) for _, realised in got.history]
    assert len(got.history) == 3 and abs(got.realised - 3.0) == min(gaps)
    with pytest.warns(UserWarning, match="closest step"):
        alpha = RoutedBudget(model, bank, batches, steps=1, tolerance=1e-9).alpha(3.0)
    assert 0 < alpha <= 1
