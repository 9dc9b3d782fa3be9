"""Tests of bh_helpers.selection.reference against independent oracles (statsmodels, brute force, transformers)."""

import gc

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from statsmodels.stats.multitest import multipletests

from bh_helpers.selection.reference import FDR_METHODS, Selection, fdr_counts, select_experts

STATSMODELS_NAME = {"bh": "fdr_bh", "by": "fdr_by", "bonferroni": "bonferroni", "holm": "holm"}


def statsmodels_counts(p: np.ndarray, alpha: float, method: str) -> np.ndarray:
    """The oracle: statsmodels' own rejection count, one row at a time."""
    name = STATSMODELS_NAME[method]
    # statsmodels' Holm branch calls gc.collect() on every call (memory hygiene only); with torch
    # loaded that costs ~0.1 s per row, so it is skipped while the oracle runs.
    collect = gc.collect
    gc.collect = lambda *args: 0
    try:
        return np.array([multipletests(row, alpha=alpha, method=name)[0].sum() for row in p])
    finally:
        gc.collect = collect


def realistic_pvalues(rng: np.random.Generator, rows: int, m: int = 64) -> np.ndarray:
    """Rows of uniform null p-values with a random number of strong signals (Beta(0.05, 1))."""
    p = rng.uniform(size=(rows, m))
    n_signal = rng.integers(0, 16, size=rows)
    signal = rng.beta(0.05, 1.0, size=(rows, m))
    p = np.where(np.arange(m) < n_signal[:, None], signal, p)
    return rng.permuted(p, axis=1)


# ----------------------------------------------------------------------------------------------
# fdr_counts vs statsmodels
# ----------------------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("method", FDR_METHODS)
def test_fdr_counts_equal_statsmodels_on_100k_rows(method):
    rng = np.random.default_rng(1234)
    alphas = (0.01, 0.05, 0.2, 0.5)
    p = realistic_pvalues(rng, 100_000)
    total_rows = 0
    for alpha, block in zip(alphas, np.array_split(p, len(alphas))):
        ours = fdr_counts(torch.from_numpy(block), alpha, method).numpy()
        expected = statsmodels_counts(block, alpha, method)
        np.testing.assert_array_equal(ours, expected)
        total_rows += len(block)
        # The rows must exercise the procedure: many different counts, not all zeros.
        assert len(np.unique(expected)) >= 5
    assert total_rows == 100_000


def adversarial_rows(alpha: float, m: int = 64) -> np.ndarray:
    ecdf = np.arange(1, m + 1) / float(m)
    exactly_at_bh = ecdf * alpha  # every p-value sits on its own BH threshold
    one_signal = np.full(m, 0.9)
    one_signal[17] = 1e-12
    ties_at_threshold = np.full(m, 0.5)
    ties_at_threshold[:5] = 5 / m * alpha  # five ties, all exactly at the 5th threshold
    # Step-up beyond the first failure: p_(1) fails, p_(3) passes, so BH rejects 3.
    step_up = np.full(m, 0.99)
    step_up[:3] = [2 * alpha / m, 2.5 * alpha / m, 3 * alpha / m]
    just_above = np.minimum(np.nextafter(exactly_at_bh, 2.0), 1.0)
    return np.stack(
        [np.zeros(m), np.ones(m), exactly_at_bh, just_above, one_signal, ties_at_threshold, step_up,
         np.full(m, alpha / m), np.full(m, alpha)]
    )


@pytest.mark.parametrize("method", FDR_METHODS)
@pytest.mark.parametrize("alpha", [0.05, 0.1, 1.0])
def test_fdr_counts_adversarial_rows(method, alpha):
    rows = adversarial_rows(alpha)
    ours = fdr_counts(torch.from_numpy(rows), alpha, method).numpy()
    np.testing.assert_array_equal(ours, statsmodels_counts(rows, alpha, method))


