"""Compute-matched controls: policies that really run at the compute of an adaptive configuration.

A chord between neighbouring static top-k points says what top-k *would* cost at a fractional
mean k; these controls are policies one can run, so a comparison with them is a comparison of
two routings at the same compute:

- :class:`MixedTopKSelector` gives each token ``floor(m)`` or ``ceil(m)`` experts, the top ones
  by logit, so that the mean is ``m`` (per layer, matched to the adaptive row's per-layer mean k)
  however the tokens are split into calls: each layer carries the fractional remainder of its
  ceilings from call to call (error diffusion), and within a call the tokens that get the ceiling
  are drawn at random among the real (non-padding) tokens. An adaptive rule that beats it
  allocates experts better than chance at the same budget.
- :class:`ShuffledSelector` runs the adaptive selector, then permutes its per-token counts
  across the real tokens of the batch (same histogram of k, per layer and call) and gives each
  token its top ones by logit. If the adaptive rule beats its shuffle, *which* tokens get more
  experts carries information; if not, only the histogram matters.

Both read the call's padding from :func:`~bh_helpers.routing.patch.route`, which passes
``valid`` (``[T]`` bool, False at padding rows) to a selector whose ``reads_valid_rows`` is True;
called directly (or by an engine, which has no padding rows) every row counts. Their draws never
synchronise with the host (state in device tensors, no ``.item()``) and are reproducible: the same
``seed`` and the same sequence of calls give the same choices; :meth:`MixedTopKSelector.reset` and
:meth:`ShuffledSelector.reset` start the sequence again.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

from bh_helpers._validate import check_int, check_number
from bh_helpers.selection.reference import Selection, select_top_counts
from bh_helpers.selection.selectors import (
    RoutedModel,
    Selector,
    _check_weights,
    check_layer_entries,
    check_null_bank,
    weight_pvalues,
)

__all__ = ["MixedTopKSelector", "ShuffledSelector"]


def _generator(cache: dict, device: torch.device, seed: int) -> torch.Generator:
    """One generator per device, seeded once: draws are reproducible for a given call sequence."""
    gen = cache.get(device)
    if gen is None:
        gen = cache[device] = torch.Generator(device=device).manual_seed(seed)
    return gen


def _valid_rows(valid: torch.Tensor | None, rows: int, device: torch.device) -> torch.Tensor:
    """``valid`` as a bool ``(T,)`` on ``device``; every row when None."""
    if valid is None:
        return torch.ones(rows, dtype=torch.bool, device=device)
    valid = valid.reshape(-1).to(device=device, dtype=torch.bool)
    if valid.numel() != rows:
        raise ValueError(f"`valid` has {valid.numel()} rows for {rows} tokens; pass one flag per token.")
    return valid


def _random_order(valid: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Row ids ``(T,)``: the valid rows in a random order, then the others in their own order.

    Sorting uniform keys (the invalid rows' keys pushed past 2, increasing with the row) draws a
    uniformly random order of the valid rows on the device, without a host synchronisation.
    """
    rows = valid.shape[0]
    keys = torch.rand(rows, generator=gen, device=valid.device, dtype=torch.float64)  # (T,) in [0, 1)
    keys = torch.where(valid, keys, 2.0 + torch.arange(rows, device=valid.device, dtype=torch.float64))  # (T,)
    return keys.argsort()  # (T,)


