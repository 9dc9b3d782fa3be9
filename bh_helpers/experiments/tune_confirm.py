"""Choose on one half of the text, state the answer on the other: configurations picked on a tuning split.

A sweep of many configurations evaluated on one text will find some that beat their controls by
chance, and the best of them beats its control by more than it would on new text (the winner's
curse). So the demo splits every data set by document (:data:`bh_helpers.models.texts.SPLITS`:
``"prose:tune"`` holds the even-numbered documents, ``"prose:confirm"`` the odd-numbered ones),
sweeps the whole grid on the tuning halves, keeps per family and compute target the configuration
that did best against its strongest control (:func:`pick_on_tuning`; a family is a method and
where its levels come from, :func:`family_of`), and runs only those, with
their controls, on the confirmation halves. The verdict is read on the confirmation split alone.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from bh_helpers.experiments.configs import CONTROLS, FDR_METHODS, SweepConfig, config_of, with_controls

__all__ = ["confirmation_configs", "family_of", "pick_on_tuning"]


def family_of(config: SweepConfig) -> str:
    """The family a multiple-testing configuration belongs to: its method and where its levels come
    from (one alpha for all layers, one alpha per layer, or per-layer levels from a static budget).

    Everything else (null kernel, test statistic, trim, floor, ceiling) is a variant the tuning
    split chooses among.
    """
    if config.method not in FDR_METHODS:
        raise ValueError(f"{config.label()!r} is not a multiple-testing configuration.")
    levels = ("static budget" if config.budget == "static" else
              "one alpha" if config.layer_alphas is None else "per-layer alpha")
    return f"{config.method}, {levels}"


def pick_on_tuning(comparison, results, *, targets: Sequence[float]) -> list[SweepConfig]:
    """Per family and compute target, the configuration that did best against its strongest control.

    Parameters
    ----------
    comparison : pandas.DataFrame
        :func:`~bh_helpers.experiments.comparison.compare_with_controls` of the tuning sweep.
    results : pandas.DataFrame
        The tuning sweep's results (for the configurations).
    targets : sequence of float
        The compute targets of the grid; a configuration belongs to the target nearest its mean k
        over the tuning data sets.

    Returns
    -------
    list of SweepConfig
        One configuration per (family, target) that ran with a strongest control, ordered by
        family then target; the score is the mean over data sets of
        ``delta_vs_strongest / strongest_perplexity`` (ties: the first in the grid).
    """
    if not targets:
        raise ValueError("`targets` is empty; pass the grid's compute targets (mean experts per token).")
    rows = comparison[comparison["delta_vs_strongest"].notna()] if len(comparison) else comparison
    if not len(rows):
        return []
    scored = rows.assign(relative=rows["delta_vs_strongest"] / rows["strongest_perplexity"])
    per_key = scored.groupby("key", sort=False).agg(relative=("relative", "mean"), mean_k=("mean_k", "mean"))
    best: dict[tuple[str, float], tuple[float, SweepConfig]] = {}
    for key, row in per_key.iterrows():
        config = config_of(results, key)
        target = min(targets, key=lambda t: (abs(t - row["mean_k"]), t))
        slot = (family_of(config), float(target))
        if slot not in best or row["relative"] < best[slot][0] - 1e-12:
            best[slot] = (float(row["relative"]) if math.isfinite(row["relative"]) else math.inf, config)
    return [best[slot][1] for slot in sorted(best)]


def confirmation_configs(configs, picks, *, seed: int = 0, static: bool = True) -> list[SweepConfig]:
    """The confirmation grid: the baselines of the tuning grid ``configs`` and the ``picks`` with their
    controls (the static chord only with ``static``, i.e. when a static allocation path is there)."""
    controls = CONTROLS if static else tuple(c for c in CONTROLS if c != "static_chord")
    baselines = [c for c in configs if c.method not in FDR_METHODS + CONTROLS]
    return baselines + with_controls(picks, seed=seed, controls=controls)
