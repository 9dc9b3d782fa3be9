"""A budget optimiser over sweep results: the best configuration under a compute budget or a weighting.

Two questions, per data set, over every configuration that ran (adaptive, static top-k, top-p,
native; the controls are not candidates but are shown beside an adaptive pick):

- **budget**: the lowest perplexity with mean experts per token ``<= budget``;
- **weights** (the earlier research's ``optimize --quality-weight 0.7 --speed-weight 0.3``): the
  highest ``quality_weight * q + speed_weight * s`` where ``q`` and ``s`` are min-max scaled to
  [0, 1] over the candidates (``q = 1`` at the lowest perplexity, ``s = 1`` at the fewest
  experts per token).

Ties go to the configuration listed first in the results; a row with a non-finite perplexity or cost
(an overflowed run: ``inf``) ranks last and is never picked; a data set with no finite row is an error.
"""

from __future__ import annotations

import dataclasses
import math
import warnings

from bh_helpers._locks import new_output, refuse_existing
from bh_helpers.engines.config import bank_sha256_of
from bh_helpers.experiments.configs import CONTROLS, controls_by_adaptive
from bh_helpers.experiments.results_file import finite_rows

__all__ = ["OPTIMIZE_COLUMNS", "optimize", "save_routing_config"]

OPTIMIZE_COLUMNS = ["dataset", "criterion", "label", "method", "mean_k", "perplexity", "score",
                    "mixed_perplexity", "shuffled_perplexity", "candidates", "key"]


def _check(results, budget: float | None, quality_weight: float | None, speed_weight: float | None,
           metric: str, cost: str) -> None:
    """The arguments of :func:`optimize`, named as the caller typed them (the command line shows its flags)."""
    import pandas as pd

    if not isinstance(results, pd.DataFrame):
        raise ValueError(f"`results` must be the DataFrame of bh_helpers.experiments.sweep.load_results; got "
                         f"{type(results).__name__}.")
    if (budget is None) == (quality_weight is None and speed_weight is None):
        raise ValueError("give either `budget` (mean experts per token) or `quality_weight` and `speed_weight`.")
    if budget is not None and (isinstance(budget, bool) or not isinstance(budget, (int, float))
                               or not math.isfinite(budget) or budget <= 0):
        raise ValueError(f"`budget` must be a positive number of experts per token; got {budget!r}.")
    if budget is None:
        for name, w in (("quality_weight", quality_weight), ("speed_weight", speed_weight)):
            if isinstance(w, bool) or not isinstance(w, (int, float)) or not (math.isfinite(w) and w >= 0):
                raise ValueError(f"`{name}` must be a number >= 0; got {w!r}.")
        if quality_weight + speed_weight <= 0:
            raise ValueError("`quality_weight` and `speed_weight` must not both be 0.")
    numeric = [c for c in results.columns if pd.api.types.is_numeric_dtype(results[c])]
    for name, column in (("metric", metric), ("cost", cost)):
        if len(results) and column not in results.columns:
            raise ValueError(f"`{name}` {column!r} is not a column of `results`; the numeric columns are "
                             f"{sorted(numeric)[:12]}{' ...' if len(numeric) > 12 else ''}.")
    if len(results) and pd.api.types.is_numeric_dtype(results[cost]) and (results[cost] < 0).any():
        raise ValueError(f"`results` has rows with a negative {cost!r} (no run gives one: edited?); pass "
                         "load_results of the sweep's file, which sets such rows aside.")
    _check_one_sweep(results)


def _check_one_sweep(results) -> None:
    """Refuse rows of two sweeps in one table: their configurations share keys (the protocol is not in the key)."""
    if {"key", "dataset"} <= set(results.columns) and results.duplicated(["key", "dataset"]).any():
        pair = results.loc[results.duplicated(["key", "dataset"]), ["key", "dataset"]].iloc[0].tolist()
        raise ValueError(f"`results` holds configuration {pair[0]} on data set {pair[1]!r} twice: rows of two sweeps "
                         "(concatenated?) cannot be ranked as one; pass one sweep's load_results.")


