"""Fused expert selection for CUDA: p-values, step-up count, clamping and weights in ONE kernel.

The plain-torch path (:meth:`bh_helpers.nulls.model.NullModel.sf` followed by
:func:`bh_helpers.selection.reference.select_experts`) launches some forty small kernels per call and reads
the logits several times. Here one Triton program handles a block of token rows, each row of
``E`` experts held in registers. Two kernels:

* :func:`_sorted_select_kernel`, for top-k and for a POOLED null (the default): a pooled null's
  float32 p-value is non-increasing in the logit, so the reference's preference order (smallest
  p-value, then larger logit, then lower id) is simply "larger logit, then lower id", and each
  rank's test ``p_(i) <= t_i`` is a test ``x_(i) >= c_i`` on the i-th largest logit, with per-rank
  logit cuts ``c_i`` found once per (null, method, alpha) by bisection over float32 values with
  the reference ``NullModel.sf`` itself (:func:`_logit_cuts`). The kernel sorts 64-bit keys
  ``(ordered logit bits, inverted id)`` once per row, which yields order and ids together,
  compares the sorted logits with the cuts, and writes the first ``count`` experts and their
  weights. No p-value is computed per token at all.
* :func:`_select_kernel`, for a per-expert null or given p-values: the p-value of every logit in
  float64 exactly as ``NullModel.sf`` computes it (searchsorted on the grid through a bucket
  table, linear interpolation clipped to the cell, exponential tails, rounding to float32 and
  clipping to ``[tiny, 1 - eps/2]``); the step-up (or step-down) count from the sorted p-values
  against the float64 thresholds of :func:`bh_helpers.selection.reference.fdr_counts` rounded DOWN to
  float32 (the same decisions for float32 p-values); ``max_k`` rounds of an arg-min over a
  64-bit key ``(p-value bits, descending-logit bits)``, ties to the lower id; the chosen ones
  ordered by decreasing logit.

Both clamp counts to ``[min_k, max_k]`` and compute the mixing weights (softmax over all experts,
then "renorm", "softmax" or "uniform"; "inverse_p", from the chosen experts' p-values, in
:func:`_select_kernel` only, which a pooled null then uses too). Selections (indices and counts)
are identical to the reference; weights agree within float32 rounding (the softmax's ``exp``
differs in the last bits). Everything else - other devices, float64 logits, ``top_p``, missing Triton - goes to the
reference path: :func:`select` picks automatically.

The kernels also run under Triton's interpreter (``TRITON_INTERPRET=1``) on CPU tensors, which
is how the CPU test-suite checks them; there the float64 special functions come from NumPy.
"""

from __future__ import annotations

import math
import os
import weakref
from typing import Any, NamedTuple

import numpy as np
import torch

from bh_helpers._cuda import on_device
from bh_helpers._validate import check_choice, check_int, check_level
from bh_helpers.nulls.statistics import STATISTICS, apply_statistic
from bh_helpers.selection.fused_kernels import HAS_TRITON
from bh_helpers.selection.reference import (
    FDR_METHODS,
    Selection,
    _check_logits,
    _check_pvalues,
    _check_selection_args,
    _thresholds_np,
    select_experts,
)

__all__ = [
    "HAS_TRITON",
    "fused_available",
    "fused_select_experts",
    "select_from_bank",
    "select_with_null",
]

_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"

if HAS_TRITON:
    import triton

    from bh_helpers.selection.fused_kernels import _select_kernel, _sorted_select_kernel

# p-value modes of the kernel
_P_GIVEN, _P_NULL = 1, 2
_WEIGHT_CODE = {"renorm": 0, "softmax": 1, "uniform": 2, "inverse_p": 3}  # 3: _select_kernel only
# Parameters per null row, in this order (float64): see _null_tables.
_PARAMS = ("x_min", "inv_h", "x_max", "sf_first", "sf_last", "log_sf_last", "log_cdf_first", "beta_upper", "beta_lower")
_NP = len(_PARAMS)
# Most distinct argument sets (per null) whose logit cuts and launch plans are kept.
_PLAN_CACHE_SIZE = 256


def fused_available(device: torch.device | str) -> bool:
    """Whether the Triton kernel can run on tensors of ``device``.

    True on CUDA devices with Triton installed, and on CPU only under ``TRITON_INTERPRET=1``
    (Triton's interpreter, used by the tests).
    """
    device = torch.device(device)
    if not HAS_TRITON:
        return False
    if device.type == "cuda":
        return not _INTERPRET
    return device.type == "cpu" and _INTERPRET