def test_fdr_counts_known_adversarial_values():
    alpha, m = 0.05, 64
    rows = torch.from_numpy(adversarial_rows(alpha, m))
    bh = fdr_counts(rows, alpha, "bh").tolist()
    # all zero -> all rejected; all one -> none at alpha < 1; on-threshold -> all (p <= thr);
    # one tiny among nulls -> 1; five ties at the 5th threshold -> 5; step-up past a failure -> 3.
    assert bh[:3] == [m, 0, m]
    assert bh[3] == 0  # every p just above its threshold
    assert bh[4:7] == [1, 5, 3]


@pytest.mark.parametrize("method", FDR_METHODS)
def test_fdr_counts_single_hypothesis(method):
    p = torch.tensor([[0.04], [0.05], [0.06]], dtype=torch.float64)
    assert fdr_counts(p, 0.05, method).tolist() == [1, 1, 0]


@pytest.mark.parametrize("method", FDR_METHODS)
def test_fdr_counts_leading_dims_and_dtypes(method):
    rng = np.random.default_rng(0)
    p64 = torch.from_numpy(realistic_pvalues(rng, 24)).reshape(2, 3, 4, 64)
    counts = fdr_counts(p64, 0.1, method)
    assert counts.shape == (2, 3, 4) and counts.dtype == torch.long
    flat = fdr_counts(p64.reshape(-1, 64), 0.1, method).reshape(2, 3, 4)
    assert torch.equal(counts, flat)
    # Half-precision input is upcast; its counts equal those of the same values in float32.
    p16 = p64.to(torch.bfloat16)
    assert torch.equal(fdr_counts(p16, 0.1, method), fdr_counts(p16.float(), 0.1, method))


@pytest.mark.parametrize(
    "pvalues, alpha, method, match",
    [
        (torch.full((2, 4), 0.5), 0.0, "bh", "alpha"),
        (torch.full((2, 4), 0.5), 1.5, "bh", "alpha"),
        (torch.full((2, 4), 0.5), float("nan"), "bh", "alpha"),
        (torch.full((2, 4), 0.5), 0.05, "fdr", "method"),
        (torch.tensor([[0.5, 1.2]]), 0.05, "bh", r"\[0, 1\]"),
        (torch.tensor([[0.5, -0.1]]), 0.05, "bh", r"\[0, 1\]"),
        (torch.tensor([[0.5, float("nan")]]), 0.05, "bh", "NaN"),
        (torch.zeros(3, 0), 0.05, "bh", "non-empty"),
    ],
)
@pytest.mark.fault("bad arguments", "clear error")
def test_fdr_counts_bad_input(pvalues, alpha, method, match):
    with pytest.raises(ValueError, match=match):
        fdr_counts(pvalues, alpha, method)


# ----------------------------------------------------------------------------------------------
# select_experts
# ----------------------------------------------------------------------------------------------


def brute_force_selection(logits, pvalues, counts, max_k):
    """Per-row Python reference of the ranking rule: smallest p first, ties -> larger logit."""
    idx = np.full((len(logits), max_k), -1)
    for r, (lg, pv, c) in enumerate(zip(logits, pvalues, counts)):
        order = sorted(range(len(lg)), key=lambda e: (pv[e], -lg[e], e))[:c]
        order = sorted(order, key=lambda e: (-lg[e], order.index(e)))
        idx[r, :c] = order
    return idx


@pytest.mark.parametrize("method", FDR_METHODS)
def test_select_experts_matches_brute_force(method):
    rng = np.random.default_rng(7)
    logits = torch.from_numpy(rng.normal(size=(500, 64)))
    # p-values not monotone in the logit (as with per-expert nulls), with exact ties, to test the
    # ranking rule in full.
    p = torch.from_numpy(np.round(realistic_pvalues(rng, 500), 2))
    sel = select_experts(logits, p, method=method, alpha=0.2, min_k=2, max_k=10)
    counts = np.clip(statsmodels_counts(p.numpy(), 0.2, method), 2, 10)
    np.testing.assert_array_equal(sel.counts.numpy(), counts)
    np.testing.assert_array_equal(sel.indices.numpy(), brute_force_selection(logits.numpy(), p.numpy(), counts, 10))


