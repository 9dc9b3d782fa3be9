"""Ready-made routing rules: ``(logits[T, E] float32, layer) -> Selection``.

A selector decides which experts each token gets; :func:`bh_helpers.routing.patch.route` asks it
once per routed layer and forward call. :class:`BHSelector` tests each router logit against the
layer's null (p-values from a :class:`~bh_helpers.nulls.NullBank`) and keeps what a multiple-testing
procedure rejects; :class:`TopKSelector`, :class:`NativeSelector` and :class:`TopPSelector` are the
static baselines. Any callable with the :class:`Selector` signature works with ``route``; one that
is a pure, sync-free device function may set ``graph_safe = True`` to be captured in CUDA graphs.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch
from torch import nn

from bh_helpers._validate import check_choice, check_int
from bh_helpers.models.families import find_moe_blocks
from bh_helpers.selection.budget import alpha_at, layer_alphas
from bh_helpers.selection.fused import fused_select_experts, select_from_bank
from bh_helpers.selection.reference import FDR_METHODS, WEIGHT_MODES, Selection, select_experts

__all__ = ["BHSelector", "NativeSelector", "Selector", "TopKSelector", "TopPSelector", "weight_pvalues"]


class Selector(Protocol):
    """A routing rule: ``(logits[T, E] float32, layer) -> Selection`` (``indices`` ``[T, K]``)."""

    def __call__(self, logits: torch.Tensor, layer: int) -> Selection: ...


def _check_weights(weights: str, null_bank: Any = None) -> None:
    check_choice("weights", weights, WEIGHT_MODES)
    if weights == "inverse_p" and not callable(getattr(null_bank, "pvalues", None)):
        raise ValueError('weights="inverse_p" needs `null_bank` (a NullBank: the p-values of the chosen experts); '
                         "pass null_bank=..., or another weight mode.")


def weight_pvalues(null_bank: Any, logits: torch.Tensor, layer: int, weights: str) -> torch.Tensor | None:
    """The p-values ``[T, E]`` that ``weights="inverse_p"`` mixes with (None for other modes).

    Static and control selectors choose by logit alone; with inverse-p weights they weigh their
    experts by the same null's p-values as the adaptive selector they are compared with.
    """
    if weights != "inverse_p":
        return None
    return null_bank.pvalues(logits, layer).to(logits.device)


@dataclass(frozen=True)
class BHSelector:
    """Multiple-testing routing: p-values from a null bank, then BH (or BY, Bonferroni, Holm).

    Parameters
    ----------
    null_bank : NullBank
        Anything with ``.pvalues(logits[T, E], layer) -> [T, E]``.
    method : {"bh", "by", "bonferroni", "holm"}, default "bh"
    alpha : float, sequence of float, or mapping of int to float, default 0.05
        Level of the procedure, in (0, 1]; or one per layer (adaptive FDR): a sequence indexed by
        layer number or a mapping ``{layer: alpha}`` (stored as a dict; see
        :func:`~bh_helpers.selection.budget.layer_alphas`).
    min_k, max_k : int, default 1 and 8
        Floor and ceiling on experts per token; ``max_k`` may exceed the model's native k.
    weights : {"renorm", "softmax", "uniform", "inverse_p"}, default "renorm"
    """

    null_bank: Any = field(repr=False)
    method: str = "bh"
    alpha: float | Sequence[float] | Mapping[int, float] = 0.05
    min_k: int = 1
    max_k: int = 8
    weights: str = "renorm"
    validate: bool = field(default=False, repr=False)

    def __post_init__(self) -> None:
        check_choice("method", self.method, FDR_METHODS)
        object.__setattr__(self, "alpha", layer_alphas(self.alpha))
        check_int("max_k", self.max_k, 1)
        check_int("min_k", self.min_k, 0)
        if self.min_k > self.max_k:
            raise ValueError(f"`min_k`={self.min_k} exceeds `max_k`={self.max_k}; pass min_k <= max_k.")
        if not callable(getattr(self.null_bank, "pvalues", None)):
            raise ValueError("`null_bank` needs a `.pvalues(logits, layer)` method (bh_helpers.nulls.bank.NullBank).")
        _check_weights(self.weights, self.null_bank)

    def __call__(self, logits: torch.Tensor, layer: int) -> Selection:
        # Fused on CUDA (pooled null: logit cuts + one sort; per expert: p-values in the kernel);
        # NullBank.pvalues + select_experts elsewhere.
        return select_from_bank(
            logits,
            self.null_bank,
            layer,
            method=self.method,
            alpha=alpha_at(self.alpha, layer),
            min_k=self.min_k,
            max_k=self.max_k,
            weights=self.weights,
            validate=self.validate,
        )


@dataclass(frozen=True)
class TopKSelector:
    """Static top-k routing with a chosen weight convention (``min_k = max_k = k``).

    ``null_bank`` is needed (and used) only by ``weights="inverse_p"``: see :func:`weight_pvalues`.
    """

    k: int
    weights: str = "renorm"
    validate: bool = field(default=False, repr=False)
    null_bank: Any = field(default=None, repr=False)

    def __post_init__(self) -> None:
        check_int("k", self.k, 1)
        _check_weights(self.weights, self.null_bank)

    @property
    def min_k(self) -> int:
        return self.k

    @property
    def max_k(self) -> int:
        return self.k

    def __call__(self, logits: torch.Tensor, layer: int) -> Selection:
        return fused_select_experts(
            logits, weight_pvalues(self.null_bank, logits, layer, self.weights), method="topk", k=self.k,
            max_k=self.k, weights=self.weights, validate=self.validate,
        )


@dataclass(frozen=True)
class NativeSelector(TopKSelector):
    """The model's own routing (its k and weight convention); build it with :meth:`for_model`."""

    @classmethod
    def for_model(cls, model: nn.Module) -> NativeSelector:
        """Read k and the weight convention from the model's MoE blocks.

        Raises
        ------
        ValueError
            For an unsupported model, or when layers disagree on k or convention.
        """
        blocks = find_moe_blocks(model)
        settings = {(b.native_k, b.native_weights) for b in blocks}
        if len(settings) != 1:
            raise ValueError(f"MoE layers disagree on (k, weights): {sorted(settings)}; use TopKSelector per layer.")
        (k, weights), = settings
        return cls(k=k, weights=weights)


@dataclass(frozen=True)
class TopPSelector:
    """Top-p routing: the fewest most-probable experts whose softmax mass reaches ``p``.

    ``null_bank`` is needed (and used) only by ``weights="inverse_p"``: see :func:`weight_pvalues`.
    """

    p: float
    min_k: int = 1
    max_k: int = 8
    weights: str = "renorm"
    validate: bool = field(default=False, repr=False)
    null_bank: Any = field(default=None, repr=False)

    def __post_init__(self) -> None:
        if not 0.0 < float(self.p) <= 1.0:
            raise ValueError(f"`p` must be in (0, 1]; got {self.p!r}.")
        check_int("max_k", self.max_k, 1)
        check_int("min_k", self.min_k, 0)
        if self.min_k > self.max_k:
            raise ValueError(f"`min_k`={self.min_k} exceeds `max_k`={self.max_k}; pass min_k <= max_k.")
        _check_weights(self.weights, self.null_bank)

    def __call__(self, logits: torch.Tensor, layer: int) -> Selection:
        return select_experts(
            logits, weight_pvalues(self.null_bank, logits, layer, self.weights), method="top_p", top_p=self.p,
            min_k=self.min_k, max_k=self.max_k, weights=self.weights,
            validate=self.validate,
        )

