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

import math
from collections.abc import Mapping
from typing import Any, NamedTuple

import numpy as np
import torch

from bh_helpers.nulls.kernels import VALID_KERNELS, _LEGACY_KERNEL
from bh_helpers.nulls.statistics import check_statistic, check_trim

__all__ = ["NullModel"]

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
    statistic : {"raw", "centred", "zscore"}, default "raw"
        The per-token statistic the null was fitted on (:mod:`bh_helpers.nulls.statistics`);
        :meth:`sf` and friends take values of that statistic, and
        :meth:`bh_helpers.nulls.bank.NullBank.pvalues` and the selectors compute it from logits.
    trim : int, default 0
        Largest values per token left out of the fit (recorded, not used by evaluation).

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
        statistic: str = "raw",
        trim: int = 0,
    ) -> None:
        self.statistic = check_statistic(statistic)
        self.trim = check_trim(trim)
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
            f"grid={self._grid.shape[-1]}{experts}"
            + (f", statistic={self.statistic!r}" if self.statistic != "raw" else "")
            + (f", trim={self.trim}" if self.trim else "") + ")"
        )

    # -- serialisation --------------------------------------------------------------------------

    def to_arrays(self) -> dict[str, np.ndarray]:
        """The null's arrays, as :meth:`NullBank.save` stores them (under a ``layer_<i>.`` prefix).

        Returns
        -------
        dict of str to ndarray
            In this order: ``grid``, ``sf``, ``cdf``, ``pdf`` (float64 ``[E', G]``, ``E' = 1`` for a
            pooled null), ``tail_scale_upper``, ``tail_scale_lower`` (float64 ``[E']``),
            ``bandwidth`` (float64, ``[E]`` per expert, else ``[1]``), ``n_samples`` (int64 ``[1]``),
            ``per_expert`` (bool ``[1]``). Kernel, statistic and trim are the bank's metadata.
        """
        return {
            "grid": self._grid,
            "sf": self._sf,
            "cdf": self._cdf,
            "pdf": self._pdf,
            "tail_scale_upper": self._beta_upper,
            "tail_scale_lower": self._beta_lower,
            "bandwidth": np.atleast_1d(np.asarray(self.bandwidth_, dtype=np.float64)),
            "n_samples": np.array([self.n_samples_], dtype=np.int64),
            "per_expert": np.array([self.per_expert]),
        }

    @classmethod
    def from_arrays(
        cls, arrays: Mapping[str, np.ndarray], *, kernel: str, statistic: str = "raw", trim: int = 0
    ) -> NullModel:
        """Rebuild a null from :meth:`to_arrays`' arrays, checking the stored invariants first.

        Parameters
        ----------
        arrays : mapping of str to ndarray
            The keys of :meth:`to_arrays` (without a layer prefix).
        kernel, statistic, trim
            As in the constructor (stored in the bank's metadata, not in the arrays).

        Raises
        ------
        KeyError
            When an array is missing.
        ValueError
            A grid, sf or cdf that is not float64 and finite, an unsorted grid, sf / cdf that are not
            monotone probabilities summing to 1, or tail scales that are not finite and positive.
        """
        _check_stored_arrays(arrays)
        per_expert = bool(arrays["per_expert"][0])

        def row(name: str) -> np.ndarray:
            # Pooled nulls are stored as [1, G] rows like per-expert ones.
            return arrays[name] if per_expert else arrays[name][0]

        return cls(
            grid=row("grid"),
            sf=row("sf"),
            cdf=row("cdf"),
            pdf=row("pdf"),
            tail_scale_upper=arrays["tail_scale_upper"],
            tail_scale_lower=arrays["tail_scale_lower"],
            kernel=kernel,
            bandwidth=row("bandwidth"),
            n_samples=int(arrays["n_samples"][0]),
            statistic=statistic,
            trim=trim,
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


def _check_stored_arrays(arrays: Mapping[str, np.ndarray]) -> None:
    """Invariants of one stored null: float64 grid sorted, sf = 1 - cdf in [0, 1] and
    monotone, finite positive tail scales. Raises ValueError naming what is wrong."""
    grid, sf, cdf = (arrays[name] for name in ("grid", "sf", "cdf"))
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
        value = np.asarray(arrays[name], dtype=np.float64)
        if not (np.isfinite(value) & (value > 0)).all():
            raise ValueError(f"{name} must be finite and positive")
