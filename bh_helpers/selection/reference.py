"""Multiple-testing counts and per-token expert selection.

Everything here is vectorised over any leading dimensions ``[..., E]`` (E = number of experts)
and runs on whatever device the input lives on. There is no Python loop over tokens or experts.

Two public functions carry the routing statistics:

- :func:`fdr_counts` -- how many hypotheses (experts) a multiple-testing procedure rejects in
  each row, exactly as :func:`statsmodels.stats.multitest.multipletests` counts them.
- :func:`select_experts` -- turns router logits (and p-values for the testing methods) into a
  :class:`Selection`: which experts each token uses, with which mixing weights.

The threshold convention is decided once, here: a p-value EQUAL to its threshold is rejected
(``p <= threshold``), as in statsmodels (since 0.8) and :func:`scipy.stats.false_discovery_control`.

Why one module: past 500 lines on purpose, it is the definition every fast path is tested
against (argument checks, thresholds, counts, ranking, weights), and a reader checks a fast path
against it top to bottom; the fast paths import its checks rather than repeating them.

References
----------
.. [1] Y. Benjamini and Y. Hochberg, "Controlling the false discovery rate: a practical and
       powerful approach to multiple testing", J. R. Stat. Soc. B 57 (1995) 289-300.
.. [2] Y. Benjamini and D. Yekutieli, "The control of the false discovery rate in multiple testing
       under dependency", Ann. Statist. 29 (2001) 1165-1188.
.. [3] S. Holm, "A simple sequentially rejective multiple test procedure", Scand. J. Statist. 6
       (1979) 65-70.
"""

from __future__ import annotations

import math

from dataclasses import dataclass
from functools import lru_cache

import numpy as np
import torch

from bh_helpers._validate import check_choice, check_int, check_level, check_number

__all__ = [
    "FDR_METHODS",
    "SELECTION_METHODS",
    "WEIGHT_MODES",
    "Selection",
    "fdr_counts",
    "select_experts",
    "select_top_counts",
]

#: Multiple-testing procedures understood by :func:`fdr_counts`.
FDR_METHODS = ("bh", "by", "bonferroni", "holm")
#: All methods understood by :func:`select_experts`.
SELECTION_METHODS = FDR_METHODS + ("topk", "top_p")
#: How the selected experts' outputs are mixed.
WEIGHT_MODES = ("renorm", "softmax", "uniform", "inverse_p")


@dataclass(frozen=True)
class Selection:
    """Which experts each token uses, and with which weights.

    Attributes
    ----------
    indices : torch.LongTensor, shape ``[..., max_k]``
        Chosen expert ids, the chosen ones first, ordered by decreasing router logit;
        ``-1`` at unused slots.
    weights : torch.Tensor (float32), shape ``[..., max_k]``
        Mixing weight of each chosen expert; exactly ``0`` at unused slots.
    counts : torch.LongTensor, shape ``[...]``
        Number of experts chosen for each token (the number of valid slots).
    """

    indices: torch.Tensor
    weights: torch.Tensor
    counts: torch.Tensor

    @property
    def max_k(self) -> int:
        """Number of slots per token (the width of ``indices``)."""
        return self.indices.shape[-1]

    def valid(self) -> torch.Tensor:
        """Boolean mask ``[..., max_k]`` of the used slots."""
        return self.indices >= 0

    def expert_mask(self, num_experts: int) -> torch.Tensor:
        """Boolean mask ``[..., num_experts]``: True where the token uses that expert."""
        mask = torch.zeros(
            (*self.indices.shape[:-1], num_experts + 1), dtype=torch.bool, device=self.indices.device
        )
        # Unused slots (-1) are scattered into the extra last column, then dropped.
        slots = torch.where(self.valid(), self.indices, num_experts)  # (..., max_k)
        mask.scatter_(-1, slots, True)
        return mask[..., :num_experts]


# ----------------------------------------------------------------------------------------------
# Input validation
# ----------------------------------------------------------------------------------------------


def _check_method(method: str, allowed: tuple[str, ...]) -> str:
    check_choice("method", method, allowed)
    return method


