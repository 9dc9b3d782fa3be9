"""Host side of the fused selection: what its kernels read besides the logits, and the one cache.

- :func:`null_tables`: a :class:`~bh_helpers.nulls.model.NullModel`'s grid, survival values, bucket
  bounds and tail parameters laid out for :func:`~bh_helpers.selection.fused_kernels._select_kernel`;
- :func:`thresholds_tensor`: the float32 per-rank thresholds that make the kernel's decisions on
  float32 p-values those of :func:`~bh_helpers.selection.reference.fdr_counts` in float64;
- :func:`logit_cuts`: per-rank logit cuts of a pooled null for
  :func:`~bh_helpers.selection.fused_kernels._sorted_select_kernel`;
- :data:`CACHE`: the one cache (:class:`KernelCache`) of everything the fused selection derives
  from its arguments: these tables, its launch plans and its compiled launches.

The device code is :mod:`bh_helpers.selection.fused_kernels`; the launches and the public entry
points are :mod:`bh_helpers.selection.fused`.
"""

from __future__ import annotations

import math
import weakref
from collections.abc import Callable, Hashable
from typing import Any, NamedTuple

import numpy as np
import torch

from bh_helpers.selection.reference import _thresholds_np

__all__ = [
    "CACHE",
    "KernelCache",
    "NullTables",
    "float_from_ordered",
    "logit_cuts",
    "null_tables",
    "ordered_from_float",
    "thresholds_tensor",
]

# Parameters per null row, in this order (float64): see null_tables.
_PARAMS = ("x_min", "inv_h", "x_max", "sf_first", "sf_last", "log_sf_last", "log_cdf_first", "beta_upper", "beta_lower")
_NP = len(_PARAMS)


class KernelCache:
    """Memo of what the fused selection derives from its arguments: ``get_or_build(key, build, owner)``.

    Entries live in one table per owner: the null they were derived from, held weakly (its entries
    go with it), or None (the shared table). ONE eviction rule for all of them: a table that holds
    ``maxsize`` entries is emptied before the next entry is added. That bounds memory when the
    arguments keep changing (an alpha slider makes a new key per value) and costs a steady
    workload one rebuild pass. Keys that cannot be hashed are never stored (built on every call).
    At decode sizes the selection is bound by host time, so what it derives once per distinct set
    of arguments (argument checks, tables, cuts, plans) is looked up here instead of recomputed.

    Parameters
    ----------
    maxsize : int, default 256
        Most entries per table.
    """

    def __init__(self, maxsize: int = 256) -> None:
        self.maxsize = maxsize
        self._shared: dict[Hashable, Any] = {}
        self._owned: weakref.WeakKeyDictionary[Any, dict[Hashable, Any]] = weakref.WeakKeyDictionary()

    def get(self, key: Hashable, owner: Any = None) -> Any:
        """The entry of ``key`` in ``owner``'s table, or None."""
        table = self._shared if owner is None else self._owned.get(owner)
        if table is None:
            return None
        try:
            return table.get(key)
        except TypeError:  # unhashable: never stored
            return None

    def put(self, key: Hashable, value: Any, owner: Any = None) -> Any:
        """Store ``value`` under ``key`` in ``owner``'s table (emptied first when full); returns ``value``."""
        try:
            hash(key)
        except TypeError:
            return value
        if owner is None:
            table = self._shared
        else:
            table = self._owned.get(owner)
            if table is None:
                table = self._owned[owner] = {}
        if len(table) >= self.maxsize:
            table.clear()
        table[key] = value
        return value

    def get_or_build(self, key: Hashable, build: Callable[[], Any], owner: Any = None) -> Any:
        """The entry of ``key``, built (and stored) on first use; ``build`` must not return None."""
        value = self.get(key, owner)
        if value is None:
            value = self.put(key, build(), owner)
        return value

    def keys(self, owner: Any = None) -> list[Hashable]:
        """The keys in ``owner``'s table (the shared one by default)."""
        table = self._shared if owner is None else self._owned.get(owner, {})
        return list(table)

    def clear(self) -> None:
        """Forget every entry."""
        self._shared.clear()
        self._owned.clear()


