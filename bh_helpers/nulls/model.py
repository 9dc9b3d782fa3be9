"""Null distributions of router logits: logit -> p-value.

A null model turns a router logit ``x`` into the p-value ``p = P(X >= x)`` under the
distribution of router logits logged on calibration text (the survival function, ``sf``).
One null is fitted per MoE layer; :class:`NullBank` holds them, saves them in a safe format
(``.npz`` + ``.json``, no pickle) and checks that they fit the model they are used with.

How a null is represented
-------------------------
Every null is a float64 grid ``x_0 < ... < x_{G-1}`` spanning the calibration data
(``x_0`` = smallest logit, ``x_{G-1}`` = largest) with the exact ``sf``, ``cdf`` and ``pdf`` of
the fitted distribution at the grid points, plus two exponential tails:

- between grid points, values are linearly interpolated (``torch.searchsorted``);
- above the largest calibration logit, ``sf(x) = sf(x_max) * exp(-(x - x_max) / beta_upper)``,
  with ``beta_upper`` the mean excess of the top order statistics (the maximum-likelihood
  exponential fitted to the peaks over a threshold). The tail keeps decreasing, so the
  strongest experts never tie at ``p = 0``, and ``logsf`` is computed from it directly, so it
  stays accurate where ``sf`` underflows. The lower tail mirrors this for ``cdf``.

Kernel density estimates are evaluated exactly, not by a Riemann sum: the KDE's CDF is the mean
of the kernel's own CDF over the samples, computed on the grid by linear binning of the samples
and one discrete convolution with the integrated kernel (cost ``O(n + G log G)``, memory
``O(n + G)``).
"""

from __future__ import annotations

import datetime
import importlib
import hashlib
import json
import math
import pickle
import re
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch
from scipy import signal, special, stats

__all__ = [
    "VALID_KERNELS",
    "VALID_BANDWIDTHS",
    "SCHEMA_VERSION",
    "NullModel",
    "fit_null",
    "GoodnessOfFit",
    "goodness_of_fit",
    "NullBankMetadata",
    "NullBank",
    "fit_null_bank",
]

VALID_KERNELS = ("gaussian", "tophat", "epanechnikov", "linear", "empirical")
VALID_BANDWIDTHS = ("scott", "silverman")
# Version of the on-disk layout written by NullBank.save; bump on any incompatible change.
SCHEMA_VERSION = 1

NPZ_NAME = "nulls.npz"
METADATA_NAME = "metadata.json"
LEGACY_PATTERN = re.compile(r"^distribution_model_layer_(\d+)\.pkl$")

# Kernels "legacy" nulls may carry (read from the earlier research code's pickles).
_LEGACY_KERNEL = "legacy"

# Standard deviation of each unit-scale kernel; the rule-of-thumb bandwidths are Gaussian
# standard deviations and are divided by these so every kernel smooths by the same amount.
_KERNEL_STD = {
    "gaussian": 1.0,
    "tophat": 1.0 / math.sqrt(3.0),
    "epanechnikov": 1.0 / math.sqrt(5.0),
    "linear": 1.0 / math.sqrt(6.0),
}
# Half-width of each kernel's support in units of the bandwidth. The Gaussian is cut at 9
# standard deviations, where its tail mass (1e-19) is far below float64 resolution of a CDF.
_KERNEL_SUPPORT = {"gaussian": 9.0, "tophat": 1.0, "epanechnikov": 1.0, "linear": 1.0}

# Grid resolution: spacing at most bandwidth / 32, between 16,384 (4,096 per expert, as those
# are stored E times) and 65,536 points. Interpolation and binning then err by about 1e-8
# (Gaussian) to 2e-7 (tophat, whose CDF has kinks) in the body for 2,000 standard-normal samples.
_GRID_MIN = 16384
_GRID_MIN_PER_EXPERT = 4096
_GRID_MAX = 65536
_POINTS_PER_BANDWIDTH = 32
# Number of order statistics the exponential tails are fitted on: sqrt(n), within [10, 5000].
_TAIL_K_MIN = 10
_TAIL_K_MAX = 5000
# A tail scale below this fraction of the standard deviation only happens with heavily tied
# top logits (e.g. bf16); the floor keeps the tail from collapsing onto a step.
_TAIL_SCALE_FLOOR = 1e-3
# Samples are processed in chunks of this many values: full-size float64 temporaries of
# millions of logits cost more in page faults than the arithmetic itself.
_CHUNK = 1 << 16


# ---------------------------------------------------------------------------------------------
# Kernels (unit scale: u = (x - x_i) / bandwidth)
# ---------------------------------------------------------------------------------------------


def _kernel_pdf(kernel: str, u: np.ndarray) -> np.ndarray:
    """Density of the unit-scale kernel (sklearn's kernel shapes, normalised to integrate to 1)."""
    a = np.abs(u)
    if kernel == "gaussian":
        return np.exp(-0.5 * u * u) / math.sqrt(2.0 * math.pi)
    if kernel == "tophat":
        # Half height exactly on the edge: the binned convolution samples the kernel there, and
        # the mid value is what the cell-average of the step would give.
        return np.where(a < 1.0, 0.5, np.where(a == 1.0, 0.25, 0.0))
    if kernel == "epanechnikov":
        return np.where(a <= 1.0, 0.75 * (1.0 - u * u), 0.0)
    if kernel == "linear":
        return np.where(a <= 1.0, 1.0 - a, 0.0)
    raise AssertionError(f"no pdf for kernel {kernel!r}")


def _kernel_cdf(kernel: str, u: np.ndarray) -> np.ndarray:
    """CDF of the unit-scale kernel: normal CDF, linear ramp, cubic, or piecewise quadratic."""
    if kernel == "gaussian":
        return special.ndtr(u)
    c = np.clip(u, -1.0, 1.0)
    if kernel == "tophat":
        return 0.5 * (c + 1.0)
    if kernel == "epanechnikov":
        return 0.5 + 0.75 * c - 0.25 * c**3
    if kernel == "linear":
        return np.where(c < 0.0, 0.5 * (1.0 + c) ** 2, 1.0 - 0.5 * (1.0 - c) ** 2)
    raise AssertionError(f"no cdf for kernel {kernel!r}")


def _kernel_cdf_minus_step(kernel: str, u: np.ndarray) -> np.ndarray:
    """``K_cdf(u) - H(u)`` with ``H`` the unit step (``H(0) = 1/2``).

    The difference is odd and vanishes outside the kernel's support, so the KDE's CDF is the
    cumulative sum of the binned samples (the step part) plus a short convolution with it.
    For the Gaussian the right half is computed as ``-ndtr(-u)`` to keep full relative precision.
    """
    if kernel == "gaussian":
        return np.where(u < 0.0, special.ndtr(u), np.where(u > 0.0, -special.ndtr(-u), 0.0))
    step = np.where(u > 0.0, 1.0, np.where(u < 0.0, 0.0, 0.5))
    return _kernel_cdf(kernel, u) - step


