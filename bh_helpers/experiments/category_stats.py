"""The tests behind the prompt-category claims: bootstrap interval of a mean, trend, paired comparison.

- :func:`bootstrap_mean_ci`: percentile bootstrap confidence interval of a mean (values
  resampled with replacement, ``numpy.random.default_rng(seed)``);
- :func:`trend_test`: Spearman correlation between category rank and per-prompt value
  (two-sided), and a Kruskal-Wallis test of equal distributions across categories;
- :func:`paired_comparison`: paired t-test, Wilcoxon signed-rank test and Cohen's
  ``d_z = mean(d) / sd(d)`` (``ddof=1``) of two aligned samples.

:mod:`bh_helpers.experiments.categories` runs them on measured prompts (and re-exports them).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass

import numpy as np

from bh_helpers._validate import check_int

__all__ = ["BootstrapCI", "PairedTest", "TrendTest", "bootstrap_mean_ci", "check_ci", "paired_comparison", "trend_test"]


@dataclass(frozen=True)
class BootstrapCI:
    """Percentile bootstrap confidence interval of a mean.

    Attributes
    ----------
    mean : float
        Sample mean.
    low, high : float
        Percentile interval ``[q((1 - ci) / 2), q((1 + ci) / 2)]`` of the bootstrap means
        (``numpy.quantile``, linear method).
    n : int
    n_boot : int
    ci : float
    seed : int
    """

    mean: float
    low: float
    high: float
    n: int
    n_boot: int
    ci: float
    seed: int

    def to_dict(self) -> dict:
        return asdict(self)


def check_ci(ci: float, n_boot: int) -> None:
    """Raise ValueError naming `ci` unless it is in (0, 1), or `n_boot` unless it is a positive integer."""
    if not 0.0 < float(ci) < 1.0:
        raise ValueError(f"`ci` must be in (0, 1), e.g. 0.95; got {ci!r}.")
    check_int("n_boot", n_boot, 1)


def _as_1d(values, name: str) -> np.ndarray:
    x = np.asarray(values, dtype=float).reshape(-1)
    if x.size == 0:
        raise ValueError(f"`{name}` is empty.")
    if not np.all(np.isfinite(x)):
        raise ValueError(f"`{name}` holds NaN or inf values.")
    return x


def bootstrap_mean_ci(values, *, n_boot: int = 2000, ci: float = 0.95, seed: int = 0,
                      rng: np.random.Generator | None = None) -> BootstrapCI:
    """Percentile bootstrap interval of the mean of ``values``.

    Parameters
    ----------
    values : array-like of float
    n_boot : int, default 2000
        Bootstrap resamples.
    ci : float, default 0.95
        Coverage.
    seed : int, default 0
        Seed of ``numpy.random.default_rng`` (ignored when ``rng`` is given).
    rng : numpy.random.Generator, optional
        Generator to draw from (so several calls can share one stream).

    Returns
    -------
    BootstrapCI

    Notes
    -----
    The resample indices are one draw ``rng.integers(0, n, size=(n_boot, n))``; resample
    ``b`` is row ``b``.

    Examples
    --------
    >>> r = bootstrap_mean_ci([1.0, 2.0, 3.0, 4.0], n_boot=500, seed=0)
    >>> r.low <= r.mean <= r.high
    True
    """
    check_ci(ci, n_boot)
    x = _as_1d(values, "values")
    gen = rng if rng is not None else np.random.default_rng(seed)
    idx = gen.integers(0, x.size, size=(int(n_boot), x.size))  # (B, n)
    means = x[idx].mean(axis=1)  # (B,)
    lo, hi = np.quantile(means, [(1 - ci) / 2, (1 + ci) / 2])
    return BootstrapCI(mean=float(x.mean()), low=float(lo), high=float(hi), n=int(x.size),
                       n_boot=int(n_boot), ci=float(ci), seed=int(seed))


@dataclass(frozen=True)
class TrendTest:
    """Is mean k ordered by category? (see :func:`trend_test`).

    Attributes
    ----------
    spearman_rho, spearman_pvalue : float
        ``scipy.stats.spearmanr(category rank, per-prompt value)``, two-sided.
    kruskal_h, kruskal_pvalue : float
        ``scipy.stats.kruskal`` across categories.
    n : int
        Prompts.
    categories : list of str
        In rank order.
    """

    spearman_rho: float
    spearman_pvalue: float
    kruskal_h: float
    kruskal_pvalue: float
    n: int
    categories: list[str]

    def to_dict(self) -> dict:
        return asdict(self)


def trend_test(values_by_category: Mapping[str, Sequence[float]]) -> TrendTest:
    """Spearman trend over ordered categories and Kruskal-Wallis across them.

    Parameters
    ----------
    values_by_category : mapping of str to sequence of float
        Per-prompt values (e.g. mean experts per token), categories in their order (rank 0, 1, ...).

    Returns
    -------
    TrendTest

    Raises
    ------
    ValueError
        Fewer than two categories, or an empty one.
    """
    from scipy import stats

    if not isinstance(values_by_category, Mapping) or len(values_by_category) < 2:
        raise ValueError("`values_by_category` needs at least two categories {name: values}.")
    groups = [_as_1d(v, f"values_by_category[{k!r}]") for k, v in values_by_category.items()]
    ranks = np.concatenate([np.full(g.size, i, dtype=float) for i, g in enumerate(groups)])
    values = np.concatenate(groups)
    rho = stats.spearmanr(ranks, values)
    try:
        kw = stats.kruskal(*groups)
        h, p = float(kw.statistic), float(kw.pvalue)
    except ValueError:  # all values identical
        h, p = math.nan, math.nan
    return TrendTest(spearman_rho=float(rho.statistic), spearman_pvalue=float(rho.pvalue), kruskal_h=h,
                     kruskal_pvalue=p, n=int(values.size), categories=[str(k) for k in values_by_category])


@dataclass(frozen=True)
class PairedTest:
    """Paired comparison of two configurations on the same prompts (``d = a - b``).

    Attributes
    ----------
    name_a, name_b : str
    n : int
    mean_a, mean_b, mean_diff, sd_diff : float
        ``sd_diff`` with ``ddof=1``.
    t_statistic, t_pvalue : float
        ``scipy.stats.ttest_rel(a, b)``, two-sided.
    wilcoxon_statistic, wilcoxon_pvalue : float
        ``scipy.stats.wilcoxon(a, b)``, two-sided (NaN when every difference is 0).
    cohens_dz : float
        ``mean_diff / sd_diff`` (NaN when ``sd_diff`` is 0).
    """

    name_a: str
    name_b: str
    n: int
    mean_a: float
    mean_b: float
    mean_diff: float
    sd_diff: float
    t_statistic: float
    t_pvalue: float
    wilcoxon_statistic: float
    wilcoxon_pvalue: float
    cohens_dz: float

    def to_dict(self) -> dict:
        return asdict(self)


def paired_comparison(a, b, *, name_a: str = "a", name_b: str = "b") -> PairedTest:
    """Paired t-test, Wilcoxon signed-rank test and Cohen's d_z of ``a - b``.

    Parameters
    ----------
    a, b : array-like of float
        Per-prompt values of two configurations, aligned (same prompts, same order).
    name_a, name_b : str
        Labels kept in the result.

    Returns
    -------
    PairedTest

    Raises
    ------
    ValueError
        Different lengths, fewer than 2 pairs, or non-finite values.
    """
    from scipy import stats

    x, y = _as_1d(a, "a"), _as_1d(b, "b")
    if x.size != y.size:
        raise ValueError(f"`a` and `b` must be paired (same length); got {x.size} and {y.size}.")
    if x.size < 2:
        raise ValueError("`a` and `b` need at least 2 pairs for a paired test.")
    d = x - y
    sd = float(d.std(ddof=1))
    t = stats.ttest_rel(x, y)
    if np.all(d == 0):
        w_stat, w_p = math.nan, math.nan
    else:
        w = stats.wilcoxon(x, y)
        w_stat, w_p = float(w.statistic), float(w.pvalue)
    return PairedTest(
        name_a=name_a, name_b=name_b, n=int(x.size), mean_a=float(x.mean()), mean_b=float(y.mean()),
        mean_diff=float(d.mean()), sd_diff=sd, t_statistic=float(t.statistic), t_pvalue=float(t.pvalue),
        wilcoxon_statistic=w_stat, wilcoxon_pvalue=w_p, cohens_dz=float(d.mean()) / sd if sd > 0 else math.nan,
    )