def _check_pvalues(pvalues: torch.Tensor) -> None:
    if not isinstance(pvalues, torch.Tensor):
        raise TypeError(f"`pvalues` must be a torch.Tensor; got {type(pvalues).__name__}.")
    if pvalues.ndim == 0 or pvalues.shape[-1] == 0:
        raise ValueError(f"`pvalues` needs a non-empty last dimension; got shape {tuple(pvalues.shape)}.")
    if pvalues.numel() == 0:
        return
    # One host synchronisation for all three checks.
    nan, low, high = torch.stack(
        [pvalues.isnan().any(), (pvalues < 0).any(), (pvalues > 1).any()]
    ).tolist()
    if nan:
        raise ValueError("`pvalues` contains NaN; compute p-values from finite logits.")
    if low or high:
        raise ValueError(
            "`pvalues` must lie in [0, 1]; got values outside it "
            f"(min {pvalues.min().item():.3g}, max {pvalues.max().item():.3g})."
        )


def _check_logits(logits: torch.Tensor) -> None:
    if not isinstance(logits, torch.Tensor):
        raise TypeError(f"`logits` must be a torch.Tensor; got {type(logits).__name__}.")
    if logits.ndim == 0 or logits.shape[-1] == 0:
        raise ValueError(f"`logits` needs a non-empty last (expert) dimension; got shape {tuple(logits.shape)}.")
    if not logits.is_floating_point():
        raise TypeError(f"`logits` must be floating point; got {logits.dtype}.")
    if logits.numel():
        # +inf gives NaN softmax weights and a row of -inf has none: both are refused, with where.
        # (A single -inf, an expert masked out, is fine.)
        bad = logits.isnan() | logits.isposinf()  # (..., E)
        dead = logits.isneginf().all(dim=-1)  # (...,)
        if bad.any().item() or dead.any().item():
            rows = logits.reshape(-1, logits.shape[-1])
            flat_bad, flat_dead = bad.reshape(rows.shape), dead.reshape(-1)
            if flat_bad.any().item():
                token, expert = (int(i) for i in flat_bad.nonzero()[0])
                value = "NaN" if math.isnan(rows[token, expert].item()) else "+inf"
                raise ValueError(
                    f"`logits` has {value} at token {token}, expert {expert}; check the model's hidden states "
                    "(overflow in float16?).")
            token = int(flat_dead.nonzero()[0, 0])
            raise ValueError(f"`logits` is -inf for every expert at token {token}; no expert can be chosen.")


def _stat_dtype(x: torch.Tensor) -> torch.dtype:
    # P-value arithmetic never happens in half precision: in bf16 the strongest experts' p-values
    # collapse onto one value and BH can no longer separate them (README.md, "Selection: the
    # statistics"; tests/test_nulls.py::test_top8_of_64_never_tie_in_float32).
    return torch.float64 if x.dtype == torch.float64 else torch.float32


# ----------------------------------------------------------------------------------------------
# Multiple-testing counts
# ----------------------------------------------------------------------------------------------


@lru_cache(maxsize=64)
def _thresholds_np(method: str, alpha: float, m: int) -> np.ndarray:
    """Per-rank rejection thresholds in float64, computed exactly as statsmodels does.

    Matching statsmodels' order of floating-point operations makes the counts agree bit for bit
    even for p-values that sit exactly on a threshold.
    """
    ecdf = np.arange(1, m + 1) / float(m)
    if method == "bh":  # [1], step-up: p_(k) <= k/m * alpha
        return ecdf * alpha
    if method == "by":  # [2], BH with alpha / c(m), c(m) = sum_{i<=m} 1/i
        cm = np.sum(1.0 / np.arange(1, m + 1))
        return (ecdf / cm) * alpha
    if method == "bonferroni":
        return np.full(m, alpha / float(m))
    if method == "holm":  # [3], step-down: p_(k) <= alpha / (m - k + 1)
        return alpha / np.arange(m, 0, -1)
    raise AssertionError(method)


def _thresholds(method: str, alpha: float, m: int, device: torch.device) -> torch.Tensor:
    return torch.from_numpy(_thresholds_np(method, alpha, m)).to(device)