def test_topk_reproduces_olmoe_router():
    from transformers import OlmoeConfig
    from transformers.models.olmoe.modeling_olmoe import OlmoeTopKRouter

    torch.manual_seed(0)
    config = OlmoeConfig(hidden_size=48, num_experts=64, num_experts_per_tok=8, norm_topk_prob=False)
    router = OlmoeTopKRouter(config)
    torch.nn.init.normal_(router.weight, std=0.2)
    hidden = torch.randn(1000, 48)
    logits, scores, indices = router(hidden)
    sel = select_experts(logits, method="topk", k=8, max_k=8, weights="softmax")
    assert torch.equal(sel.indices, indices)
    assert torch.equal(sel.weights, scores)
    assert torch.equal(sel.counts, torch.full((1000,), 8))


def test_topk_other_k_and_widths():
    logits = torch.randn(50, 16)
    sel = select_experts(logits, method="topk", k=3, max_k=5, weights="renorm")
    assert sel.indices.shape == (50, 5)
    assert torch.equal(sel.indices[:, :3], logits.topk(3).indices)
    assert (sel.indices[:, 3:] == -1).all() and (sel.weights[:, 3:] == 0).all()
    torch.testing.assert_close(sel.weights.sum(-1), torch.ones(50))


def test_top_p_matches_brute_force():
    rng = np.random.default_rng(3)
    logits = torch.from_numpy(rng.normal(scale=2.0, size=(300, 32)))
    for top_p in (0.3, 0.5, 0.9, 1.0):
        sel = select_experts(logits, method="top_p", top_p=top_p, min_k=1, max_k=32)
        probs = torch.softmax(logits, -1).numpy()
        for row, c in zip(probs, sel.counts.tolist()):
            mass = np.cumsum(np.sort(row)[::-1])
            expected = min(int(np.searchsorted(mass, top_p) + 1), 32)  # first index reaching top_p
            assert c == expected or (c == expected - 1 and np.isclose(mass[c - 1], top_p))


def test_top_p_clamped_to_bounds():
    logits = torch.tensor([[10.0, 0.0, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0]])
    sel = select_experts(logits, method="top_p", top_p=0.99, min_k=2, max_k=3)
    assert sel.counts.tolist() == [2, 3]


def test_weights_modes_and_temperature():
    logits = torch.randn(64, 64)
    p = torch.rand(64, 64)
    base = dict(method="bh", alpha=0.5, min_k=1, max_k=8)
    renorm = select_experts(logits, p, weights="renorm", **base)
    soft = select_experts(logits, p, weights="softmax", **base)
    uni = select_experts(logits, p, weights="uniform", **base)
    hot = select_experts(logits, p, weights="renorm", temperature=3.0, **base)
    for s in (soft, uni, hot):
        assert torch.equal(s.indices, renorm.indices)  # selection never depends on weights
    probs = torch.softmax(logits, -1)
    valid = renorm.valid()
    torch.testing.assert_close(soft.weights[valid], probs.gather(-1, renorm.indices.clamp(min=0))[valid])
    torch.testing.assert_close(renorm.weights.sum(-1), torch.ones(64))
    torch.testing.assert_close(uni.weights.sum(-1), torch.ones(64))
    torch.testing.assert_close(hot.weights.sum(-1), torch.ones(64))
    # A higher temperature flattens the weights among the chosen experts.
    multi = renorm.counts > 1
    assert (hot.weights.amax(-1)[multi] <= renorm.weights.amax(-1)[multi] + 1e-6).all()


