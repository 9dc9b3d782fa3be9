"""Each adaptive configuration against the controls that ran at its compute, with paired intervals.

For every multiple-testing row of a sweep (per data set) this pairs it with its two controls
(:func:`bh_helpers.experiments.sweep.with_controls`):

- ``delta_vs_mixed`` = perplexity(adaptive) - perplexity(mixed top-k at the same per-layer mean
  k), with a paired interval (``ci_low``, ``ci_high``; by documents, see ``unit``):
  negative and excluding 0 means the adaptive rule is better than a policy that really ran at its
  compute;
- ``delta_vs_shuffled`` (and its interval): the same against the adaptive rule's own counts
  shuffled across tokens; negative means *which* tokens get more experts carries information;
- ``delta_vs_static`` (and its interval): against the static chord, the per-window mixture of the
  two static per-layer allocations that brackets the adaptive row's realised mean k
  (:mod:`bh_helpers.experiments.static_allocation`), the strongest static policy;
- ``strongest`` (``delta_vs_strongest``, ``strongest_ci_low``, ``strongest_ci_high``): the control
  of the three with the lowest perplexity on that data set; a verdict reads against it;
  ``compute_matched`` says whether the adaptive row used at most the control's mean k (plus
  :data:`COMPUTE_TOLERANCE`): a row that used more is never called better;
- ``delta_vs_chord``: against the interpolated uniform top-k curve (the earlier guide), for
  reference.
"""

from __future__ import annotations

import math
from typing import Any

from bh_helpers._validate import check_choice
from bh_helpers.experiments.bootstrap import DEFAULT_RESAMPLES, paired_bootstrap, paired_jackknife
from bh_helpers.experiments.frontier import compute_frontier
from bh_helpers.experiments.configs import FDR_METHODS, controls_by_adaptive

__all__ = ["COMPARISON_COLUMNS", "UNITS", "compare_with_controls", "interval_unit"]

#: What a paired bootstrap may resample.
UNITS = ("document", "window")

COMPARISON_COLUMNS = [
    "dataset", "key", "label", "method", "statistic", "trim", "min_k", "alpha", "mean_k", "perplexity",
    "mixed_mean_k", "mixed_perplexity", "delta_vs_mixed", "ci_low", "ci_high",
    "shuffled_perplexity", "delta_vs_shuffled", "shuffled_ci_low", "shuffled_ci_high",
    "static_mean_k", "static_perplexity", "delta_vs_static", "static_ci_low", "static_ci_high",
    "strongest", "strongest_mean_k", "strongest_perplexity", "delta_vs_strongest", "strongest_ci_low",
    "strongest_ci_high", "compute_matched", "delta_vs_chord",
]
#: Mean experts per token by which an adaptive row may exceed its control and still count as
#: compute-matched (the mixed control rounds ``frac * T`` per call).
COMPUTE_TOLERANCE = 0.01
#: Control method -> column prefix in the comparison table.
_PREFIX = {"mixed": "mixed", "shuffled": "shuffled", "static_chord": "static"}


def _int_or(value: Any, default: int) -> int:
    """A config field read back from results (None or NaN where unset)."""
    return default if value is None or (isinstance(value, float) and math.isnan(value)) else int(value)


def _windows(row: Any) -> tuple[list, list] | None:
    nll, tok = row.get("window_nll"), row.get("window_tokens")
    if not isinstance(nll, list) or not isinstance(tok, list) or not nll:
        return None
    return nll, tok


def _documents(row: Any) -> list | None:
    """The document of each window, when the row has them and they name at least three documents."""
    docs = row.get("window_docs")
    return docs if isinstance(docs, list) and len(set(docs)) >= 3 else None


def _interval(a: Any, b: Any, resamples: int, seed: int, unit: str) -> tuple[float, float, float]:
    """(delta, low, high) of perplexity(a) - perplexity(b); NaNs when either lacks its windows."""
    wa, wb = _windows(a), _windows(b)
    if wa is None or wb is None:
        return math.nan, math.nan, math.nan
    if unit == "document":
        result = paired_jackknife(*wa, *wb, clusters=_documents(a))
    else:
        result = paired_bootstrap(*wa, *wb, resamples=resamples, seed=seed)
    return result.delta, result.low, result.high


