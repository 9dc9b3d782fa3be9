"""The grids a sweep runs: :func:`expand_grid` (methods x levels x ceilings x floors x kernels) and
:func:`sweep_grid` (the demo's and ``bh-routing sweep``'s grid: levels chosen for compute
targets, baselines, static allocations, and each adaptive configuration's controls).

:func:`check_grid` is the one check of a grid's options (the demo's settings, ``bh-routing sweep``
and :func:`sweep_grid` run it), :func:`check_grid_fits` the one check against a model's shape (run
on its config, before the weights load). Nothing requested is dropped silently: a value no
configuration can use is refused, and a combination that one (floor, ceiling) pair cannot run while
another can is named in a warning.
"""

from __future__ import annotations

import math
import numbers
import warnings
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from bh_helpers._validate import check_choice, check_int, check_level
from bh_helpers.experiments.configs import CONTROLS, FDR_METHODS, SweepConfig, with_controls
from bh_helpers.models.families import moe_shape
from bh_helpers.selection.budget import ComputeBudget, check_calibration_fits_bank

__all__ = ["LAYER_TARGETS", "check_grid", "check_grid_fits", "expand_grid", "sweep_grid"]


def _as_tuple(values) -> tuple:
    if values is None:
        return ()
    if isinstance(values, (str, int, float)):
        return (values,)
    return tuple(values)


def expand_grid(
    *,
    methods: Iterable[str] = ("bh",),
    alphas: Iterable[float] = (0.01, 0.05, 0.1, 0.2),
    max_ks: Iterable[int] = (8,),
    min_ks: Iterable[int] = (1,),
    kernels: Iterable[str] = ("gaussian",),
    topk: Iterable[int] | bool = True,
    top_ps: Iterable[float] = (),
    native: bool = True,
) -> list[SweepConfig]:
    """The configurations of a grid, in a fixed order.

    Parameters
    ----------
    methods : iterable of str
        Multiple-testing methods (subset of :data:`FDR_METHODS`), crossed with
        ``alphas x max_ks x min_ks x kernels``.
    alphas, max_ks, min_ks, kernels : iterables
        Grid axes of the multiple-testing methods (pairs with ``min_k > max_k`` are skipped).
    topk : iterable of int or bool
        Static top-k baselines: ``True`` for ``k = 1 .. max(max_ks)``, ``False`` for none, or
        the ``k`` values.
    top_ps : iterable of float
        Top-p baselines, each with ``min_k = min(min_ks)`` and ``max_k = max(max_ks)``.
    native : bool
        Include the unmodified model.

    Returns
    -------
    list of SweepConfig
        Native first, then the static top-k, top-p, and the multiple-testing configurations
        (method, alpha, max_k, min_k, kernel varying slowest to fastest).

    Examples
    --------
    >>> len(expand_grid(methods=["bh", "by"], alphas=[0.05, 0.1], max_ks=[8], topk=True))
    13
    """
    methods, alphas = _as_tuple(methods), _as_tuple(alphas)
    max_ks, min_ks = _as_tuple(max_ks), _as_tuple(min_ks)
    kernels, top_ps = _as_tuple(kernels), _as_tuple(top_ps)
    bad = [m for m in methods if m not in FDR_METHODS]
    if bad:
        raise ValueError(f"`methods` must be among {list(FDR_METHODS)} (baselines have their own options), got {bad}.")
    if methods and not (alphas and max_ks and min_ks and kernels):
        raise ValueError("`alphas`, `max_ks`, `min_ks` and `kernels` must be non-empty when `methods` is.")
    if topk is True:
        if not max_ks:
            raise ValueError("`topk=True` needs `max_ks` to know the largest k; pass the k values instead.")
        ks: tuple = tuple(range(1, max(max_ks) + 1))
    elif topk is False:
        ks = ()
    else:
        ks = _as_tuple(topk)
    _warn_skipped([f"`min_k` {lo} > `max_k` {hi}" for hi in max_ks for lo in min_ks if lo > hi] if methods else [])
    configs: list[SweepConfig] = []
    if native:
        configs.append(SweepConfig("native"))
    configs += [SweepConfig("topk", k=k) for k in ks]
    if top_ps:
        if not (max_ks and min_ks):
            raise ValueError("`top_ps` needs non-empty `max_ks` and `min_ks`.")
        configs += [SweepConfig("top_p", top_p=p, min_k=min(min_ks), max_k=max(max_ks)) for p in top_ps]
    for method in methods:
        for alpha in alphas:
            for max_k in max_ks:
                for min_k in min_ks:
                    if min_k > max_k:
                        continue
                    for kernel in kernels:
                        configs.append(
                            SweepConfig(method, alpha=alpha, max_k=max_k, min_k=min_k, kernel=kernel)
                        )
    return configs


