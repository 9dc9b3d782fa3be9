"""The report's verdict, written from the numbers of :func:`bh_helpers.experiments.comparison.compare_with_controls`.

Nothing here is typed by hand: each sentence counts rows of the comparison table, and a claim
that a configuration is better needs a 95% paired-bootstrap interval that excludes zero against
the strongest control that ran at its compute (the lowest perplexity of mixed top-k, its own
shuffled counts and the static chord), at no more experts than that control.
"""

from __future__ import annotations

import math
from typing import Any

from scipy.stats import binom

from bh_helpers.experiments.bootstrap import MIN_WINDOWS

__all__ = ["comparison_markdown", "verdict_markdown"]


def _fmt_delta(delta: float, low: float, high: float) -> str:
    return f"{delta:+.3f} [{low:+.3f}, {high:+.3f}]"


_CONTROL_NAMES = {"mixed": "mixed top-k", "shuffled": "its own counts shuffled", "static_chord": "the static chord"}


def _decided(comparison, low: str, high: str) -> tuple[Any, Any, Any]:
    """Rows better (interval below 0), worse (above 0), and all with an interval, by the given columns."""
    valid = comparison[comparison[low].notna() & comparison[high].notna()]
    better = valid[valid[high] < 0]
    worse = valid[valid[low] > 0]
    return better, worse, valid


def verdict_markdown(comparison) -> str:
    """The ``## Verdict`` section (without its heading), read against each row's STRONGEST control.

    Each adaptive (configuration, data set) pair is compared with the control that ran at its
    compute with the lowest perplexity (mixed top-k, its own counts shuffled, or the static chord
    of per-layer allocations); it counts as better only when the paired interval excludes zero
    AND it used no more experts than that control (``compute_matched``).

    Parameters
    ----------
    comparison : pandas.DataFrame
        :func:`~bh_helpers.experiments.comparison.compare_with_controls` output.

    Returns
    -------
    str
        Markdown paragraphs; states plainly when no configuration beat its strongest control.
    """
    if comparison is None or not len(comparison):
        return "No adaptive configuration ran with its compute-matched controls, so there is no verdict."
    level = int(round(100 * comparison.attrs.get("level", 0.95)))
    windows = comparison.attrs.get("windows")
    if windows is not None and windows < MIN_WINDOWS:
        return (f"**No verdict: too few scoring windows.** The smallest data set was scored in {windows} window"
                f"{'s' * (windows != 1)}; a paired interval needs at least {MIN_WINDOWS} (with one window every "
                "interval has zero width). Rerun with more evaluation tokens (`--max-tokens`) or a smaller `--window`.")
    better, worse, valid = _decided(comparison, "strongest_ci_low", "strongest_ci_high")
    more_compute = better[~better["compute_matched"].astype(bool)]
    better = better[better["compute_matched"].astype(bool)]
    n, sets = len(valid), sorted(set(valid["dataset"]))
    if not n:
        return "The adaptive rows have no per-window scores to pair with their controls; rerun the sweep."
    chance = n * (1 - level / 100) / 2  # intervals below zero expected if nothing differed
    # wins as many or more than this would come by chance with probability p_chance (binomial)
    p_chance = float(binom.sf(len(better) - 1, n, (1 - level / 100) / 2))
    if len(better) and p_chance < 0.05:
        answer = "yes, in some configurations"
    elif len(better):
        answer = "not clearly (no more wins than chance would plausibly give)"
    else:
        answer = "no"
    which = valid["strongest"].value_counts()
    strongest = ", ".join(f"{_CONTROL_NAMES[m]} for {c}" for m, c in which.items())
    lines = [
        f"**Does calibrated routing keep quality with fewer experts than top-k at the same compute? {answer.capitalize()}** "
        f"on this model and these data: of {n} adaptive (configuration, data set) pairs on {', '.join(sets)}, "
        f"{len(better)} had lower perplexity than their strongest control at the same compute with a {level}% "
        f"paired interval excluding zero, {len(worse)} had higher perplexity, and "
        f"{n - len(better) - len(worse) - len(more_compute)} were undecided"
        + (f" ({len(more_compute)} more were better but used more experts than the control, so they do not count)"
           if len(more_compute) else "")
        + f". The strongest control (lowest perplexity at the row's compute) was {strongest}. (Each interval is a "
        f"separate test: if no configuration differed from its control, about {chance:.1f} of {n} would still fall "
        "below zero by chance"
        + (f", and {len(better)} or more with probability {p_chance:.2g}; the answer is yes only below 0.05.)"
           if len(better) else ".)")
    ]
    if len(better):
        items = [f"- {r['label']} on {r['dataset']} at mean k {r['mean_k']:.2f}: "
                 f"{_fmt_delta(r['delta_vs_strongest'], r['strongest_ci_low'], r['strongest_ci_high'])} perplexity "
                 f"vs {_CONTROL_NAMES[r['strongest']]}"
                 for _, r in better.sort_values("delta_vs_strongest").iterrows()]
        lines += ["", "Better than the strongest control:", "", *items]
    per_control = []
    for method, (low, high, delta) in {"mixed": ("ci_low", "ci_high", "delta_vs_mixed"),
                                        "static_chord": ("static_ci_low", "static_ci_high", "delta_vs_static")}.items():
        c_better, c_worse, c_valid = _decided(comparison, low, high)
        if len(c_valid):
            per_control.append(f"- vs {_CONTROL_NAMES[method]}: {len(c_better)} better, {len(c_worse)} worse, "
                               f"{len(c_valid) - len(c_better) - len(c_worse)} undecided of {len(c_valid)}")
    if per_control:
        lines += ["", "Against each control separately (intervals excluding zero):", "", *per_control]
    s_better, s_worse, s_valid = _decided(comparison, "shuffled_ci_low", "shuffled_ci_high")
    if len(s_valid):
        lines += ["", (
            f"Allocation: against its own per-token counts shuffled across tokens (same histogram of k), "
            f"{len(s_better)} of {len(s_valid)} pairs were better and {len(s_worse)} worse with intervals excluding "
            "zero; " + ("which tokens get more experts carries information where it is better."
                        if len(s_better) > len(s_worse) else
                        "which tokens get more experts does not, on balance, carry information here.")
        )]
    by_stat = []
    for (statistic, trim), group in valid.groupby(["statistic", "trim"], sort=True):
        best = group.loc[group["delta_vs_strongest"].idxmin()]
        wins = int(((group["strongest_ci_high"] < 0) & group["compute_matched"].astype(bool)).sum())
        by_stat.append(f"- {statistic}{f', trim {trim}' if trim else ''}: {wins} of {len(group)} better; best "
                       f"{best['label']} on {best['dataset']} "
                       f"{_fmt_delta(best['delta_vs_strongest'], best['strongest_ci_low'], best['strongest_ci_high'])} "
                       f"vs {_CONTROL_NAMES[best['strongest']]}")
    if len(by_stat) > 1:
        lines += ["", "By test statistic (delta = perplexity minus the strongest control's, 95% interval):", "",
                  *by_stat]
    return "\n".join(lines)


