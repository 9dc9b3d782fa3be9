"""Alpha for a compute target, solved on the ROUTED model's own router logits.

:class:`~bh_helpers.selection.budget.ComputeBudget` finds the alpha that gives ``target`` experts
per token on calibration logits captured from the native model. Once the model is routed, every
layer after the first sees the output of routed layers, so its router logits, and with them the
realised mean k, drift (4.2 instead of 4.0 on the embedded model at alpha 0.75). A control run at
the target would then hand the adaptive rule extra compute. :func:`match_alpha_routed` closes the
loop: route with the current alpha, capture the routed model's router logits on the same
calibration text, solve again on those, until the realised mean k on the calibration text is
within ``tolerance`` of the target (a fixed-point iteration; on the embedded model 4.20, 4.04,
4.01, 4.002 at a target of 4).
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from bh_helpers._validate import check_int
from bh_helpers.capture import capture_router_logits
from bh_helpers.routing.patch import route
from bh_helpers.selection.budget import ComputeBudget
from bh_helpers.selection.selectors import BHSelector

__all__ = ["MatchedAlpha", "RoutedBudget", "match_alpha_routed"]


@dataclass(frozen=True)
class MatchedAlpha:
    """The alpha of a compute target, solved on routed logits.

    Attributes
    ----------
    alpha : float or dict of int to float
        One level, or one per layer (for per-layer targets or ``per_layer=True``).
    realised : float or dict of int to float
        Mean k on the calibration text routed with ``alpha`` (per layer for per-layer targets).
    history : tuple of (alpha, realised)
        Every step, the native-logit solve first.
    """

    alpha: float | dict[int, float]
    realised: float | dict[int, float]
    history: tuple


def _gap(realised: Any, target: Any) -> float:
    if isinstance(target, Mapping):
        return max(abs(realised[layer] - t) for layer, t in target.items())
    return abs(realised - target)


def match_alpha_routed(model, bank, batches: Sequence[Mapping[str, Any]], target_mean_k: float | Mapping[int, float],
                       *, method: str = "bh", min_k: int = 1, max_k: int = 8, per_layer: bool = False,
                       weights: str = "softmax", steps: int = 4, tolerance: float = 0.02,
                       strict: bool = True) -> MatchedAlpha:
    """The alpha at which the ROUTED model uses ``target_mean_k`` experts per token on calibration text.

    Parameters
    ----------
    model
        A MoE causal LM of a supported family.
    bank : NullBank
        The null bank the configuration routes with.
    batches : sequence of mappings
        Calibration batches (``input_ids``, ``attention_mask``), e.g.
        :func:`bh_helpers.capture.window_batches` of the calibration token ids.
    target_mean_k : float or mapping of int to float
        Mean experts per token over all layers, or one target per layer (a per-layer budget).
    method, min_k, max_k, weights
        The configuration's (:class:`~bh_helpers.selection.selectors.BHSelector`).
    per_layer : bool, default False
        One alpha per layer, each reaching ``target_mean_k`` in its layer.
    steps : int, default 4
        Most routed solves after the native one.
    tolerance : float, default 0.02
        Largest accepted gap between the realised and the target mean k (experts per token; per
        layer the largest gap over layers).
    strict : bool, default True
        Raise when no step is within ``tolerance``; with False, return the step with the smallest
        gap and warn (its realised mean k is in ``realised``: controls run at the realised k, so
        a miss moves the row along the compute axis, not away from its controls).

    Returns
    -------
    MatchedAlpha

    Raises
    ------
    ValueError
        A target out of reach (from :meth:`ComputeBudget.alpha`), or no convergence within
        ``steps``, naming the gap and the fix.
    """
    steps = check_int("steps", steps, 1)
    if not (isinstance(tolerance, (int, float)) and tolerance > 0):
        raise ValueError(f"`tolerance` must be a positive number of experts per token; got {tolerance!r}.")
    per_layer_view = per_layer or isinstance(target_mean_k, Mapping)
    one_target_per_layer = per_layer and not isinstance(target_mean_k, Mapping)  # the same target in every layer
    logits = capture_router_logits(model, batches, progress=False)  # the native model's logits first
    history = []
    for _ in range(steps + 1):
        alpha = ComputeBudget(bank, logits).alpha(target_mean_k, method=method, min_k=min_k, max_k=max_k,
                                                  per_layer=per_layer)
        selector = BHSelector(bank, method=method, alpha=alpha, min_k=min_k, max_k=max_k, weights=weights)
        with route(model, selector) as rec:
            logits = capture_router_logits(model, batches, progress=False)  # what routed layers feed on
        summary = rec.summary()
        realised = ({layer: s["mean_k"] for layer, s in summary["per_layer"].items()} if per_layer_view
                    else summary["mean_k"])
        history.append((alpha, realised))
        wanted = dict.fromkeys(realised, target_mean_k) if one_target_per_layer else target_mean_k
        if _gap(realised, wanted) <= tolerance:
            return MatchedAlpha(alpha=alpha, realised=realised, history=tuple(history))
    message = (f"the routed mean k did not settle within {tolerance:g} of the target {target_mean_k!r} in {steps} "
               f"routed solves (last gap {_gap(realised, wanted):.3g}); pass a larger `steps` or `tolerance`, or a "
               "target further from the floor and the ceiling.")
    if strict:
        raise ValueError(message)
    best_alpha, best_realised = min(history, key=lambda step: _gap(step[1], wanted))
    warnings.warn(f"{message} Using the closest step (gap {_gap(best_realised, wanted):.3g}).", stacklevel=2)
    return MatchedAlpha(alpha=best_alpha, realised=best_realised, history=tuple(history))


@dataclass(frozen=True)
class RoutedBudget:
    """:meth:`alpha` like :class:`~bh_helpers.selection.budget.ComputeBudget`'s, solved on routed logits.

    Not strict: a target that does not settle within the tolerance (0.02 experts per token over
    all layers, 0.05 in each layer for per-layer targets) gets the closest step, with a warning.

    Give it to :func:`bh_helpers.experiments.grids.sweep_grid` as ``budget_for=lambda bank:
    RoutedBudget(model, bank, batches)``.
    """

    model: Any
    bank: Any
    batches: Sequence[Mapping[str, Any]]
    weights: str = "softmax"
    steps: int = 4
    tolerance: float = 0.02
    layer_tolerance: float = 0.05  # per-layer targets: the largest gap over layers

    def alpha(self, target_mean_k: float | Mapping[int, float], *, method: str = "bh", min_k: int = 1,
              max_k: int = 8, per_layer: bool = False) -> float | dict[int, float]:
        """The routed alpha of ``target_mean_k`` (see :func:`match_alpha_routed`)."""
        per_layer_targets = per_layer or isinstance(target_mean_k, Mapping)
        return match_alpha_routed(self.model, self.bank, self.batches, target_mean_k, method=method, min_k=min_k,
                                  max_k=max_k, per_layer=per_layer, weights=self.weights, steps=self.steps,
                                  tolerance=self.layer_tolerance if per_layer_targets else self.tolerance,
                                  strict=False).alpha
