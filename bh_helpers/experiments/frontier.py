"""Compute-matched comparison of adaptive routing against static top-k.

A BH configuration that uses on average ``k_bar`` experts per token should be compared with
static top-k at the same compute, not only with the model's native top-8. Static top-k is run
at integer ``k = 1 .. K`` only, so the baseline at ``k_bar`` is interpolated:

- the top-k curve of one data set is the set of points ``(k_i, q_i)`` (measured mean experts
  per token, quality metric) of its ``method == "topk"`` rows, sorted by ``k_i``;
- between neighbouring points ``k_i <= k_bar <= k_{i+1}`` the baseline is
  ``q(k_bar) = q_i + (k_bar - k_i) / (k_{i+1} - k_i) * (q_{i+1} - q_i)``
  (``interpolation="linear"``), or the same formula on ``log q`` and then ``exp``
  (``interpolation="log"``; for perplexity this is linear interpolation of the mean NLL);
- a configuration with ``k_bar`` outside ``[k_1, k_K]`` gets no baseline (``NaN``) and a status
  that says so; nothing is extrapolated.

The difference is ``delta = q_config - q_topk`` and ``relative = delta / q_topk``. For
perplexity (lower is better) a negative delta means the configuration beats compute-matched
top-k.

Caveat: perplexity falls convexly with k, and a chord lies above a convex curve, so the
interpolated baseline is slightly pessimistic about top-k between integer k (it favours the
configuration); ``"log"`` interpolation shrinks but does not remove this. Differences of the
size of that gap (compare with the neighbouring top-k values) are not evidence either way.

Examples
--------
>>> import pandas as pd
>>> df = pd.DataFrame({
...     "dataset": ["d"] * 3, "label": ["top-1", "top-2", "bh a=0.5 k=1..8 gaussian"],
...     "method": ["topk", "topk", "bh"], "key": ["a", "b", "c"],
...     "mean_experts_per_token": [1.0, 2.0, 1.25], "perplexity": [40.0, 20.0, 30.0]})
>>> fr = compute_frontier(df)
>>> float(fr.loc[0, "topk_matched"]), float(fr.loc[0, "delta"])
(35.0, -5.0)
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from bh_helpers._validate import check_choice
from bh_helpers.experiments.configs import FDR_METHODS
from bh_helpers.experiments.results_file import finite_rows

__all__ = [
    "INTERPOLATIONS",
    "STATUS_OK",
    "STATUS_BELOW",
    "STATUS_ABOVE",
    "STATUS_MISSING",
    "TopKCurve",
    "topk_curve",
    "interpolate_topk",
    "compute_frontier",
]

INTERPOLATIONS = ("linear", "log")
STATUS_OK = "ok"
STATUS_BELOW = "below top-k range"  # fewer experts than the smallest static k: not extrapolated
STATUS_ABOVE = "above top-k range"  # more experts than the largest static k: not extrapolated
STATUS_MISSING = "missing metric"

_TOL = 1e-9  # a mean k within this of an end of the top-k range counts as inside


@dataclass(frozen=True)
class TopKCurve:
    """The static top-k curve of one data set.

    Attributes
    ----------
    k : ndarray of float
        Mean experts per token of each static top-k point, increasing.
    value : ndarray of float
        The quality metric at each point.
    labels : list of str
        ``"top-1"``, ``"top-2"``, ... in the same order.
    """

    k: np.ndarray
    value: np.ndarray
    labels: list[str]


def _check_interpolation(interpolation: str) -> None:
    check_choice("interpolation", interpolation, INTERPOLATIONS)


def _check_columns(results, columns: Sequence[str]) -> None:
    missing = [c for c in columns if c not in results.columns]
    if missing:
        raise ValueError(
            f"`results` lacks columns {missing}; pass a DataFrame from bh_helpers.experiments.sweep.load_results "
            f"of a sweep whose metrics include them (it has {sorted(map(str, results.columns))})."
        )


def topk_curve(results, *, dataset: str | None = None, metric: str = "perplexity",
               cost: str = "mean_experts_per_token") -> TopKCurve:
    """The static top-k points of one data set, sorted by mean experts per token.

    Parameters
    ----------
    results : pandas.DataFrame
        Sweep results (columns ``dataset``, ``method``, ``cost`` and ``metric``).
    dataset : str, optional
        Required when ``results`` holds more than one data set.
    metric, cost : str
        Column names of the quality metric and of the mean experts per token.

    Returns
    -------
    TopKCurve

    Raises
    ------
    ValueError
        No static top-k rows with a finite metric, two top-k rows at the same cost, or an
        ambiguous ``dataset``.
    """
    _check_columns(results, ["dataset", "method", metric, cost])
    if dataset is None:
        names = list(dict.fromkeys(results["dataset"]))
        if len(names) != 1:
            raise ValueError(f"`results` holds data sets {names}; pass `dataset=` to pick one.")
        dataset = names[0]
    rows = results[(results["dataset"] == dataset) & (results["method"] == "topk")]
    x = rows[cost].to_numpy(dtype=float)
    y = rows[metric].to_numpy(dtype=float)
    finite = finite_rows(results, rows, (metric, cost), dataset=dataset, what="static top-k row")
    if not finite.any():
        raise ValueError(
            f"no static top-k rows for data set {dataset!r}; include static top-k in the sweep (`topk_max` "
            "of 1 or more; expand_grid with `topk=True`)."
        )
    labels = rows["label"].tolist() if "label" in rows.columns else [f"top-{k}" for k in rows.get("k", x)]
    order = np.argsort(x[finite], kind="stable")
    kx, ky = x[finite][order], y[finite][order]
    if np.any(np.diff(kx) <= 0):
        raise ValueError(
            f"static top-k rows of data set {dataset!r} repeat a mean-k value ({kx.tolist()}); "
            "deduplicate `results` first."
        )
    kept = [lab for lab, f in zip(labels, finite) if f]
    return TopKCurve(k=kx, value=ky, labels=[kept[i] for i in order])


def interpolate_topk(curve: TopKCurve, mean_k, *, interpolation: str = "linear") -> tuple[np.ndarray, np.ndarray]:
    """Compute-matched top-k metric at ``mean_k`` (see the module docstring).

    Parameters
    ----------
    curve : TopKCurve
    mean_k : float or array-like
        Mean experts per token of the configurations.
    interpolation : {"linear", "log"}
        Interpolate the metric itself, or its logarithm.

    Returns
    -------
    matched : ndarray of float
        The interpolated metric, ``NaN`` outside ``[curve.k[0], curve.k[-1]]`` and for NaN input.
    status : ndarray of str
        :data:`STATUS_OK`, :data:`STATUS_BELOW`, :data:`STATUS_ABOVE` or :data:`STATUS_MISSING`.
    """
    _check_interpolation(interpolation)
    x = np.atleast_1d(np.asarray(mean_k, dtype=float))
    lo, hi = curve.k[0], curve.k[-1]
    status = np.full(x.shape, STATUS_OK, dtype=object)
    status[x < lo - _TOL] = STATUS_BELOW
    status[x > hi + _TOL] = STATUS_ABOVE
    status[~np.isfinite(x)] = STATUS_MISSING
    inside = status == STATUS_OK
    values = curve.value if interpolation == "linear" else np.log(curve.value)
    matched = np.full(x.shape, np.nan)
    # np.interp is exactly the piecewise-linear formula of the module docstring.
    matched[inside] = np.interp(np.clip(x[inside], lo, hi), curve.k, values)
    if interpolation == "log":
        matched = np.exp(matched)
    return matched, status


def _bracket(curve: TopKCurve, x: float) -> tuple[str, str]:
    """Labels of the top-k points on either side of ``x`` (equal when ``x`` hits one)."""
    if not (curve.k[0] - _TOL <= x <= curve.k[-1] + _TOL):
        return "", ""
    i = int(np.searchsorted(curve.k, x - _TOL, side="left"))
    if i < len(curve.k) and abs(curve.k[i] - x) <= _TOL:
        return curve.labels[i], curve.labels[i]
    return curve.labels[i - 1], curve.labels[i]


def compute_frontier(
    results,
    *,
    metric: str = "perplexity",
    cost: str = "mean_experts_per_token",
    methods: Sequence[str] = FDR_METHODS,
    interpolation: str = "linear",
    higher_is_better: bool = False,
):
    """Compare every configuration of ``methods`` with static top-k at the same mean k.

    Parameters
    ----------
    results : pandas.DataFrame
        Sweep results (:func:`bh_helpers.experiments.sweep.load_results`): columns ``dataset``,
        ``method``, ``label``, ``cost`` and ``metric``; every data set needs static top-k rows.
    metric : str, default "perplexity"
        Quality column to compare.
    cost : str, default "mean_experts_per_token"
        Column with the mean experts per token (measured by the routing recorder).
    methods : sequence of str, default ("bh", "by", "bonferroni", "holm")
        Methods to compare (add ``"top_p"`` to compare top-p too).
    interpolation : {"linear", "log"}, default "linear"
        How the top-k curve is interpolated between neighbouring k (module docstring).
    higher_is_better : bool, default False
        Direction of ``metric`` (False for perplexity and NLL, True for accuracy); decides
        the ``better`` column.

    Returns
    -------
    pandas.DataFrame
        One row per (configuration, data set), in the order of ``results``: ``dataset``,
        ``key``, ``label``, ``method``, ``alpha``, ``max_k``, ``mean_k``, ``value`` (the
        configuration's metric), ``topk_matched``, ``delta`` (``value - topk_matched``),
        ``relative`` (``delta / topk_matched``), ``bracket`` (the neighbouring top-k labels),
        ``status``, ``better`` (True/False, None when not matched). ``attrs`` records
        ``metric``, ``cost``, ``interpolation`` and ``higher_is_better``.

    Raises
    ------
    ValueError
        Missing columns, a data set without static top-k rows, unknown ``interpolation``.
    """
    import pandas as pd

    _check_interpolation(interpolation)
    _check_columns(results, ["dataset", "method", metric, cost])
    methods = tuple(methods)
    if not methods:
        raise ValueError("`methods` is empty; pass e.g. ('bh', 'by').")
    chosen = results[results["method"].isin(methods)]
    columns = ["dataset", "key", "label", "method", "alpha", "max_k", "mean_k", "value", "topk_matched",
               "delta", "relative", "bracket", "status", "better"]
    records = []
    curves: dict[str, TopKCurve] = {}
    for _, row in chosen.iterrows():
        name = row["dataset"]
        if name not in curves:
            curves[name] = topk_curve(results, dataset=name, metric=metric, cost=cost)
        curve = curves[name]
        x, value = float(row[cost]), float(row[metric])
        matched, status = interpolate_topk(curve, x, interpolation=interpolation)
        matched, status = float(matched[0]), str(status[0])
        if status == STATUS_OK and not math.isfinite(value):
            status, matched = STATUS_MISSING, math.nan
        delta = value - matched if status == STATUS_OK else math.nan
        lo, hi = _bracket(curve, x) if status == STATUS_OK else ("", "")
        records.append({
            "dataset": name,
            "key": row.get("key"),
            "label": row.get("label"),
            "method": row["method"],
            "alpha": row.get("alpha"),
            "max_k": row.get("max_k"),
            "mean_k": x,
            "value": value,
            "topk_matched": matched,
            "delta": delta,
            "relative": delta / matched if status == STATUS_OK else math.nan,
            "bracket": (lo if lo == hi else f"{lo}..{hi}") if lo else "",
            "status": status,
            "better": (delta > 0 if higher_is_better else delta < 0) if status == STATUS_OK else None,
        })
    out = pd.DataFrame.from_records(records, columns=columns)
    out.attrs.update(metric=metric, cost=cost, interpolation=interpolation, higher_is_better=higher_is_better)
    return out