def _convolve_same(weights: np.ndarray, kernel_vec: np.ndarray, half: int) -> np.ndarray:
    """``out[j] = sum_m weights[m] * kernel_vec[j - m + half]`` for every grid index ``j``."""
    if weights.size * kernel_vec.size <= 2**25:
        full = np.convolve(weights, kernel_vec)
    else:
        # FFT error is about 1e-16 of the total weight (1), far below 1/n at the data's edges.
        full = signal.fftconvolve(weights, kernel_vec)
    return full[half : half + weights.size]


# ---------------------------------------------------------------------------------------------
# Input validation
# ---------------------------------------------------------------------------------------------


def _check_kernel(kernel: Any) -> str:
    if not isinstance(kernel, str) or kernel not in VALID_KERNELS:
        raise ValueError(f"`kernel` must be one of {VALID_KERNELS}, got {kernel!r}")
    return kernel


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
    if kernel == "empirical":
        raise ValueError(
            "`bandwidth` must be left at a rule name for kernel='empirical' (it does no "
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
    if kernel == "empirical":
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


# ---------------------------------------------------------------------------------------------
# NullModel
# ---------------------------------------------------------------------------------------------


class _DeviceGrids(NamedTuple):
    """Grid tensors of one null on one device, each ``[E', G]`` or ``[E', 1]`` (E' = 1 if pooled)."""

    x: torch.Tensor
    sf: torch.Tensor
    cdf: torch.Tensor
    pdf: torch.Tensor
    x_min: torch.Tensor
    x_max: torch.Tensor
    sf_first: torch.Tensor
    sf_last: torch.Tensor
    cdf_first: torch.Tensor
    cdf_last: torch.Tensor
    log_sf_last: torch.Tensor
    log_cdf_first: torch.Tensor
    beta_upper: torch.Tensor
    beta_lower: torch.Tensor


class NullModel:
    """Null distribution of router logits of one layer, pooled or one per expert.

    Build it with :func:`fit_null` (or get it from a :class:`NullBank`); the constructor only
    takes already computed grids, as stored by :meth:`NullBank.save`.

    Parameters
    ----------
    grid : ndarray of shape (G,) or (E, G)
        Increasing float64 logit grid from the smallest to the largest calibration logit.
    sf, cdf, pdf : ndarray of the same shape
        Survival function ``P(X >= x)``, CDF and density at the grid points.
    tail_scale_upper, tail_scale_lower : float or ndarray of shape (E,)
        Scales of the exponential tails beyond the largest / below the smallest grid point.
    kernel : str
        One of :data:`VALID_KERNELS`, or ``"legacy"`` for nulls read from the old pickles.
    bandwidth : float or ndarray of shape (E,)
        Kernel scale used for fitting (0 for ``"empirical"``, NaN for ``"legacy"``).
    n_samples : int
        Number of calibration logits per fitted distribution.

    Attributes
    ----------
    kernel : str
    bandwidth_ : float or ndarray of shape (E,)
        Kernel scale (sklearn ``KernelDensity`` convention: the Gaussian's standard deviation, the
        half-width of the compact kernels).
    n_samples_ : int
    per_expert : bool
    num_experts : int or None
        ``E`` for per-expert nulls, None for a pooled null.
    grid_, sf_grid_, cdf_grid_, pdf_grid_ : ndarray, float64, shape (G,) or (E, G)
    tail_scale_upper_, tail_scale_lower_ : float or ndarray of shape (E,)

    Notes
    -----
    Evaluation (:meth:`sf`, :meth:`cdf`, :meth:`logsf`, :meth:`pdf`) runs on the input tensor's
    device in float64 with ``torch.searchsorted`` and linear interpolation, one batched call for
    all experts. The result is float64 for float64 input and float32 otherwise (bf16/fp16 logits
    would tie the strongest experts' p-values). ``sf`` and ``cdf`` are clipped to
    ``[tiny, 1 - eps/2]`` of the output dtype so that they are never exactly 0 or 1; only logits
    beyond the point where the tail underflows that dtype (in float32 about 80 tail scales past
    the largest calibration logit) share the value ``tiny``; :meth:`logsf` separates them.
    NaN logits give NaN. The functions are monotone in ``x`` by construction (interpolated
    values are clipped to their cell's end values and the tails to the grid's end values).

    Grids are cached per device on first use; treat the grid attributes as read-only.
    """

    def __init__(
        self,
        *,
        grid: np.ndarray,
        sf: np.ndarray,
        cdf: np.ndarray,
        pdf: np.ndarray,
        tail_scale_upper: float | np.ndarray,
        tail_scale_lower: float | np.ndarray,
        kernel: str,
        bandwidth: float | np.ndarray,
        n_samples: int,
    ) -> None:
        if kernel not in VALID_KERNELS and kernel != _LEGACY_KERNEL:
            raise ValueError(f"`kernel` must be one of {VALID_KERNELS}, got {kernel!r}")
        grid = np.asarray(grid, dtype=np.float64)
        if grid.ndim not in (1, 2) or grid.shape[-1] < 2:
            raise ValueError(f"`grid` must have shape (G,) or (E, G) with G >= 2, got {grid.shape}")
        self.per_expert = grid.ndim == 2
        self.num_experts = int(grid.shape[0]) if self.per_expert else None
        rows = grid.shape[0] if self.per_expert else 1
        arrays = {}
        for name, value in (("grid", grid), ("sf", sf), ("cdf", cdf), ("pdf", pdf)):
            value = np.asarray(value, dtype=np.float64)
            if value.shape != grid.shape:
                raise ValueError(f"`{name}` must have the grid's shape {grid.shape}, got {value.shape}")
            if not np.all(np.isfinite(value)):
                raise ValueError(f"`{name}` contains NaN/inf")
            arrays[name] = value.reshape(rows, -1)
        g, s, c = arrays["grid"], arrays["sf"], arrays["cdf"]
        if np.any(np.diff(g, axis=1) < 0) or np.any(g[:, -1] <= g[:, 0]):
            raise ValueError("`grid` must be non-decreasing with its last point above its first")
        if np.any(np.diff(s, axis=1) > 0) or np.any(np.diff(c, axis=1) < 0):
            raise ValueError("`sf` must be non-increasing and `cdf` non-decreasing along the grid")
        # Both ends must be strictly inside (0, 1): the tails are attached in log space there.
        if np.any(s[:, -1] <= 0) or np.any(c[:, 0] <= 0) or np.any(s > 1) or np.any(c > 1):
            raise ValueError("`sf` and `cdf` must lie in [0, 1] and be positive at the grid's far ends")
        betas = {}
        for name, value in (("tail_scale_upper", tail_scale_upper), ("tail_scale_lower", tail_scale_lower)):
            value = np.broadcast_to(np.asarray(value, dtype=np.float64), (rows,)).copy()
            if not np.all(np.isfinite(value) & (value > 0)):
                raise ValueError(f"`{name}` must be positive and finite, got {value}")
            betas[name] = value
        self.kernel = kernel
        bw = np.asarray(bandwidth, dtype=np.float64)
        self.bandwidth_ = bw.copy() if (self.per_expert and bw.ndim == 1) else float(bw)
        self.n_samples_ = int(n_samples)
        self._grid, self._sf, self._cdf, self._pdf = g, s, c, arrays["pdf"]
        self._beta_upper, self._beta_lower = betas["tail_scale_upper"], betas["tail_scale_lower"]
        self._cache: dict[str, _DeviceGrids] = {}

    # -- attributes -----------------------------------------------------------------------------

    def _public(self, arr: np.ndarray) -> np.ndarray:
        return arr if self.per_expert else arr[0]

    @property
    def grid_(self) -> np.ndarray:
        return self._public(self._grid)

    @property
    def sf_grid_(self) -> np.ndarray:
        return self._public(self._sf)

    @property
    def cdf_grid_(self) -> np.ndarray:
        return self._public(self._cdf)

    @property
    def pdf_grid_(self) -> np.ndarray:
        return self._public(self._pdf)

    @property
    def tail_scale_upper_(self) -> float | np.ndarray:
        return self._beta_upper.copy() if self.per_expert else float(self._beta_upper[0])

    @property
    def tail_scale_lower_(self) -> float | np.ndarray:
        return self._beta_lower.copy() if self.per_expert else float(self._beta_lower[0])

    def __repr__(self) -> str:
        experts = f", per_expert=True, num_experts={self.num_experts}" if self.per_expert else ""
        bw = np.round(np.mean(self.bandwidth_), 6)
        return (
            f"NullModel(kernel={self.kernel!r}, bandwidth_~{bw}, n_samples_={self.n_samples_}, "
            f"grid={self._grid.shape[-1]}{experts})"
        )

    # -- evaluation -----------------------------------------------------------------------------

    def _grids(self, device: torch.device) -> _DeviceGrids:
        key = str(device)
        cached = self._cache.get(key)
        if cached is None:
            # MPS has no float64; everything else computes in float64.
            dtype = torch.float32 if device.type == "mps" else torch.float64

            def t(a: np.ndarray) -> torch.Tensor:
                return torch.as_tensor(np.ascontiguousarray(a), dtype=dtype, device=device)

            g, s, c = self._grid, self._sf, self._cdf
            cached = _DeviceGrids(
                x=t(g),
                sf=t(s),
                cdf=t(c),
                pdf=t(self._pdf),
                x_min=t(g[:, :1]),
                x_max=t(g[:, -1:]),
                sf_first=t(s[:, :1]),
                sf_last=t(s[:, -1:]),
                cdf_first=t(c[:, :1]),
                cdf_last=t(c[:, -1:]),
                log_sf_last=t(np.log(s[:, -1:])),
                log_cdf_first=t(np.log(c[:, :1])),
                beta_upper=t(self._beta_upper[:, None]),
                beta_lower=t(self._beta_lower[:, None]),
            )
            self._cache[key] = cached
        return cached

    def _evaluate(self, x: Any, what: str, dtype: torch.dtype | None) -> torch.Tensor:
        x = torch.as_tensor(x)
        if dtype is None:
            dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
        elif dtype not in (torch.float32, torch.float64):
            raise ValueError(f"`dtype` must be torch.float32 or torch.float64, got {dtype}")
        g = self._grids(x.device)
        shape = x.shape
        xq = x.detach().to(g.x.dtype)
        if self.per_expert:
            if xq.ndim == 0 or shape[-1] != self.num_experts:
                raise ValueError(
                    f"`x` must have {self.num_experts} experts in its last dimension for a "
                    f"per-expert null, got shape {tuple(shape)}"
                )
            xq = xq.reshape(-1, self.num_experts).transpose(0, 1).contiguous()  # (E, T)
        else:
            xq = xq.reshape(1, -1).contiguous()  # (1, T)

        n_grid = g.x.shape[-1]
        idx = torch.searchsorted(g.x, xq, right=True)  # (E', T) in [0, G]; NaN -> G
        # x above the largest calibration logit (x equal to it stays on the grid: same sf, and
        # the pdf there is the grid's, not the tail's)
        upper = (idx == n_grid) & (xq > g.x_max)
        lower = idx == 0  # x < smallest calibration logit
        j = (idx - 1).clamp_(0, n_grid - 2)
        x0, x1 = g.x.gather(1, j), g.x.gather(1, j + 1)
        w = ((xq - x0) / (x1 - x0).clamp_min(torch.finfo(xq.dtype).tiny)).clamp_(0.0, 1.0)

        def interp(table: torch.Tensor) -> torch.Tensor:
            y0, y1 = table.gather(1, j), table.gather(1, j + 1)
            y = y0 + w * (y1 - y0)
            # Clip to the cell's end values so rounding can never break monotonicity.
            return torch.minimum(torch.maximum(y, torch.minimum(y0, y1)), torch.maximum(y0, y1))

        # Exponential tails, in log space so nothing underflows before the final exp.
        log_sf_up = torch.minimum(g.log_sf_last - (xq - g.x_max) / g.beta_upper, g.log_sf_last)
        log_cdf_lo = torch.minimum(g.log_cdf_first + (xq - g.x_min) / g.beta_lower, g.log_cdf_first)
        if what == "sf":
            out = torch.where(
                upper,
                torch.minimum(log_sf_up.exp(), g.sf_last),
                torch.where(lower, torch.maximum(-torch.expm1(log_cdf_lo), g.sf_first), interp(g.sf)),
            )
        elif what == "cdf":
            out = torch.where(
                upper,
                torch.maximum(-torch.expm1(log_sf_up), g.cdf_last),
                torch.where(lower, torch.minimum(log_cdf_lo.exp(), g.cdf_first), interp(g.cdf)),
            )
        elif what == "logsf":
            # log of the interpolated sf in the body; the tail's own log-linear form above it.
            body = torch.where(
                lower, torch.log1p(-torch.minimum(log_cdf_lo.exp(), g.cdf_first)), interp(g.sf).log()
            )
            out = torch.where(upper, log_sf_up, body)
        elif what == "pdf":
            out = torch.where(
                upper,
                log_sf_up.exp() / g.beta_upper,
                torch.where(lower, log_cdf_lo.exp() / g.beta_lower, interp(g.pdf)),
            )
        else:
            raise AssertionError(what)

        out = out.to(dtype)
        info = torch.finfo(dtype)
        one_minus = 1.0 - info.eps / 2.0  # largest value below 1 in this dtype
        if what in ("sf", "cdf"):
            out = out.clamp(info.tiny, one_minus)
        elif what == "logsf":
            out = out.clamp(max=math.log1p(-info.eps / 2.0))
        # (E', T) -> input shape; per expert the rows are experts, i.e. the last input dimension.
        return out.transpose(0, 1).reshape(shape) if self.per_expert else out.reshape(shape)

    def sf(self, x: Any, *, dtype: torch.dtype | None = None) -> torch.Tensor:
        """Survival function ``P(X >= x)``: the p-value of logit ``x``.

        Parameters
        ----------
        x : Tensor (or array-like)
            Logits of any shape; ``[..., E]`` for a per-expert null (column ``e`` of the last
            dimension uses expert ``e``'s null).
        dtype : torch.float32 or torch.float64, optional
            Output dtype; default float64 for float64 input, float32 otherwise.

        Returns
        -------
        Tensor
            Same shape and device as ``x``, values in ``[tiny, 1 - eps/2]``.

        Examples
        --------
        >>> import torch
        >>> null = fit_null(torch.randn(2000, 8, generator=torch.Generator().manual_seed(0)))
        >>> p = null.sf(torch.tensor([-3.0, 0.0, 3.0, 50.0]))
        >>> bool((p[:-1] > p[1:]).all()) and bool(p[-1] > 0)
        True
        """
        return self._evaluate(x, "sf", dtype)

    def cdf(self, x: Any, *, dtype: torch.dtype | None = None) -> torch.Tensor:
        """Cumulative distribution function ``P(X <= x)``; see :meth:`sf` for the arguments."""
        return self._evaluate(x, "cdf", dtype)

    def logsf(self, x: Any, *, dtype: torch.dtype | None = None) -> torch.Tensor:
        """Log of the survival function, computed directly in the upper tail (never ``-inf``).

        Beyond the largest calibration logit ``logsf`` is exactly linear in ``x``, so it stays
        accurate (and keeps strong experts apart) where ``sf`` underflows. See :meth:`sf`.
        """
        return self._evaluate(x, "logsf", dtype)

    def pdf(self, x: Any, *, dtype: torch.dtype | None = None) -> torch.Tensor:
        """Density, interpolated linearly between grid points; see :meth:`sf` for the arguments."""
        return self._evaluate(x, "pdf", dtype)


def fit_null(
    logits: Any,
    kernel: str = "gaussian",
    bandwidth: str | float = "scott",
    per_expert: bool = False,
    *,
    grid_size: int | None = None,
) -> NullModel:
    """Fit a null distribution to calibration router logits of one layer.

    Parameters
    ----------
    logits : Tensor or ndarray of shape (N, E)
        Router logits logged on calibration text (any float dtype and device; copied to CPU
        float64). Pooled over all experts unless ``per_expert``; a 1-D array is accepted for a
        pooled null.
    kernel : {"gaussian", "tophat", "epanechnikov", "linear", "empirical"}, default="gaussian"
        Smoothing kernel (``"linear"`` is the triangular kernel, as in scikit-learn), or
        ``"empirical"`` for no smoothing: the mid-p empirical distribution
        ``P(X > x) + P(X = x) / 2`` at the distinct calibration values, linearly interpolated.
    bandwidth : {"scott", "silverman"} or float, default="scott"
        A positive number is the kernel scale in scikit-learn's ``KernelDensity`` convention
        (Gaussian standard deviation; half-width of tophat, epanechnikov and linear). The rules
        follow ``scipy.stats.gaussian_kde`` in 1-D: Scott ``sigma * n**(-1/5)``, Silverman
        ``sigma * (3n/4)**(-1/5)``, ``sigma`` the sample standard deviation (ddof=1) of the pooled
        logits (of each column when ``per_expert``); for the compact kernels that standard
        deviation is converted to the scale of a kernel with the same standard deviation
        (``* sqrt(3)``, ``* sqrt(5)``, ``* sqrt(6)``). Ignored by ``"empirical"`` (a number is an error).
    per_expert : bool, default=False
        Fit one null per expert column; the null then evaluates ``x[..., e]`` with column ``e``.
    grid_size : int, optional
        Number of grid points; default: spacing at most bandwidth / 32, clipped to
        [16384, 65536] ([4096, 65536] per expert, as E grids are stored), the same for every
        expert; for ``"empirical"``: every distinct value, up to 65536 (4096 per expert), else
        evenly spaced distinct values plus the 512 most extreme on each side.

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
    if grid_size is not None and (
        isinstance(grid_size, bool) or not isinstance(grid_size, (int, np.integer)) or grid_size < 16
    ):
        raise ValueError(f"`grid_size` must be an integer >= 16 or None, got {grid_size!r}")
    data = _as_float64(logits, per_expert=per_expert)

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
        )

    columns = np.ascontiguousarray(data.T)  # (E, N): each expert's logits contiguous
    n = columns.shape[1]
    sigmas = [_check_spread(c, f"in expert column {e}") for e, c in enumerate(columns)]
    if grid_size is None and kernel == "empirical":
        grid_size = _GRID_MIN_PER_EXPERT  # at most this many distinct values per expert
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
    )


def _fit_column(
    a: np.ndarray, *, sigma: float, kernel: str, bandwidth: str | float, grid_size: int | None
) -> _Column:
    if kernel == "empirical":
        fitted = _fit_empirical_column(a, max_grid=grid_size or _GRID_MAX, sigma=sigma)
        h = 0.0
    else:
        h = _bandwidth_value(bandwidth, kernel=kernel, sigma=sigma, n=a.size)
        n_grid = _grid_size(float(a.max() - a.min()), h, grid_size)
        fitted = _fit_kde_column(a, kernel=kernel, bandwidth=h, n_grid=n_grid, sigma=sigma)
    return _Column(*fitted, bandwidth=h)


# ---------------------------------------------------------------------------------------------
# Diagnostics
# ---------------------------------------------------------------------------------------------

# Nominal levels at which the observed fraction of held-out p-values is reported.
_TAIL_LEVELS = (0.001, 0.01, 0.05, 0.1)


@dataclass(frozen=True)
class GoodnessOfFit:
    """How well a null describes held-out null logits (see :func:`goodness_of_fit`).

    Attributes
    ----------
    ks_distance : float
        Kolmogorov-Smirnov distance ``sup_x |F_null(x) - F_heldout(x)|`` over all held-out logits
        (pooled over experts; for a per-expert null each logit uses its own expert's CDF).
    pit_ks_statistic, pit_ks_pvalue : float
        ``scipy.stats.kstest`` of the held-out p-values against Uniform(0, 1), on a seeded
        subsample of at most ``max_samples`` values (with millions of logits any misfit, however
        small, would give a p-value of 0).
    n_held_out : int
        Number of held-out logits.
    n_tested : int
        Size of the subsample used for the KS test.
    pvalue_histogram : ndarray of shape (bins,)
        Fraction of all held-out p-values in each of ``bins`` equal bins of [0, 1] (uniform:
        ``1 / bins`` each).
    bin_edges : ndarray of shape (bins + 1,)
    tail_fractions : dict of float to float
        Observed fraction of held-out p-values ``<= t`` for ``t`` in 0.001, 0.01, 0.05, 0.1
        (calibrated: about ``t``; above ``t`` means anti-conservative p-values).
    """

    ks_distance: float
    pit_ks_statistic: float
    pit_ks_pvalue: float
    n_held_out: int
    n_tested: int
    pvalue_histogram: np.ndarray
    bin_edges: np.ndarray
    tail_fractions: dict[float, float] = field(default_factory=dict)


def goodness_of_fit(
    null: NullModel,
    held_out_logits: Any,
    *,
    bins: int = 10,
    max_samples: int = 20_000,
    seed: int = 0,
) -> GoodnessOfFit:
    """Check a null against held-out calibration logits (not used for fitting it).

    Parameters
    ----------
    null : NullModel
    held_out_logits : Tensor or ndarray
        ``[N, E]`` logits (``[..., E]`` for a per-expert null), finite.
    bins : int, default=10
        Number of p-value histogram bins.
    max_samples : int, default=20_000
        Largest subsample for the KS test of uniformity (drawn without replacement with
        ``numpy.random.default_rng(seed)``, so results are reproducible).
    seed : int, default=0

    Returns
    -------
    GoodnessOfFit

    Examples
    --------
    >>> import torch
    >>> g = torch.Generator().manual_seed(0)
    >>> null = fit_null(torch.randn(4000, 16, generator=g))
    >>> fit = goodness_of_fit(null, torch.randn(4000, 16, generator=g))
    >>> fit.ks_distance < 0.01 and fit.pit_ks_pvalue > 0.01
    True
    """
    # Input Validation and Special Cases
    if not isinstance(null, NullModel):
        raise ValueError(f"`null` must be a NullModel, got {type(null).__name__}")
    if isinstance(bins, bool) or not isinstance(bins, (int, np.integer)) or bins < 1:
        raise ValueError(f"`bins` must be a positive integer, got {bins!r}")
    if isinstance(max_samples, bool) or not isinstance(max_samples, (int, np.integer)) or max_samples < 1:
        raise ValueError(f"`max_samples` must be a positive integer, got {max_samples!r}")
    x = torch.as_tensor(held_out_logits).detach().to("cpu", torch.float64)
    if x.numel() == 0:
        raise ValueError("`held_out_logits` is empty")
    if not bool(torch.isfinite(x).all()):
        raise ValueError("`held_out_logits` contains NaN/inf values; held-out logits must be finite")

    # Main Algorithm
    u = np.sort(null.cdf(x).numpy().reshape(-1))
    n = u.size
    # KS distance of a continuous CDF to an ECDF: the largest gap on either side of each jump.
    i = np.arange(1, n + 1, dtype=np.float64)
    ks_distance = float(max(np.max(i / n - u), np.max(u - (i - 1) / n)))

    p = null.sf(x).numpy().reshape(-1)
    if n > max_samples:
        tested = p[np.random.default_rng(seed).choice(n, size=max_samples, replace=False)]
    else:
        tested = p
    test = stats.kstest(tested, "uniform")
    hist, edges = np.histogram(p, bins=bins, range=(0.0, 1.0))
    return GoodnessOfFit(
        ks_distance=ks_distance,
        pit_ks_statistic=float(test.statistic),
        pit_ks_pvalue=float(test.pvalue),
        n_held_out=int(n),
        n_tested=int(tested.size),
        pvalue_histogram=hist / n,
        bin_edges=edges,
        tail_fractions={t: float(np.mean(p <= t)) for t in _TAIL_LEVELS},
    )


# ---------------------------------------------------------------------------------------------
# Legacy pickles (earlier research code), read through a restricted unpickler
# ---------------------------------------------------------------------------------------------

# Globals a pickled dict of float64 arrays needs, and nothing else: array reconstruction
# (protocol <= 4: _reconstruct + ndarray + dtype; protocol 2 also encodes the raw bytes with
# _codecs.encode; protocol 5: _frombuffer), plus plain built-in containers and scalars.
_SAFE_BUILTINS = frozenset(
    {
        "dict",
        "list",
        "tuple",
        "set",
        "frozenset",
        "str",
        "bytes",
        "bytearray",
        "int",
        "float",
        "complex",
        "bool",
    }
)
_SAFE_NUMPY = {
    ("numpy.core.multiarray", "_reconstruct"): ("multiarray", "_reconstruct"),
    ("numpy._core.multiarray", "_reconstruct"): ("multiarray", "_reconstruct"),
    ("numpy.core.numeric", "_frombuffer"): ("numeric", "_frombuffer"),
    ("numpy._core.numeric", "_frombuffer"): ("numeric", "_frombuffer"),
    ("numpy", "ndarray"): (None, "ndarray"),
    ("numpy", "dtype"): (None, "dtype"),
}


def _numpy_global(submodule: str | None, name: str) -> Any:
    if submodule is None:
        return getattr(np, name)
    # numpy >= 2 keeps these in numpy._core; importing numpy.core there only warns and forwards.
    for prefix in ("numpy._core.", "numpy.core."):
        try:
            return getattr(importlib.import_module(prefix + submodule), name)
        except (ImportError, AttributeError):
            continue
    raise pickle.UnpicklingError(f"this numpy has no {submodule}.{name}")


class _ArrayOnlyUnpickler(pickle.Unpickler):
    """Unpickler that can rebuild dicts of numpy arrays and refuses every other global."""

    def find_class(self, module: str, name: str) -> Any:
        if module in ("builtins", "__builtin__") and name in _SAFE_BUILTINS:
            return getattr(__import__("builtins"), name)
        if (module, name) == ("_codecs", "encode"):
            import codecs

            return codecs.encode
        if (module, name) in _SAFE_NUMPY:
            return _numpy_global(*_SAFE_NUMPY[(module, name)])
        raise pickle.UnpicklingError(
            f"refusing to load global '{module}.{name}': legacy null pickles may only contain "
            "numpy arrays and plain containers"
        )


def _read_legacy_pickle(path: Path) -> tuple[np.ndarray, np.ndarray]:
    try:
        with open(path, "rb") as fh:
            obj = _ArrayOnlyUnpickler(fh).load()
    except pickle.UnpicklingError:
        raise
    except (EOFError, ValueError, TypeError, AttributeError, IndexError, KeyError) as err:
        raise ValueError(f"`{path}` is not a readable legacy null pickle: {err}") from err
    if not isinstance(obj, dict) or "x" not in obj or "cdf" not in obj:
        raise ValueError(f"`{path}` must hold a dict with keys 'x' and 'cdf', got {type(obj).__name__}")
    x = np.asarray(obj["x"], dtype=np.float64)
    cdf = np.asarray(obj["cdf"], dtype=np.float64)
    if x.ndim != 1 or x.shape != cdf.shape or x.size < 2:
        raise ValueError(
            f"`{path}`: 'x' and 'cdf' must be 1-D of equal length >= 2, got {x.shape}, {cdf.shape}"
        )
    if not (np.all(np.isfinite(x)) and np.all(np.isfinite(cdf))):
        raise ValueError(f"`{path}`: 'x' and 'cdf' must be finite")
    if np.any(np.diff(x) <= 0) or np.any(np.diff(cdf) < 0) or cdf[0] < 0 or cdf[-1] > 1:
        raise ValueError(f"`{path}`: 'x' must increase and 'cdf' must be a non-decreasing CDF in [0, 1]")
    return x, cdf


def _log_slope_scale(x_far: float, x_near: float, p_far: float, p_near: float, fallback: float) -> float:
    """Exponential scale through two tail points ``(x, p)``, or ``fallback`` if degenerate."""
    drop = math.log(p_near) - math.log(p_far)
    scale = abs(x_far - x_near) / drop if drop > 0 else fallback
    return scale if math.isfinite(scale) and scale > 0 else fallback


def _null_from_legacy(x: np.ndarray, cdf: np.ndarray, path: Path) -> NullModel:
    # Old grids run past the data with cdf exactly 0 / 1; keep the part strictly inside (0, 1),
    # where the exponential tails can be attached, and fit their scales to the last decade.
    inside = np.flatnonzero((cdf > 0) & (cdf < 1))
    if inside.size < 2:
        raise ValueError(f"`{path}`: the cdf needs at least 2 points strictly between 0 and 1")
    x, cdf = x[inside[0] : inside[-1] + 1], cdf[inside[0] : inside[-1] + 1]
    sf = 1.0 - cdf
    spacing = (x[-1] - x[0]) / (x.size - 1)
    a = int(np.argmax(sf <= min(10.0 * sf[-1], sf[0])))
    a = min(a, x.size - 2)
    beta_upper = _log_slope_scale(x[-1], x[a], sf[-1], sf[a], spacing)
    b = int(x.size - 1 - np.argmax((cdf <= min(10.0 * cdf[0], cdf[-1]))[::-1]))
    b = max(b, 1)
    beta_lower = _log_slope_scale(x[0], x[b], cdf[0], cdf[b], spacing)
    return NullModel(
        grid=x,
        sf=sf,
        cdf=cdf,
        pdf=np.maximum(np.gradient(cdf, x), 0.0),
        tail_scale_upper=beta_upper,
        tail_scale_lower=beta_lower,
        kernel=_LEGACY_KERNEL,
        bandwidth=float("nan"),
        n_samples=0,
    )


# ---------------------------------------------------------------------------------------------
# NullBank
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class NullBankMetadata:
    """Provenance of a :class:`NullBank`, written to ``metadata.json``.

    Attributes
    ----------
    model_id : str or None
        Model the logits were captured from (hub id or path).
    num_layers : int
        Number of MoE layers of that model (the bank may cover a subset).
    num_experts : int or None
        Experts per layer (None only for legacy banks read without ``num_experts``).
    layers : list of int
        Layers that have a null.
    kernel : str
    bandwidth : str or float
        The bandwidth argument (rule name or number); per-layer values are in each null's
        ``bandwidth_``.
    per_expert : bool
    n_samples : dict of int to int
        Calibration logits per fitted distribution, per layer.
    calibration : str
        Free-text description of the calibration text.
    library_version : str
        ``bh_helpers.__version__`` that fitted the bank.
    created : str
        ISO 8601 UTC timestamp.
    schema_version : int
        On-disk layout version (:data:`SCHEMA_VERSION`).
    router_fingerprint : dict of int to list of float, optional
        :func:`bh_helpers.models.families.router_fingerprint` of the model the logits came from;
        :func:`bh_helpers.routing.patch.route` refuses the bank on a model whose routers differ.
        None for banks fitted without the model at hand (no check then).
    """

    model_id: str | None
    num_layers: int
    num_experts: int | None
    layers: list[int]
    kernel: str
    bandwidth: str | float
    per_expert: bool
    n_samples: dict[int, int]
    calibration: str
    library_version: str
    created: str
    schema_version: int = SCHEMA_VERSION
    router_fingerprint: dict[int, list[float]] | None = None


def _library_version() -> str:
    from bh_helpers import __version__

    return __version__


def _now() -> str:
    return datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")


def _config_counts(model_or_config: Any) -> tuple[int, int]:
    config = getattr(model_or_config, "config", model_or_config)
    layers = getattr(config, "num_hidden_layers", None)
    experts = None
    # OLMoE/Qwen-MoE call it num_experts, Mixtral num_local_experts, DeepSeek n_routed_experts.
    for name in ("num_experts", "num_local_experts", "n_routed_experts"):
        experts = getattr(config, name, None)
        if experts is not None:
            break
    if not isinstance(layers, int) or not isinstance(experts, int):
        raise ValueError(
            "`model_or_config` must be a MoE model or config with `num_hidden_layers` and "
            f"`num_experts` (or `num_local_experts`), got {type(model_or_config).__name__}"
        )
    return layers, experts


class NullBank(Mapping[int, NullModel]):
    """One :class:`NullModel` per MoE layer, with provenance; a read-only mapping ``layer -> null``.

    Build it with :func:`fit_null_bank`, :meth:`load` or :meth:`from_legacy_pickles`.

    Parameters
    ----------
    nulls : mapping of int to NullModel
    metadata : NullBankMetadata

    Examples
    --------
    >>> import torch
    >>> g = torch.Generator().manual_seed(0)
    >>> bank = fit_null_bank({0: torch.randn(1000, 8, generator=g), 1: torch.randn(1000, 8, generator=g)})
    >>> bank.pvalues(torch.randn(3, 8, generator=g), layer=1).shape
    torch.Size([3, 8])
    """

    def __init__(self, nulls: Mapping[int, NullModel], metadata: NullBankMetadata) -> None:
        if not nulls:
            raise ValueError("`nulls` is empty: a NullBank needs at least one layer")
        for layer, null in nulls.items():
            if not isinstance(null, NullModel):
                raise ValueError(f"`nulls[{layer}]` must be a NullModel, got {type(null).__name__}")
        self._nulls = {int(k): nulls[k] for k in sorted(nulls)}
        self.metadata = metadata

    # Mapping protocol
    def __getitem__(self, layer: int) -> NullModel:
        try:
            return self._nulls[layer]
        except KeyError:
            raise KeyError(f"no null for layer {layer}; this bank has layers {list(self._nulls)}") from None

    def __iter__(self) -> Iterator[int]:
        return iter(self._nulls)

    def __len__(self) -> int:
        return len(self._nulls)

    def __repr__(self) -> str:
        m = self.metadata
        return (
            f"NullBank(model_id={m.model_id!r}, layers={len(self)}/{m.num_layers}, "
            f"num_experts={m.num_experts}, kernel={m.kernel!r}, per_expert={m.per_expert})"
        )

    @property
    def num_layers(self) -> int:
        return self.metadata.num_layers

    @property
    def num_experts(self) -> int | None:
        return self.metadata.num_experts

    def pvalues(self, logits: Any, layer: int) -> torch.Tensor:
        """P-values of router logits of one layer: ``self[layer].sf(logits)`` in float32.

        Parameters
        ----------
        logits : Tensor of shape (..., E)
        layer : int

        Returns
        -------
        Tensor, float32, same shape and device as ``logits``.
        """
        null = self[layer]
        shape = getattr(logits, "shape", None)
        if self.num_experts is not None and (not shape or shape[-1] != self.num_experts):
            raise ValueError(
                f"`logits` must have {self.num_experts} experts in the last dimension, got shape "
                f"{tuple(shape) if shape is not None else None}"
            )
        return null.sf(logits, dtype=torch.float32)

    def check_compatible(self, model_or_config: Any, *, what: str = "`model_or_config`") -> NullBank:
        """Raise ValueError unless layer and expert counts match the model; return self.

        Parameters
        ----------
        model_or_config : transformers model or config
            Anything with ``num_hidden_layers`` and ``num_experts`` / ``num_local_experts`` /
            ``n_routed_experts`` (directly or under ``.config``).
        what : str
            How the message names the model.
        """
        layers, experts = _config_counts(model_or_config)
        self._check_counts(num_layers=layers, num_experts=experts, what=what)
        return self

    def _check_counts(self, *, num_layers: int | None, num_experts: int | None, what: str) -> None:
        if num_layers is not None and (self.num_layers != num_layers or max(self) >= num_layers):
            raise ValueError(
                f"null bank was fitted for a model with {self.num_layers} layers (layers "
                f"{list(self)}), but {what} has {num_layers}: fit a bank for this model"
            )
        if num_experts is not None and self.num_experts is not None and self.num_experts != num_experts:
            raise ValueError(
                f"null bank was fitted for {self.num_experts} experts per layer, but {what} has "
                f"{num_experts}: fit a bank for this model"
            )

    # -- persistence ------------------------------------------------------------------------

    def save(self, directory: str | Path) -> Path:
        """Write ``nulls.npz`` (float64 grids) and ``metadata.json`` into ``directory``.

        No pickle is involved: :meth:`load` reads the arrays with ``allow_pickle=False``.
        Returns the directory.
        """
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        arrays: dict[str, np.ndarray] = {}
        for layer, null in self._nulls.items():
            prefix = f"layer_{layer}."
            arrays[prefix + "grid"] = null._grid
            arrays[prefix + "sf"] = null._sf
            arrays[prefix + "cdf"] = null._cdf
            arrays[prefix + "pdf"] = null._pdf
            arrays[prefix + "tail_scale_upper"] = null._beta_upper
            arrays[prefix + "tail_scale_lower"] = null._beta_lower
            arrays[prefix + "bandwidth"] = np.atleast_1d(np.asarray(null.bandwidth_, dtype=np.float64))
            arrays[prefix + "n_samples"] = np.array([null.n_samples_], dtype=np.int64)
            arrays[prefix + "per_expert"] = np.array([null.per_expert])
        meta = asdict(self.metadata)
        meta["n_samples"] = {str(k): v for k, v in meta["n_samples"].items()}
        if meta["router_fingerprint"] is not None:
            meta["router_fingerprint"] = {str(k): v for k, v in meta["router_fingerprint"].items()}
        meta["format"] = "bh_helpers.NullBank"
        # A checksum per array: a shifted grid or two layers' arrays swapped still satisfy every
        # invariant and gave p-values off by 0.35-0.55 before; load() now refuses them.
        meta["array_sha256"] = {name: _array_digest(value) for name, value in sorted(arrays.items())}
        # Write to temporary names first so an interrupted save never leaves a half-written bank.
        tmp_npz, tmp_json = directory / (NPZ_NAME + ".tmp"), directory / (METADATA_NAME + ".tmp")
        with open(tmp_npz, "wb") as fh:
            np.savez_compressed(fh, **arrays)
        tmp_json.write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")
        tmp_npz.replace(directory / NPZ_NAME)
        tmp_json.replace(directory / METADATA_NAME)
        return directory

    @classmethod
    def load(
        cls,
        directory: str | Path,
        *,
        num_layers: int | None = None,
        num_experts: int | None = None,
    ) -> NullBank:
        """Read a bank written by :meth:`save`, checking schema version and model shape.

        Parameters
        ----------
        directory : str or Path
            Folder with ``nulls.npz`` and ``metadata.json``.
        num_layers, num_experts : int, optional
            Layer and expert counts of the model the bank will be used with; a mismatch raises.
            (Or call :meth:`check_compatible` with the model.)

        Raises
        ------
        ValueError
            Missing, corrupt or truncated files, a schema newer than this library's, or a layer /
            expert count that does not match.
        """
        directory = Path(directory)
        meta_path, npz_path = directory / METADATA_NAME, directory / NPZ_NAME
        if not meta_path.is_file() or not npz_path.is_file():
            raise ValueError(
                f"`directory` {str(directory)!r} must contain {METADATA_NAME} and {NPZ_NAME} "
                "(written by NullBank.save)"
            )
        metadata = _read_metadata(meta_path)
        try:
            with np.load(npz_path, allow_pickle=False) as npz:
                arrays = {key: npz[key] for key in npz.files}  # read everything now: errors surface here
        # Damaged archives surface as many exception types (BadZipFile, zlib.error, EOFError, and
        # even tokenize errors from a garbled array header): any failure here means a bad file.
        except Exception as err:  # noqa: BLE001
            raise ValueError(
                f"`{npz_path}` is corrupt or truncated ({type(err).__name__}: {err}); "
                "save or fit the bank again"
            ) from err
        _check_digests(arrays, _read_digests(meta_path), npz_path)
        nulls = {}
        for layer in metadata.layers:
            try:
                _check_null_arrays(arrays, layer=layer)
                nulls[layer] = _null_from_arrays(arrays, layer=layer, kernel=metadata.kernel)
            except (KeyError, IndexError, ValueError) as err:
                raise ValueError(
                    f"`{npz_path}` does not hold a valid null for layer {layer} ({err}); "
                    "save or fit the bank again"
                ) from err
        bank = cls(nulls, metadata)
        bank._check_counts(
            num_layers=num_layers, num_experts=num_experts, what="the model (`num_layers`/`num_experts`)"
        )
        return bank

    @classmethod
    def from_legacy_pickles(
        cls,
        directory: str | Path,
        *,
        trust: bool = False,
        model_id: str | None = None,
        num_layers: int | None = None,
        num_experts: int | None = None,
    ) -> NullBank:
        """Read nulls of the earlier research code (``distribution_model_layer_{i}.pkl``).

        Each file holds ``{'x': float64[G], 'cdf': float64[G]}``. Unpickling can run arbitrary
        code, so this refuses unless ``trust=True``; even then a restricted unpickler admits only
        what numpy arrays and plain containers need and raises ``pickle.UnpicklingError`` for
        any other global (``os.system``, ``builtins.eval``, ...). Save the result with
        :meth:`save` and use that from then on.

        Parameters
        ----------
        directory : str or Path
        trust : bool, default=False
            Set to True only for files from a source you trust.
        model_id : str, optional
        num_layers : int, optional
            Layers of the model; default: highest layer index + 1.
        num_experts : int, optional
            Experts per layer (the old format does not record it).

        Notes
        -----
        The legacy grids store only the CDF, so ``sf = 1 - cdf`` there carries the old format's
        absolute (not relative) precision in the upper tail; grid points with ``cdf`` exactly 0
        or 1 are dropped and replaced by exponential tails fitted to the last decade of the grid.
        """
        if trust is not True:
            raise ValueError(
                "refusing to unpickle legacy null files: pickle can execute code. If these files "
                "come from a source you trust, pass `trust=True` (a restricted unpickler is used even then)"
            )
        directory = Path(directory)
        files = {}
        for path in directory.glob("distribution_model_layer_*.pkl"):
            match = LEGACY_PATTERN.match(path.name)
            if match:
                files[int(match.group(1))] = path
        if not files:
            raise ValueError(
                f"`directory` {str(directory)!r} has no distribution_model_layer_{{i}}.pkl files"
            )
        nulls = {
            layer: _null_from_legacy(*_read_legacy_pickle(path), path)
            for layer, path in sorted(files.items())
        }
        metadata = NullBankMetadata(
            model_id=model_id,
            num_layers=num_layers if num_layers is not None else max(nulls) + 1,
            num_experts=num_experts,
            layers=sorted(nulls),
            kernel=_LEGACY_KERNEL,
            bandwidth="legacy",
            per_expert=False,
            n_samples={layer: 0 for layer in nulls},
            calibration=f"converted from legacy pickles in {directory.name}",
            library_version=_library_version(),
            created=_now(),
        )
        bank = cls(nulls, metadata)
        bank._check_counts(num_layers=num_layers, num_experts=None, what="`num_layers`")
        return bank


def _array_digest(value: np.ndarray) -> str:
    """sha256 of an array's dtype, shape and bytes."""
    value = np.ascontiguousarray(value)
    return hashlib.sha256(f"{value.dtype.str}{value.shape}".encode() + value.tobytes()).hexdigest()


def _read_digests(meta_path: Path) -> dict[str, str] | None:
    """The ``array_sha256`` map of ``metadata.json`` (None for banks saved before it existed)."""
    digests = json.loads(meta_path.read_text()).get("array_sha256")
    return digests if isinstance(digests, dict) else None


def _check_digests(arrays: Mapping[str, np.ndarray], digests: Mapping[str, str] | None, npz_path: Path) -> None:
    if digests is None:
        return
    missing, extra = sorted(set(digests) - set(arrays)), sorted(set(arrays) - set(digests))
    if missing or extra:

        def by_layer(names: list[str]) -> str:
            layers: dict[str, list[str]] = {}
            for name in names:
                head, _, field = name.partition(".")
                layers.setdefault(head.replace("layer_", "layer "), []).append(field)
            return "; ".join(f"{layer} ({', '.join(fields)})" for layer, fields in layers.items()) or "none"

        raise ValueError(f"`{npz_path}` does not hold the arrays its metadata lists (missing: {by_layer(missing)}; "
                         f"unexpected: {by_layer(extra)}); save or fit the bank again")
    changed = sorted(name for name, value in arrays.items() if _array_digest(value) != digests[name])
    if changed:
        raise ValueError(
            f"`{npz_path}` was changed after it was saved (checksum mismatch: {', '.join(changed[:6])}"
            f"{' ...' if len(changed) > 6 else ''}); save or fit the bank again"
        )


def _check_null_arrays(arrays: Mapping[str, np.ndarray], *, layer: int) -> None:
    """Invariants of one stored null: float64 grid sorted, sf = 1 - cdf in [0, 1] and
    monotone, finite positive tail scales. Raises ValueError naming what is wrong."""
    prefix = f"layer_{layer}."
    grid, sf, cdf = (arrays[prefix + name] for name in ("grid", "sf", "cdf"))
    for name, value in (("grid", grid), ("sf", sf), ("cdf", cdf)):
        if value.dtype != np.float64:
            raise ValueError(f"{name} must be float64, got {value.dtype}")
        if not np.isfinite(value).all():
            raise ValueError(f"{name} has non-finite values")
    if (np.diff(grid, axis=-1) < 0).any():  # empirical nulls may repeat a value
        raise ValueError("grid is not sorted")
    if (sf < 0).any() or (sf > 1).any() or (np.diff(sf, axis=-1) > 0).any() or (np.diff(cdf, axis=-1) < 0).any():
        raise ValueError("sf / cdf are not probabilities monotone along the grid")
    if np.abs(sf + cdf - 1.0).max() > 1e-9:
        raise ValueError(f"sf + cdf differs from 1 by up to {np.abs(sf + cdf - 1.0).max():.3g}")
    for name in ("tail_scale_upper", "tail_scale_lower"):
        value = np.asarray(arrays[prefix + name], dtype=np.float64)
        if not (np.isfinite(value) & (value > 0)).all():
            raise ValueError(f"{name} must be finite and positive")


def _null_from_arrays(arrays: Mapping[str, np.ndarray], *, layer: int, kernel: str) -> NullModel:
    """Rebuild one layer's null from the arrays written by :meth:`NullBank.save`."""
    prefix = f"layer_{layer}."
    per_expert = bool(arrays[prefix + "per_expert"][0])

    def row(name: str) -> np.ndarray:
        # Pooled nulls are stored as [1, G] rows like per-expert ones.
        value = arrays[prefix + name]
        return value if per_expert else value[0]

    return NullModel(
        grid=row("grid"),
        sf=row("sf"),
        cdf=row("cdf"),
        pdf=row("pdf"),
        tail_scale_upper=arrays[prefix + "tail_scale_upper"],
        tail_scale_lower=arrays[prefix + "tail_scale_lower"],
        kernel=kernel,
        bandwidth=row("bandwidth"),
        n_samples=int(arrays[prefix + "n_samples"][0]),
    )


def _parse_fingerprint(raw: Any) -> dict[int, list[float]] | None:
    if raw is None:
        return None
    if not isinstance(raw, dict):
        raise ValueError(f"`router_fingerprint` must be a mapping of layer to numbers, got {type(raw).__name__}")
    return {int(layer): [float(v) for v in values] for layer, values in raw.items()}


def _read_metadata(path: Path) -> NullBankMetadata:
    try:
        raw = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ValueError(f"`{path}` is corrupt or truncated ({err}); save or fit the bank again") from err
    if not isinstance(raw, dict):
        raise ValueError(f"`{path}` must hold a JSON object, got {type(raw).__name__}")
    version = raw.get("schema_version")
    if isinstance(version, bool) or not isinstance(version, int) or version < 1:
        raise ValueError(f"`{path}` has an invalid `schema_version` {version!r}; save or fit the bank again")
    if version > SCHEMA_VERSION:
        raise ValueError(
            f"`{path}` has `schema_version` {version}, newer than this bh_helpers "
            f"({_library_version()}, schema {SCHEMA_VERSION}): upgrade bh_helpers to load it"
        )
    try:
        meta = NullBankMetadata(
            model_id=raw["model_id"],
            num_layers=int(raw["num_layers"]),
            num_experts=None if raw["num_experts"] is None else int(raw["num_experts"]),
            layers=[int(v) for v in raw["layers"]],
            kernel=str(raw["kernel"]),
            bandwidth=raw["bandwidth"],
            per_expert=bool(raw["per_expert"]),
            n_samples={int(k): int(v) for k, v in raw["n_samples"].items()},
            calibration=str(raw["calibration"]),
            library_version=str(raw["library_version"]),
            created=str(raw["created"]),
            router_fingerprint=_parse_fingerprint(raw.get("router_fingerprint")),
            schema_version=version,
        )
    except (KeyError, TypeError, ValueError, AttributeError) as err:
        raise ValueError(
            f"`{path}` is missing or has a malformed field ({err!r}); save or fit the bank again"
        ) from err
    if not meta.layers:
        raise ValueError(f"`{path}` lists no layers")
    return meta


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
) -> NullBank:
    """Fit one null per layer (see :func:`fit_null`) and collect them in a :class:`NullBank`.

    Parameters
    ----------
    logits_by_layer : mapping of int to Tensor of shape (N, E)
        Calibration router logits per layer, as returned by
        ``bh_helpers.capture.capture_router_logits``; every layer must have the same E.
    kernel, bandwidth, per_expert, grid_size
        As in :func:`fit_null`.
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
    for layer in logits_by_layer:
        if isinstance(layer, bool) or not isinstance(layer, (int, np.integer)) or layer < 0:
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
    elif isinstance(num_layers, bool) or not isinstance(num_layers, int) or num_layers <= top:
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
        library_version=_library_version(),
        created=_now(),
        router_fingerprint=_parse_fingerprint(dict(router_fingerprint)) if router_fingerprint is not None else None,
    )
    return NullBank(nulls, metadata)