def optimize(results, *, budget: float | None = None, quality_weight: float | None = None,
             speed_weight: float | None = None, metric: str = "perplexity", cost: str = "mean_experts_per_token"):
    """The best configuration per data set under a compute budget, or by weighted quality and speed.

    Parameters
    ----------
    results : pandas.DataFrame
        Sweep results (:func:`bh_helpers.experiments.sweep.load_results`).
    budget : float, optional
        Maximum mean experts per token.
    quality_weight, speed_weight : float, optional
        Weights of the scaled quality and speed (instead of ``budget``).
    metric, cost : str
        Quality (lower is better) and compute columns.

    Returns
    -------
    pandas.DataFrame
        One row per data set (:data:`OPTIMIZE_COLUMNS`); ``label`` is None where no configuration
        fits the budget.

    Raises
    ------
    ValueError
        A data set none of whose rows has a finite metric and cost (nothing to rank; the message
        names the file of ``results.attrs["path"]``). ``mixed_perplexity``/``shuffled_perplexity``: the pick's controls (NaN
        for a static configuration).
    """
    import pandas as pd

    _check(results, budget, quality_weight, speed_weight, metric, cost)
    if len(results) == 0:  # a header alone (a sweep stopped before its first row): no columns to name
        where = f" {str(results.attrs['path'])!r}" if "path" in results.attrs else ""
        raise ValueError(f"`results`{where} has no rows (the sweep stopped before its first row, or its rows were set "
                         "aside); run the sweep into it first.")
    for column in ("dataset", "method", "label", metric, cost):
        if column not in results.columns:
            raise ValueError(f"`results` lacks column {column!r}; pass bh_helpers.experiments.sweep.load_results output.")
    controls = controls_by_adaptive(results)
    criterion = (f"lowest {metric} with mean k <= {budget:g}" if budget is not None
                 else f"max {quality_weight:g} x quality + {speed_weight:g} x speed (min-max scaled)")
    records = []
    for name in dict.fromkeys(results["dataset"]):
        rows = results[(results["dataset"] == name) & ~results["method"].isin(CONTROLS)]
        # A non-finite perplexity or cost (an overflowed run reads back as inf/nan) ranks last: never a pick,
        # and left out of the min-max scaling, which it would turn into NaN for every row; none finite is an error.
        rows = rows[finite_rows(results, rows, (metric, cost), dataset=name, what="row")]
        best, best_score = None, -math.inf
        if budget is not None:
            for _, r in rows.iterrows():
                if r[cost] <= budget + 1e-12 and -r[metric] > best_score:
                    best, best_score = r, -float(r[metric])
            score = -best_score if best is not None else math.nan
            if best is None and len(rows):  # said in words: a row of empty cells read as a failed run
                cheapest = rows.loc[rows[cost].idxmin()]
                warnings.warn(f"no configuration of {name!r} has mean k <= {budget:g}: the cheapest measured is "
                              f"{cheapest['label']} at mean k {float(cheapest[cost]):.3g}; raise `budget`.",
                              stacklevel=2)
        else:
            q_lo, q_hi = rows[metric].min(), rows[metric].max()
            c_lo, c_hi = rows[cost].min(), rows[cost].max()
            for _, r in rows.iterrows():
                q = 1.0 if q_hi == q_lo else (q_hi - r[metric]) / (q_hi - q_lo)
                s = 1.0 if c_hi == c_lo else (c_hi - r[cost]) / (c_hi - c_lo)
                value = quality_weight * q + speed_weight * s
                if value > best_score:
                    best, best_score = r, value
            score = best_score
        mixed = controls.get((best["key"], name, "mixed")) if best is not None else None
        shuffled = controls.get((best["key"], name, "shuffled")) if best is not None else None
        records.append({
            "dataset": name, "criterion": criterion,
            "label": best["label"] if best is not None else None,
            "method": best["method"] if best is not None else None,
            "mean_k": float(best[cost]) if best is not None else math.nan,
            "perplexity": float(best[metric]) if best is not None else math.nan,
            "score": float(score),
            "mixed_perplexity": float(mixed[metric]) if mixed is not None else math.nan,
            "shuffled_perplexity": float(shuffled[metric]) if shuffled is not None else math.nan,
            "candidates": len(rows),
            "key": best["key"] if best is not None else None,
        })
    return pd.DataFrame.from_records(records, columns=OPTIMIZE_COLUMNS)


def _recorded_nulls(results):
    """The bank identity (or ``[[name, identity], ...]``) the sweep of ``results`` recorded in its grid id; None
    for files without one (older sweeps)."""
    import json

    grid_id = results.attrs.get("header", {}).get("grid_id")
    return json.loads(grid_id).get("nulls") if isinstance(grid_id, str) else None


def check_banks_are_the_sweeps(results, banks, folder) -> None:
    """``banks`` (a bank, or a mapping of named banks, loaded from ``folder``) are the ones the sweep of
    ``results`` recorded in its grid id; files without a grid id (older sweeps) are not checked.

    A report's tables routed with another bank would describe a run that was not measured.
    """
    from bh_helpers.experiments.evaluate import bank_identity

    recorded = _recorded_nulls(results)
    found = bank_identity(banks)
    if isinstance(recorded, list) and len(recorded) == 1 and isinstance(found, dict):
        recorded = recorded[0][1]  # a folder of one bank loads as that bank
    if recorded is not None and found != recorded:
        raise ValueError(f"`nulls` {str(folder)!r} is not the bank the sweep of these results used (another "
                         "statistic, trim, kernel or fit); pass the bank folder the sweep ran with (the demo's "
                         "nulls/ folder, or the sweep's --nulls).")


