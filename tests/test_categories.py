"""Tests for bh_helpers.experiments.categories: bootstrap, paired and trend tests against numpy/scipy, prompts."""

from __future__ import annotations

import json

import numpy as np
import pytest
from scipy import stats

from bh_helpers.experiments.categories import (
    DEFAULT_PROMPTS_PATH,
    bootstrap_mean_ci,
    category_summary,
    load_prompt_sets,
    measure_prompts,
    paired_comparison,
    trend_test,
)

pd = pytest.importorskip("pandas")


def _brute_force_bootstrap(x, n_boot, ci, seed):
    """Plain loop: one resample per iteration from the same generator stream."""
    rng = np.random.default_rng(seed)
    means = np.empty(n_boot)
    for b in range(n_boot):
        idx = rng.integers(0, len(x), size=len(x))
        means[b] = sum(x[i] for i in idx) / len(x)
    return np.quantile(means, [(1 - ci) / 2, (1 + ci) / 2])


@pytest.mark.parametrize("seed", [0, 7])
@pytest.mark.parametrize("ci", [0.9, 0.95])
def test_bootstrap_matches_brute_force(seed, ci):
    x = np.random.default_rng(100 + seed).gamma(2.0, size=23)
    r = bootstrap_mean_ci(x, n_boot=400, ci=ci, seed=seed)
    lo, hi = _brute_force_bootstrap(x, 400, ci, seed)
    assert (r.low, r.high) == pytest.approx((lo, hi), rel=1e-12)
    assert r.mean == pytest.approx(x.mean()) and r.n == 23 and r.low <= r.mean <= r.high


def test_bootstrap_is_seeded_and_validates():
    x = [1.0, 2.0, 4.0, 8.0]
    assert bootstrap_mean_ci(x, seed=3) == bootstrap_mean_ci(x, seed=3)
    assert bootstrap_mean_ci(x, seed=3) != bootstrap_mean_ci(x, seed=4)
    with pytest.raises(ValueError, match="`ci`"):
        bootstrap_mean_ci(x, ci=95)
    with pytest.raises(ValueError, match="`n_boot`"):
        bootstrap_mean_ci(x, n_boot=0)
    with pytest.raises(ValueError, match="empty"):
        bootstrap_mean_ci([])
    with pytest.raises(ValueError, match="NaN"):
        bootstrap_mean_ci([1.0, float("nan")])


def test_category_summary_shares_one_stream_in_rank_order():
    rng = np.random.default_rng(1)
    df = pd.DataFrame({"category": ["b"] * 5 + ["a"] * 6, "rank": [0] * 5 + [1] * 6, "mean_k": rng.normal(4, 1, 11)})
    s = category_summary(df, n_boot=300, seed=5)
    assert s["category"].tolist() == ["b", "a"]
    gen = np.random.default_rng(5)
    first = bootstrap_mean_ci(df["mean_k"][:5], n_boot=300, rng=gen)
    second = bootstrap_mean_ci(df["mean_k"][5:], n_boot=300, rng=gen)
    assert s[["low", "high"]].to_numpy().tolist() == [[first.low, first.high], [second.low, second.high]]


def test_paired_comparison_matches_scipy():
    rng = np.random.default_rng(0)
    a = rng.normal(3.0, 1.0, 30)
    b = a + rng.normal(0.2, 0.3, 30)
    r = paired_comparison(a, b, name_a="bh", name_b="top-4")
    t = stats.ttest_rel(a, b)
    w = stats.wilcoxon(a, b)
    d = a - b
    assert r.t_statistic == pytest.approx(t.statistic) and r.t_pvalue == pytest.approx(t.pvalue)
    assert r.wilcoxon_statistic == pytest.approx(w.statistic) and r.wilcoxon_pvalue == pytest.approx(w.pvalue)
    assert r.cohens_dz == pytest.approx(d.mean() / d.std(ddof=1))
    assert r.mean_diff == pytest.approx(d.mean()) and r.n == 30 and r.name_a == "bh"


