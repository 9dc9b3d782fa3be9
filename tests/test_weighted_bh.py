"""benchmarks/weighted_bh.py (issue 27, item 3): BH with one level per token, checked against
statsmodels and fdr_counts row by row, and the selector on the embedded tiny model against
BHSelector (gamma 0) and against the per-row oracle (gamma 1)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import weighted_bh as wbh  # noqa: E402  (a benchmark, not the package: kept only if it wins)

from bh_helpers.selection.reference import fdr_counts  # noqa: E402


def _pvalues(rows: int, m: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    p = torch.rand(rows, m, generator=g, dtype=torch.float64) ** 3  # (rows, m): counts spread over 0..m
    p[:4, :3] = torch.tensor([0.05 / m, 0.1 / m, 0.2 / m], dtype=torch.float64)
    p[:4, 3:] = 0.9  # rows 0..3: at level 0.05, ranks 1 and 2 sit exactly on their thresholds (count 2)
    return p


def test_per_row_level_matches_statsmodels_and_fdr_counts():
    multipletests = pytest.importorskip("statsmodels.stats.multitest").multipletests
    p = _pvalues(200, 16, 0)
    level = torch.rand(200, generator=torch.Generator().manual_seed(1), dtype=torch.float64) * 0.99 + 0.01
    level[:4] = torch.tensor([0.05, 0.1, 0.2, 0.1], dtype=torch.float64)
    got = wbh.weighted_bh_counts(p, level)
    assert got.unique().numel() > 5  # the rows do spread over counts: the check can fail
    for t in range(p.shape[0]):
        a = float(level[t])
        assert int(got[t]) == int(fdr_counts(p[t], a, "bh")), t
        assert int(got[t]) == int(multipletests(p[t].double().numpy(), alpha=a, method="fdr_bh")[0].sum()), t
    clamped = wbh.weighted_bh_counts(p, level, min_k=2, max_k=5)
    assert torch.equal(clamped, got.clamp(2, 5))


def test_levels_above_one_and_bad_levels():
    p = _pvalues(10, 8, 2)
    assert torch.equal(wbh.weighted_bh_counts(p, 1.0 / 0.01 * 8), torch.full((10,), 8))  # every threshold >= 1
    assert torch.equal(wbh.weighted_bh_counts(p, 0.3), fdr_counts(p, 0.3, "bh"))  # one level for all rows
    with pytest.raises(ValueError, match="`level` must be > 0"):
        wbh.weighted_bh_counts(p, torch.zeros(10))


@pytest.fixture(scope="module")
def tiny_bank(tiny_model_and_tokenizer):
    from bh_helpers.capture import capture_calibration
    from bh_helpers.nulls.fit import fit_null_bank

    model, tok = tiny_model_and_tokenizer
    captured = capture_calibration(model, tok, max_tokens=1024, window=256, batch_size=4, progress=False)
    return fit_null_bank(captured, statistic="zscore", trim=8, model_id="tiny"), captured


ALPHA = {0: 0.3, 1: 0.05, 2: 0.2, 3: 0.5, 4: 0.1, 5: 0.02}


def test_gamma_zero_routes_like_bh_selector(tiny_model_and_tokenizer, tiny_bank):
    """gamma 0: every weight is 1, so the routed model equals BHSelector at the same per-layer alphas."""
    from bh_helpers.evaluation.scoring import perplexity
    from bh_helpers.routing.patch import route
    from bh_helpers.selection.selectors import BHSelector

    model, tok = tiny_model_and_tokenizer
    bank, _ = tiny_bank
    texts = ["The river ran past the mill and the old stone bridge.", "def add(a, b):\n    return a + b\n"]
    out = {}
    for name, selector in (("bh", BHSelector(bank, alpha=ALPHA, max_k=8, weights="softmax")),
                           ("weighted", wbh.WeightedBHSelector(bank, alpha=ALPHA, gamma=0.0))):
        with route(model, selector) as rec:
            ppl = perplexity(model, tok, texts, window=32, stride=32, batch_size=2, progress=False)
        out[name] = ppl.perplexity, rec.per_token_counts().counts
    assert out["bh"][0] == out["weighted"][0]
    for layer, counts in out["bh"][1].items():
        assert torch.equal(counts, out["weighted"][1][layer]), layer
    assert len({int(c.float().mean() * 100) for c in out["bh"][1].values()}) > 1  # layers differ: alphas matter


def test_previous_layer_count_sets_the_level(tiny_bank):
    """gamma 1: layer 1's count of each token is BH at alpha_1 * c_0 / norm, c_0 its count in layer 0."""
    from bh_helpers.selection.selectors import BHSelector

    bank, captured = tiny_bank
    x0, x1 = captured[0][:300], captured[1][:300]  # (300, 64) real router logits
    selector = wbh.WeightedBHSelector(bank, alpha=ALPHA, gamma=1.0, norm={1: 2.5})
    c0 = selector(x0, 0).counts  # (300,)
    assert torch.equal(c0, BHSelector(bank, alpha=ALPHA, max_k=8)(x0, 0).counts)  # first layer: unweighted
    got = selector(x1, 1)
    p1 = bank.pvalues(x1, 1)
    want = torch.stack([fdr_counts(p1[t], min(1.0, ALPHA[1] * float(c0[t]) / 2.5), "bh") for t in range(300)])
    assert torch.equal(got.counts, want.clamp(1, 8))
    assert not torch.equal(got.counts, BHSelector(bank, alpha=ALPHA, max_k=8)(x1, 1).counts)  # the weight acts
    top = x1.argsort(dim=-1, descending=True, stable=True)  # (300, 64): the chosen experts are the top logits
    for t in range(0, 300, 37):
        assert set(got.indices[t, : got.counts[t]].tolist()) == set(top[t, : got.counts[t]].tolist())


def test_out_of_order_layers_and_graphs_are_refused(tiny_bank):
    from bh_helpers.routing.graphs import graph_safe_selector

    bank, captured = tiny_bank
    selector = wbh.WeightedBHSelector(bank, alpha=ALPHA, gamma=1.0)
    with pytest.raises(RuntimeError, match="needs the counts of layer 1"):
        selector(captured[2][:10], 2)
    selector(captured[0][:10], 0)
    with pytest.raises(RuntimeError, match="for the same 20 tokens"):
        selector(captured[1][:20], 1)
    assert not graph_safe_selector(selector, torch.device("cpu"))
    assert not selector.capturable(torch.device("cuda"))
