"""Paired bootstrap intervals for the difference in perplexity between two routings of one text.

Both arms are scored on the same sliding windows (:class:`~bh_helpers.evaluation.scoring.PerplexityResult`
keeps each window's summed NLL and token count), so the windows are resampled together: one
draw of window indices serves both arms, and the interval reflects how much the difference
depends on which text was scored, not the (much larger) spread of perplexity across windows.

Windows of one document are correlated, so resampling windows treats a few long documents as
many independent samples and gives intervals that are too narrow. With ``clusters`` (the
document of each window, ``PerplexityResult.window_docs``) whole documents are resampled instead:
the cluster bootstrap (each draw takes all windows of the drawn documents).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np

from bh_helpers._validate import check_int

__all__ = ["MIN_WINDOWS", "BootstrapDelta", "paired_bootstrap", "paired_jackknife"]

#: Fewest scoring windows for an interval: with fewer, resampling windows says nothing about the text
#: (one window gives an interval of zero width). Runs with fewer are refused (CLI) or get no verdict (report).
MIN_WINDOWS = 8

#: Resamples per interval (Monte-Carlo error of a 95% percentile end: about 0.5% of the width).
DEFAULT_RESAMPLES = 2000


@dataclass(frozen=True)
class BootstrapDelta:
    """Perplexity of arm A minus arm B, with a paired percentile-bootstrap interval.

    Attributes
    ----------
    delta : float
        ``ppl_A - ppl_B`` on all windows (negative: A is better).
    low, high : float
        Ends of the ``level`` percentile interval of the resampled differences.
    level : float
    resamples : int
    windows : int
    unit : {"window", "document"}
        What was resampled.
    units : int
        How many of them (windows, or distinct documents).
    """

    delta: float
    low: float
    high: float
    level: float
    resamples: int
    windows: int
    unit: str = "window"
    units: int = 0

    @property
    def excludes_zero(self) -> bool:
        """Whether the interval lies entirely on one side of 0."""
        return self.low > 0 or self.high < 0


def _check_arm(nll: Sequence[float], tokens: Sequence[int], name: str) -> tuple[np.ndarray, np.ndarray]:
    nll_a = np.asarray(nll, dtype=np.float64)
    tok_a = np.asarray(tokens, dtype=np.float64)
    if nll_a.ndim != 1 or nll_a.shape != tok_a.shape or nll_a.size == 0:
        raise ValueError(f"`{name}` needs equal-length, non-empty per-window NLL sums and token counts; "
                         f"got {nll_a.shape} and {tok_a.shape}.")
    if not (np.isfinite(nll_a).all() and (tok_a > 0).all()):
        raise ValueError(f"`{name}` has non-finite NLL sums or windows without scored tokens.")
    return nll_a, tok_a


def paired_bootstrap(
    nll_a: Sequence[float],
    tokens_a: Sequence[int],
    nll_b: Sequence[float],
    tokens_b: Sequence[int],
    *,
    resamples: int = DEFAULT_RESAMPLES,
    level: float = 0.95,
    seed: int = 0,
    clusters: Sequence[int] | None = None,
) -> BootstrapDelta:
    """Paired percentile bootstrap of ``perplexity(A) - perplexity(B)`` over scoring windows.

    Parameters
    ----------
    nll_a, tokens_a : sequences of float and int, length W
        Arm A's per-window summed NLL and scored tokens (``PerplexityResult.window_nll`` /
        ``window_tokens``).
    nll_b, tokens_b : sequences, length W
        Arm B on the same windows (token counts must be equal window by window).
    resamples : int, default 2000
    level : float, default 0.95
        Coverage of the interval, in (0, 1).
    seed : int, default 0
        Seed of the window draws (the interval is reproducible).
    clusters : sequence of int, length W, optional
        The document of each window: resample whole documents (cluster bootstrap) instead of
        windows. Needs at least 2 distinct documents.

    Returns
    -------
    BootstrapDelta

    Raises
    ------
    ValueError
        Arms of different lengths or different windows, empty or non-finite inputs, bad
        ``resamples`` or ``level``.

    Notes
    -----
    Each resample draws W window indices with replacement and recomputes both token-weighted
    perplexities, ``exp(sum nll[idx] / sum tokens[idx])``, on the same indices.
    """
    a_nll, a_tok = _check_arm(nll_a, tokens_a, "nll_a/tokens_a")
    b_nll, b_tok = _check_arm(nll_b, tokens_b, "nll_b/tokens_b")
    if a_nll.shape != b_nll.shape or not np.array_equal(a_tok, b_tok):
        raise ValueError("the two arms must be scored on the same windows (equal token counts per window).")
    check_int("resamples", resamples, 100)
    if not (isinstance(level, float) and 0.0 < level < 1.0):
        raise ValueError(f"`level` must be a float in (0, 1), e.g. 0.95; got {level!r}.")
    windows = a_nll.size
    unit = "window"
    if clusters is not None:
        cluster_ids = np.asarray(clusters)
        if cluster_ids.shape != a_nll.shape:
            raise ValueError(f"`clusters` needs one document id per window ({windows}); got {cluster_ids.shape}.")
        _, inverse = np.unique(cluster_ids, return_inverse=True)
        if inverse.max() < 1:
            raise ValueError("`clusters` names a single document: a document-level interval needs at least 2; "
                             "score more documents or pass clusters=None (window-level).")
        # a cluster draw takes all its windows: resample the per-document sums
        a_nll, b_nll, a_tok = (np.bincount(inverse, weights=x) for x in (a_nll, b_nll, a_tok))
        unit = "document"
    units = a_nll.size
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, units, size=(resamples, units))  # (R, U) shared by both arms
    tok = a_tok[idx].sum(axis=1)  # (R,)
    diffs = np.exp(a_nll[idx].sum(axis=1) / tok) - np.exp(b_nll[idx].sum(axis=1) / tok)  # (R,)
    delta = float(np.exp(a_nll.sum() / a_tok.sum()) - np.exp(b_nll.sum() / a_tok.sum()))
    low, high = np.quantile(diffs, [(1 - level) / 2, (1 + level) / 2])
    return BootstrapDelta(delta=delta, low=float(low), high=float(high), level=level, resamples=resamples,
                          windows=windows, unit=unit, units=units)


def paired_jackknife(
    nll_a: Sequence[float],
    tokens_a: Sequence[int],
    nll_b: Sequence[float],
    tokens_b: Sequence[int],
    *,
    clusters: Sequence[int],
    level: float = 0.95,
) -> BootstrapDelta:
    """Delete-one-document jackknife interval of ``perplexity(A) - perplexity(B)`` with t quantiles.

    With few documents the percentile bootstrap over documents is too narrow (it cannot show more
    spread than the handful of documents holds); the jackknife standard error with Student's t on
    ``G - 1`` degrees of freedom widens the interval as ``G`` shrinks.

    Parameters
    ----------
    nll_a, tokens_a, nll_b, tokens_b
        As in :func:`paired_bootstrap`.
    clusters : sequence of int, length W
        The document of each window; at least 3 distinct documents.
    level : float, default 0.95

    Returns
    -------
    BootstrapDelta
        ``resamples`` 0, ``unit`` "document".
    """
    from scipy.stats import t as student_t

    a_nll, a_tok = _check_arm(nll_a, tokens_a, "nll_a/tokens_a")
    b_nll, b_tok = _check_arm(nll_b, tokens_b, "nll_b/tokens_b")
    if a_nll.shape != b_nll.shape or not np.array_equal(a_tok, b_tok):
        raise ValueError("the two arms must be scored on the same windows (equal token counts per window).")
    if not (isinstance(level, float) and 0.0 < level < 1.0):
        raise ValueError(f"`level` must be a float in (0, 1), e.g. 0.95; got {level!r}.")
    cluster_ids = np.asarray(clusters)
    if cluster_ids.shape != a_nll.shape:
        raise ValueError(f"`clusters` needs one document id per window ({a_nll.size}); got {cluster_ids.shape}.")
    _, inverse = np.unique(cluster_ids, return_inverse=True)
    g = int(inverse.max()) + 1
    if g < 3:
        raise ValueError(f"`clusters` names {g} document(s): a jackknife interval needs at least 3; score more "
                         "documents.")
    sa, sb, st = (np.bincount(inverse, weights=x) for x in (a_nll, b_nll, a_tok))  # (G,) per-document sums
    delta = float(np.exp(sa.sum() / st.sum()) - np.exp(sb.sum() / st.sum()))
    rest_t = st.sum() - st  # (G,) leave one document out
    leave_out = np.exp((sa.sum() - sa) / rest_t) - np.exp((sb.sum() - sb) / rest_t)  # (G,)
    se = float(np.sqrt((g - 1) / g * np.sum((leave_out - leave_out.mean()) ** 2)))
    half = float(student_t.ppf((1 + level) / 2, g - 1)) * se
    return BootstrapDelta(delta=delta, low=delta - half, high=delta + half, level=level, resamples=0,
                          windows=a_nll.size, unit="document", units=g)