def comparison_markdown(comparison, *, digits: int = 3) -> str:
    """The comparison table: every adaptive row beside its mixed, shuffled and static-chord controls, with intervals."""
    if comparison is None or not len(comparison):
        return "(no adaptive rows with controls)"
    head = ("| dataset | configuration | mean k | perplexity | mixed top-k | delta vs mixed [95% CI] | "
            "shuffled | delta vs shuffled [95% CI] | static chord | delta vs static chord [95% CI] | "
            "delta vs top-k chord |")
    rows = [head, "|---|---|---:|---:|---:|---|---:|---|---:|---|---:|"]

    def num(v: float) -> str:
        return "n/a" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.{digits}f}"

    def ci(d: float, lo: float, hi: float) -> str:
        return "n/a" if math.isnan(d) else f"{d:+.{digits}f} [{lo:+.{digits}f}, {hi:+.{digits}f}]"

    for _, r in comparison.iterrows():
        rows.append(
            f"| {r['dataset']} | {r['label']} | {r['mean_k']:.2f} | {num(r['perplexity'])} | "
            f"{num(r['mixed_perplexity'])} | {ci(r['delta_vs_mixed'], r['ci_low'], r['ci_high'])} | "
            f"{num(r['shuffled_perplexity'])} | "
            f"{ci(r['delta_vs_shuffled'], r['shuffled_ci_low'], r['shuffled_ci_high'])} | "
            f"{num(r['static_perplexity'])} | {ci(r['delta_vs_static'], r['static_ci_low'], r['static_ci_high'])} | "
            f"{num(r['delta_vs_chord']) if math.isnan(r['delta_vs_chord']) else format(r['delta_vs_chord'], f'+.{digits}f')} |"
        )
    return "\n".join(rows)
