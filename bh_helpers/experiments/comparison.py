"""Each adaptive configuration against the controls that ran at its compute, with paired intervals.

For every multiple-testing row of a sweep (per data set) this pairs it with its two controls
(:func:`bh_helpers.experiments.sweep.with_controls`):

- ``delta_vs_mixed`` = perplexity(adaptive) - perplexity(mixed top-k at the same per-layer mean
  k), with a paired bootstrap interval over the scoring windows (``ci_low``, ``ci_high``):
  negative and excluding 0 means the adaptive rule is better than a policy that really ran at its
  compute;
- ``delta_vs_shuffled`` (and its interval): the same against the adaptive rule's own counts
  shuffled across tokens; negative means *which* tokens get more experts carries information;
- ``delta_vs_chord``: against the interpolated static top-k curve (the earlier guide), for
  reference.
"""

from __future__ import annotations

import math
from typing import Any

from bh_helpers.experiments.bootstrap import DEFAULT_RESAMPLES, paired_bootstrap
from bh_helpers.experiments.frontier import compute_frontier
from bh_helpers.experiments.configs import FDR_METHODS, controls_by_adaptive

__all__ = ["COMPARISON_COLUMNS", "compare_with_controls"]

COMPARISON_COLUMNS = [
    "dataset", "key", "label", "method", "statistic", "trim", "min_k", "alpha", "mean_k", "perplexity",
    "mixed_mean_k", "mixed_perplexity", "delta_vs_mixed", "ci_low", "ci_high",
    "shuffled_perplexity", "delta_vs_shuffled", "shuffled_ci_low", "shuffled_ci_high", "delta_vs_chord",
]


def _int_or(value: Any, default: int) -> int:
    """A config field read back from results (None or NaN where unset)."""
    return default if value is None or (isinstance(value, float) and math.isnan(value)) else int(value)


def _windows(row: Any) -> tuple[list, list] | None:
    nll, tok = row.get("window_nll"), row.get("window_tokens")
    if not isinstance(nll, list) or not isinstance(tok, list) or not nll:
        return None
    return nll, tok


def _interval(a: Any, b: Any, resamples: int, seed: int) -> tuple[float, float, float]:
    """(delta, low, high) of perplexity(a) - perplexity(b); NaNs when either lacks its windows."""
    wa, wb = _windows(a), _windows(b)
    if wa is None or wb is None:
        return math.nan, math.nan, math.nan
    result = paired_bootstrap(*wa, *wb, resamples=resamples, seed=seed)
    return result.delta, result.low, result.high


def compare_with_controls(results, *, resamples: int = DEFAULT_RESAMPLES, seed: int = 0):
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

    Returns
    -------
    pandas.DataFrame
        Columns :data:`COMPARISON_COLUMNS`; a control that did not run leaves its columns NaN.
    """
    import pandas as pd

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
        mixed = controls.get((key, name, "mixed"))
        shuffled = controls.get((key, name, "shuffled"))
        d_mixed = _interval(row, mixed, resamples, seed) if mixed is not None else (math.nan,) * 3
        d_shuf = _interval(row, shuffled, resamples, seed) if shuffled is not None else (math.nan,) * 3
        records.append({
            "dataset": name, "key": key, "label": row.get("label"), "method": row.get("method"),
            "statistic": row.get("statistic") if isinstance(row.get("statistic"), str) else "raw",
            "trim": _int_or(row.get("trim"), 0),
            "min_k": row.get("min_k"), "alpha": row.get("alpha"),
            "mean_k": float(row["mean_experts_per_token"]), "perplexity": float(row["perplexity"]),
            "mixed_mean_k": float(mixed["mean_experts_per_token"]) if mixed is not None else math.nan,
            "mixed_perplexity": float(mixed["perplexity"]) if mixed is not None else math.nan,
            "delta_vs_mixed": d_mixed[0], "ci_low": d_mixed[1], "ci_high": d_mixed[2],
            "shuffled_perplexity": float(shuffled["perplexity"]) if shuffled is not None else math.nan,
            "delta_vs_shuffled": d_shuf[0], "shuffled_ci_low": d_shuf[1], "shuffled_ci_high": d_shuf[2],
            "delta_vs_chord": chords.get((key, name), math.nan),
        })
    out = pd.DataFrame.from_records(records, columns=COMPARISON_COLUMNS)
    out.attrs.update(resamples=resamples, seed=seed, level=0.95)
    return out
