"""max_k saturation: how far mean k grows as the ceiling on experts per token is raised.

With a ceiling ``max_k`` a testing procedure's count per token is ``min(max(count, min_k), max_k)``.
A low ceiling hides how many experts the procedure would choose; raising it shows where the
ceiling stops mattering. For each alpha, :func:`saturation_table` gives mean k and the
ceiling-hit rate (share of token-layers whose uncapped count reaches ``max_k``) at every
``max_k`` of a grid, and :func:`saturation_points` the **saturation point**: the smallest grid
``max_k`` whose mean k is within ``threshold`` (5%) of the mean k at the largest grid ``max_k``,
i.e. the ceiling beyond which mean k grows by under 5% in all.

The counts come from calibration router logits under a null bank (the demo's captured logits:
native routing upstream), as in :class:`bh_helpers.selection.budget.ComputeBudget`; the
uncapped counts are computed once per alpha and every ceiling is a clamp of them.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch

from bh_helpers._validate import check_choice, check_int, check_level
from bh_helpers.selection.reference import FDR_METHODS, _counts_from_sorted

__all__ = ["SATURATION_MAX_KS", "saturation_from_counts", "saturation_points", "saturation_table"]

#: The ceilings of the saturation sweep (those above the model's expert count are left out).
SATURATION_MAX_KS = (2, 4, 8, 16, 32, 64)


def saturation_from_counts(counts_by_alpha: Mapping[float, Any], max_ks: Sequence[int], *, min_k: int = 1):
    """The saturation table from uncapped counts per token-layer.

    Parameters
    ----------
    counts_by_alpha : mapping of float to array of int
        Per alpha, the procedure's uncapped rejection count of every token-layer (any shape).
    max_ks : sequence of int
        Ceilings, increasing, each ``>= min_k``.
    min_k : int, default 1

    Returns
    -------
    pandas.DataFrame
        One row per (alpha, max_k): ``alpha``, ``max_k``, ``mean_k`` (of the clamped counts),
        ``ceiling_rate`` (share of token-layers whose uncapped count is at least ``max_k``).
    """
    import pandas as pd

    check_int("min_k", min_k, 0)
    max_ks = [check_int("max_ks", m, 1) for m in max_ks]
    if not max_ks or any(b <= a for a, b in zip(max_ks, max_ks[1:])) or max_ks[0] < min_k:
        raise ValueError(f"`max_ks` must be increasing ceilings >= min_k={min_k}; got {max_ks}.")
    rows = []
    for alpha, counts in counts_by_alpha.items():
        c = np.asarray(counts, dtype=np.int64).reshape(-1)
        if c.size == 0:
            raise ValueError(f"no counts for alpha={alpha!r}.")
        for m in max_ks:
            rows.append({"alpha": float(alpha), "max_k": m, "mean_k": float(np.clip(c, min_k, m).mean()),
                         "ceiling_rate": float((c >= m).mean())})
    return pd.DataFrame(rows, columns=["alpha", "max_k", "mean_k", "ceiling_rate"])


def saturation_table(bank: Any, logits_by_layer: Mapping[int, Any], alphas: Sequence[float], *, method: str = "bh",
                     min_k: int = 1, max_ks: Sequence[int] | None = None, max_tokens: int | None = 4096):
    """:func:`saturation_from_counts` of ``method``'s counts on calibration logits under ``bank``.

    Parameters
    ----------
    bank : NullBank
        Anything with ``.pvalues(logits, layer)``.
    logits_by_layer : mapping of int to Tensor of shape (N, E)
        Calibration router logits (e.g. a :class:`~bh_helpers.capture.CapturedLogits`).
    alphas : sequence of float
    method : {"bh", "by", "bonferroni", "holm"}, default "bh"
    min_k : int, default 1
    max_ks : sequence of int, optional
        Default: :data:`SATURATION_MAX_KS` up to the number of experts ``E``.
    max_tokens : int, optional, default 4096
        Tokens per layer, evenly spaced (None: all).

    Returns
    -------
    pandas.DataFrame
        As :func:`saturation_from_counts`, over all layers' tokens.
    """
    from bh_helpers.selection.budget import ComputeBudget

    check_choice("method", method, FDR_METHODS)
    alphas = [check_level("alphas", a) for a in alphas]
    budget = ComputeBudget(bank, logits_by_layer, max_tokens=max_tokens)  # sorted p-values, once
    num_experts = next(iter(budget.sorted_p.values())).shape[-1]
    if max_ks is None:
        max_ks = [m for m in SATURATION_MAX_KS if m <= num_experts]
    elif max(max_ks) > num_experts:
        raise ValueError(f"`max_ks` reaches {max(max_ks)} but the logits have {num_experts} experts; "
                         f"pass ceilings <= {num_experts}.")
    counts = {a: torch.cat([_counts_from_sorted(p, a, method) for p in budget.sorted_p.values()]).numpy()
              for a in alphas}
    return saturation_from_counts(counts, max_ks, min_k=min_k)


def saturation_points(table, *, threshold: float = 0.05):
    """Per alpha, the smallest ``max_k`` whose mean k is within ``threshold`` of the largest ceiling's.

    Returns
    -------
    pandas.DataFrame
        One row per alpha: ``alpha``, ``saturation_max_k``, ``mean_k_there``, ``ceiling_rate_there``,
        ``mean_k_at_largest`` (mean k at the largest grid ``max_k``), ``largest_max_k``.
    """
    import pandas as pd

    if not 0 <= threshold < 1:
        raise ValueError(f"`threshold` must be in [0, 1) (a relative growth); got {threshold!r}.")
    rows = []
    for alpha, group in table.sort_values("max_k").groupby("alpha", sort=False):
        top = group.iloc[-1]
        mean_k = group["mean_k"]
        within = group[(mean_k >= top["mean_k"]) | (top["mean_k"] < (1 + threshold) * mean_k)]  # growth < threshold
        first = within.iloc[0]
        rows.append({"alpha": alpha, "saturation_max_k": int(first["max_k"]), "mean_k_there": first["mean_k"],
                     "ceiling_rate_there": first["ceiling_rate"], "mean_k_at_largest": top["mean_k"],
                     "largest_max_k": int(top["max_k"])})
    return pd.DataFrame(rows)