def _check_bank_is_the_sweeps(results, config, bank, folder) -> None:
    """``bank`` (loaded from ``folder``) is the one the sweep recorded for ``config`` (results header's grid id).

    Another bank (another statistic, trim, kernel or fit) gives the same configuration other
    counts, so a config naming it would not route what was measured. Files without a grid id
    (older sweeps) record no bank and are not checked.
    """
    from bh_helpers.experiments.evaluate import bank_identity

    recorded = _recorded_nulls(results)
    if isinstance(recorded, list):  # several named banks: the configuration's
        recorded = dict((name, ident) for name, ident in recorded).get(config.bank_name())
    if not isinstance(recorded, dict):
        return
    found = bank_identity(bank)
    if found != recorded:
        differ = sorted(k for k in set(found) | set(recorded) if found.get(k) != recorded.get(k))
        raise ValueError(f"`nulls` {str(folder)!r} is not the bank the sweep used for {config.label()!r} (it differs in "
                         f"{', '.join(differ)}: the sweep's {', '.join(f'{k}={recorded.get(k)!r}' for k in differ)}); "
                         "pass the bank folder the sweep ran with (the demo's nulls/ folder, or the sweep's --nulls).")


def save_routing_config(results, key: str | None, path, *, nulls=None, weights: str | None = None,
                        allow_unverified: bool = False):
    """Write the configuration ``key`` of ``results`` as a routing config file (JSON).

    The file is what ``route()`` users (``RoutingConfig.load(path).to_selector()``) and the vLLM
    plugin (``BH_ROUTING_CONFIG``) read; a BH-family configuration names its bank: ``nulls`` is the
    bank folder, or a folder of banks (the demo's ``nulls/``) holding the configuration's bank.
    ``allow_unverified`` loads a bank without (or failing) its metadata checksum, with a warning,
    and writes ``"allow_unverified_bank": true`` into the config so that engines load it too.
    ``weights`` (None: the sweep's, from the results header) must be the sweep's: other weights
    would route something that was not measured.

    Returns
    -------
    SweepConfig
        The configuration written.

    Raises
    ------
    ValueError
        No configuration (``key`` None: nothing fit the budget), a BH-family configuration without
        ``nulls``, a folder of banks without its bank, or an existing ``path`` (never overwritten).
    """
    from pathlib import Path

    from bh_helpers.experiments.configs import FDR_METHODS, config_of
    from bh_helpers.nulls.bank import load_bank_folder

    if not isinstance(key, str):
        raise ValueError(f"`key` is {key!r}, not a configuration of `results` (nothing fits the budget?); "
                         "nothing to save.")
    refuse_existing(path, "`path`")  # before the work; again under the lock
    _check_one_sweep(results)  # whose protocol (weights) would the config carry?
    config = config_of(results, key)
    measured = (results.attrs.get("header", {}).get("protocol") or {}).get("weights", "softmax")  # older: softmax
    if weights is None:
        weights = measured
    elif weights != measured:
        raise ValueError(f"`weights` {weights!r} is not the weighting the sweep measured ({measured!r}): the config "
                         f"would route something that was not measured; leave it out (the sweep's) or pass {measured!r}.")
    bank = None
    if config.method in FDR_METHODS or weights == "inverse_p":
        if nulls is None:
            raise ValueError(f"{config.label()!r} routes with a null bank: pass `nulls`, the bank folder it used.")
        folder = Path(nulls)
        try:
            banks = load_bank_folder(folder, allow_unverified=allow_unverified)
        except ValueError as err:  # its `path` is this function's `nulls` (`path` here is the config file)
            raise ValueError(str(err).replace("`path`", "`nulls`", 1)) from None
        if isinstance(banks, dict):  # a folder of banks: the demo's nulls/<bank name>
            name = config.bank_name()
            if name not in banks:
                raise ValueError(f"`nulls` {str(nulls)!r} has no bank {name!r} (it has {sorted(banks)}).")
            folder, banks = folder / name.replace("/", "-"), banks[name]
        _check_bank_is_the_sweeps(results, config, banks, folder)
        bank = str(folder.resolve())
    routing = config.routing_config(bank=bank, weights=weights)
    if bank is not None:  # pinned: a bank refitted or replaced at that path later is refused, not routed
        routing = dataclasses.replace(routing, bank_sha256=bank_sha256_of(bank),
                                      allow_unverified_bank=bool(allow_unverified))
    with new_output(path, "`path`"):  # one writer: a second optimize --save-config to this file is refused
        routing.to_json(path)
    return config