@pytest.mark.parametrize("method", ["bh", "holm", "topk", "top_p"])
def test_inverse_p_weights_equal_direct_float64_computation(method):
    """Oracle: 1/p of the chosen experts over their sum, in float64, from the float32 p-values
    (p-values under float32's smallest normal number count as it, as documented)."""
    g = torch.Generator().manual_seed(3)
    logits = torch.randn(300, 64, generator=g) * 2
    p = torch.rand(300, 64, generator=g) ** 6  # many tiny p-values
    # five p-values near float32's smallest normal: the sum of their 1/p overflows float32
    p[0, :6] = torch.tensor([1e-38, 2e-38, 3e-39, 1.5e-38, 1.2e-38, 0.5])
    args = dict(method=method, alpha=0.5, min_k=1, max_k=8, k=8 if method == "topk" else None,
                top_p=0.8 if method == "top_p" else None)
    sel = select_experts(logits, p, weights="inverse_p", **args)
    assert torch.equal(sel.indices, select_experts(logits, p, weights="renorm", **args).indices)
    tiny = torch.finfo(torch.float32).tiny
    inv = 1.0 / p.double().clamp(min=tiny).gather(-1, sel.indices.clamp(min=0))  # (300, 8)
    inv = torch.where(sel.valid(), inv, 0.0)
    expected = inv / inv.sum(-1, keepdim=True)
    assert torch.isfinite(sel.weights).all()
    # float32 log/exp: relative error about |log p| * eps32 (|log p| <= 88)
    torch.testing.assert_close(sel.weights.double(), expected, rtol=1e-5, atol=1e-6)
    # float64 input: float64 weights, equal to the oracle to float64 rounding
    sel64 = select_experts(logits.double(), p.double().clamp(min=tiny), weights="inverse_p", **args)
    assert sel64.weights.dtype == torch.float64
    torch.testing.assert_close(sel64.weights, expected, rtol=1e-12, atol=1e-15)


def test_inverse_p_weights_zero_pvalues_and_empty_rows():
    logits = torch.tensor([[3.0, 2.0, 1.0, 0.0], [0.0, 0.0, 0.0, 0.0]])
    p = torch.tensor([[0.0, 0.0, 0.5, 0.9], [0.9, 0.9, 0.9, 0.9]])
    sel = select_experts(logits, p, method="bh", alpha=0.1, min_k=0, max_k=3, weights="inverse_p")
    assert sel.counts.tolist() == [2, 0]
    # two underflowed p-values share the weight; a row with no expert keeps zero weights
    torch.testing.assert_close(sel.weights, torch.tensor([[0.5, 0.5, 0.0], [0.0, 0.0, 0.0]]))


@pytest.mark.fault("bad arguments", "clear error")
def test_inverse_p_weights_need_pvalues_everywhere():
    from bh_helpers.selection.controls import MixedTopKSelector
    from bh_helpers.selection.reference import select_top_counts
    from bh_helpers.selection.selectors import TopKSelector, TopPSelector

    logits = torch.randn(3, 8)
    with pytest.raises(ValueError, match='weights="inverse_p" needs `pvalues`'):
        select_experts(logits, method="topk", k=2, max_k=2, weights="inverse_p")
    with pytest.raises(ValueError, match='weights="inverse_p" needs `pvalues`'):
        select_top_counts(logits, torch.ones(3, dtype=torch.long), max_k=2, weights="inverse_p")
    for build in (lambda: TopKSelector(k=2, weights="inverse_p"), lambda: TopPSelector(p=0.5, weights="inverse_p"),
                  lambda: MixedTopKSelector(1.5, weights="inverse_p")):
        with pytest.raises(ValueError, match="needs `null_bank`"):
            build()


def test_static_and_control_selectors_weigh_by_the_bank():
    from bh_helpers.nulls import fit_null_bank
    from bh_helpers.selection.controls import MixedTopKSelector, ShuffledSelector
    from bh_helpers.selection.reference import select_top_counts
    from bh_helpers.selection.selectors import BHSelector, TopKSelector

    g = torch.Generator().manual_seed(0)
    bank = fit_null_bank({0: torch.randn(3000, 16, generator=g)})
    x = torch.randn(40, 16, generator=g) * 2
    p = bank.pvalues(x, 0)
    top = TopKSelector(k=4, weights="inverse_p", null_bank=bank)(x, 0)
    ref = select_experts(x, p, method="topk", k=4, max_k=4, weights="inverse_p")
    assert torch.equal(top.indices, ref.indices)
    torch.testing.assert_close(top.weights, ref.weights)
    adaptive = BHSelector(bank, alpha=0.3, max_k=6, weights="inverse_p")
    for control in (MixedTopKSelector(2.5, max_k=6, weights="inverse_p", null_bank=bank),
                    ShuffledSelector(adaptive, weights="inverse_p")):
        sel = control(x, 0)
        expected = select_top_counts(x, sel.counts, max_k=6, weights="inverse_p", pvalues=p)
        assert torch.equal(sel.indices, expected.indices)
        torch.testing.assert_close(sel.weights, expected.weights)