def interval_unit(results, unit: str = "document") -> str:
    """``unit``, or "window" when some row of ``results`` lacks the documents of its windows."""
    check_choice("unit", unit, UNITS)
    if unit == "document" and "window_docs" in results.columns:
        if all(_documents(r) is not None for _, r in results.iterrows() if _windows(r) is not None):
            return "document"
    return "window"


def compare_with_controls(results, *, resamples: int = DEFAULT_RESAMPLES, seed: int = 0, unit: str = "document"):
    """One row per (adaptive configuration, data set) with its controls and paired intervals.

    Parameters
    ----------
    results : pandas.DataFrame
        Sweep results (:func:`bh_helpers.experiments.sweep.load_results`) with control rows
        (``method`` "mixed"/"shuffled", ``control_of``) and per-window NLL (``window_nll``,
        ``window_tokens``).
    resamples : int, default 2000
        Bootstrap resamples per interval.
    seed : int, default 0
        Seed of the window draws (the same for every row: comparable intervals).
    unit : {"document", "window"}, default "document"
        The paired interval: "document", the delete-one-document jackknife with Student's t
        (:func:`~bh_helpers.experiments.bootstrap.paired_jackknife`; windows of one document are
        correlated), or "window", the percentile bootstrap over windows. In the A/A benchmark
        (``benchmarks/aa_intervals.py``: two seeds of one policy, 200 replications per data set,
        16 windows, 6 documents) only the jackknife held its 5% level; the window bootstrap gave
        7.5-10% false positives and a percentile bootstrap over documents 12.5-16.5%. "document"
        falls back to "window" when a row has no per-window documents or fewer than three
        (results written before they were recorded); ``attrs["unit"]`` says which ran.

    Returns
    -------
    pandas.DataFrame
        Columns :data:`COMPARISON_COLUMNS`; a control that did not run leaves its columns NaN.
    """
    import pandas as pd

    unit = interval_unit(results, unit) if len(results) else "window"

    rows = {(r["key"], r["dataset"]): r for _, r in results.iterrows()}
    controls = controls_by_adaptive(results)
    chords = {}
    if len(results) and (results["method"] == "topk").any():
        frontier = compute_frontier(results)
        chords = {(f["key"], f["dataset"]): f["delta"] for _, f in frontier.iterrows()}
    records = []
    for (key, name), row in rows.items():
        if row.get("method") not in FDR_METHODS:
            continue
        record = {
            "dataset": name, "key": key, "label": row.get("label"), "method": row.get("method"),
            "statistic": row.get("statistic") if isinstance(row.get("statistic"), str) else "raw",
            "trim": _int_or(row.get("trim"), 0),
            "min_k": row.get("min_k"), "alpha": row.get("alpha"),
            "mean_k": float(row["mean_experts_per_token"]), "perplexity": float(row["perplexity"]),
            "delta_vs_chord": chords.get((key, name), math.nan),
        }
        ran = {}
        for method, prefix in _PREFIX.items():
            control = controls.get((key, name, method))
            delta = _interval(row, control, resamples, seed, unit) if control is not None else (math.nan,) * 3
            low, high = ("ci_low", "ci_high") if method == "mixed" else (f"{prefix}_ci_low", f"{prefix}_ci_high")
            record.update({f"{prefix}_mean_k": float(control["mean_experts_per_token"]) if control is not None
                           else math.nan,
                           f"{prefix}_perplexity": float(control["perplexity"]) if control is not None else math.nan,
                           f"delta_vs_{prefix}": delta[0], low: delta[1], high: delta[2]})
            if control is not None and not math.isnan(delta[0]):
                ran[method] = (float(control["perplexity"]), float(control["mean_experts_per_token"]), delta)
        if ran:  # the strongest control: the lowest perplexity (ties: mixed, shuffled, static chord order)
            method = min(ran, key=lambda m: ran[m][0])
            ppl, mean_k, delta = ran[method]
            record.update(strongest=method, strongest_mean_k=mean_k, strongest_perplexity=ppl,
                          delta_vs_strongest=delta[0], strongest_ci_low=delta[1], strongest_ci_high=delta[2],
                          compute_matched=bool(record["mean_k"] <= mean_k + COMPUTE_TOLERANCE))
        records.append(record)
    out = pd.DataFrame.from_records(records, columns=COMPARISON_COLUMNS)
    out.attrs.update(resamples=resamples, seed=seed, level=0.95, unit=unit)
    return out