def test_paired_comparison_edge_cases():
    same = paired_comparison([1.0, 2.0, 3.0], [1.0, 2.0, 3.0])
    assert np.isnan(same.wilcoxon_pvalue) and np.isnan(same.cohens_dz)
    with pytest.raises(ValueError, match="same length"):
        paired_comparison([1.0, 2.0], [1.0])
    with pytest.raises(ValueError, match="at least 2"):
        paired_comparison([1.0], [2.0])


def test_trend_test_matches_scipy():
    groups = {"simple": [1.0, 1.2, 1.1], "medium": [1.5, 1.4], "hard": [2.0, 2.2, 1.9, 2.1]}
    r = trend_test(groups)
    ranks = [0, 0, 0, 1, 1, 2, 2, 2, 2]
    values = sum(groups.values(), [])
    assert r.spearman_rho == pytest.approx(stats.spearmanr(ranks, values).statistic)
    assert r.spearman_pvalue == pytest.approx(stats.spearmanr(ranks, values).pvalue)
    assert r.kruskal_h == pytest.approx(stats.kruskal(*groups.values()).statistic)
    assert r.categories == ["simple", "medium", "hard"] and r.n == 9
    with pytest.raises(ValueError, match="two categories"):
        trend_test({"only": [1.0]})


def test_default_prompt_sets():
    sets = load_prompt_sets()
    assert list(sets) == ["simple", "medium", "complex", "technical"]
    assert all(len(v) >= 10 for v in sets.values())
    assert any("def " in p for p in sets["technical"])  # code: a domain of the embedded model
    assert json.loads(DEFAULT_PROMPTS_PATH.read_text()) == sets


def test_user_prompt_sets(tmp_path):
    assert load_prompt_sets({"x": ["a b"], "y": ["c d"]}) == {"x": ["a b"], "y": ["c d"]}
    (tmp_path / "1_easy.txt").write_text("one\n---\ntwo\nlines\n")
    (tmp_path / "2_hard.txt").write_text("three\n")
    assert load_prompt_sets(tmp_path) == {"1_easy": ["one", "two\nlines"], "2_hard": ["three"]}
    path = tmp_path / "p.json"
    path.write_text(json.dumps({"a": ["x y"]}))
    assert load_prompt_sets(path) == {"a": ["x y"]}
    with pytest.raises(ValueError, match="empty"):
        load_prompt_sets({"a": []})
    with pytest.raises(ValueError, match="empty or non-string"):
        load_prompt_sets({"a": ["ok", "  "]})
    with pytest.raises(ValueError, match="neither"):
        load_prompt_sets(tmp_path / "missing.json")


@pytest.fixture(scope="module")
def tiny():
    import torch

    from bh_helpers.models.loading import load_model

    return load_model("tiny", device="cpu", dtype=torch.float32)


def test_measure_prompts_counts_and_nll(tiny):
    import torch
    import torch.nn.functional as F

    from bh_helpers import NativeSelector, TopKSelector

    model, tok = tiny
    sets = {"prose": ["The cat sat on the mat.", "A penny saved is a penny earned, they say."],
            "code": ["def f(x):\n    return x + 1\n"]}
    df = measure_prompts(model, tok, sets, TopKSelector(3), batch_size=2)
    assert df["mean_k"].tolist() == [3.0, 3.0, 3.0]
    assert df["category"].tolist() == ["prose", "prose", "code"] and df["rank"].tolist() == [0, 0, 1]
    native = measure_prompts(model, tok, sets, NativeSelector.for_model(model), batch_size=2)
    for i, prompt in enumerate(sum(sets.values(), [])):  # padding must not change the NLL
        ids = torch.tensor([tok(prompt, add_special_tokens=False)["input_ids"]])
        with torch.no_grad():
            logits = model(input_ids=ids).logits
        ref = F.cross_entropy(logits[0, :-1], ids[0, 1:]).item()
        assert native.loc[i, "nll"] == pytest.approx(ref, abs=1e-4)
        assert native.loc[i, "n_tokens"] == ids.shape[1]
    assert native["mean_k"].tolist() == [8.0, 8.0, 8.0]
    with pytest.raises(ValueError, match="fewer than 2 tokens"):
        measure_prompts(model, tok, {"a": ["x"]}, TopKSelector(2))