def fdr_counts(pvalues: torch.Tensor, alpha: float, method: str = "bh", *, validate: bool = True) -> torch.Tensor:
    """Number of rejected hypotheses in each row of ``pvalues``.

    Parameters
    ----------
    pvalues : torch.Tensor, shape ``[..., m]``
        P-values in ``[0, 1]``; the last dimension holds the ``m`` hypotheses (experts) of one
        test family (token). Half-precision input is upcast to float32.
    alpha : float
        Level of the procedure, in ``(0, 1]``: the false discovery rate for "bh" and "by", the
        family-wise error rate for "bonferroni" and "holm".
    method : {"bh", "by", "bonferroni", "holm"}
        "bh": Benjamini-Hochberg step-up, the LARGEST ``k`` with ``p_(k) <= k * alpha / m``
        (not the first failure); valid for independent or positively dependent p-values.
        "by": Benjamini-Yekutieli, BH at ``alpha / sum_{i<=m} 1/i``; valid under any dependence.
        "bonferroni": ``p <= alpha / m``.
        "holm": step-down, rejects while ``p_(k) <= alpha / (m - k + 1)``.
    validate : bool, default True
        Check the inputs (costs one host synchronisation on GPU). Disable only in hot loops whose
        p-values are known to be valid.

    Returns
    -------
    torch.LongTensor, shape ``[...]``
        Rejection counts in ``[0, m]``; never clamped.

    Notes
    -----
    A p-value equal to its threshold is rejected. The counts equal
    ``statsmodels.stats.multitest.multipletests(p, alpha, method={"fdr_bh", "fdr_by",
    "bonferroni", "holm"})[0].sum()`` row by row.

    Examples
    --------
    >>> import torch
    >>> p = torch.tensor([[0.001, 0.008, 0.039, 0.041, 0.042, 0.06, 0.074, 0.205]])
    >>> fdr_counts(p, 0.05, "bh")
    tensor([2])
    >>> fdr_counts(p, 0.05, "bonferroni")
    tensor([1])
    """
    # Input validation
    alpha = check_level("alpha", alpha)
    method = _check_method(method, FDR_METHODS)
    if validate:
        _check_pvalues(pvalues)
    m = pvalues.shape[-1]

    # Main algorithm
    p = pvalues.to(_stat_dtype(pvalues))
    if method == "bonferroni":  # no ordering needed
        return (p.double() <= alpha / float(m)).sum(-1)
    return _counts_from_sorted(p.sort(dim=-1).values, alpha, method)


def _counts_from_sorted(sorted_p: torch.Tensor, alpha: float, method: str) -> torch.Tensor:
    """Rejection counts ``[...]`` from p-values already sorted ascending along the last axis."""
    m = sorted_p.shape[-1]
    below = sorted_p.double() <= _thresholds(method, alpha, m, sorted_p.device)  # (..., m)
    if method == "holm":
        # Step-down: count the leading run of rejections (stop at the first failure).
        return below.long().cumprod(dim=-1).sum(-1)
    if method == "bonferroni":
        return below.sum(-1)
    # Step-up: the largest rank k whose p-value is under its threshold, 0 if none.
    ranks = torch.arange(1, m + 1, device=sorted_p.device)  # (m,)
    return (below * ranks).amax(dim=-1)


# ----------------------------------------------------------------------------------------------
# Expert selection
# ----------------------------------------------------------------------------------------------


def _check_selection_args(
    logits: torch.Tensor, method: str, min_k: int, max_k: int, weights: str, temperature: float, validate: bool
) -> tuple[int, int, float]:
    """Validate the arguments every selector shares; returns ``(min_k, max_k, temperature)``.

    Shared by :func:`select_experts` and the fused CUDA selector so both raise the same errors.
    """
    _check_method(method, SELECTION_METHODS)
    check_choice("weights", weights, WEIGHT_MODES)
    temperature = check_number("temperature", temperature, 0.0, low_open=True)
    if validate:
        _check_logits(logits)
    num_experts = logits.shape[-1]
    min_k, max_k = check_int("min_k", min_k), check_int("max_k", max_k)
    if not 1 <= max_k <= num_experts:
        raise ValueError(f"`max_k` must be in [1, {num_experts}] (the number of experts); got {max_k}.")
    if method != "topk" and not 0 <= min_k <= max_k:
        raise ValueError(f"`min_k` must be in [0, max_k={max_k}]; got {min_k}.")
    return min_k, max_k, temperature


