"""Levels per layer, and choosing alpha by compute: the level at which a procedure uses a target mean k.

Hand-picked alphas land wherever the null puts them (with a raw pooled null, alpha 0.05 gives
almost every token ``min_k`` experts). Comparisons are cleaner at chosen compute: a few targets
of mean experts per token, each turned into the alpha that reaches it on calibration logits.

An alpha may also differ between layers (adaptive FDR: e.g. looser in early layers): a sequence
indexed by layer number or a mapping ``{layer: alpha}`` (:func:`layer_alphas`, :func:`alpha_at`);
:meth:`ComputeBudget.alpha` with ``per_layer=True`` (or a target per layer) finds such levels.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import torch

from bh_helpers._validate import check_choice, check_finite_logits, check_int, check_level, check_number
from bh_helpers.selection.reference import FDR_METHODS, _counts_from_sorted

__all__ = ["ComputeBudget", "alpha_at", "alpha_for_mean_k", "check_calibration_fits_bank", "layer_alphas"]

#: Bisection steps on log(alpha): the bracket [1e-12, 1] (27.6 in log) shrinks to 2.6e-8 in log.
_STEPS = 30
_ALPHA_MIN = 1e-12


def layer_alphas(alpha: Any, name: str = "alpha") -> float | dict[int, float]:
    """``alpha`` checked: one level (a float), or one per layer (a dict ``{layer: level}``).

    Parameters
    ----------
    alpha : float, sequence of float, or mapping of int to float
        A level in ``(0, 1]`` for every layer; a sequence gives layer ``i`` the level
        ``alpha[i]``; a mapping names its layers.
    name : str, default "alpha"
        The argument's name, as the user typed it, for the error messages.

    Raises
    ------
    ValueError, TypeError
        An empty sequence or mapping, a layer that is not an integer >= 0, or a level outside (0, 1].
    """
    if isinstance(alpha, Mapping):
        items = list(alpha.items())
    elif isinstance(alpha, Sequence) and not isinstance(alpha, str):
        items = list(enumerate(alpha))
    else:
        return check_level(name, alpha)
    if not items:
        raise ValueError(f"`{name}` has no level: give one float, or one level per layer.")
    out = {}
    for layer, level in items:
        if isinstance(layer, bool) or not isinstance(layer, int) or layer < 0:
            raise ValueError(f"`{name}` keys must be layer numbers (integers >= 0); got {layer!r}.")
        out[layer] = check_level(f"{name}[{layer}]", level)
    return out


def alpha_at(alphas: float | Mapping[int, float], layer: int, name: str = "alpha") -> float:
    """The level of ``layer`` in :func:`layer_alphas`' result."""
    if not isinstance(alphas, Mapping):
        return alphas
    if layer not in alphas:
        raise ValueError(f"`{name}` has no level for layer {layer} (it has layers {sorted(alphas)}); "
                         "give one level per routed layer.")
    return alphas[layer]


def _sorted_pvalues(bank: Any, logits: Any, layer: int) -> torch.Tensor:
    """Each token's p-values under ``bank``'s layer, sorted ascending ``(N, E)``, as float64 once
    (the counts compare them with float64 thresholds at every bisection step)."""
    x = torch.as_tensor(logits).float()
    return bank.pvalues(x, layer).sort(dim=-1).values.double()


def _mean_k(sorted_p: list[torch.Tensor], alpha: float, method: str, min_k: int, max_k: int) -> float:
    """Mean experts per token over all layers' tokens at ``alpha``."""
    total = sum(float(_counts_from_sorted(p, alpha, method).clamp(min_k, max_k).double().sum()) for p in sorted_p)
    return total / sum(p.shape[0] for p in sorted_p)


