"""The report's verdict, written from the numbers of :func:`bh_helpers.experiments.comparison.compare_with_controls`.

Nothing here is typed by hand: each sentence counts rows of the comparison table, and a claim
that a configuration is better needs a 95% paired-bootstrap interval that excludes zero against
the control that ran at its compute.
"""

from __future__ import annotations

import math
from typing import Any

from bh_helpers.experiments.bootstrap import MIN_WINDOWS

__all__ = ["comparison_markdown", "verdict_markdown"]


def _fmt_delta(delta: float, low: float, high: float) -> str:
    return f"{delta:+.3f} [{low:+.3f}, {high:+.3f}]"


def _decided(comparison, low: str, high: str) -> tuple[Any, Any, Any]:
    """Rows better (interval below 0), worse (above 0), and undecided, by the given interval columns."""
    valid = comparison[comparison[low].notna() & comparison[high].notna()]
    better = valid[valid[high] < 0]
    worse = valid[valid[low] > 0]
    return better, worse, valid


def verdict_markdown(comparison) -> str:
    """The ``## Verdict`` section (without its heading): counts, the winners, allocation, by statistic.

    Parameters
    ----------
    comparison : pandas.DataFrame
        :func:`~bh_helpers.experiments.comparison.compare_with_controls` output.

    Returns
    -------
    str
        Markdown paragraphs; states plainly when no configuration beat its control.
    """
    if comparison is None or not len(comparison):
        return "No adaptive configuration ran with its compute-matched controls, so there is no verdict."
    level = int(round(100 * comparison.attrs.get("level", 0.95)))
    windows = comparison.attrs.get("windows")
    if windows is not None and windows < MIN_WINDOWS:
        return (f"**No verdict: too few scoring windows.** The smallest data set was scored in {windows} window"
                f"{'s' * (windows != 1)}; a paired-bootstrap interval over windows needs at least {MIN_WINDOWS} (with "
                "one window every interval has zero width). Rerun with more evaluation tokens (`--max-tokens`) or a "
                "smaller `--window`.")
    better, worse, valid = _decided(comparison, "ci_low", "ci_high")
    n, sets = len(valid), sorted(set(valid["dataset"]))
    lines = []
    if not n:
        return "The adaptive rows have no per-window scores to pair with their controls; rerun the sweep."
    chance = n * (1 - level / 100) / 2  # intervals below zero expected if nothing differed
    if len(better) > chance:
        answer = "yes, in some configurations"
    elif len(better):
        answer = "not clearly (no more wins than chance would give)"
    else:
        answer = "no"
    lines.append(
        f"**Does calibrated routing keep quality with fewer experts than top-k at the same compute? {answer.capitalize()}** "
        f"on this model and these data: of {n} adaptive (configuration, data set) pairs on {', '.join(sets)}, "
        f"{len(better)} had lower perplexity than mixed top-k run at the same per-layer mean k with a {level}% "
        f"paired-bootstrap interval excluding zero, {len(worse)} had higher perplexity, and {n - len(better) - len(worse)} "
        f"were undecided. (Each interval is a separate test: if no configuration differed from its control, "
        f"about {chance:.1f} of {n} would still fall below zero by chance.)"
    )
    if len(better):
        items = [f"- {r['label']} on {r['dataset']} at mean k {r['mean_k']:.2f}: "
                 f"{_fmt_delta(r['delta_vs_mixed'], r['ci_low'], r['ci_high'])} perplexity vs mixed top-k"
                 for _, r in better.sort_values("delta_vs_mixed").iterrows()]
        lines += ["", "Better than the mixed control:", "", *items]
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
        best = group.loc[group["delta_vs_mixed"].idxmin()]
        wins = int((group["ci_high"] < 0).sum())
        by_stat.append(f"- {statistic}{f', trim {trim}' if trim else ''}: {wins} of {len(group)} better; best "
                       f"{best['label']} on {best['dataset']} "
                       f"{_fmt_delta(best['delta_vs_mixed'], best['ci_low'], best['ci_high'])}")
    if len(by_stat) > 1:
        lines += ["", "By test statistic (delta = perplexity minus the mixed control's, 95% interval):", "", *by_stat]
    return "\n".join(lines)


def comparison_markdown(comparison, *, digits: int = 3) -> str:
    """The comparison table: every adaptive row beside its mixed and shuffled controls, with intervals."""
    if comparison is None or not len(comparison):
        return "(no adaptive rows with controls)"
    head = ("| dataset | configuration | mean k | perplexity | mixed top-k | delta vs mixed [95% CI] | "
            "shuffled | delta vs shuffled [95% CI] | delta vs top-k chord |")
    rows = [head, "|---|---|---:|---:|---:|---|---:|---|---:|"]

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
            f"{num(r['delta_vs_chord']) if math.isnan(r['delta_vs_chord']) else format(r['delta_vs_chord'], f'+.{digits}f')} |"
        )
    return "\n".join(rows)