def _check_k(k: int | None, num_experts: int, max_k: int) -> int:
    """``k`` of "topk": given, an int in ``[1, num_experts]`` and at most ``max_k``."""
    if k is None:
        raise ValueError("method='topk' needs `k`, the number of experts per token.")
    checked = check_int("k", k)
    if not 1 <= checked <= num_experts:
        raise ValueError(f"`k` must be in [1, {num_experts}] (the number of experts); got {k}.")
    if checked > max_k:
        raise ValueError(f"`k`={k} exceeds `max_k`={max_k}; pass max_k >= k.")
    return checked


def _ranked_experts(logits: torch.Tensor, pvalues: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Expert ids ``[..., E]`` in order of preference, and the p-values in that order.

    Preference: smallest p-value first, ties broken by the larger logit; without p-values, by
    decreasing logit. Two stable sorts give the lexicographic order; the sorted p-values are
    returned so that the counts need no third sort.
    """
    by_logit = logits.argsort(dim=-1, descending=True, stable=True)  # (..., E)
    if pvalues is None:
        return by_logit, None
    p_in_logit_order = pvalues.gather(-1, by_logit)  # (..., E)
    sorted_p, order = p_in_logit_order.sort(dim=-1, stable=True)  # (..., E), ascending
    return by_logit.gather(-1, order), sorted_p


def _mixing_weights(
    logits: torch.Tensor, indices: torch.Tensor, counts: torch.Tensor, mode: str, temperature: float,
    pvalues: torch.Tensor | None = None,
) -> torch.Tensor:
    """Weights ``[..., max_k]`` (float32 or float64) for the chosen slots, 0 at unused slots."""
    valid = indices >= 0  # (..., max_k)
    if mode == "uniform":
        w = valid.to(logits.dtype) / counts.clamp(min=1).unsqueeze(-1).to(logits.dtype)
        return w
    if mode == "inverse_p":
        return _inverse_p_weights(pvalues.to(logits.dtype).gather(-1, indices.clamp(min=0)), valid)
    probs = torch.softmax(logits / temperature, dim=-1)  # (..., E)
    w = probs.gather(-1, indices.clamp(min=0)) * valid  # (..., max_k)
    if mode == "renorm":
        total = w.sum(-1, keepdim=True)  # (..., 1)
        # Rows with no chosen expert (only possible with min_k=0) keep all-zero weights.
        w = torch.where(total > 0, w / total.clamp(min=torch.finfo(w.dtype).tiny), w)
    return w


def _inverse_p_weights(chosen_p: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """``(1/p_i) / sum_j (1/p_j)`` over the valid slots of ``chosen_p (..., max_k)``, 0 elsewhere.

    Computed as a softmax of ``-log p``, so that p-values near the dtype's smallest normal number
    (where the sum of a few ``1/p`` overflows float32) keep finite, exact ratios. A p-value below
    that number (0: an underflowed tail; subnormals, which GPUs may flush to 0) counts as it: such
    experts share their weight equally.
    """
    tiny = torch.finfo(chosen_p.dtype).tiny
    neg_log_p = torch.where(valid, -chosen_p.clamp(min=tiny).log(), -torch.inf)  # (..., max_k)
    top = neg_log_p.amax(-1, keepdim=True)  # (..., 1); -inf for a row with no chosen expert
    e = torch.exp(neg_log_p - torch.where(torch.isfinite(top), top, 0.0))  # (..., max_k) in [0, 1]
    total = e.sum(-1, keepdim=True)
    return torch.where(total > 0, e / total.clamp(min=tiny), e)


def select_experts(
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
    """Choose the experts of every token.

    Parameters
    ----------
    logits : torch.Tensor, shape ``[..., E]``
        Router logits (any float dtype; statistics run in float32, or float64 for float64 input).
    pvalues : torch.Tensor, shape ``[..., E]``, optional
        P-values of the logits under the null (``NullBank.pvalues``). Required by the testing
        methods and by ``weights="inverse_p"``; otherwise ignored by "topk" and "top_p".
    method : {"bh", "by", "bonferroni", "holm", "topk", "top_p"}
        "bh"/"by"/"bonferroni"/"holm": the number of experts is the number of rejections of
        :func:`fdr_counts` at level ``alpha``, clamped to ``[min_k, max_k]``; the experts with the
        smallest p-values are chosen (ties broken by the larger logit).
        "topk": the ``k`` largest logits (the model's native routing when ``k`` is its own).
        "top_p": the smallest set of largest-probability experts whose softmax mass reaches
        ``top_p``, clamped to ``[min_k, max_k]``.
    alpha : float, default 0.05
        Level of the testing methods, in ``(0, 1]``.
    min_k, max_k : int, default 1 and 8
        Bounds on the number of experts per token for the adaptive methods,
        ``0 <= min_k <= max_k <= E``. ``max_k`` is also the width of the result. "topk" needs
        ``k <= max_k`` and ignores ``min_k``.
    k : int, optional
        Number of experts for "topk", in ``[1, E]``.
    top_p : float, optional
        Probability mass for "top_p", in ``(0, 1]``.
    weights : {"renorm", "softmax", "uniform", "inverse_p"}, default "renorm"
        "renorm": softmax probabilities of the chosen experts, renormalised to sum to 1.
        "softmax": the raw softmax probabilities over all experts (OLMoE's ``norm_topk_prob=False``).
        "uniform": ``1 / count`` each.
        "inverse_p": ``1 / p`` of the chosen experts, renormalised to sum to 1 (computed as a
        softmax of ``-log p``; a p-value below the dtype's smallest normal number counts as it).
    temperature : float, default 1.0
        Softmax temperature of the weights only; the selection never depends on it.
    validate : bool, default True
        Check logits and p-values for NaN and range (one host synchronisation on GPU).

    Returns
    -------
    Selection
        ``indices`` ``[..., max_k]`` (-1 at unused slots, chosen experts ordered by decreasing
        logit), ``weights`` ``[..., max_k]`` (float32, or float64 for float64 logits; 0 at unused
        slots) and ``counts`` ``[...]``.

    Raises
    ------
    ValueError
        For an argument outside its range, an unknown method or weight mode, NaN in logits or
        p-values, p-values outside [0, 1], or p-values whose shape differs from the logits'.
        Nothing is clamped silently.

    Examples
    --------
    >>> import torch
    >>> logits = torch.tensor([[4.0, 0.0, 3.0, -1.0]])
    >>> sel = select_experts(logits, method="topk", k=2, max_k=2, weights="renorm")
    >>> sel.indices
    tensor([[0, 2]])
    >>> sel.counts
    tensor([2])
    """
    # Input validation
    min_k, max_k, temperature = _check_selection_args(logits, method, min_k, max_k, weights, temperature, validate)
    num_experts = logits.shape[-1]

    stat_dtype = _stat_dtype(logits)
    x = logits.to(stat_dtype)  # (..., E)
    leading = x.shape[:-1]

    # Main algorithm: a count per token, then the ranked experts up to that count.
    p = None
    if method in FDR_METHODS or weights == "inverse_p":
        p = _checked_pvalues(logits, pvalues, method, weights, validate).to(device=x.device, dtype=stat_dtype)
    if method in FDR_METHODS:
        alpha = check_level("alpha", alpha)
        ranked, sorted_p = _ranked_experts(x, p)  # (..., E), (..., E)
        counts = _counts_from_sorted(sorted_p, alpha, method).clamp(min_k, max_k)  # (...)
    elif method == "topk":
        k = _check_k(k, num_experts, max_k)
        counts = torch.full(leading, k, dtype=torch.long, device=x.device)
        ranked, _ = _ranked_experts(x, None)
    else:  # top_p
        if top_p is None:
            raise ValueError("method='top_p' needs `top_p`, the probability mass to cover.")
        top_p = check_level("top_p", top_p, example="0.9")
        ranked, _ = _ranked_experts(x, None)
        sorted_probs = torch.softmax(x, dim=-1).gather(-1, ranked)  # (..., E), descending
        mass_before = sorted_probs.cumsum(-1) - sorted_probs  # (..., E)
        # An expert is needed while the mass before it is still short of top_p.
        counts = (mass_before < top_p).sum(-1).clamp(min_k, max_k)

    return _selection_from_ranked(x, ranked, counts, max_k, weights, temperature, p)


def _checked_pvalues(logits: torch.Tensor, pvalues: torch.Tensor | None, method: str, weights: str,
                     validate: bool) -> torch.Tensor:
    """``pvalues``, refused when missing (a testing method or ``weights="inverse_p"`` needs them),
    of another shape than ``logits``, or (``validate``) NaN or outside [0, 1]."""
    if pvalues is None:
        needs = f"method={method!r}" if method in FDR_METHODS else 'weights="inverse_p"'
        raise ValueError(f"{needs} needs `pvalues` (e.g. NullBank.pvalues(logits, layer)).")
    if pvalues.shape != logits.shape:
        raise ValueError(f"`pvalues` shape {tuple(pvalues.shape)} must equal `logits` shape {tuple(logits.shape)}.")
    if validate:
        _check_pvalues(pvalues)
    return pvalues


def _selection_from_ranked(x: torch.Tensor, ranked: torch.Tensor, counts: torch.Tensor, max_k: int, weights: str,
                           temperature: float, pvalues: torch.Tensor | None = None) -> Selection:
    """The first ``counts`` experts of ``ranked (..., E)`` per token, ordered by logit, with weights."""
    slot = torch.arange(max_k, device=x.device)  # (max_k,)
    used = slot < counts.unsqueeze(-1)  # (..., max_k)
    chosen = torch.where(used, ranked[..., :max_k], -1)  # (..., max_k)
    # Order the chosen experts by decreasing logit (unused slots last).
    chosen_logits = torch.where(used, x.gather(-1, chosen.clamp(min=0)), -torch.inf)
    order = chosen_logits.argsort(dim=-1, descending=True, stable=True)  # (..., max_k)
    indices = chosen.gather(-1, order)
    w = _mixing_weights(x, indices, counts, weights, temperature, pvalues)
    return Selection(indices=indices, weights=w, counts=counts)


def select_top_counts(logits: torch.Tensor, counts: torch.Tensor, *, max_k: int, weights: str = "renorm",
                      temperature: float = 1.0, pvalues: torch.Tensor | None = None) -> Selection:
    """Each token's ``counts`` largest logits (ties to the lower id): top-k with a per-token k.

    The selection of the compute-matched controls (:mod:`bh_helpers.selection.controls`).

    Parameters
    ----------
    logits : torch.Tensor, shape ``[..., E]``
    counts : torch.LongTensor, shape ``[...]``
        Experts per token, in ``[0, max_k]``.
    max_k : int
        Slots per token (``indices`` width).
    weights, temperature
        As in :func:`select_experts`.
    pvalues : torch.Tensor, shape ``[..., E]``, optional
        Needed by ``weights="inverse_p"`` only (the selection never depends on them).

    Returns
    -------
    Selection
    """
    _, max_k, temperature = _check_selection_args(logits, "topk", 0, max_k, weights, temperature, False)
    if counts.shape != logits.shape[:-1] or counts.dtype.is_floating_point:
        raise ValueError(f"`counts` must be integers of shape {tuple(logits.shape[:-1])}; got "
                         f"{counts.dtype} {tuple(counts.shape)}.")
    x = logits.to(_stat_dtype(logits))  # (..., E)
    if weights == "inverse_p":
        pvalues = _checked_pvalues(logits, pvalues, "topk", weights, False).to(device=x.device, dtype=x.dtype)
    ranked, _ = _ranked_experts(x, None)
    return _selection_from_ranked(x, ranked, counts.to(device=x.device, dtype=torch.long), max_k, weights,
                                  temperature, pvalues)
