"""Compute-matched controls: policies that really run at the compute of an adaptive configuration.

A chord between neighbouring static top-k points says what top-k *would* cost at a fractional
mean k; these controls are policies one can run, so a comparison with them is a comparison of
two routings at the same compute:

- :class:`MixedTopKSelector` gives each token ``floor(m)`` or ``ceil(m)`` experts, the top ones
  by logit: in each call exactly ``round((m - floor(m)) T)`` of its ``T`` tokens, drawn at random,
  get the ceiling, so the mean is ``m`` (per layer, matched to the adaptive row's per-layer mean k).
  An adaptive rule that beats it allocates experts better than chance at the same budget.
- :class:`ShuffledSelector` runs the adaptive selector, then permutes its per-token counts
  across the tokens of the batch (same histogram of k, per layer and call) and gives each token
  its top ones by logit. If the adaptive rule beats its shuffle, *which* tokens get more experts
  carries information; if not, only the histogram matters.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

from bh_helpers._validate import check_int
from bh_helpers.selection.reference import Selection, select_top_counts
from bh_helpers.selection.selectors import RoutedModel, Selector, _check_weights, check_null_bank, weight_pvalues

__all__ = ["MixedTopKSelector", "ShuffledSelector"]


def _generator(cache: dict, device: torch.device, seed: int) -> torch.Generator:
    """One generator per device, seeded once: draws are reproducible for a given call sequence."""
    gen = cache.get(device)
    if gen is None:
        gen = cache[device] = torch.Generator(device=device).manual_seed(seed)
    return gen


@dataclass(eq=False)
class MixedTopKSelector(Selector):
    """Top-k with a random per-token k in ``{floor(m), ceil(m)}``, mean ``m`` (per layer).

    Parameters
    ----------
    mean_k : float or mapping of int to float
        Target mean experts per token, one for every layer or per layer (the adaptive row's
        ``per_layer_mean_k``); in each call ``round((m - floor(m)) T)`` of the ``T`` tokens,
        drawn at random, get ``ceil(m)``, the others ``floor(m)``.
    seed : int, default 0
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

    def __post_init__(self) -> None:
        means = dict(self.mean_k) if isinstance(self.mean_k, Mapping) else {None: self.mean_k}
        for layer, m in means.items():
            if isinstance(m, bool) or not isinstance(m, (int, float)) or not (math.isfinite(m) and m >= 0):
                where = "" if layer is None else f"[{layer}]"
                raise ValueError(f"`mean_k{where}` must be a finite number >= 0 (experts per token); got {m!r}.")
        self._means = {k: float(v) for k, v in means.items()}
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
        """A ``null_bank`` (for inverse-p weights) fits the routed model (:func:`check_null_bank`)."""
        check_null_bank(self.null_bank, target)

    def __call__(self, logits: torch.Tensor, layer: int) -> Selection:
        m = self.target(layer)
        low = math.floor(m)
        rows = math.prod(logits.shape[:-1])
        n_up = round((m - low) * rows)  # tokens of this call at ceil(m): the mean is m up to 1 / (2 T)
        gen = _generator(self._generators, logits.device, self.seed)
        chosen = torch.randperm(rows, generator=gen, device=logits.device)[:n_up]  # (n_up,)
        counts = torch.full((rows,), low, dtype=torch.long, device=logits.device)  # (T,)
        counts[chosen] = low + 1
        return select_top_counts(logits, counts.reshape(logits.shape[:-1]), max_k=self.max_k, weights=self.weights,
                                 pvalues=weight_pvalues(self.null_bank, logits, layer, self.weights))


@dataclass(eq=False)
class ShuffledSelector(Selector):
    """The inner selector's per-token counts, permuted across the batch's tokens; top ones by logit.

    Parameters
    ----------
    inner : Selector
        The adaptive selector whose allocation is shuffled (e.g. a :class:`BHSelector`).
    seed : int, default 0
    weights : {"renorm", "softmax", "uniform", "inverse_p"}, default "renorm"
        "inverse_p" takes the p-values from the inner selector's ``null_bank``.
    """

    inner: Any
    seed: int = 0
    weights: str = "renorm"
    validate: bool = field(default=False, repr=False)
    _generators: dict = field(default_factory=dict, init=False, repr=False)

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

    def __call__(self, logits: torch.Tensor, layer: int) -> Selection:
        counts = self.inner(logits, layer).counts.reshape(-1)  # (T,)
        gen = _generator(self._generators, logits.device, self.seed)
        perm = torch.randperm(counts.numel(), generator=gen, device=logits.device)  # (T,)
        shuffled = counts[perm].reshape(logits.shape[:-1])  # (...,) same histogram
        return select_top_counts(logits, shuffled, max_k=self.max_k, weights=self.weights,
                                 pvalues=weight_pvalues(self.null_bank, logits, layer, self.weights))