def test_half_precision_logits_select_like_float32():
    logits = (torch.randn(256, 64) * 2).to(torch.bfloat16)
    p = torch.rand(256, 64)
    for method in ("bh", "topk", "top_p"):
        kw = dict(method=method, k=8, top_p=0.6, alpha=0.3, max_k=8)
        a, b = select_experts(logits, p, **kw), select_experts(logits.float(), p, **kw)
        assert torch.equal(a.indices, b.indices) and torch.equal(a.counts, b.counts)
        assert a.weights.dtype == torch.float32
        torch.testing.assert_close(a.weights, b.weights)


def test_min_k_zero_gives_empty_rows_with_zero_weights():
    logits = torch.randn(4, 8)
    p = torch.ones(4, 8)
    sel = select_experts(logits, p, method="bh", alpha=0.05, min_k=0, max_k=4)
    assert sel.counts.tolist() == [0, 0, 0, 0]
    assert (sel.indices == -1).all() and (sel.weights == 0).all()


def test_expert_mask():
    sel = Selection(
        indices=torch.tensor([[3, 0, -1], [-1, -1, -1]]),
        weights=torch.tensor([[0.5, 0.5, 0.0], [0.0, 0.0, 0.0]]),
        counts=torch.tensor([2, 0]),
    )
    assert sel.expert_mask(4).tolist() == [[True, False, False, True], [False] * 4]


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(method="bh", alpha=0.0), "alpha"),
        (dict(method="bh", min_k=-1), "min_k"),
        (dict(method="bh", min_k=9, max_k=8), "min_k"),
        (dict(method="bh", max_k=65), "max_k"),
        (dict(method="bh", max_k=0), "max_k"),
        (dict(method="topk", k=0), "`k`"),
        (dict(method="topk", k=65, max_k=64), "`k`"),
        (dict(method="topk", k=9, max_k=8), "max_k"),
        (dict(method="topk"), "needs `k`"),
        (dict(method="top_p", top_p=0.0), "top_p"),
        (dict(method="top_p", top_p=1.5), "top_p"),
        (dict(method="top_p"), "needs `top_p`"),
        (dict(method="magic"), "method"),
        (dict(method="bh", weights="sparsemax"), "weights"),
        (dict(method="bh", temperature=0.0), "temperature"),
    ],
)
@pytest.mark.fault("bad arguments", "clear error")
def test_select_experts_bad_arguments(kwargs, match):
    logits = torch.randn(3, 64)
    with pytest.raises(ValueError, match=match):
        select_experts(logits, torch.rand(3, 64), **kwargs)


