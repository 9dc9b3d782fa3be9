"""Goodness of fit of a null on held-out logits: KS distance and calibration of the tail levels.

:func:`goodness_of_fit` checks one null; :func:`goodness_table` tabulates it for every kernel's bank
and layer, and :func:`choose_kernel` picks the kernel that fits best.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from scipy import stats

from bh_helpers._validate import check_finite_logits, check_int
from bh_helpers.nulls.model import NullModel

__all__ = ["GoodnessOfFit", "choose_kernel", "goodness_of_fit", "goodness_table"]

# ---------------------------------------------------------------------------------------------
# Diagnostics
# ---------------------------------------------------------------------------------------------

# Nominal levels at which the observed fraction of held-out p-values is reported.
_TAIL_LEVELS = (0.001, 0.01, 0.05, 0.1)


@dataclass(frozen=True)
class GoodnessOfFit:
    """How well a null describes held-out null logits (see :func:`goodness_of_fit`).

    Attributes
    ----------
    ks_distance : float
        Kolmogorov-Smirnov distance ``sup_x |F_null(x) - F_heldout(x)|`` over all held-out logits
        (pooled over experts; for a per-expert null each logit uses its own expert's CDF).
    pit_ks_statistic, pit_ks_pvalue : float
        ``scipy.stats.kstest`` of the held-out p-values against Uniform(0, 1), on a seeded
        subsample of at most ``max_samples`` values (with millions of logits any misfit, however
        small, would give a p-value of 0).
    n_held_out : int
        Number of held-out logits.
    n_tested : int
        Size of the subsample used for the KS test.
    pvalue_histogram : ndarray of shape (bins,)
        Fraction of all held-out p-values in each of ``bins`` equal bins of [0, 1] (uniform:
        ``1 / bins`` each).
    bin_edges : ndarray of shape (bins + 1,)
    tail_fractions : dict of float to float
        Observed fraction of held-out p-values ``<= t`` for ``t`` in 0.001, 0.01, 0.05, 0.1
        (calibrated: about ``t``; above ``t`` means anti-conservative p-values).
    """

    ks_distance: float
    pit_ks_statistic: float
    pit_ks_pvalue: float
    n_held_out: int
    n_tested: int
    pvalue_histogram: np.ndarray
    bin_edges: np.ndarray
    tail_fractions: dict[float, float] = field(default_factory=dict)


def goodness_of_fit(
    null: NullModel,
    held_out_logits: Any,
    *,
    bins: int = 10,
    max_samples: int = 20_000,
    seed: int = 0,
) -> GoodnessOfFit:
    """Check a null against held-out calibration logits (not used for fitting it).

    Parameters
    ----------
    null : NullModel
    held_out_logits : Tensor or ndarray
        ``[N, E]`` logits (``[..., E]`` for a per-expert null), finite.
    bins : int, default=10
        Number of p-value histogram bins.
    max_samples : int, default=20_000
        Largest subsample for the KS test of uniformity (drawn without replacement with
        ``numpy.random.default_rng(seed)``, so results are reproducible).
    seed : int, default=0

    Returns
    -------
    GoodnessOfFit

    Examples
    --------
    >>> import torch
    >>> g = torch.Generator().manual_seed(0)
    >>> null = fit_null(torch.randn(4000, 16, generator=g))
    >>> fit = goodness_of_fit(null, torch.randn(4000, 16, generator=g))
    >>> fit.ks_distance < 0.01 and fit.pit_ks_pvalue > 0.01
    True
    """
    # Input Validation and Special Cases
    if not isinstance(null, NullModel):
        raise ValueError(f"`null` must be a NullModel, got {type(null).__name__}")
    check_int("bins", bins, 1)
    check_int("max_samples", max_samples, 1)
    check_finite_logits("held_out_logits", held_out_logits)
    x = torch.as_tensor(held_out_logits).detach().to("cpu", torch.float64)
    if x.numel() == 0:
        raise ValueError("`held_out_logits` is empty")

    # Main Algorithm
    u = np.sort(null.cdf(x).numpy().reshape(-1))
    n = u.size
    # KS distance of a continuous CDF to an ECDF: the largest gap on either side of each jump.
    i = np.arange(1, n + 1, dtype=np.float64)
    ks_distance = float(max(np.max(i / n - u), np.max(u - (i - 1) / n)))

    p = null.sf(x).numpy().reshape(-1)
    if n > max_samples:
        tested = p[np.random.default_rng(seed).choice(n, size=max_samples, replace=False)]
    else:
        tested = p
    test = stats.kstest(tested, "uniform")
    hist, edges = np.histogram(p, bins=bins, range=(0.0, 1.0))
    return GoodnessOfFit(
        ks_distance=ks_distance,
        pit_ks_statistic=float(test.statistic),
        pit_ks_pvalue=float(test.pvalue),
        n_held_out=int(n),
        n_tested=int(tested.size),
        pvalue_histogram=hist / n,
        bin_edges=edges,
        tail_fractions={t: float(np.mean(p <= t)) for t in _TAIL_LEVELS},
    )


def goodness_table(banks_by_kernel: Mapping[str, Any], held_out: Mapping[int, torch.Tensor]):
    """Goodness of fit of every kernel's null on held-out logits, per layer.

    Parameters
    ----------
    banks_by_kernel : mapping of str to NullBank
        One bank per kernel name (or any mapping ``layer -> NullModel``).
    held_out : mapping of int to Tensor
        Held-out logits ``[N, E]`` per layer (not used for fitting the banks).

    Returns
    -------
    pandas.DataFrame
        Columns ``kernel``, ``layer``, ``ks_distance``, ``pit_ks_statistic``, ``pit_ks_pvalue``,
        ``p<=0.001``, ``p<=0.01``, ``p<=0.05`` (observed share of held-out p-values under each
        level: about the level when calibrated, above it when the null's tail is too light).
    """
    import pandas as pd

    rows = []
    for kernel, bank in banks_by_kernel.items():
        for layer, logits in held_out.items():
            fit = goodness_of_fit(bank[layer], logits)
            rows.append({
                "kernel": kernel,
                "layer": layer,
                "ks_distance": fit.ks_distance,
                "pit_ks_statistic": fit.pit_ks_statistic,
                "pit_ks_pvalue": fit.pit_ks_pvalue,
                **{f"p<={t:g}": fit.tail_fractions[t] for t in (0.001, 0.01, 0.05)},
            })
    return pd.DataFrame(rows)


def choose_kernel(table) -> str:
    """The kernel with the smallest mean KS distance over layers (ties: the first listed).

    Parameters
    ----------
    table : pandas.DataFrame
        From :func:`goodness_table`.

    Returns
    -------
    str
    """
    means = table.groupby("kernel", sort=False)["ks_distance"].mean()
    return str(means.idxmin())