# ----------------------------------------------------------------------------------------------
# Host-side tables
# ----------------------------------------------------------------------------------------------


class _NullTables(NamedTuple):
    """One null, laid out for the kernel on one device."""

    grid_sf: torch.Tensor  # (E', G, 2) float64: grid point and sf there, interleaved
    buckets: torch.Tensor  # (E', B, 2) int32: [lo, hi] bounds on searchsorted(right) per bucket
    params: torch.Tensor  # (E', _NP) float64
    n_grid: int
    n_buckets: int
    iters: int  # binary-search steps that always suffice inside one bucket's bounds
    per_expert: bool


_TABLES: weakref.WeakKeyDictionary[Any, dict[str, _NullTables]] = weakref.WeakKeyDictionary()


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


def _null_tables(null: Any, device: torch.device) -> _NullTables:
    """Kernel tables of a :class:`~bh_helpers.nulls.model.NullModel` on ``device`` (cached per null)."""
    per_device = _TABLES.setdefault(null, {})
    key = str(device)
    if key in per_device:
        return per_device[key]
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
    tables = _NullTables(
        grid_sf=grid_sf.to(device),
        buckets=torch.from_numpy(np.stack(bounds)).contiguous().to(device),
        params=torch.tensor(params, dtype=torch.float64).to(device),
        n_grid=n_grid,
        n_buckets=n_buckets,
        iters=max(1, math.ceil(math.log2(widest + 1))),
        per_expert=bool(null.per_expert),
    )
    per_device[key] = tables
    return tables


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


_THRESHOLDS: dict[tuple, torch.Tensor] = {}


def _thresholds_tensor(method: str, alpha: float, m: int, padded: int, device: torch.device) -> torch.Tensor:
    """:func:`_thresholds32` on ``device``, cached like the plans (cleared past ``_PLAN_CACHE_SIZE`` keys)."""
    key = (method, alpha, m, padded, str(device))
    return _cached_plan(_THRESHOLDS, key, lambda: torch.from_numpy(_thresholds32(method, alpha, m, padded)).to(device))


def _ordered_from_float(x: torch.Tensor) -> torch.Tensor:
    """float32 -> int64, strictly increasing in the value (-0.0 just below +0.0); NaN-free input."""
    b = x.view(torch.int32).to(torch.int64)
    return torch.where(b >= 0, b, b ^ 0x7FFFFFFF)


