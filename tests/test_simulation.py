"""Empirical FDR, power and FWER on simulated router rows against the theorems (issue 16, item 4)."""

from __future__ import annotations

import pytest
import torch

from bh_helpers.experiments.simulation import empirical_error_rates, simulate_router_rows


def test_simulated_rows_have_the_asked_truth_and_dependence():
    logits, truth = simulate_router_rows(40_000, 16, relevant=3, signal=2.0, dependence="equicorrelated", rho=0.5)
    assert logits.shape == truth.shape == (40_000, 16) and bool((truth.sum(dim=1) == 3).all())
    null = logits.masked_fill(truth, float("nan"))
    # marginal N(0, 1); within-token correlation rho between null experts
    values = null[~truth]
    assert abs(float(values.mean())) < 0.02 and abs(float(values.std()) - 1.0) < 0.02
    a, b = logits[:, 0], logits[:, 1]
    both = ~truth[:, 0] & ~truth[:, 1]
    corr = torch.corrcoef(torch.stack([a[both], b[both]]))[0, 1]
    assert abs(float(corr) - 0.5) < 0.03


def _by_method(rates):
    return {r.method: r for r in rates}


def test_bh_fdr_is_alpha_m0_over_m_under_independence():
    """Benjamini-Hochberg (1995): with independent continuous p-values, FDR = alpha * m0 / m."""
    rates = _by_method(empirical_error_rates(alpha=0.1, n_tokens=20_000, dependence="independent", seed=3))
    bh = rates["bh"]
    low, high = bh.fdr_ci
    assert low - 0.003 <= 0.1 * 56 / 64 <= high + 0.003, bh  # the KDE null adds a little slack
    assert rates["by"].fdr <= bh.fdr and rates["bh"].power > rates["by"].power > 0.3


@pytest.mark.parametrize("dependence,rho", [("equicorrelated", 0.5), ("factor", 0.8)])
def test_guarantees_hold_within_monte_carlo_error(dependence, rho):
    """BH under positive (equicorrelated) dependence (Benjamini-Yekutieli 2001, PRDS); BY under any
    dependence; Bonferroni and Holm control the family-wise error rate."""
    rates = _by_method(empirical_error_rates(alpha=0.1, n_tokens=20_000, dependence=dependence, rho=rho, seed=5))
    if dependence == "equicorrelated":
        assert rates["bh"].fdr_ci[0] <= 0.1
    assert rates["by"].fdr_ci[0] <= 0.1
    for method in ("bonferroni", "holm"):
        assert rates[method].fwer_ci[0] <= 0.1, rates[method]
    assert rates["holm"].power >= rates["bonferroni"].power


@pytest.mark.fault("bad arguments", "clear error")
@pytest.mark.parametrize("kwargs,match", [(dict(rho=1.0), "rho"), (dict(dependence="copula"), "dependence"),
                                          (dict(relevant=70), "relevant"), (dict(signal=float("inf")), "signal")])
def test_simulation_bad_input(kwargs, match):
    with pytest.raises(ValueError, match=match):
        simulate_router_rows(10, 64, **kwargs)


def test_scale_dependence_breaks_bh_conditionally_and_zscore_restores_it():
    """Tokens of different logit spread: over all tokens the pooled raw null keeps BH's FDR below
    alpha (the p-values are uniform over tokens), but among the widest tokens it is far above
    alpha; the per-token z-score brings every spread group back within alpha."""
    common = dict(alpha=0.2, methods=("bh",), n_tokens=20_000, relevant=1, signal=3.0, dependence="scale", rho=0.5,
                  spread_groups=4, seed=7)
    raw = {r.group: r for r in empirical_error_rates(**common)}
    assert raw["all tokens"].fdr_ci[0] <= 0.2
    widest = raw["spread group 4/4"]
    assert widest.tokens == 5000 and widest.fdr_ci[0] > 0.3, widest  # the guarantee broken, far outside MC error
    assert raw["spread group 1/4"].fdr < 0.05  # and the narrow tokens pay for it with power
    zscore = {r.group: r for r in empirical_error_rates(**common, statistic="zscore")}
    for group, r in zscore.items():
        assert r.fdr_ci[0] <= 0.2, (group, r)


def test_scale_rows_have_a_shared_spread():
    logits, truth = simulate_router_rows(20_000, 64, relevant=0, dependence="scale", rho=0.5, seed=1)
    log_sd = logits.double().std(dim=1).log()
    # the log spread per token is rho * z plus the small sampling noise of 64 values
    assert abs(float(log_sd.std()) - 0.5) < 0.03 and not truth.any()