def _bisect(sorted_p: list[torch.Tensor], target: float, method: str, min_k: int, max_k: int, where: str) -> float:
    """Smallest alpha (to bisection precision) whose mean k reaches ``target``."""
    low, high = _mean_k(sorted_p, _ALPHA_MIN, method, min_k, max_k), _mean_k(sorted_p, 1.0, method, min_k, max_k)
    if not low <= target <= high:
        # a sweep's grid takes targets from min_k + 0.5 up: below that this method has no target to offer it
        fix = ("pick a target in that range (or change `min_k` or `max_k`)" if high >= min_k + 0.5 else
               "that is below `min_k` + 0.5, where a sweep's targets start: give `alphas` instead, use another "
               "method (bh reaches further), or lower `min_k`")
        raise ValueError(
            f"`target_mean_k` {target:g} is out of reach{where}: {method} with `min_k` {min_k}, `max_k` {max_k} "
            f"gives mean k {low:.3f} at alpha=1e-12 and {high:.3f} at alpha=1; {fix}."
        )
    lo, hi = math.log(_ALPHA_MIN), 0.0  # mean k(exp(lo)) <= target <= mean k(exp(hi))
    for _ in range(_STEPS):
        mid = 0.5 * (lo + hi)
        if _mean_k(sorted_p, math.exp(mid), method, min_k, max_k) >= target:
            hi = mid
        else:
            lo = mid
    return math.exp(hi)


def check_calibration_fits_bank(bank: Any, logits_by_layer: Mapping[int, Any], *, every_layer: bool = False) -> None:
    """Refuse calibration logits that do not belong with ``bank``: other layers, or another model's routers.

    An alpha solved on another model's logits missed its compute target without a word. Checked when
    ``bank`` is a :class:`~bh_helpers.nulls.bank.NullBank` (its layers and router fingerprint) and the
    logits carry a fingerprint (a :class:`~bh_helpers.capture.CapturedLogits` does); anything else is
    taken as it is. A subset of the bank's layers is an alpha for those layers (route them with
    ``layers=``); with ``every_layer`` (a sweep routes every layer of the bank) it is refused too:
    an alpha solved on 3 of 6 layers was applied to all 6.

    Raises
    ------
    ValueError
        Naming ``logits_by_layer``, the layers on each side or the layers whose routers differ.
    """
    from bh_helpers.models.families import fingerprints_differ
    from bh_helpers.nulls.bank import NullBank

    if not isinstance(bank, NullBank):
        return
    given, fitted = sorted(int(layer) for layer in logits_by_layer), sorted(bank)
    if not set(given) <= set(fitted) or (every_layer and given != fitted):
        raise ValueError(f"`logits_by_layer` holds layers {given}, but the bank has nulls for layers {fitted}: an "
                         f"alpha is solved on the layers it routes{' (all of them)' if every_layer else ''}; capture "
                         "the calibration logits of every layer (`bh-routing capture`) of the model the bank was "
                         "fitted on.")
    ours, theirs = getattr(logits_by_layer, "router_fingerprint", None), bank.metadata.router_fingerprint
    differ = fingerprints_differ(theirs, ours) if ours and theirs else []
    if differ:
        raise ValueError(f"`logits_by_layer` comes from another model than the bank ({bank.metadata.model_id!r}): "
                         f"their routers (weights or routing settings) differ at layers {differ}; capture the calibration logits with the "
                         "model the bank was fitted on.")