@dataclass(eq=False)
class MixedTopKSelector(Selector):
    """Top-k with a random per-token k in ``{floor(m), ceil(m)}``, mean ``m`` (per layer).

    Parameters
    ----------
    mean_k : float or mapping of int to float
        Target mean experts per token, one for every layer or per layer (the adaptive row's
        ``per_layer_mean_k``). Each token gets ``floor(m)`` or ``ceil(m)``; after ``N`` real tokens
        of a layer, in calls of any sizes, exactly ``round((m - floor(m)) N)`` of them got the
        ceiling (each layer carries its remainder from call to call, starting at one half), so
        one-token decode steps reach the mean as a single large call does. Within a call, which
        real tokens get the ceiling is drawn at random; padding rows (``valid`` False) get the
        floor and do not count.
    seed : int, default 0
        Seeds the draws (one generator per device). The carried remainders and the generators
        persist across calls and ``route`` contexts; :meth:`reset` starts again from the seed.
    max_k : int, optional
        Slots per token; default ``ceil(max(mean_k))``.
    weights : {"renorm", "softmax", "uniform", "inverse_p"}, default "renorm"
    null_bank : NullBank, optional
        Needed (and used) only by ``weights="inverse_p"``: the adaptive configuration's bank.
    """

    mean_k: float | Mapping[int, float]
    seed: int = 0
    max_k: int | None = None
    weights: str = "renorm"
    validate: bool = field(default=False, repr=False)
    null_bank: Any = field(default=None, repr=False)
    _generators: dict = field(default_factory=dict, init=False, repr=False)
    _carry: dict = field(default_factory=dict, init=False, repr=False)  # (layer, device) -> (1,) float64

    #: ``route`` passes ``valid`` (False at padding rows): the ceilings are drawn over real tokens only.
    reads_valid_rows = True

    def __post_init__(self) -> None:
        means = dict(self.mean_k) if isinstance(self.mean_k, Mapping) else {None: self.mean_k}
        self._means = {layer: check_number("mean_k" if layer is None else f"mean_k[{layer}]", m, 0.0,
                                           hint="experts per token")
                       for layer, m in means.items()}
        if self.max_k is None:
            self.max_k = max(1, math.ceil(max(self._means.values())))
        check_int("max_k", self.max_k, 1)
        if max(self._means.values()) > self.max_k:
            raise ValueError(f"`mean_k` reaches {max(self._means.values()):g} but `max_k` is {self.max_k}; "
                             "raise max_k.")
        check_int("seed", self.seed, 0)
        _check_weights(self.weights, self.null_bank)

    def target(self, layer: int) -> float:
        """The mean k of ``layer``."""
        if None in self._means:
            return self._means[None]
        if layer not in self._means:
            raise ValueError(f"`mean_k` has no entry for layer {layer} (it has {sorted(self._means)}).")
        return self._means[layer]

    def check(self, target: RoutedModel) -> None:
        """A per-layer ``mean_k`` fits the routed layers (:func:`check_layer_entries`); a ``null_bank``
        (for inverse-p weights) fits the routed model (:func:`check_null_bank`)."""
        if None not in self._means:
            check_layer_entries(self._means, target, "mean_k", "mean k")
        check_null_bank(self.null_bank, target)

    def reset(self) -> None:
        """Start the draws again: generators re-seeded from ``seed``, every layer's remainder at one half."""
        self._generators.clear()
        self._carry.clear()

    def __call__(self, logits: torch.Tensor, layer: int, valid: torch.Tensor | None = None) -> Selection:
        """Top ``floor(m)`` or ``ceil(m)`` experts of each token of ``logits (..., E)``.

        ``valid (T,)`` bool, optional: False at padding rows, which get ``floor(m)`` and are not
        counted in the layer's running mean (``route`` passes it).
        """
        m = self.target(layer)
        low = math.floor(m)
        device = logits.device
        rows = math.prod(logits.shape[:-1])
        counts = torch.full((rows,), low, dtype=torch.long, device=device)  # (T,)
        if m > low:
            valid = _valid_rows(valid, rows, device)  # (T,)
            carry = self._carry.get((layer, device))
            if carry is None:  # one half: the first call rounds to nearest, as a single draw would
                carry = self._carry[(layer, device)] = torch.full((1,), 0.5, dtype=torch.float64, device=device)
            # Error diffusion on the device (no synchronisation): ceilings of this call = whole part
            # of (remainder + frac * real tokens); the fraction left is carried to the next call.
            total = carry + (m - low) * valid.sum(dtype=torch.float64)  # (1,) float64
            n_up = total.floor()  # (1,)
            carry.copy_(total - n_up)
            order = _random_order(valid, _generator(self._generators, device, self.seed))  # (T,)
            rank = torch.empty_like(order).scatter_(0, order, torch.arange(rows, device=device))  # (T,)
            counts += (rank < n_up).long()  # the first n_up real tokens of the random order
        return select_top_counts(logits, counts.reshape(logits.shape[:-1]), max_k=self.max_k, weights=self.weights,
                                 pvalues=weight_pvalues(self.null_bank, logits, layer, self.weights))


@dataclass(eq=False)
class ShuffledSelector(Selector):
    """The inner selector's per-token counts, permuted across the batch's tokens; top ones by logit.

    Parameters
    ----------
    inner : Selector
        The adaptive selector whose allocation is shuffled (e.g. a :class:`BHSelector`).
        The counts are permuted among the call's real tokens (``valid``, passed by ``route``);
        padding rows keep their own.
    seed : int, default 0
        Seeds the permutations (one generator per device, persisting across calls); :meth:`reset`
        starts again from the seed.
    weights : {"renorm", "softmax", "uniform", "inverse_p"}, default "renorm"
        "inverse_p" takes the p-values from the inner selector's ``null_bank``.
    """

    inner: Any
    seed: int = 0
    weights: str = "renorm"
    validate: bool = field(default=False, repr=False)
    _generators: dict = field(default_factory=dict, init=False, repr=False)

    #: ``route`` passes ``valid`` (False at padding rows): only real tokens' counts are permuted.
    reads_valid_rows = True

    def __post_init__(self) -> None:
        if not callable(self.inner):
            raise ValueError(f"`inner` must be a selector, callable as inner(logits, layer); got {self.inner!r}.")
        check_int("seed", self.seed, 0)
        _check_weights(self.weights, self.null_bank)

    @property
    def max_k(self) -> int:
        return self.inner.max_k

    @property
    def null_bank(self) -> Any:  # inverse-p weights use the inner selector's bank
        return getattr(self.inner, "null_bank", None)

    def check(self, target: RoutedModel) -> None:
        """The inner selector's checks (its null bank, its per-layer levels)."""
        check = getattr(self.inner, "check", None)
        if callable(check):
            check(target)

    def reset(self) -> None:
        """Start the draws again: generators re-seeded from ``seed``."""
        self._generators.clear()

    def __call__(self, logits: torch.Tensor, layer: int, valid: torch.Tensor | None = None) -> Selection:
        """The inner selector's counts permuted among the real tokens (``valid (T,)``, optional)."""
        reads_valid = getattr(self.inner, "reads_valid_rows", False) is True
        counts = (self.inner(logits, layer, valid=valid) if reads_valid else self.inner(logits, layer)).counts
        counts = counts.reshape(-1)  # (T,)
        rows = counts.numel()
        valid = _valid_rows(valid, rows, counts.device)  # (T,)
        order = _random_order(valid, _generator(self._generators, counts.device, self.seed))  # (T,)
        in_place = (~valid).long().argsort(stable=True)  # (T,) valid rows in their order, then the others
        # a random permutation of the valid rows; the others keep their own counts
        shuffled = torch.empty_like(counts).scatter_(0, in_place, counts[order])  # (T,)
        return select_top_counts(logits, shuffled.reshape(logits.shape[:-1]), max_k=self.max_k, weights=self.weights,
                                 pvalues=weight_pvalues(self.null_bank, logits, layer, self.weights))