@pytest.mark.fault("bad arguments", "clear error")
def test_select_experts_bad_tensors():
    logits = torch.randn(3, 64)
    with pytest.raises(ValueError, match="needs `pvalues`"):
        select_experts(logits, method="bh")
    with pytest.raises(ValueError, match="shape"):
        select_experts(logits, torch.rand(3, 63), method="bh")
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        select_experts(logits, torch.rand(3, 64) + 1, method="bh")
    bad = logits.clone()
    bad[1, 5] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        select_experts(bad, torch.rand(3, 64), method="bh")
    p = torch.rand(3, 64)
    p[0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        select_experts(logits, p, method="by")


# ----------------------------------------------------------------------------------------------
# Properties (hypothesis)
# ----------------------------------------------------------------------------------------------

pvalue_rows = st.integers(min_value=1, max_value=64).flatmap(
    lambda m: st.lists(
        st.lists(st.floats(0.0, 1.0, allow_nan=False), min_size=m, max_size=m), min_size=1, max_size=8
    )
)
alphas = st.floats(1e-4, 1.0, allow_nan=False, exclude_min=False)


@settings(max_examples=200, deadline=None)
@given(pvalue_rows, alphas, alphas)
def test_counts_monotone_in_alpha(rows, a1, a2):
    p = torch.tensor(rows, dtype=torch.float64)
    lo, hi = sorted((a1, a2))
    for method in FDR_METHODS:
        assert (fdr_counts(p, lo, method) <= fdr_counts(p, hi, method)).all()


@settings(max_examples=200, deadline=None)
@given(pvalue_rows, alphas)
def test_counts_ordering_between_methods(rows, alpha):
    p = torch.tensor(rows, dtype=torch.float64)
    bh, by = fdr_counts(p, alpha, "bh"), fdr_counts(p, alpha, "by")
    bonf, holm = fdr_counts(p, alpha, "bonferroni"), fdr_counts(p, alpha, "holm")
    assert (by <= bh).all()
    assert (bonf <= holm).all() and (holm <= bh).all()


@settings(max_examples=150, deadline=None)
@given(
    st.integers(1, 64).flatmap(lambda e: st.tuples(st.just(e), st.integers(1, e))),
    st.integers(0, 64),
    alphas,
    st.sampled_from(("bh", "by", "bonferroni", "holm", "top_p")),
    st.sampled_from(("renorm", "softmax", "uniform", "inverse_p")),
    st.integers(0, 2**31 - 1),
)
def test_selection_invariants(e_and_max_k, min_k, alpha, method, weights, seed):
    num_experts, max_k = e_and_max_k
    min_k = min(min_k, max_k)
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(16, num_experts, generator=g) * 3
    p = torch.rand(16, num_experts, generator=g) ** 4
    sel = select_experts(logits, p, method=method, alpha=alpha, top_p=alpha, min_k=min_k, max_k=max_k, weights=weights)
    counts = sel.counts
    assert ((counts >= min_k) & (counts <= max_k)).all()
    valid = sel.valid()
    assert torch.equal(valid.sum(-1), counts)
    # Valid slots come first, hold distinct experts, in decreasing logit order.
    assert torch.equal(valid, torch.arange(max_k) < counts[:, None])
    chosen_logits = torch.where(valid, logits.gather(-1, sel.indices.clamp(min=0)), -torch.inf)
    assert (chosen_logits[:, :-1] >= chosen_logits[:, 1:]).all()
    assert torch.equal(sel.expert_mask(num_experts).sum(-1), counts)
    # Weights: non-negative, zero exactly at padding, positive where used, renorm sums to 1.
    assert (sel.weights >= 0).all()
    assert (sel.weights[~valid] == 0).all()
    assert (sel.weights[valid] > 0).all()
    if weights in ("renorm", "uniform", "inverse_p"):
        nonempty = counts > 0
        torch.testing.assert_close(sel.weights.sum(-1)[nonempty], torch.ones(int(nonempty.sum())))


# ----------------------------------------------------------------------------------------------
# GPU (skipped cleanly without CUDA)
# ----------------------------------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("method", ("bh", "by", "bonferroni", "holm", "topk", "top_p"))
def test_cuda_matches_cpu(method):
    rng = np.random.default_rng(11)
    logits = torch.from_numpy(rng.normal(size=(4096, 64))).float()
    p = torch.from_numpy(realistic_pvalues(rng, 4096)).float()
    kw = dict(method=method, alpha=0.1, k=8, top_p=0.7, max_k=8)
    cpu = select_experts(logits, p, **kw)
    gpu = select_experts(logits.cuda(), p.cuda(), **kw)
    assert torch.equal(cpu.indices, gpu.indices.cpu())
    assert torch.equal(cpu.counts, gpu.counts.cpu())
    torch.testing.assert_close(cpu.weights, gpu.weights.cpu())


@pytest.mark.fault("bad arguments", "clear error")
@pytest.mark.parametrize("bad", [True, "0.05", None, torch.tensor([0.05])])
def test_alpha_of_the_wrong_type_is_refused_everywhere(bad):
    """``alpha=True`` was taken as 1.0 and ``"0.05"`` accepted; ``None`` failed inside float()."""
    from bh_helpers.selection.fused import fused_select_experts, select_with_null
    from bh_helpers.nulls.fit import fit_null, fit_null_bank
    from bh_helpers import BHSelector

    g = torch.Generator().manual_seed(0)
    x = torch.randn(5, 64, generator=g)
    null = fit_null(torch.randn(2000, 64, generator=g))
    p = null.sf(x)
    bank = fit_null_bank({0: torch.randn(2000, 64, generator=g)})
    calls = [
        lambda: fdr_counts(p, bad),
        lambda: select_experts(x, p, method="bh", alpha=bad),
        lambda: fused_select_experts(x, p, method="bh", alpha=bad),
        lambda: select_with_null(x, null, method="bh", alpha=bad),
        lambda: BHSelector(bank, alpha=bad),
    ]
    for call in calls:
        with pytest.raises(TypeError, match=r"`alpha` must be a number in \(0, 1\], e.g. alpha=0.05"):
            call()
    assert select_experts(x, p, method="bh", alpha=np.float32(0.5)).counts.shape == (5,)  # numpy reals are numbers


def test_kernel_cache_one_eviction_rule_weak_owners_and_unhashable_keys():
    """The one cache of the fused selection (issue 24, item 4): a full table is emptied before
    the next entry, an owner's entries go with it, unhashable keys are built every time."""
    from bh_helpers.selection.fused_tables import KernelCache

    cache = KernelCache(maxsize=3)
    builds = []

    def build(value):
        builds.append(value)
        return value

    for i in range(3):
        assert cache.get_or_build(("k", i), lambda i=i: build(i)) == i
    assert cache.get_or_build(("k", 0), lambda: build("again")) == 0 and builds == [0, 1, 2]
    cache.get_or_build(("k", 3), lambda: build(3))  # the fourth entry empties the full table first
    assert cache.keys() == [("k", 3)]

    class Owner:
        pass

    owner = Owner()
    cache.put("cut", "value", owner=owner)
    assert cache.get("cut", owner=owner) == "value" and cache.get("cut") is None
    del owner
    gc.collect()
    assert len(cache._owned) == 0
    assert cache.get_or_build(("k", [1]), lambda: build("unhashable")) == "unhashable"
    assert cache.get_or_build(("k", [1]), lambda: build("unhashable")) == "unhashable"
    assert builds[-2:] == ["unhashable", "unhashable"]


# ----------------------------------------------------------------------------------------------
# Booleans are not numbers (issue 25, class 7): every numeric selector and budget argument
# ----------------------------------------------------------------------------------------------


def _numeric_argument_cases():
    """``(label, call)`` for a boolean given to each numeric argument of the selectors and budgets."""
    from bh_helpers.app.paths import default_null_bank_dir
    from bh_helpers.experiments.configs import SweepConfig
    from bh_helpers.nulls.bank import NullBank
    from bh_helpers.selection.budget import ComputeBudget
    from bh_helpers.selection.controls import MixedTopKSelector
    from bh_helpers.selection.selectors import BHSelector, TopKSelector, TopPSelector
    from bh_helpers.selection.static import StaticLayerSelector

    bank = NullBank.load(default_null_bank_dir("tiny"))
    x = torch.randn(20, 64, generator=torch.Generator().manual_seed(0))
    budget = ComputeBudget(bank, {0: x})
    return {
        "TopPSelector p": ("p", lambda v: TopPSelector(p=v)),
        "TopPSelector min_k": ("min_k", lambda v: TopPSelector(0.5, min_k=v)),
        "TopPSelector max_k": ("max_k", lambda v: TopPSelector(0.5, max_k=v)),
        "TopKSelector k": ("k", lambda v: TopKSelector(v)),
        "BHSelector alpha": ("alpha", lambda v: BHSelector(bank, alpha=v)),
        "BHSelector alpha per layer": (r"alpha\[0\]", lambda v: BHSelector(bank, alpha=(v, 0.1))),
        "BHSelector min_k": ("min_k", lambda v: BHSelector(bank, min_k=v)),
        "BHSelector max_k": ("max_k", lambda v: BHSelector(bank, max_k=v)),
        "MixedTopKSelector mean_k": ("mean_k", lambda v: MixedTopKSelector(v)),
        "MixedTopKSelector mean_k per layer": (r"mean_k\[0\]", lambda v: MixedTopKSelector({0: v})),
        "MixedTopKSelector max_k": ("max_k", lambda v: MixedTopKSelector(0.5, max_k=v)),
        "StaticLayerSelector ks": (r"ks\[0\]", lambda v: StaticLayerSelector((v, 2))),
        "select_experts top_p": ("top_p", lambda v: select_experts(x, method="top_p", top_p=v)),
        "select_experts temperature": ("temperature", lambda v: select_experts(x, method="topk", k=2, temperature=v)),
        "select_experts k": ("k", lambda v: select_experts(x, method="topk", k=v)),
        "ComputeBudget target_mean_k": ("target_mean_k", lambda v: budget.alpha(v)),
        "ComputeBudget target_mean_k per layer": (r"target_mean_k\[0\]", lambda v: budget.alpha({0: v})),
        "ComputeBudget max_tokens": ("max_tokens", lambda v: ComputeBudget(bank, {0: x}, max_tokens=v)),
        "SweepConfig top_p": ("top_p", lambda v: SweepConfig("top_p", top_p=v, min_k=1, max_k=8)),
        "SweepConfig alpha": ("alpha", lambda v: SweepConfig("bh", alpha=v, min_k=1, max_k=8, kernel="gaussian")),
    }


@pytest.mark.fault("bad arguments", "clear error")
@pytest.mark.parametrize("value", [True, np.bool_(True)], ids=["True", "numpy True"])
@pytest.mark.parametrize("case", ["TopPSelector p", "select_experts top_p", "select_experts temperature",
                                  "SweepConfig top_p", "SweepConfig alpha"])
def test_a_boolean_is_not_a_number(case, value):
    """``TopPSelector(p=True)`` was p=1.0 (every expert up to max_k), and its siblings likewise."""
    name, call = _numeric_argument_cases()[case]
    with pytest.raises(TypeError, match=rf"`{name}` must be .*got (np\.)?True"):
        call(value)


@pytest.mark.parametrize("case", [
    "TopPSelector min_k", "TopPSelector max_k", "TopKSelector k", "BHSelector alpha", "BHSelector alpha per layer",
    "BHSelector min_k", "BHSelector max_k", "MixedTopKSelector mean_k", "MixedTopKSelector mean_k per layer",
    "MixedTopKSelector max_k", "StaticLayerSelector ks", "select_experts k", "ComputeBudget target_mean_k",
    "ComputeBudget target_mean_k per layer", "ComputeBudget max_tokens"])
def test_a_boolean_is_refused_by_every_other_numeric_argument(case):
    """The siblings that refused a boolean already (one check per kind: check_int, check_level, check_number)."""
    name, call = _numeric_argument_cases()[case]
    with pytest.raises(TypeError, match=rf"`{name}` must be .*got True"):
        call(True)


def test_check_number():
    from bh_helpers._validate import ArgumentTypeError, check_number

    assert check_number("t", 2) == 2.0 and check_number("t", np.float32(0.5), 0, 1) == 0.5
    for bad in (True, np.bool_(False), "0.5", None):
        with pytest.raises(ArgumentTypeError, match="`t` must be a (finite )?number"):
            check_number("t", bad)
    for bad in (float("nan"), float("inf"), -1.0):
        with pytest.raises(ValueError, match=r"`t` must be a number >= 0 \(experts\); got"):
            check_number("t", bad, 0, hint="experts")
    with pytest.raises(ValueError, match=r"`t` must be a number in \(0, 1\]; got 0.0"):
        check_number("t", 0.0, 0, 1, low_open=True)
    with pytest.raises(ValueError, match=r"`t` must be a finite number; got nan"):
        check_number("t", float("nan"))
