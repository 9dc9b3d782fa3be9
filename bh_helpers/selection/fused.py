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
  the reference ``NullModel.sf`` itself (:func:`~bh_helpers.selection.fused_tables.logit_cuts`).
  The kernel sorts 64-bit keys ``(ordered logit bits, inverted id)`` once per row, which yields
  order and ids together, compares the sorted logits with the cuts, and writes the first
  ``count`` experts and their weights. No p-value is computed per token at all.
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
differs in the last bits). Everything else - other devices, float64 logits, ``top_p``, missing
Triton - goes to the reference path: each entry point (:func:`fused_select_experts`, :func:`select_with_null`,
:func:`select_from_bank`) falls back to it by itself.

The tables, thresholds and cuts the kernels read, and the one cache of everything derived from
the arguments, are :mod:`bh_helpers.selection.fused_tables`; the device code is
:mod:`bh_helpers.selection.fused_kernels`.

The kernels also run under Triton's interpreter (``TRITON_INTERPRET=1``) on CPU tensors, which
is how the CPU test-suite checks them; there the float64 special functions come from NumPy.
"""

from __future__ import annotations

import os
from typing import Any, NamedTuple

import torch

from bh_helpers._cuda import on_device
from bh_helpers._validate import check_choice, check_level
from bh_helpers.nulls.statistics import STATISTICS, apply_statistic
from bh_helpers.selection.fused_kernels import HAS_TRITON
from bh_helpers.selection.fused_tables import CACHE, NullTables, logit_cuts, null_tables, thresholds_tensor
from bh_helpers.selection.reference import (
    FDR_METHODS,
    Selection,
    _check_k,
    _check_logits,
    _check_selection_args,
    _checked_pvalues,
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
    key = ("launch", tuple(constants.values()), block_r, warps, x.dtype, cut.dtype, x.device)
    aligned = x.data_ptr() % 16 == 0
    if _DIRECT_LAUNCH and aligned:
        entry = CACHE.get(key)
        if entry is not None:
            compiled, tail = entry
            compiled[grid](*args, *tail)
            return
    compiled = _sorted_select_kernel[grid](*args, BLOCK_R=block_r, num_warps=warps, **constants)
    if _DIRECT_LAUNCH and aligned and hasattr(compiled, "__getitem__"):
        values = {**constants, "BLOCK_R": block_r}
        tail = tuple(values[name] for name in _sorted_select_kernel.arg_names[len(args):])  # after T, in order
        CACHE.put(key, (compiled, tail))


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
    tables: NullTables | None,
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
    thr = thresholds_tensor(method, alpha, num_experts, ep, device)
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
            checked_k = _check_k(k, logits.shape[-1], checked_max_k)
            return _sorted_plan(None, num_experts=logits.shape[-1], step_down=False, min_k=checked_k,
                                max_k=checked_max_k, weights=weights, temperature=checked_temperature)

        # types in the key: True == 1 and 8.0 == 8 hash alike but are refused by the checks
        key = ("topk_plan", k, type(k), max_k, type(max_k), weights, temperature, logits.shape[-1], logits.device)
        plan = CACHE.get_or_build(key, build)  # built (and the arguments checked) once per key
        if validate:
            _check_logits(logits)
        return _run_sorted(logits, plan)
    # a testing method from here on: _check_selection_args refuses unknown ones, _fusable "top_p"
    min_k, max_k, temperature = _check_selection_args(logits, method, min_k, max_k, weights, temperature, validate)
    pvalues = _checked_pvalues(logits, pvalues, method, weights, validate)
    alpha = check_level("alpha", alpha)
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
            cut = logit_cuts(null, method, level, num_experts, _pow2(num_experts), logits.device)
            return _sorted_plan(cut, num_experts=num_experts, step_down=method == "holm", min_k=checked[0],
                                max_k=checked[1], weights=weights, temperature=checked[2], statistic=statistic)

        key = ("null_plan", method, alpha, type(alpha), min_k, type(min_k), max_k, type(max_k), weights, temperature,
               logits.shape[-1], logits.device)
        plan = CACHE.get_or_build(key, build, owner=null)
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
    tables = null_tables(null, logits.device)
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
