"""Ready-made routing rules: ``(logits[T, E] float32, layer) -> Selection``.

A selector decides which experts each token gets; :func:`bh_helpers.routing.patch.route` asks it
once per routed layer and forward call. :class:`BHSelector` tests each router logit against the
layer's null (p-values from a :class:`~bh_helpers.nulls.NullBank`) and keeps what a multiple-testing
procedure rejects; :class:`TopKSelector`, :class:`NativeSelector` and :class:`TopPSelector` are the
static baselines. Any callable with the :class:`Selector` signature works with ``route``; one that
is a pure, sync-free device function may set ``graph_safe = True`` to be captured in CUDA graphs.

Before it installs anything, ``route`` describes the routed model in a :class:`RoutedModel` and
hands it to the selector's :meth:`Selector.check`, so a selector refuses a model it cannot route
(a null bank of another model, an ``alpha`` without a level for a routed layer) without ``route``
knowing what a null bank is. An engine's routing callback gets the same description.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch
from torch import nn

from bh_helpers._validate import check_choice, check_int, check_level
from bh_helpers.models.families import find_moe_blocks, fingerprints_differ
from bh_helpers.nulls.bank import NullBank
from bh_helpers.selection.budget import alpha_at, layer_alphas
from bh_helpers.selection.fused import fused_available, fused_select_experts, select_from_bank
from bh_helpers.selection.reference import FDR_METHODS, WEIGHT_MODES, Selection, select_experts

__all__ = [
    "BHSelector",
    "NativeSelector",
    "RoutedModel",
    "Selector",
    "TopKSelector",
    "TopPSelector",
    "check_layer_entries",
    "check_null_bank",
    "weight_pvalues",
]


@dataclass(frozen=True)
class RoutedModel:
    """The model a selector is about to route, as :meth:`Selector.check` sees it.

    Built by :func:`bh_helpers.routing.patch.route` (or an engine's routing plugin) before
    anything is installed.

    Attributes
    ----------
    layers : tuple of int
        The MoE layers that will be routed, increasing.
    num_experts : int
        Experts per MoE layer (the width ``E`` of the router logits).
    num_hidden_layers : int or None
        Decoder layers of the whole model (``config.num_hidden_layers``); None when unknown.
    router_fingerprint : callable or None, default None
        ``layers -> {layer: [float]}``, the routed model's
        :func:`~bh_helpers.models.families.router_fingerprint` at those layers; None where it
        cannot be computed, which skips the fingerprint check.
    allow_other_model : bool, default False
        Accept a null bank whose router fingerprint differs (``route(..., allow_other_model=True)``).
    """

    layers: tuple[int, ...]
    num_experts: int
    num_hidden_layers: int | None
    router_fingerprint: Callable[[list[int]], Mapping[int, Sequence[float]]] | None = field(default=None, repr=False)
    allow_other_model: bool = False


class Selector(Protocol):
    """A routing rule: ``(logits[T, E] float32, layer) -> Selection`` (``indices`` ``[T, K]``).

    Any callable with this signature routes; the ready-made selectors subclass this class and
    inherit the defaults of the two optional hooks below, which ``route`` calls where present.
    """

    def __call__(self, logits: torch.Tensor, layer: int) -> Selection: ...

    def check(self, target: RoutedModel) -> None:
        """Raise ValueError when this selector cannot route ``target``; default: accept any model.

        ``route`` calls it once, after choosing the layers and before installing anything.
        """
        return None

    def capturable(self, device: torch.device) -> bool:
        """Whether a call on ``device`` is a pure, sync-free device function (CUDA-graph capturable).

        Default False; a plain callable may opt in with a ``graph_safe = True`` attribute instead.
        """
        return False


def check_null_bank(null_bank: Any, target: RoutedModel) -> None:
    """Refuse a :class:`~bh_helpers.nulls.bank.NullBank` that does not fit the routed model.

    Layer and expert counts, the router fingerprint (unless ``target.allow_other_model``; a bank
    that records none is routed with a warning that it cannot be checked) and a null for every
    routed layer. Anything else (None, a duck-typed bank with ``.pvalues`` only) is not checked.
    Used by the :meth:`Selector.check` of every selector that holds a bank.

    Raises
    ------
    ValueError
        Naming what differs and how to fit a matching bank.
    """
    if not isinstance(null_bank, NullBank):
        return
    # a bank of another model routed silently (mean k 1.0) before these checks
    null_bank.check_counts(num_layers=target.num_hidden_layers, num_experts=target.num_experts,
                           what="the routed model")
    fitted = null_bank.metadata.router_fingerprint
    if fitted is not None and not target.allow_other_model and target.router_fingerprint is not None:
        differ = fingerprints_differ(fitted, target.router_fingerprint(list(fitted)))
        if differ:
            raise ValueError(
                f"the selector's null bank was fitted on another model ({null_bank.metadata.model_id!r}): its routers "
                f"(weights or routing settings) differ at layers {differ}. Fit a bank for this model (`bh-routing "
                "capture` + `bh-routing fit`) (or, to use it anyway, `allow_other_model=True`)."
            )
    if fitted is None and not target.allow_other_model and target.router_fingerprint is not None:
        warnings.warn(
            f"the selector's null bank{f' ({null_bank.metadata.model_id!r})' if null_bank.metadata.model_id else ''} "
            "records no router fingerprint, so it cannot be checked against the routed model (another model's bank "
            "would route quietly wrong): fit it from a capture of this model, which records it (`bh-routing "
            "capture` + `bh-routing fit`) (or, to route without the check, `allow_other_model=True`).",
            UserWarning, stacklevel=4)
    missing = [layer for layer in target.layers if layer not in set(null_bank)]
    if missing:
        raise ValueError(
            f"the selector's null bank has no null for MoE layers {missing} (it has layers {list(null_bank)}): "
            "fit a bank on every layer (`bh-routing capture` + `bh-routing fit`) (or route only the layers it has: "
            f"`layers={','.join(map(str, null_bank))}`)."
        )


def check_layer_entries(entries: Mapping[int, Any], target: RoutedModel, name: str, what: str) -> None:
    """Refuse per-layer settings (``alpha`` levels, ``ks``) that do not fit the routed model's layers.

    Every routed layer needs an entry, and no entry may name a layer the model does not have
    (``layer >= target.num_hidden_layers``): a list of 7 levels on a 6-layer model is a setting of
    another model, whose last entry would be ignored without a word. The one check of both, for
    every selector with per-layer settings (``route`` and the vLLM plugin call it through
    :meth:`Selector.check`).

    Parameters
    ----------
    entries : mapping of int to Any
        ``{layer: setting}``.
    target : RoutedModel
    name : str
        The setting's name, as the user typed it (``"alpha"``, ``"ks"``).
    what : str
        One entry, in words (``"level"``, ``"k"``).

    Raises
    ------
    ValueError
        Naming the missing or extra layers and the layers the model has.
    """
    missing = [layer for layer in target.layers if layer not in entries]
    if missing:
        raise ValueError(f"`{name}` has no {what} for MoE layers {missing} (it has layers {sorted(entries)}); give "
                         f"one {what} per routed layer, or pass `layers` to route.")
    total = target.num_hidden_layers
    extra = sorted(layer for layer in entries if total is not None and layer >= total)
    if extra:
        raise ValueError(f"`{name}` has a {what} for layers {extra}, which the routed model does not have (it has "
                         f"{total} layers, 0..{total - 1}): is it a setting of another model? Give one {what} per "
                         f"layer number (0..{total - 1}).")


def _fused_capturable(selector: Any, device: torch.device, call: Callable) -> bool:
    """The ready-made fused ``call`` (not overridden by a subclass), validation off, the kernel on ``device``."""
    return type(selector).__call__ is call and not selector.validate and fused_available(device)


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
class BHSelector(Selector):
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

    def check(self, target: RoutedModel) -> None:
        """The null bank fits the routed model (:func:`check_null_bank`); a per-layer ``alpha`` has
        a level for every routed layer and none for a layer the model lacks (:func:`check_layer_entries`)."""
        check_null_bank(self.null_bank, target)
        if isinstance(self.alpha, Mapping):
            check_layer_entries(self.alpha, target, "alpha", "level")

    def capturable(self, device: torch.device) -> bool:
        """The fused kernel runs on ``device``, validation is off and the bank is a NullBank."""
        # the kernel looks the p-values up itself only in a NullBank
        return _fused_capturable(self, device, BHSelector.__call__) and isinstance(self.null_bank, NullBank)


@dataclass(frozen=True)
class TopKSelector(Selector):
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

    def check(self, target: RoutedModel) -> None:
        """``k`` fits the model's experts, and a ``null_bank`` (inverse-p weights) the model (:func:`check_null_bank`)."""
        if self.k > target.num_experts:  # before a forward, and by the name the user gave (not `max_k`)
            raise ValueError(f"`k` {self.k} exceeds the routed model's {target.num_experts} experts per layer; pass "
                             f"k <= {target.num_experts}.")
        check_null_bank(self.null_bank, target)

    def capturable(self, device: torch.device) -> bool:
        """The fused kernel runs on ``device``, validation is off and the weights are not inverse-p."""
        # inverse-p weights take their p-values from NullBank.pvalues, not from the kernel
        return _fused_capturable(self, device, TopKSelector.__call__) and self.weights != "inverse_p"


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
class TopPSelector(Selector):
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
        object.__setattr__(self, "p", check_level("p", self.p, example="0.9"))  # True, "0.9": refused
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

    def check(self, target: RoutedModel) -> None:
        """A ``null_bank`` (for inverse-p weights) fits the routed model (:func:`check_null_bank`)."""
        check_null_bank(self.null_bank, target)