def _warn_skipped(skipped: Sequence[str]) -> None:
    """Name the combinations of a grid that no configuration runs (a floor above a ceiling, a target out of reach)."""
    if skipped:
        warnings.warn(f"{len(skipped)} combination{'s' * (len(skipped) != 1)} of the grid cannot run and "
                      f"{'are' if len(skipped) != 1 else 'is'} left out: {'; '.join(skipped)} (a floor must not "
                      "exceed its ceiling; a compute target lies in [floor + 0.5, ceiling]).", UserWarning, stacklevel=3)


def _reaches(target: float, min_k: int, max_k: int) -> bool:
    """Whether BH with floor ``min_k`` and ceiling ``max_k`` can be tuned to ``target`` experts per token."""
    return min_k + 0.5 <= target <= max_k


def check_grid(*, methods: Sequence[str], alphas: Sequence[float], mean_ks: Sequence[float], max_ks: Sequence[int],
               min_ks: Sequence[int], top_ps: Sequence[float] = (), layer_alphas: Sequence[Sequence[float]] = (),
               layer_targets: str = "global", topk_max: int = 1) -> None:
    """Every level, floor, ceiling and compute target of a grid, before a model loads or anything is written.

    Raises ValueError (naming the argument, which the command line shows as its flag) for a bad
    value, an empty axis, a floor above every ceiling, or a compute target that no (floor,
    ceiling) pair reaches: such a request would give no configuration at all.
    """
    for name, values in (("methods", methods), ("max_ks", max_ks), ("min_ks", min_ks)):
        if not len(values):
            raise ValueError(f"`{name}` is empty; give at least one value.")
    for method in methods:
        check_choice("method", method, FDR_METHODS)
    for alpha in alphas:
        check_level("alpha", alpha)
    for row in layer_alphas:
        if not len(row):
            raise ValueError("`layer_alphas` holds an empty row; give one level per layer number.")
        for alpha in row:
            check_level("layer_alphas", alpha)
    for top_p in top_ps:
        check_level("top_p", top_p, example="0.8")
    for min_k in min_ks:
        check_int("min_k", min_k, 0)
    for max_k in max_ks:
        check_int("max_k", max_k, 1)
    check_int("topk_max", topk_max, 1)
    check_choice("layer_targets", layer_targets, LAYER_TARGETS)
    if not (len(alphas) or len(mean_ks) or len(layer_alphas)):
        raise ValueError("give `mean_ks` (compute targets), `alphas` or `layer_alphas` (levels).")
    if max(min_ks) > max(max_ks):  # pairs with floor > ceiling are left out (with a warning); none at all is an error
        raise ValueError(f"`min_k` {max(min_ks)} exceeds every `max_k` ({','.join(map(str, max_ks))}): "
                         f"pass floors of {max(max_ks)} or lower, or a larger `max_k`.")
    for target in mean_ks:
        if isinstance(target, bool) or not isinstance(target, numbers.Real) or not math.isfinite(target):
            raise ValueError(f"`mean_k` must be a number of experts per token; got {target!r}.")
        if not any(_reaches(target, lo, hi) for lo in min_ks for hi in max_ks):
            raise ValueError(
                f"`mean_k` {target:g} is not reachable: a compute target must lie between a floor plus half an "
                f"expert and a ceiling (`min_k` {','.join(map(str, min_ks))}, `max_k` "
                f"{','.join(map(str, max_ks))}); pass targets in [{min(min_ks) + 0.5:g}, {max(max_ks)}].")


