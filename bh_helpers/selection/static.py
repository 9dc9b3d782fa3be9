"""Static per-layer routing: top-``k_l`` experts in layer ``l``, the same for every token.

The strongest static control of an adaptive rule is not one ``k`` for all layers but an
allocation of experts over layers (found on calibration text by
:func:`bh_helpers.experiments.static_allocation.fit_static_allocation`): layers differ in how much
a missing expert costs. :class:`StaticLayerSelector` runs such an allocation exactly; it is a pure
device function of the logits (top-k per layer), so it is captured in CUDA graphs.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from bh_helpers._validate import check_int
from bh_helpers.selection.fused import fused_select_experts
from bh_helpers.selection.reference import Selection
from bh_helpers.selection.selectors import (
    RoutedModel,
    Selector,
    _check_weights,
    _fused_capturable,
    check_layer_entries,
    check_null_bank,
    weight_pvalues,
)

__all__ = ["StaticLayerSelector"]


@dataclass(frozen=True)
class StaticLayerSelector(Selector):
    """Top-``ks[layer]`` routing: a fixed number of experts per layer (per-layer static allocation).

    Parameters
    ----------
    ks : sequence of int, or mapping of int to int
        Experts per token in each MoE layer: a sequence indexed by layer number, or
        ``{layer: k}``; every routed layer needs an entry (``route`` checks), each ``k >= 1``.
    weights : {"renorm", "softmax", "uniform", "inverse_p"}, default "renorm"
        Weights of the chosen experts; OLMoE's own convention is "softmax".
    null_bank : NullBank, optional
        Needed (and used) only by ``weights="inverse_p"``.

    Examples
    --------
    >>> selector = StaticLayerSelector((3, 2, 2, 2, 2, 1), weights="softmax")
    >>> selector.k_at(0), selector.mean_k
    (3, 2.0)
    """

    ks: Sequence[int] | Mapping[int, int]
    weights: str = "renorm"
    validate: bool = field(default=False, repr=False)
    null_bank: Any = field(default=None, repr=False)

    def __post_init__(self) -> None:
        if isinstance(self.ks, (str, bytes)) or not isinstance(self.ks, (Sequence, Mapping)):
            raise ValueError(f"`ks` must be a sequence of experts per layer (or {{layer: k}}); got {self.ks!r}.")
        items = dict(self.ks) if isinstance(self.ks, Mapping) else dict(enumerate(self.ks))
        if not items:
            raise ValueError("`ks` is empty; give one number of experts per MoE layer.")
        checked = {check_int("ks layer", layer, 0): check_int(f"ks[{layer}]", k, 1)
                   for layer, k in items.items()}
        object.__setattr__(self, "ks", checked)
        _check_weights(self.weights, self.null_bank)

    @property
    def max_k(self) -> int:
        """The largest per-layer k (slots per token)."""
        return max(self.ks.values())

    @property
    def min_k(self) -> int:
        return min(self.ks.values())

    @property
    def mean_k(self) -> float:
        """Mean experts per token over the allocation's layers."""
        return sum(self.ks.values()) / len(self.ks)

    def k_at(self, layer: int) -> int:
        """The number of experts of ``layer``."""
        if layer not in self.ks:
            raise ValueError(f"`ks` has no entry for layer {layer} (it has layers {sorted(self.ks)}); "
                             "give one k per routed MoE layer.")
        return self.ks[layer]

    def check(self, target: RoutedModel) -> None:
        """A k for every routed layer and none for a layer the model lacks (:func:`check_layer_entries`),
        none above the model's experts; a ``null_bank`` fits the model."""
        check_layer_entries(self.ks, target, "ks", "k")
        too_many = {layer: k for layer, k in self.ks.items() if k > target.num_experts}
        if too_many:
            raise ValueError(f"`ks` asks for more experts than the {target.num_experts} per layer: {too_many}; "
                             f"pass ks of at most {target.num_experts}.")
        check_null_bank(self.null_bank, target)

    def capturable(self, device: torch.device) -> bool:
        """Top-k per layer through the fused kernel (validation off, weights not inverse-p)."""
        return _fused_capturable(self, device, StaticLayerSelector.__call__) and self.weights != "inverse_p"

    def __call__(self, logits: torch.Tensor, layer: int) -> Selection:
        k = self.k_at(layer)
        return fused_select_experts(
            logits, weight_pvalues(self.null_bank, logits, layer, self.weights), method="topk", k=k, max_k=k,
            weights=self.weights, validate=self.validate,
        )
