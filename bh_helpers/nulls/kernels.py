"""Kernels of the null KDEs: unit-scale pdf and cdf, and the constants of fitting.

Each kernel is scaled so that the rule-of-thumb bandwidths (Gaussian standard deviations) smooth
by the same amount; the grid and tail constants say how finely a null is tabulated.
"""

from __future__ import annotations

import math

import numpy as np
from scipy import signal, special

__all__ = ["VALID_KERNELS", "VALID_BANDWIDTHS"]

VALID_KERNELS = ("gaussian", "tophat", "epanechnikov", "linear", "empirical", "efron")
VALID_BANDWIDTHS = ("scott", "silverman")


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
