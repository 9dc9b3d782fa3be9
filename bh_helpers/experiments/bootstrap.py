"""Paired bootstrap intervals for the difference in perplexity between two routings of one text.

Both arms are scored on the same sliding windows (:class:`~bh_helpers.evaluation.scoring.PerplexityResult`
keeps each window's summed NLL and token count), so the windows are resampled together: one
draw of window indices serves both arms, and the interval reflects how much the difference
depends on which text was scored, not the (much larger) spread of perplexity across windows.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np

from bh_helpers._validate import check_int

__all__ = ["MIN_WINDOWS", "BootstrapDelta", "paired_bootstrap"]

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
    """

    delta: float
    low: float
    high: float
    level: float
    resamples: int
    windows: int

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
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, windows, size=(resamples, windows))  # (R, W) shared by both arms
    tok = a_tok[idx].sum(axis=1)  # (R,)
    diffs = np.exp(a_nll[idx].sum(axis=1) / tok) - np.exp(b_nll[idx].sum(axis=1) / tok)  # (R,)
    delta = float(np.exp(a_nll.sum() / a_tok.sum()) - np.exp(b_nll.sum() / b_tok.sum()))
    low, high = np.quantile(diffs, [(1 - level) / 2, (1 + level) / 2])
    return BootstrapDelta(delta=delta, low=float(low), high=float(high), level=level, resamples=resamples,
                          windows=windows)