def _float_from_ordered(s: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`_ordered_from_float`."""
    return torch.where(s >= 0, s, s ^ 0x7FFFFFFF).to(torch.int32).view(torch.float32)


_CUTS: weakref.WeakKeyDictionary[Any, dict[tuple, torch.Tensor]] = weakref.WeakKeyDictionary()


def _logit_cuts(null: Any, method: str, alpha: float, m: int, padded: int, device: torch.device) -> torch.Tensor:
    """Per-rank logit cuts ``c`` (float32, ``(padded,)``) of a POOLED null: ``sf(x) <= t_i  <=>  x >= c_i``.

    A pooled null's float32 p-value is non-increasing in the logit (the interpolation is clipped
    to each grid cell, the tails are monotone), so each rank's test "p <= t_i" is a test
    "logit >= c_i", where ``c_i`` is the smallest float32 whose p-value passes. It is found by
    bisection over the ordered float32 values (33 steps), evaluating the reference
    ``null.sf(..., dtype=float32)`` on ``device`` itself, so the cut reproduces exactly the
    p-values the reference path computes there. NaN where no logit passes (and at padded ranks):
    every comparison with it is False. Cached per (null, method, alpha, m, device).
    """
    per_null = _CUTS.get(null)
    if per_null is None:
        per_null = _CUTS[null] = {}
    key = (method, alpha, m, padded, device)
    cut = per_null.get(key)
    if cut is not None:
        return cut
    t32 = torch.from_numpy(_thresholds32(method, alpha, m, m)).to(device)  # (m,)
    inf = torch.tensor(float("inf"), device=device)

    def passes(s: torch.Tensor) -> torch.Tensor:
        return null.sf(_float_from_ordered(s), dtype=torch.float32) <= t32

    hi = _ordered_from_float(inf).expand(m).clone()  # +inf: passes, or nothing does
    lo = _ordered_from_float(-inf).expand(m) - 1  # below -inf: treated as failing
    for _ in range(33):  # the ordered range spans < 2**33 values
        open_ = hi - lo > 1
        mid = torch.where(open_, torch.div(lo + hi, 2, rounding_mode="floor"), hi)
        ok = passes(mid)
        hi = torch.where(open_ & ok, mid, hi)
        lo = torch.where(open_ & ~ok, mid, lo)
    cut = torch.full((padded,), float("nan"), dtype=torch.float32, device=device)
    cut[:m] = torch.where(passes(hi), _float_from_ordered(hi), float("nan"))
    if len(per_null) >= _PLAN_CACHE_SIZE:  # e.g. an alpha slider: keep memory bounded
        per_null.clear()
    per_null[key] = cut
    return cut



def _sorted_config(n_rows: int, ep: int) -> tuple[int, int]:
    """(rows per program, warps) of the sorted kernel, from a sweep on an H100 at E = 64
    (benchmarks/results/NOTES.md): one row per warp-sized program while launch-bound, then
    16 rows over 4 warps. Wider rows keep about 1024 keys per program."""
    if n_rows <= 64:
        return 1, 1
    if n_rows <= 4096:
        return 2, 1
    return max(1, min(16, 1024 // ep)), 4


class _SortedPlan(NamedTuple):
    """What a sorted-kernel call needs beyond the logits: fixed by the arguments, so cached."""

    cut: torch.Tensor | None  # (EP,) float32 per-rank logit cuts of a pooled null; None for top-k
    max_k: int
    ep: int  # experts padded to a power of two
    constants: dict[str, Any]  # the kernel's constexpr arguments except BLOCK_R


def _sorted_plan(cut: torch.Tensor | None, *, num_experts: int, step_down: bool, min_k: int, max_k: int,
                 weights: str, temperature: float, statistic: str = "raw") -> _SortedPlan:
    ep = _pow2(num_experts)
    constants = dict(E=num_experts, EP=ep, MAX_K=max_k, CUT=cut is not None, STEP_DOWN=step_down, MIN_K=min_k,
                     WMODE=_WEIGHT_CODE[weights], TEMPERATURE=temperature, STAT=STATISTICS.index(statistic),
                     LIBDEV=not _INTERPRET)
    return _SortedPlan(cut, max_k, ep, constants)


_TOPK_PLANS: dict[tuple, _SortedPlan] = {}
_NULL_PLANS: weakref.WeakKeyDictionary[Any, dict[tuple, _SortedPlan]] = weakref.WeakKeyDictionary()


def _cached_plan(cache: dict, key: tuple, build: Any) -> _SortedPlan:
    """``cache[key]``, built (which validates the arguments) on first use.

    At decode sizes the selector is bound by host time, so the argument checks and the null's cuts
    are done once per distinct set of arguments rather than once per call. Unhashable arguments
    are never cached; the cache is cleared when it grows past ``_PLAN_CACHE_SIZE`` keys.
    """
    try:
        plan = cache.get(key)
    except TypeError:
        return build()
    if plan is None:
        plan = build()
        if len(cache) >= _PLAN_CACHE_SIZE:
            cache.clear()
        cache[key] = plan
    return plan


def _run_sorted(logits: torch.Tensor, plan: _SortedPlan, config: tuple[int, int] | None = None) -> Selection:
    """:func:`_sorted_select_kernel` on ``logits [..., E]``; ``config`` overrides (rows per program, warps)."""
    x = _as_rows(logits)  # (T, E)
    n_rows = x.shape[0]
    indices, w, counts = _outputs(n_rows, plan.max_k, x.device)
    if n_rows:
        block_r, warps = config or _sorted_config(n_rows, plan.ep)
        args = (x, x if plan.cut is None else plan.cut, indices, w, counts, n_rows)
        with on_device(x.device):
            _launch_sorted_kernel(((n_rows + block_r - 1) // block_r, 1, 1), args, plan, block_r, warps)
    return _as_selection(logits, indices, w, counts)


_DIRECT_LAUNCH = not _INTERPRET
_COMPILED_SORTED: dict[tuple, tuple[Any, tuple]] = {}


def _launch_sorted_kernel(grid: tuple[int, int, int], args: tuple, plan: _SortedPlan, block_r: int, warps: int) -> None:
    """Launch :func:`_sorted_select_kernel`, through the compiled kernel once Triton has built it.

    Triton's JIT launcher re-derives the specialisation of every argument on every call, about as
    much host time as the rest of a decode-sized selection. The variant the JIT compiles for one
    call serves every call with the same constants, dtypes and device whose pointers are 16-byte
    aligned (the only pointer property Triton specialises on; fresh CUDA allocations, i.e. the
    outputs and the cuts, always are, and the logits are checked) - the row count ``T`` is never
    specialised. Launching the compiled kernel with all arguments is the pattern of Triton's
    fused-softmax tutorial. Unaligned logits and the interpreter take the JIT every time.
    """
    x, cut = args[0], args[1]
    constants = plan.constants
    key = (tuple(constants.values()), block_r, warps, x.dtype, cut.dtype, x.device)
    aligned = x.data_ptr() % 16 == 0
    if _DIRECT_LAUNCH and aligned:
        entry = _COMPILED_SORTED.get(key)
        if entry is not None:
            compiled, tail = entry
            compiled[grid](*args, *tail)
            return
    compiled = _sorted_select_kernel[grid](*args, BLOCK_R=block_r, num_warps=warps, **constants)
    if _DIRECT_LAUNCH and aligned and hasattr(compiled, "__getitem__"):
        values = {**constants, "BLOCK_R": block_r}
        tail = tuple(values[name] for name in _sorted_select_kernel.arg_names[len(args):])  # after T, in order
        _COMPILED_SORTED[key] = (compiled, tail)


def _pow2(n: int) -> int:
    """Smallest power of two >= n (n >= 1); ``triton.next_power_of_2`` costs ~3 us per call."""
    return 1 << (n - 1).bit_length()


def _outputs(n_rows: int, max_k: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Uninitialised indices ``(T, max_k)`` int64, weights ``(T, max_k)`` float32, counts ``(T,)`` int64."""
    return (
        torch.empty((n_rows, max_k), dtype=torch.long, device=device),
        torch.empty((n_rows, max_k), dtype=torch.float32, device=device),
        torch.empty((n_rows,), dtype=torch.long, device=device),
    )


