"""Fitting one column of logits: the exact KDE, the mid-p empirical distribution or Efron's
empirical null on a grid, with exponential tails fitted to the extreme order statistics.

:func:`fit_column` is the one entry point; :mod:`bh_helpers.nulls.fit` validates the input, calls it
once per pooled null or per expert and builds the :class:`~bh_helpers.nulls.model.NullModel`.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import numpy as np

from bh_helpers.nulls.kernels import (
    _CHUNK,
    _GRID_MAX,
    _GRID_MIN,
    _KERNEL_STD,
    _KERNEL_SUPPORT,
    _POINTS_PER_BANDWIDTH,
    _TAIL_K_MAX,
    _TAIL_K_MIN,
    _TAIL_SCALE_FLOOR,
    _convolve_same,
    _kernel_cdf_minus_step,
    _kernel_pdf,
)

__all__ = ["Column", "bandwidth_value", "check_spread", "default_grid_size", "fit_column"]


class Column(NamedTuple):
    """One fitted column: float64 grid with sf, cdf and pdf there, tail scales and the kernel scale used."""

    grid: np.ndarray
    sf: np.ndarray
    cdf: np.ndarray
    pdf: np.ndarray
    beta_upper: float
    beta_lower: float
    bandwidth: float


def check_spread(a: np.ndarray, what: str) -> float:
    """Standard deviation (``ddof=1``, summed in chunks) of ``a``; ValueError naming `logits` when it is 0.

    ``what`` says where the values come from in the message (e.g. ``"in expert column 3"``).
    """
    if a.size < 2:
        raise ValueError(f"`logits` needs at least 2 values {what}, got {a.size}")
    mean = float(np.mean(a))
    sum_sq = 0.0
    for start in range(0, a.size, _CHUNK):
        dev = a[start : start + _CHUNK] - mean
        dev *= dev
        sum_sq += float(dev.sum())
    sigma = math.sqrt(sum_sq / (a.size - 1))
    if not sigma > 0.0:
        raise ValueError(
            f"the logits{' ' + what if what else ''} have zero variance (all values equal {float(a.flat[0])!r}); a "
            "null cannot be fitted to a constant: capture more or different calibration text"
        )
    return sigma


def bandwidth_value(bandwidth: str | float, *, kernel: str, sigma: float, n: int) -> float:
    """Kernel scale (sklearn convention) from a rule name or a number.

    Rules follow ``scipy.stats.gaussian_kde`` in one dimension: Scott ``sigma * n**(-1/5)`` and
    Silverman ``sigma * (3 n / 4)**(-1/5)``, with ``sigma`` the sample standard deviation
    (``ddof=1``). They give the standard deviation of a Gaussian kernel; for the compact kernels the
    scale is widened so the kernel has that same standard deviation.
    """
    if kernel in ("empirical", "efron"):
        return 0.0
    if not isinstance(bandwidth, str):
        return float(bandwidth)
    factor = n ** (-0.2) if bandwidth == "scott" else (0.75 * n) ** (-0.2)
    return sigma * factor / _KERNEL_STD[kernel]


def default_grid_size(x_range: float, bandwidth: float, grid_size: int | None, *, minimum: int = _GRID_MIN) -> int:
    """``grid_size`` when given, else a spacing of at most bandwidth / 32 clipped to ``[minimum, 65536]``."""
    if grid_size is not None:
        return grid_size
    wanted = math.ceil(x_range * _POINTS_PER_BANDWIDTH / bandwidth) + 1
    return int(min(max(wanted, minimum), _GRID_MAX))


def _tail_k(n: int) -> int:
    """Number of order statistics a tail is fitted on: sqrt(n), clipped to [10, 5000] and n - 1."""
    return int(min(max(math.isqrt(n), _TAIL_K_MIN), _TAIL_K_MAX, n - 1))


def _tail_scale(extremes: np.ndarray, k: int, *, upper: bool, sigma: float) -> float:
    """Exponential tail scale: the mean excess of the k most extreme order statistics.

    This is the maximum-likelihood exponential fitted to the exceedances over the (k+1)-th most
    extreme value (peaks over threshold). ``extremes`` holds at least the k+1 most extreme
    values, in any order.
    """
    m = extremes.size
    if upper:
        part = np.partition(extremes, m - k - 1)
        beta = float(np.mean(part[m - k :]) - part[m - k - 1])
    else:
        part = np.partition(extremes, k)
        beta = float(part[k] - np.mean(part[:k]))
    return max(beta, _TAIL_SCALE_FLOOR * sigma)


def _fit_kde_column(a: np.ndarray, *, kernel: str, bandwidth: float, n_grid: int, sigma: float) -> tuple:
    """Exact KDE sf/cdf/pdf on a uniform grid from the smallest to the largest sample, and tails."""
    n = a.size
    x_min, x_max = float(a.min()), float(a.max())
    delta = (x_max - x_min) / (n_grid - 1)
    grid = x_min + delta * np.arange(n_grid, dtype=np.float64)
    grid[-1] = x_max  # exact endpoint: the upper tail starts at the largest sample

    # Linear binning: each sample splits its weight between its two neighbouring grid points,
    # which keeps the binned KDE second-order accurate in delta / bandwidth.
    weights = np.zeros(n_grid + 1)
    for start in range(0, n, _CHUNK):
        pos = (a[start : start + _CHUNK] - x_min) * (1.0 / delta)
        idx = pos.astype(np.intp)  # floor, as pos >= 0
        np.clip(idx, 0, n_grid - 2, out=idx)
        frac_sum = np.bincount(idx, weights=pos - idx, minlength=n_grid)
        weights[:n_grid] += np.bincount(idx, minlength=n_grid) - frac_sum
        weights[1 : n_grid + 1] += frac_sum
    weights = weights[:n_grid] / n

    half = int(min(math.ceil(_KERNEL_SUPPORT[kernel] * bandwidth / delta), n_grid - 1))
    u = np.arange(-half, half + 1, dtype=np.float64) * (delta / bandwidth)
    smooth_cdf = _convolve_same(weights, _kernel_cdf_minus_step(kernel, u), half)
    pdf = _convolve_same(weights, _kernel_pdf(kernel, u) / bandwidth, half)

    # CDF_j = sum_m w_m K_cdf(u_jm) = (mass left of j) + w_j / 2 + (w * D)_j, and symmetrically
    # for the sf, so each tail keeps full relative precision (no 1 - cdf cancellation).
    below = np.cumsum(weights) - weights
    above = np.cumsum(weights[::-1])[::-1] - weights
    cdf = below + 0.5 * weights + smooth_cdf
    sf = above + 0.5 * weights - smooth_cdf
    # Rounding (and FFT noise) can leave wiggles of ~1e-17; the true functions are monotone.
    cdf = np.maximum.accumulate(np.clip(cdf, 0.0, 1.0))
    sf = np.minimum.accumulate(np.clip(sf, 0.0, 1.0))

    # Tails: only the k+1 most extreme samples matter. Weight at grid index > j comes from samples
    # above grid[j], so n * above[j] >= k + 1 guarantees enough candidates >= grid[j] (and
    # likewise below), without sorting or partitioning all n samples.
    k = _tail_k(n)
    enough_above = np.flatnonzero(above * n >= k + 1.5)
    enough_below = np.flatnonzero(below * n >= k + 1.5)
    hi = a[a >= grid[enough_above[-1]]] if enough_above.size else a
    lo = a[a <= grid[enough_below[0]]] if enough_below.size else a
    hi = hi if hi.size > k else a
    lo = lo if lo.size > k else a
    beta_upper = _tail_scale(hi, k, upper=True, sigma=sigma)
    beta_lower = _tail_scale(lo, k, upper=False, sigma=sigma)
    return grid, sf, cdf, np.maximum(pdf, 0.0), beta_upper, beta_lower


def _fit_empirical_column(a: np.ndarray, *, max_grid: int, sigma: float) -> tuple:
    """Mid-p empirical distribution at the distinct values, linearly interpolated between them.

    ``sf(v) = (#{X > v} + #{X = v} / 2) / n`` at each distinct value ``v``: the limit of the KDE
    sf as the bandwidth goes to 0, strictly inside (0, 1), so ties are handled and the tails
    can be attached at both ends.
    """
    n = a.size
    ordered = np.sort(a)
    # First position of each distinct value; #{X < v} = starts, #{X <= v} = next start.
    starts = np.flatnonzero(np.concatenate(([True], ordered[1:] != ordered[:-1])))
    if starts.size > max_grid:
        # Keep evenly spaced distinct values plus the most extreme ones on each side (512, or a
        # quarter of the grid), where the data is sparse and p-values matter most.
        extreme = min(512, max_grid // 4)
        keep = np.unique(
            np.concatenate(
                [
                    np.linspace(0, starts.size - 1, max_grid - 2 * extreme).round().astype(np.intp),
                    np.arange(extreme),
                    np.arange(starts.size - extreme, starts.size),
                ]
            )
        )
        ends = np.where(keep + 1 < starts.size, starts[np.minimum(keep + 1, starts.size - 1)], n)
        starts = starts[keep]
    else:
        ends = np.concatenate((starts[1:], [n]))
    values = ordered[starts]
    cdf = (starts + ends) / (2.0 * n)  # #{X < v} + #{X = v} / 2
    sf = (2.0 * n - starts - ends) / (2.0 * n)  # #{X > v} + #{X = v} / 2
    pdf = (
        np.gradient(cdf, values)
        if values.size > 2
        else np.full(2, (cdf[1] - cdf[0]) / (values[1] - values[0]))
    )
    k = _tail_k(n)
    beta_upper = _tail_scale(ordered[n - k - 1 :], k, upper=True, sigma=sigma)
    beta_lower = _tail_scale(ordered[: k + 1], k, upper=False, sigma=sigma)
    return values, sf, cdf, np.maximum(pdf, 0.0), beta_upper, beta_lower


#: Efron's central matching: the central part is within this many robust sigmas of the median,
#: the Gaussian grid spans this many fitted sigmas on each side (sf there ~1e-23; tails beyond).
_EFRON_CENTRAL = 1.5
_EFRON_SPAN = 10.0
_EFRON_BINS = 120


def _efron_centre_scale(a: np.ndarray) -> tuple[float, float]:
    """Centre and scale of the empirical null by Efron's central matching.

    A quadratic is fitted by least squares to the log of the histogram counts of the central part
    (within :data:`_EFRON_CENTRAL` robust standard deviations, IQR / 1.349, of the median); a
    Gaussian ``N(delta, sigma^2)`` has exactly that log density, with ``sigma^2 = -1 / (2 c2)``
    and ``delta = c1 sigma^2``. (Efron 2004, "Large-scale simultaneous hypothesis testing: the
    choice of a null hypothesis", JASA 99; ``locfdr``'s "CM" estimate.) Falls back to the median
    and the robust standard deviation when the central log density is not concave.
    """
    q1, median, q3 = np.quantile(a, [0.25, 0.5, 0.75])
    robust = float(q3 - q1) / 1.349
    if not robust > 0:
        raise ValueError("`logits` has no spread in its central half; the empirical null needs a spread")
    lo, hi = median - _EFRON_CENTRAL * robust, median + _EFRON_CENTRAL * robust
    counts, edges = np.histogram(a[(a >= lo) & (a <= hi)], bins=_EFRON_BINS, range=(lo, hi))
    mids = 0.5 * (edges[:-1] + edges[1:]) - median
    keep = counts > 0
    if keep.sum() >= 3:
        c2, c1, _ = np.polyfit(mids[keep], np.log(counts[keep]), 2, w=np.sqrt(counts[keep]))
        if c2 < 0:
            var = -1.0 / (2.0 * c2)
            return float(median + c1 * var), math.sqrt(var)
    return float(median), robust


def _fit_efron_column(a: np.ndarray, *, n_grid: int) -> tuple:
    """The Gaussian empirical null on a grid of +-:data:`_EFRON_SPAN` sigmas, exponential tails beyond.

    The tail scales equal the Gaussian's inverse hazard at the grid ends (``sigma^2 / (x - delta)``
    to first order, here exactly ``sf / pdf``), so sf and its slope are continuous there.
    """
    from scipy import stats

    delta, sigma = _efron_centre_scale(a)
    z = np.linspace(-_EFRON_SPAN, _EFRON_SPAN, n_grid)
    grid = delta + sigma * z
    sf, cdf, pdf = stats.norm.sf(z), stats.norm.cdf(z), stats.norm.pdf(z) / sigma
    beta = float(sf[-1] / pdf[-1])  # = cdf[0] / pdf[0] by symmetry
    return grid, sf, cdf, pdf, beta, beta


def fit_column(
    a: np.ndarray, *, sigma: float, kernel: str, bandwidth: str | float, grid_size: int | None
) -> Column:
    """Fit one column of float64 values with ``kernel`` (arguments already checked by ``fit_null``).

    Parameters
    ----------
    a : ndarray of shape (n,)
        Finite float64 values with a spread.
    sigma : float
        Their standard deviation (:func:`check_spread`).
    kernel : str
        One of :data:`~bh_helpers.nulls.kernels.VALID_KERNELS`.
    bandwidth : {"scott", "silverman"} or float
    grid_size : int or None
        Grid points; None: :func:`default_grid_size` (``"empirical"``: every distinct value up to
        the maximum grid, ``"efron"``: the minimum grid).

    Returns
    -------
    Column
    """
    if kernel == "empirical":
        fitted = _fit_empirical_column(a, max_grid=grid_size or _GRID_MAX, sigma=sigma)
        h = 0.0
    elif kernel == "efron":
        fitted = _fit_efron_column(a, n_grid=grid_size or _GRID_MIN)
        h = 0.0
    else:
        h = bandwidth_value(bandwidth, kernel=kernel, sigma=sigma, n=a.size)
        n_grid = default_grid_size(float(a.max() - a.min()), h, grid_size)
        fitted = _fit_kde_column(a, kernel=kernel, bandwidth=h, n_grid=n_grid, sigma=sigma)
    return Column(*fitted, bandwidth=h)