class ComputeBudget:
    """Calibration p-values under one null bank, sorted once; the alpha of any compute target.

    Parameters
    ----------
    bank : NullBank
        Anything with ``.pvalues(logits, layer)`` (its statistic is applied there).
    logits_by_layer : mapping of int to Tensor of shape (N, E)
        Calibration router logits (e.g. :class:`~bh_helpers.capture.CapturedLogits`).
    max_tokens : int, optional
        Use at most this many tokens per layer, evenly spaced (the p-values of every token are
        computed and sorted once; each bisection step counts them all).
    """

    def __init__(self, bank: Any, logits_by_layer: Mapping[int, Any], *, max_tokens: int | None = None) -> None:
        if not isinstance(logits_by_layer, Mapping) or not logits_by_layer:
            raise ValueError("`logits_by_layer` must be a non-empty dict {layer: logits [N, E]}.")
        if max_tokens is not None:
            check_int("max_tokens", max_tokens, 1)
        check_calibration_fits_bank(bank, logits_by_layer)
        self.sorted_p: dict[int, torch.Tensor] = {}
        for layer, x in sorted(logits_by_layer.items()):
            check_finite_logits(f"logits_by_layer[{layer}]", x)  # every token, before the subsample
            x = torch.as_tensor(x)
            if max_tokens is not None and x.shape[0] > max_tokens:
                x = x[torch.linspace(0, x.shape[0] - 1, max_tokens).round().long()]  # (max_tokens, E)
            if x.shape[0] == 0:
                raise ValueError(f"`logits_by_layer[{layer}]` has no tokens.")
            self.sorted_p[layer] = _sorted_pvalues(bank, x, layer)

    def alpha(self, target_mean_k: float | Mapping[int, float], *, method: str = "bh", min_k: int = 1,
              max_k: int = 8, per_layer: bool = False) -> float | dict[int, float]:
        """The alpha reaching ``target_mean_k`` (see :func:`alpha_for_mean_k`)."""
        check_choice("method", method, FDR_METHODS)
        check_int("max_k", max_k, 1)
        check_int("min_k", min_k, 0, max_k)
        targets = dict(target_mean_k) if isinstance(target_mean_k, Mapping) else None
        if targets is not None and set(targets) != set(self.sorted_p):
            raise ValueError(f"`target_mean_k` needs one target for each calibration layer {sorted(self.sorted_p)}; "
                             f"got layers {sorted(targets)}.")
        for layer, target in (targets or {None: target_mean_k}).items():
            check_number("target_mean_k" if layer is None else f"target_mean_k[{layer}]", target,
                         hint="experts per token")
        if targets is not None or per_layer:
            targets = targets or dict.fromkeys(self.sorted_p, target_mean_k)
            # a layer whose target is the floor itself gets the smallest level (every token at min_k
            # but for p-values below 1e-12 k/m): a static budget may leave a layer at min_k
            return {layer: _ALPHA_MIN if targets[layer] == min_k else
                    _bisect([p], float(targets[layer]), method, min_k, max_k, f" at layer {layer}")
                    for layer, p in self.sorted_p.items()}
        return _bisect(list(self.sorted_p.values()), float(target_mean_k), method, min_k, max_k, "")


def alpha_for_mean_k(
    bank: Any,
    logits_by_layer: Mapping[int, Any],
    target_mean_k: float | Mapping[int, float],
    *,
    method: str = "bh",
    min_k: int = 1,
    max_k: int = 8,
    per_layer: bool = False,
) -> float | dict[int, float]:
    """The alpha at which ``method`` gives ``target_mean_k`` experts per token on calibration logits.

    Parameters
    ----------
    bank : NullBank
        Anything with ``.pvalues(logits, layer)`` (its statistic is applied there).
    logits_by_layer : mapping of int to Tensor of shape (N, E)
        Calibration router logits (e.g. :class:`~bh_helpers.capture.CapturedLogits`'s ``logits``),
        ideally not the ones the bank was fitted on.
    target_mean_k : float or mapping of int to float
        Mean experts per token to reach, over all layers and tokens (or in each layer); a mapping
        gives each layer its own target (a per-layer compute budget) and returns per-layer alphas;
        a layer's target equal to ``min_k`` gets alpha 1e-12 (the floor).
    method : {"bh", "by", "bonferroni", "holm"}, default "bh"
    min_k, max_k : int, default 1 and 8
        The selector's floor and ceiling (they shape the reachable range).
    per_layer : bool, default False
        One alpha per layer, each reaching the target in its layer, instead of one global alpha.

    Returns
    -------
    float or dict of int to float
        The smallest alpha (within a relative 3e-8) whose mean k is at least the target; as the
        mean k is a step function of alpha, it exceeds the target by at most one step (with
        thousands of tokens, a few thousandths of an expert).

    Raises
    ------
    ValueError
        A target outside ``[mean k at alpha=1e-12, mean k at alpha=1]``, bad ``method``,
        ``min_k``/``max_k``, or empty or non-finite logits.

    Notes
    -----
    For several targets or floors on one bank, build one :class:`ComputeBudget` (the p-values
    are computed and sorted once) and call its :meth:`ComputeBudget.alpha`.
    """
    return ComputeBudget(bank, logits_by_layer).alpha(target_mean_k, method=method, min_k=min_k, max_k=max_k,
                                                      per_layer=per_layer)