def _as_rows(logits: torch.Tensor) -> torch.Tensor:
    """``logits [..., E]`` as a contiguous ``(T, E)`` tensor (no copy when it already is one)."""
    if logits.dim() == 2 and logits.is_contiguous():
        return logits
    return logits.reshape(-1, logits.shape[-1]).contiguous()


def _as_selection(logits: torch.Tensor, indices: torch.Tensor, w: torch.Tensor, counts: torch.Tensor) -> Selection:
    """Row outputs reshaped to ``logits``' leading dimensions."""
    if logits.dim() != 2:
        leading = logits.shape[:-1]
        indices, w, counts = indices.reshape(*leading, -1), w.reshape(*leading, -1), counts.reshape(leading)
    return Selection(indices, w, counts)


def _launch_pvalues(
    logits: torch.Tensor,
    *,
    pvalues: torch.Tensor | None,
    tables: _NullTables | None,
    method: str,
    alpha: float,
    min_k: int,
    max_k: int,
    weights: str,
    temperature: float,
) -> Selection:
    """:func:`_select_kernel`: p-values given (``pvalues``) or looked up in a per-expert null (``tables``)."""
    num_experts = logits.shape[-1]
    x = _as_rows(logits)
    n_rows = x.shape[0]
    device = x.device
    ep = _pow2(num_experts)
    indices, w, counts = _outputs(n_rows, max_k, device)
    if n_rows == 0:
        return _as_selection(logits, indices, w, counts)
    pmode = _P_NULL if tables is not None else _P_GIVEN
    thr = _thresholds_tensor(method, alpha, num_experts, ep, device)
    pv, stride_p = x, 0
    if pmode == _P_GIVEN:
        pv = _as_rows(pvalues)
        stride_p = pv.stride(0)
    if tables is not None:
        gs, bk, prm = tables.grid_sf, tables.buckets, tables.params
        n_grid, n_buckets, iters, per_expert = tables.n_grid, tables.n_buckets, tables.iters, tables.per_expert
    else:
        gs, bk, prm, n_grid, n_buckets, iters, per_expert = x, x, x, 2, 1, 1, False
    # Rows per program: enough work per program at large T, one program for a decode step.
    block_r = 1 if n_rows <= 1 else (4 if n_rows <= 4096 else 16)
    block_r = max(1, min(block_r, 4096 // ep))
    with on_device(device):
        _select_kernel[(triton.cdiv(n_rows, block_r),)](
            x, x.stride(0), pv, stride_p,
            gs, bk, prm, n_grid, n_buckets,
            thr, indices, w, counts,
            n_rows, int(min_k), float(temperature),
            E=num_experts, EP=ep, MAX_K=max_k, KP=_pow2(max_k),
            BLOCK_R=block_r, PMODE=pmode, STEP_DOWN=method == "holm", WMODE=_WEIGHT_CODE[weights],
            PER_EXPERT=per_expert, ITERS=iters, LIBDEV=not _INTERPRET,
            num_warps=4 if block_r * ep >= 1024 else 1,
        )
    return _as_selection(logits, indices, w, counts)


# ----------------------------------------------------------------------------------------------
# Public entry points
# ----------------------------------------------------------------------------------------------


def _fusable(logits: torch.Tensor, method: str) -> bool:
    # is_cuda first: this runs once per layer and decode step, where host time is the cost
    return (
        (HAS_TRITON and not _INTERPRET if logits.is_cuda else fused_available(logits.device))
        and method != "top_p"
        and logits.dtype in (torch.float32, torch.bfloat16, torch.float16)
        and logits.shape[-1] <= 1024
    )


def fused_select_experts(
    logits: torch.Tensor,
    pvalues: torch.Tensor | None = None,
    *,
    method: str = "bh",
    alpha: float = 0.05,
    min_k: int = 1,
    max_k: int = 8,
    k: int | None = None,
    top_p: float | None = None,
    weights: str = "renorm",
    temperature: float = 1.0,
    validate: bool = True,
) -> Selection:
    """:func:`bh_helpers.selection.reference.select_experts` through the fused kernel where it can run.

    Same arguments, result and errors as ``select_experts``; falls back to it for "top_p",
    float64 logits, or a device without the kernel (see :func:`fused_available`).
    """
    # inverse_p weights need the chosen experts' p-values: only _select_kernel has them (testing methods)
    if (not _fusable(logits, method) or (pvalues is not None and pvalues.dtype == torch.float64)
            or (weights == "inverse_p" and method not in FDR_METHODS)):
        return select_experts(
            logits, pvalues, method=method, alpha=alpha, min_k=min_k, max_k=max_k, k=k, top_p=top_p,
            weights=weights, temperature=temperature, validate=validate,
        )
    if method == "topk":

        def build() -> _SortedPlan:
            _, checked_max_k, checked_temperature = _check_selection_args(
                logits, method, min_k, max_k, weights, temperature, False
            )
            if k is None:
                raise ValueError("method='topk' needs `k`, the number of experts per token.")
            checked_k = check_int("k", k)
            if not 1 <= checked_k <= logits.shape[-1]:
                raise ValueError(f"`k` must be in [1, {logits.shape[-1]}] (the number of experts); got {k}.")
            if checked_k > checked_max_k:
                raise ValueError(f"`k`={k} exceeds `max_k`={checked_max_k}; pass max_k >= k.")
            return _sorted_plan(None, num_experts=logits.shape[-1], step_down=False, min_k=checked_k,
                                max_k=checked_max_k, weights=weights, temperature=checked_temperature)

        # types in the key: True == 1 and 8.0 == 8 hash alike but are refused by the checks
        key = (k, type(k), max_k, type(max_k), weights, temperature, logits.shape[-1], logits.device)
        plan = _cached_plan(_TOPK_PLANS, key, build)
        if validate:
            _check_logits(logits)
        return _run_sorted(logits, plan)
    # a testing method from here on: _check_selection_args refuses unknown ones, _fusable "top_p"
    min_k, max_k, temperature = _check_selection_args(logits, method, min_k, max_k, weights, temperature, validate)
    if pvalues is None:
        raise ValueError(f"method={method!r} needs `pvalues` (e.g. NullBank.pvalues(logits, layer)).")
    if pvalues.shape != logits.shape:
        raise ValueError(f"`pvalues` shape {tuple(pvalues.shape)} must equal `logits` shape {tuple(logits.shape)}.")
    alpha = check_level("alpha", alpha)
    if validate:
        _check_pvalues(pvalues)
    return _launch_pvalues(logits, pvalues=pvalues.to(logits.device), tables=None, method=method,
                           alpha=alpha, min_k=min_k, max_k=max_k, weights=weights, temperature=temperature)


def select_with_null(
    logits: torch.Tensor,
    null: Any,
    *,
    method: str = "bh",
    alpha: float = 0.05,
    min_k: int = 1,
    max_k: int = 8,
    weights: str = "renorm",
    temperature: float = 1.0,
    validate: bool = True,
) -> Selection:
    """P-values from ``null`` and a testing-method selection, fused on CUDA.

    Equivalent to ``select_experts(logits, null.sf(apply_statistic(logits, null.statistic),
    dtype=torch.float32), method=method, ...)``, the reference path used on other devices: the
    null's per-token statistic (:mod:`bh_helpers.nulls.statistics`) is applied here.

    Parameters
    ----------
    logits : torch.Tensor, shape ``[..., E]``
    null : bh_helpers.nulls.model.NullModel
        Pooled, or per expert with ``E`` experts.
    method : {"bh", "by", "bonferroni", "holm"}
    alpha, min_k, max_k, weights, temperature, validate
        As in :func:`~bh_helpers.selection.reference.select_experts`.
    """
    check_choice("method", method, FDR_METHODS)
    statistic = null.statistic
    # _select_kernel looks p-values up on the raw logit: other statistics give it their p-values
    needs_pvalues = null.per_expert or weights == "inverse_p"
    if not _fusable(logits, method) or (needs_pvalues and statistic != "raw"):
        values = apply_statistic(logits, statistic)  # (..., E) the null's scale
        pvalues = null.sf(values, dtype=torch.float64 if logits.dtype == torch.float64 else torch.float32)
        select = select_experts if not _fusable(logits, method) else fused_select_experts
        return select(logits, pvalues, method=method, alpha=alpha, min_k=min_k, max_k=max_k,
                      weights=weights, temperature=temperature, validate=validate)
    if not needs_pvalues:  # pooled null: p-value monotone in the logit, one sort and per-rank logit cuts

        def build() -> _SortedPlan:
            level = check_level("alpha", alpha)
            checked = _check_selection_args(logits, method, min_k, max_k, weights, temperature, False)
            num_experts = logits.shape[-1]
            cut = _logit_cuts(null, method, level, num_experts, _pow2(num_experts), logits.device)
            return _sorted_plan(cut, num_experts=num_experts, step_down=method == "holm", min_k=checked[0],
                                max_k=checked[1], weights=weights, temperature=checked[2], statistic=statistic)

        plans = _NULL_PLANS.get(null)
        if plans is None:
            plans = _NULL_PLANS[null] = {}
        key = (method, alpha, type(alpha), min_k, type(min_k), max_k, type(max_k), weights, temperature, logits.shape[-1],
               logits.device)
        plan = _cached_plan(plans, key, build)
        if validate:
            _check_logits(logits)
        return _run_sorted(logits, plan)
    if null.per_expert and logits.shape[-1] != null.num_experts:
        raise ValueError(
            f"`logits` must have {null.num_experts} experts in its last dimension for a per-expert null, "
            f"got shape {tuple(logits.shape)}"
        )
    alpha = check_level("alpha", alpha)
    min_k, max_k, temperature = _check_selection_args(logits, method, min_k, max_k, weights, temperature, validate)
    tables = _null_tables(null, logits.device)
    return _launch_pvalues(logits, pvalues=None, tables=tables, method=method, alpha=alpha, min_k=min_k,
                           max_k=max_k, weights=weights, temperature=temperature)


def select_from_bank(logits: torch.Tensor, null_bank: Any, layer: int, **kwargs: Any) -> Selection:
    """``BHSelector``'s rule: p-values of ``layer`` from ``null_bank``, then a testing method.

    With a :class:`~bh_helpers.nulls.bank.NullBank` on a device where the kernel runs, the p-value
    lookup happens inside the kernel (:func:`select_with_null`); any other bank (anything with
    ``.pvalues(logits, layer)``) gives its p-values to :func:`fused_select_experts`.
    """
    from bh_helpers.nulls.bank import NullBank

    if isinstance(null_bank, NullBank) and _fusable(logits, kwargs.get("method", "bh")):
        if null_bank.num_experts is not None and logits.shape[-1] != null_bank.num_experts:
            raise ValueError(
                f"`logits` must have {null_bank.num_experts} experts in the last dimension, got shape "
                f"{tuple(logits.shape)}"
            )
        return select_with_null(logits, null_bank[layer], **kwargs)
    pvalues = null_bank.pvalues(logits, layer)
    return fused_select_experts(logits, pvalues.to(device=logits.device), **kwargs)