#: The cache of the fused selection. Keys start with what they hold: "tables", "thresholds" and
#: "cuts" (here), "topk_plan", "null_plan" and "launch" (:mod:`bh_helpers.selection.fused`).
CACHE = KernelCache()


class NullTables(NamedTuple):
    """One null, laid out for the kernel on one device."""

    grid_sf: torch.Tensor  # (E', G, 2) float64: grid point and sf there, interleaved
    buckets: torch.Tensor  # (E', B, 2) int32: [lo, hi] bounds on searchsorted(right) per bucket
    params: torch.Tensor  # (E', _NP) float64
    n_grid: int
    n_buckets: int
    iters: int  # binary-search steps that always suffice inside one bucket's bounds
    per_expert: bool


def _bucket_bounds(grid: np.ndarray, n_buckets: int) -> tuple[np.ndarray, float, int]:
    """``[lo, hi]`` per bucket of a uniform partition of ``[grid[0], grid[-1]]``.

    For ``x`` whose computed bucket is ``b`` (``floor((x - grid[0]) * inv_h)`` clamped, possibly
    one off by rounding), ``lo[b] <= searchsorted(grid, x, right=True) <= hi[b]``: the bounds are
    the counts at the edges one bucket wider on each side, 0 and G at the ends.
    """
    n = grid.size
    x0, x1 = float(grid[0]), float(grid[-1])
    h = (x1 - x0) / n_buckets
    edges = x0 + h * np.arange(n_buckets + 1, dtype=np.float64)  # (B+1,)
    counts = np.searchsorted(grid, edges, side="right")  # (B+1,) counts at the edges
    b = np.arange(n_buckets)
    lo = np.where(b >= 1, counts[np.maximum(b - 1, 0)], 0)
    hi = np.where(b + 2 <= n_buckets - 1, counts[np.minimum(b + 2, n_buckets)], n)
    return np.stack([lo, hi], axis=-1).astype(np.int32), 1.0 / h, int((hi - lo).max())


def null_tables(null: Any, device: torch.device) -> NullTables:
    """Kernel tables of a :class:`~bh_helpers.nulls.model.NullModel` on ``device`` (cached per null)."""
    return CACHE.get_or_build(("tables", str(device)), lambda: _build_null_tables(null, device), owner=null)


def _build_null_tables(null: Any, device: torch.device) -> NullTables:
    """:func:`null_tables`, uncached."""
    g = null._grids(torch.device("cpu"))  # float64 tensors exactly as NullModel.sf uses them
    grid = g.x.numpy()  # (E', G)
    rows, n_grid = grid.shape
    n_buckets = max(n_grid - 1, 1)
    bounds, params, widest = [], [], 0
    for r in range(rows):
        bk, inv_h, width = _bucket_bounds(grid[r], n_buckets)
        bounds.append(bk)
        widest = max(widest, width)
        params.append(
            [
                float(g.x_min[r, 0]),
                inv_h,
                float(g.x_max[r, 0]),
                float(g.sf_first[r, 0]),
                float(g.sf_last[r, 0]),
                float(g.log_sf_last[r, 0]),
                float(g.log_cdf_first[r, 0]),
                float(g.beta_upper[r, 0]),
                float(g.beta_lower[r, 0]),
            ]
        )
    grid_sf = torch.stack([g.x, g.sf], dim=-1).contiguous()  # (E', G, 2)
    return NullTables(
        grid_sf=grid_sf.to(device),
        buckets=torch.from_numpy(np.stack(bounds)).contiguous().to(device),
        params=torch.tensor(params, dtype=torch.float64).to(device),
        n_grid=n_grid,
        n_buckets=n_buckets,
        iters=max(1, math.ceil(math.log2(widest + 1))),
        per_expert=bool(null.per_expert),
    )