def check_grid_fits(model: Any, *, max_ks: Sequence[int], min_ks: Sequence[int], topk_max: int,
                    layer_alphas: Sequence[Sequence[float]] = (), model_name: str | None = None) -> None:
    """Raise ValueError when a grid asks for more experts, or other layers, than ``model`` has.

    ``model`` may be its config (``transformers.AutoConfig``), so the check runs before the
    weights load. Per-layer levels need one level per layer number (``num_hidden_layers``).
    """
    shape = moe_shape(model)
    of = f" of {model_name!r}" if model_name else ""
    for name, values in (("max_ks", max_ks), ("topk_max", (topk_max,)), ("min_ks", min_ks)):
        too_many = [v for v in values if v > shape.num_experts]
        if too_many:
            raise ValueError(f"`{name}` {','.join(map(str, too_many))} is too large for the {shape.num_experts} "
                             f"experts per layer{of}; pass `{name}` {shape.num_experts} or lower.")
    for row in layer_alphas:
        if len(row) != shape.num_layers:
            raise ValueError(f"`layer_alphas` has {len(row)} levels for the {shape.num_layers} layers{of}; give one "
                             f"level per layer number (0..{shape.num_layers - 1}).")


#: Calibration tokens per layer on which a grid's alphas are chosen (evenly spaced).
_ALPHA_TOKENS = 4096


#: Where a grid's compute targets are reached: over all layers (one alpha), in every layer
#: (one alpha per layer: adaptive FDR at equal per-layer compute), or both.
LAYER_TARGETS = ("global", "per-layer", "both")


def _per_layer_levels(found: Mapping[int, float], where: str) -> tuple[float, ...]:
    """``{layer: alpha}`` as ``SweepConfig.layer_alphas`` (index = layer number), 4 significant digits."""
    if sorted(found) != list(range(len(found))):
        raise ValueError(f"per-layer alphas{where} need calibration logits of layers 0..L-1; got layers "
                         f"{sorted(found)}.")
    return tuple(float(f"{found[layer]:.4g}") for layer in range(len(found)))


