"""Fitting nulls: one per layer from logged router logits (KDE with an exact CDF, or empirical).

:func:`fit_null` fits one :class:`~bh_helpers.nulls.model.NullModel` (pooled over experts or one
per expert) on a ``[N, E]`` logit matrix, with optional per-token statistics; :func:`fit_null_bank`
fits one per layer into a :class:`~bh_helpers.nulls.bank.NullBank`.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

import numpy as np
import torch

from bh_helpers._clock import utc_timestamp
from bh_helpers._validate import check_choice, check_int, is_int
from bh_helpers.nulls.kernels import (
    VALID_BANDWIDTHS,
    VALID_KERNELS,
    _CHUNK,
    _GRID_MAX,
    _GRID_MIN,
    _GRID_MIN_PER_EXPERT,
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
from bh_helpers.nulls.model import NullModel
from bh_helpers.nulls.statistics import check_statistic, check_trim, fit_values
from bh_helpers.nulls.bank import NullBank
from bh_helpers.nulls.metadata import NullBankMetadata, library_version, parse_fingerprint, schema_version_for

__all__ = ["fit_null", "fit_null_bank"]

# ---------------------------------------------------------------------------------------------
# Input validation
# ---------------------------------------------------------------------------------------------


def _check_kernel(kernel: Any) -> str:
    return check_choice("kernel", kernel, VALID_KERNELS)


def _check_bandwidth(bandwidth: Any, kernel: str) -> str | float:
    if isinstance(bandwidth, str):
        if bandwidth not in VALID_BANDWIDTHS:
            raise ValueError(
                f"`bandwidth` must be one of {VALID_BANDWIDTHS} or a positive number, got {bandwidth!r}"
            )
        return bandwidth
    if isinstance(bandwidth, bool) or not isinstance(bandwidth, (int, float, np.floating, np.integer)):
        raise ValueError(
            f"`bandwidth` must be one of {VALID_BANDWIDTHS} or a positive number, got {bandwidth!r}"
        )
    value = float(bandwidth)
    if not (math.isfinite(value) and value > 0.0):
        raise ValueError(f"`bandwidth` must be a positive finite number, got {bandwidth!r}")
    if kernel in ("empirical", "efron"):
        raise ValueError(
            f"`bandwidth` must be left at a rule name for kernel={kernel!r} (it does no "
            f"smoothing), got {bandwidth!r}; pick a smoothing kernel to use a numeric bandwidth"
        )
    return value


def _as_float64(logits: Any, *, per_expert: bool) -> np.ndarray:
    """Calibration logits as a float64 NumPy array ``[N, E]`` (per expert) or flat ``[N*E]``."""
    if isinstance(logits, torch.Tensor):
        arr = logits.detach().to(device="cpu", dtype=torch.float64).numpy()
    else:
        try:
            arr = np.asarray(logits, dtype=np.float64)
        except (TypeError, ValueError) as err:
            raise ValueError(f"`logits` must be a tensor or array of numbers: {err}") from err
    if per_expert:
        if arr.ndim != 2:
            raise ValueError(f"`logits` must have shape [N, E] with per_expert=True, got shape {arr.shape}")
    elif arr.ndim not in (1, 2):
        raise ValueError(f"`logits` must have shape [N, E] or [N], got shape {arr.shape}")
    if arr.size == 0:
        raise ValueError(
            f"`logits` is empty (shape {arr.shape}); log router logits on calibration text first"
        )
    n_bad = int(arr.size - np.count_nonzero(np.isfinite(arr)))
    if n_bad:
        raise ValueError(
            f"`logits` contains {n_bad} NaN/inf values; calibration logits must be finite "
            "(drop the affected tokens, or check the capture dtype for overflow)"
        )
    return arr if per_expert else arr.reshape(-1)


# ---------------------------------------------------------------------------------------------
# Fitting one column of logits
# ---------------------------------------------------------------------------------------------


class _Column(NamedTuple):
    grid: np.ndarray
    sf: np.ndarray
    cdf: np.ndarray
    pdf: np.ndarray
    beta_upper: float
    beta_lower: float
    bandwidth: float


def _check_spread(a: np.ndarray, what: str) -> float:
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
            f"`logits` has zero variance {what} (all values equal {a.flat[0]!r}); a null cannot be "
            "fitted to a constant: log more or different calibration text"
        )
    return sigma


def _bandwidth_value(bandwidth: str | float, *, kernel: str, sigma: float, n: int) -> float:
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


def _grid_size(x_range: float, bandwidth: float, grid_size: int | None, *, minimum: int = _GRID_MIN) -> int:
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


def fit_null(
    logits: Any,
    kernel: str = "gaussian",
    bandwidth: str | float = "scott",
    per_expert: bool = False,
    *,
    grid_size: int | None = None,
    statistic: str = "raw",
    trim: int = 0,
) -> NullModel:
    """Fit a null distribution to calibration router logits of one layer.

    Parameters
    ----------
    logits : Tensor or ndarray of shape (N, E)
        Router logits logged on calibration text (any float dtype and device; copied to CPU
        float64). Pooled over all experts unless ``per_expert``; a 1-D array is accepted for a
        pooled null.
    kernel : {"gaussian", "tophat", "epanechnikov", "linear", "empirical", "efron"}, default="gaussian"
        Smoothing kernel (``"linear"`` is the triangular kernel, as in scikit-learn), or
        ``"empirical"`` for no smoothing: the mid-p empirical distribution
        ``P(X > x) + P(X = x) / 2`` at the distinct calibration values, linearly interpolated; or
        ``"efron"``: an empirical null in Efron's sense, a Gaussian whose centre and scale are
        estimated from the central part of the values only (central matching), so that the
        relevant experts in the upper tail do not widen it.
    bandwidth : {"scott", "silverman"} or float, default="scott"
        A positive number is the kernel scale in scikit-learn's ``KernelDensity`` convention
        (Gaussian standard deviation; half-width of tophat, epanechnikov and linear). The rules
        follow ``scipy.stats.gaussian_kde`` in 1-D: Scott ``sigma * n**(-1/5)``, Silverman
        ``sigma * (3n/4)**(-1/5)``, ``sigma`` the sample standard deviation (ddof=1) of the pooled
        logits (of each column when ``per_expert``); for the compact kernels that standard
        deviation is converted to the scale of a kernel with the same standard deviation
        (``* sqrt(3)``, ``* sqrt(5)``, ``* sqrt(6)``). Ignored by ``"empirical"`` and ``"efron"``
        (a number is an error).
    per_expert : bool, default=False
        Fit one null per expert column; the null then evaluates ``x[..., e]`` with column ``e``.
    grid_size : int, optional
        Number of grid points; default: spacing at most bandwidth / 32, clipped to
        [16384, 65536] ([4096, 65536] per expert, as E grids are stored), the same for every
        expert; for ``"empirical"``: every distinct value, up to 65536 (4096 per expert), else
        evenly spaced distinct values plus the 512 most extreme on each side.
    statistic : {"raw", "centred", "zscore"}, default="raw"
        Per-token statistic the null is fitted on and later evaluated with
        (:mod:`bh_helpers.nulls.statistics`); recorded on the returned null.
    trim : int, default=0
        Fit on each token's values without its ``trim`` largest (needs ``[N, E]`` logits and
        ``trim <= E - 2``).

    Returns
    -------
    NullModel

    Raises
    ------
    ValueError
        Empty logits, NaN/inf, zero variance, unknown ``kernel``, invalid ``bandwidth`` or
        ``grid_size``, or a 1-D/3-D array with ``per_expert=True``.

    Notes
    -----
    The KDE's sf/cdf are exact up to linear binning of the samples on the grid (second order in
    grid spacing / bandwidth, about 1e-8 at the default resolution). Above the largest (below the
    smallest) calibration logit the KDE is replaced by an exponential tail fitted to the
    ``sqrt(n)`` most extreme order statistics; see the module docstring.

    Examples
    --------
    >>> import torch
    >>> logits = torch.randn(5000, 64, generator=torch.Generator().manual_seed(0))
    >>> null = fit_null(logits, kernel="epanechnikov")
    >>> round(float(null.sf(torch.tensor(0.0))), 2)
    0.5
    """
    # Input Validation and Special Cases
    kernel = _check_kernel(kernel)
    bandwidth = _check_bandwidth(bandwidth, kernel)
    if not isinstance(per_expert, bool):
        raise ValueError(f"`per_expert` must be True or False, got {per_expert!r}")
    if grid_size is not None:
        check_int("grid_size", grid_size, 16)  # or None: the default
    statistic = check_statistic(statistic)
    if per_expert and trim:
        raise ValueError("`trim` needs a pooled null: with per_expert=True each expert's column would lose "
                         "different tokens; pass trim=0 or per_expert=False.")
    if trim:
        shape = tuple(getattr(logits, "shape", np.shape(logits)))
        if len(shape) != 2:
            raise ValueError(f"`trim` needs logits of shape [N, E], got shape {shape}")
        check_trim(trim, shape[1])
    else:
        check_trim(trim)
    data = _as_float64(fit_values(logits, statistic, trim), per_expert=per_expert)
    recorded = {"statistic": statistic, "trim": trim}

    # Main Algorithm
    if not per_expert:
        sigma = _check_spread(data, "")
        col = _fit_column(data, sigma=sigma, kernel=kernel, bandwidth=bandwidth, grid_size=grid_size)
        return NullModel(
            grid=col.grid,
            sf=col.sf,
            cdf=col.cdf,
            pdf=col.pdf,
            tail_scale_upper=col.beta_upper,
            tail_scale_lower=col.beta_lower,
            kernel=kernel,
            bandwidth=col.bandwidth,
            n_samples=data.size,
            **recorded,
        )

    columns = np.ascontiguousarray(data.T)  # (E, N): each expert's logits contiguous
    n = columns.shape[1]
    sigmas = [_check_spread(c, f"in expert column {e}") for e, c in enumerate(columns)]
    if grid_size is None and kernel in ("empirical", "efron"):
        grid_size = _GRID_MIN_PER_EXPERT  # at most this many distinct values (grid points) per expert
    elif grid_size is None:
        # One grid size for all experts (they are stored as one [E, G] array): the finest needed.
        grid_size = max(
            _grid_size(
                float(np.ptp(c)),
                _bandwidth_value(bandwidth, kernel=kernel, sigma=s, n=n),
                None,
                minimum=_GRID_MIN_PER_EXPERT,
            )
            for c, s in zip(columns, sigmas, strict=True)
        )
    # A loop over experts is fine here: fitting is offline and each step is vectorised over N.
    fitted = [
        _fit_column(c, sigma=s, kernel=kernel, bandwidth=bandwidth, grid_size=grid_size)
        for c, s in zip(columns, sigmas, strict=True)
    ]
    width = max(col.grid.size for col in fitted)

    def stack(name: str) -> np.ndarray:
        # Empirical grids differ in length; pad by repeating the last point (a zero-width cell
        # that evaluation never interpolates in, since x >= last point goes to the tail).
        return np.stack(
            [np.pad(getattr(col, name), (0, width - col.grid.size), mode="edge") for col in fitted]
        )

    return NullModel(
        grid=stack("grid"),
        sf=stack("sf"),
        cdf=stack("cdf"),
        pdf=stack("pdf"),
        tail_scale_upper=np.array([col.beta_upper for col in fitted]),
        tail_scale_lower=np.array([col.beta_lower for col in fitted]),
        kernel=kernel,
        bandwidth=np.array([col.bandwidth for col in fitted]),
        n_samples=n,
        **recorded,
    )


def _fit_column(
    a: np.ndarray, *, sigma: float, kernel: str, bandwidth: str | float, grid_size: int | None
) -> _Column:
    if kernel == "empirical":
        fitted = _fit_empirical_column(a, max_grid=grid_size or _GRID_MAX, sigma=sigma)
        h = 0.0
    elif kernel == "efron":
        fitted = _fit_efron_column(a, n_grid=grid_size or _GRID_MIN)
        h = 0.0
    else:
        h = _bandwidth_value(bandwidth, kernel=kernel, sigma=sigma, n=a.size)
        n_grid = _grid_size(float(a.max() - a.min()), h, grid_size)
        fitted = _fit_kde_column(a, kernel=kernel, bandwidth=h, n_grid=n_grid, sigma=sigma)
    return _Column(*fitted, bandwidth=h)


def fit_null_bank(
    logits_by_layer: Mapping[int, Any],
    *,
    kernel: str = "gaussian",
    bandwidth: str | float = "scott",
    per_expert: bool = False,
    model_id: str | None = None,
    calibration: str = "unspecified calibration text",
    num_layers: int | None = None,
    grid_size: int | None = None,
    router_fingerprint: Mapping[int, Sequence[float]] | None = None,
    statistic: str = "raw",
    trim: int = 0,
) -> NullBank:
    """Fit one null per layer (see :func:`fit_null`) and collect them in a :class:`NullBank`.

    Parameters
    ----------
    logits_by_layer : mapping of int to Tensor of shape (N, E)
        Calibration router logits per layer, as returned by
        ``bh_helpers.capture.capture_router_logits``; every layer must have the same E.
    kernel, bandwidth, per_expert, grid_size, statistic, trim
        As in :func:`fit_null`; ``statistic`` and ``trim`` are recorded in the bank's metadata and
        applied by :meth:`NullBank.pvalues` and every selector.
    model_id : str, optional
        Model the logits come from (recorded in the metadata).
    calibration : str
        Description of the calibration text (dataset, split, number of tokens).
    num_layers : int, optional
        Number of MoE layers of the model; default: highest layer index + 1.
    router_fingerprint : mapping of int to list of float, optional
        :func:`bh_helpers.models.families.router_fingerprint` of that model, so that ``route``
        can refuse the bank on another model.

    Returns
    -------
    NullBank
    """
    if not isinstance(logits_by_layer, Mapping) or not logits_by_layer:
        raise ValueError("`logits_by_layer` must be a non-empty dict {layer index: logits [N, E]}")
    statistic = check_statistic(statistic)
    for layer in logits_by_layer:
        if not is_int(layer) or layer < 0:
            raise ValueError(f"`logits_by_layer` keys must be layer indices >= 0, got {layer!r}")
    experts = set()
    for layer, logits in logits_by_layer.items():
        shape = tuple(getattr(logits, "shape", np.shape(logits)))
        if len(shape) != 2:
            raise ValueError(f"`logits_by_layer[{layer}]` must have shape [N, E], got {shape}")
        experts.add(shape[1])
    if len(experts) != 1:
        raise ValueError(f"`logits_by_layer` layers disagree on the number of experts: {sorted(experts)}")
    top = max(int(k) for k in logits_by_layer)
    if num_layers is None:
        num_layers = top + 1
    elif not is_int(num_layers) or num_layers <= top:
        raise ValueError(
            f"`num_layers` must be an integer > the highest layer index {top}, got {num_layers!r}"
        )
    nulls = {}
    for layer in sorted(logits_by_layer):
        try:
            nulls[int(layer)] = fit_null(
                logits_by_layer[layer],
                kernel=kernel,
                bandwidth=bandwidth,
                per_expert=per_expert,
                grid_size=grid_size,
                statistic=statistic,
                trim=trim,
            )
        except ValueError as err:
            raise ValueError(f"layer {layer}: {err}") from err
    metadata = NullBankMetadata(
        model_id=model_id,
        num_layers=num_layers,
        num_experts=experts.pop(),
        layers=sorted(nulls),
        kernel=kernel,
        bandwidth=bandwidth if isinstance(bandwidth, str) else float(bandwidth),
        per_expert=per_expert,
        n_samples={layer: null.n_samples_ for layer, null in nulls.items()},
        calibration=str(calibration),
        library_version=library_version(),
        created=utc_timestamp(),
        router_fingerprint=parse_fingerprint(dict(router_fingerprint)) if router_fingerprint is not None else None,
        statistic=statistic,
        trim=trim,
        schema_version=schema_version_for(statistic, trim),
    )
    return NullBank(nulls, metadata)