def _thresholds32(method: str, alpha: float, m: int, padded: int) -> np.ndarray:
    """Float32 thresholds ``t32`` with ``p <= t32  <=>  float64(p) <= t64`` for float32 ``p``.

    ``t32`` is the largest float32 not above the float64 threshold of ``fdr_counts``. Padded
    ranks (beyond ``m``) get -1: never rejected.
    """
    t64 = _thresholds_np(method, alpha, m)
    t32 = t64.astype(np.float32)
    too_big = t32.astype(np.float64) > t64
    t32[too_big] = np.nextafter(t32[too_big], np.float32(-np.inf))
    out = np.full(padded, -1.0, dtype=np.float32)
    out[:m] = t32
    return out


def thresholds_tensor(method: str, alpha: float, m: int, padded: int, device: torch.device) -> torch.Tensor:
    """:func:`_thresholds32` on ``device`` (cached)."""
    key = ("thresholds", method, alpha, m, padded, str(device))
    return CACHE.get_or_build(key, lambda: torch.from_numpy(_thresholds32(method, alpha, m, padded)).to(device))


def ordered_from_float(x: torch.Tensor) -> torch.Tensor:
    """float32 -> int64, strictly increasing in the value (-0.0 just below +0.0); NaN-free input."""
    b = x.view(torch.int32).to(torch.int64)
    return torch.where(b >= 0, b, b ^ 0x7FFFFFFF)


def float_from_ordered(s: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`ordered_from_float`."""
    return torch.where(s >= 0, s, s ^ 0x7FFFFFFF).to(torch.int32).view(torch.float32)


def logit_cuts(null: Any, method: str, alpha: float, m: int, padded: int, device: torch.device) -> torch.Tensor:
    """Per-rank logit cuts ``c`` (float32, ``(padded,)``) of a POOLED null: ``sf(x) <= t_i  <=>  x >= c_i``.

    A pooled null's float32 p-value is non-increasing in the logit (the interpolation is clipped
    to each grid cell, the tails are monotone), so each rank's test "p <= t_i" is a test
    "logit >= c_i", where ``c_i`` is the smallest float32 whose p-value passes. It is found by
    bisection over the ordered float32 values (33 steps), evaluating the reference
    ``null.sf(..., dtype=float32)`` on ``device`` itself, so the cut reproduces exactly the
    p-values the reference path computes there. NaN where no logit passes (and at padded ranks):
    every comparison with it is False. Cached per (null, method, alpha, m, device).
    """
    key = ("cuts", method, alpha, m, padded, device)
    return CACHE.get_or_build(key, lambda: _bisect_cuts(null, method, alpha, m, padded, device), owner=null)


def _bisect_cuts(null: Any, method: str, alpha: float, m: int, padded: int, device: torch.device) -> torch.Tensor:
    """:func:`logit_cuts`, uncached."""
    t32 = torch.from_numpy(_thresholds32(method, alpha, m, m)).to(device)  # (m,)
    inf = torch.tensor(float("inf"), device=device)

    def passes(s: torch.Tensor) -> torch.Tensor:
        return null.sf(float_from_ordered(s), dtype=torch.float32) <= t32

    hi = ordered_from_float(inf).expand(m).clone()  # +inf: passes, or nothing does
    lo = ordered_from_float(-inf).expand(m) - 1  # below -inf: treated as failing
    for _ in range(33):  # the ordered range spans < 2**33 values
        open_ = hi - lo > 1
        mid = torch.where(open_, torch.div(lo + hi, 2, rounding_mode="floor"), hi)
        ok = passes(mid)
        hi = torch.where(open_ & ok, mid, hi)
        lo = torch.where(open_ & ~ok, mid, lo)
    cut = torch.full((padded,), float("nan"), dtype=torch.float32, device=device)
    cut[:m] = torch.where(passes(hi), float_from_ordered(hi), float("nan"))
    return cut