def sweep_grid(*, banks: Mapping[str, Any], calibration: Mapping[int, Any] | None, methods: Sequence[str],
               alphas: Sequence[float], mean_ks: Sequence[float], max_ks: Sequence[int], min_ks: Sequence[int],
               topk_max: int, top_ps: Sequence[float], controls: bool = True, seed: int = 0,
               layer_alphas: Sequence[Sequence[float]] = (), layer_targets: str = "global",
               static_path: Any = None, static_budgets: bool = True, budget_for: Any = None):
    """The grid of the demo and of ``bh-routing sweep``.

    Native, static top-1..``topk_max``, top-p, then for every null bank (one per statistic and
    trim), method, ``max_k`` and floor ``min_k``: the explicit ``alphas``, the explicit per-layer
    levels ``layer_alphas`` (each a sequence, one level per layer number) and, for each compute
    target in ``mean_ks`` above the floor by at least half an expert and not above the ceiling
    (:func:`check_grid` refuses a target no pair reaches; a pair that cannot reach it is named in a
    warning), the alpha that reaches it on ``calibration`` over all layers
    (``layer_targets="global"``), the per-layer alphas that reach it in every layer
    (``"per-layer"``), or both (:class:`bh_helpers.selection.budget.ComputeBudget` on at most
    :data:`_ALPHA_TOKENS` evenly spaced tokens per layer, rounded to 4 significant digits). With
    ``controls`` every adaptive configuration is followed by its mixed and shuffled controls.

    With a ``static_path`` (:class:`~bh_helpers.experiments.static_allocation.StaticAllocationPath`)
    the grid also holds the static per-layer allocations at mean k 1..``topk_max`` (where the
    path has them), every adaptive configuration gets the static chord as a third control, and
    (``static_budgets``) each target whose total is a whole number of experts gets "per-layer
    budgets + BH": per-layer levels solved so that layer ``l`` reaches the allocation's ``k_l``
    (a layer whose ``k_l`` is at the floor ``min_k`` gets the smallest level, 1e-12; a floor
    above some ``k_l`` skips the configuration).

    ``budget_for(bank)`` may give another solver of compute targets (anything with
    ``.alpha(target, method=, min_k=, max_k=, per_layer=)``), e.g.
    :class:`bh_helpers.experiments.k_matching.RoutedBudget`, which solves on the routed model's
    own logits so that the realised mean k matches the target once routed.
    """
    check_grid(methods=methods, alphas=alphas, mean_ks=mean_ks, max_ks=max_ks, min_ks=min_ks, top_ps=top_ps,
               layer_alphas=layer_alphas, layer_targets=layer_targets, topk_max=topk_max)
    if mean_ks and calibration is None:
        raise ValueError("compute targets (--mean-ks) need calibration logits (--captured) to choose alpha.")
    _warn_skipped([f"`min_k` {lo} > `max_k` {hi}" for hi in max_ks for lo in min_ks if lo > hi]
                  + [f"`mean_k` {t:g} with `min_k` {lo}, `max_k` {hi}" for hi in max_ks for lo in min_ks
                     for t in mean_ks if lo <= hi and not _reaches(t, lo, hi)])
    adaptive = []
    for bank in banks.values():
        meta = bank.metadata
        if not mean_ks:
            budget = None
        elif budget_for is not None:
            budget = budget_for(bank)
        else:  # the sweep routes every layer of the bank: its alpha is solved on all of them
            check_calibration_fits_bank(bank, calibration, every_layer=True)
            budget = ComputeBudget(bank, calibration, max_tokens=_ALPHA_TOKENS)
        for method in methods:
            for max_k in max_ks:
                for min_k in min_ks:
                    if min_k > max_k:
                        continue
                    same = dict(max_k=max_k, min_k=min_k, kernel=meta.kernel, statistic=meta.statistic, trim=meta.trim)
                    targets = [t for t in mean_ks if _reaches(t, min_k, max_k)]  # the others: warned above
                    levels = list(alphas)
                    per_layer = [tuple(row) for row in layer_alphas]
                    for t in targets:
                        reach = dict(method=method, min_k=min_k, max_k=max_k)
                        if layer_targets != "per-layer":
                            levels.append(float(f"{budget.alpha(t, **reach):.4g}"))
                        if layer_targets != "global":
                            found = budget.alpha(t, per_layer=True, **reach)
                            per_layer.append(_per_layer_levels(found, f" (target {t:g})"))
                    adaptive += [SweepConfig(method, alpha=a, **same) for a in dict.fromkeys(levels)]
                    adaptive += [SweepConfig(method, layer_alphas=a, **same) for a in dict.fromkeys(per_layer)]
                    if static_path is not None and static_budgets:
                        adaptive += _static_budget_configs(static_path, budget, targets, method, same)
    baselines = expand_grid(methods=(), topk=list(range(1, topk_max + 1)), top_ps=top_ps, max_ks=max_ks,
                            min_ks=min_ks, native=True)
    if not controls:
        return baselines + adaptive
    if static_path is None:
        return baselines + with_controls(adaptive, seed=seed, controls=_NO_CHORD)
    totals = static_path.allocations
    if max_ks and max(totals) < static_path.num_layers * max(max_ks):
        raise ValueError(f"the static allocations reach mean k {max(totals) / static_path.num_layers:g}, below the "
                         f"largest max_k {max(max_ks)}: fit the static allocation path with max_k={max(max_ks)}.")
    baselines += [SweepConfig("static", ks=totals[k * static_path.num_layers])
                  for k in range(1, topk_max + 1) if k * static_path.num_layers in totals]
    # a floor of 0 can route below one expert per token, where no static allocation reaches
    out = baselines
    for config in adaptive:
        out += with_controls([config], seed=seed, controls=CONTROLS if config.min_k >= 1 else _NO_CHORD)
    return out


#: The controls of a grid without a static allocation path (or of a configuration it cannot reach).
_NO_CHORD = tuple(c for c in CONTROLS if c != "static_chord")


def _static_budget_configs(path: Any, budget: Any, targets: Sequence[float], method: str,
                           same: Mapping[str, Any]) -> list[SweepConfig]:
    """BH with one level per layer, solved to reach a static allocation's k in every layer."""
    out = []
    for t in targets:
        total = t * path.num_layers
        if abs(total - round(total)) > 1e-6 or round(total) not in path.allocations:
            continue  # no integer allocation at this target (the chord control still covers it)
        ks = dict(zip(path.layers, path.allocations[round(total)]))
        if min(ks.values()) < same["min_k"]:
            continue  # the floor alone exceeds the budget of some layer
        levels = budget.alpha(ks, method=method, min_k=same["min_k"], max_k=same["max_k"])
        out.append(SweepConfig(method, layer_alphas=_per_layer_levels(levels, f" (static budget, target {t:g})"),
                               budget="static", **same))
    return out
