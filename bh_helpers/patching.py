"""Change which experts a model uses, reversibly: the ``route`` context manager.

``route(model, selector)`` replaces, on each chosen MoE block INSTANCE, the bound ``forward``
with one that

1. computes the router logits itself (float32, ``F.linear(h, gate.weight)``),
2. asks the selector which experts each token gets (a :class:`~bh_helpers.selection.Selection`
   of variable width, ``-1`` at unused slots),
3. runs only the selected (token, expert) pairs on the model's own expert weights through
   :func:`bh_helpers.auto_dispatch.fast_dispatch_experts` (grouped GEMMs on sm80+ CUDA, per-expert
   loops and Triton GEMVs on a T4, the reference
   :func:`bh_helpers.dispatch.dispatch_experts` elsewhere) and adds the shared expert where the family has one.

transformers' expert dispatch is never called with a selection, so the result does not depend on
``config._experts_implementation`` and no sentinel index ever reaches transformers code. In
``mode="analyze"`` the block calls its previous forward for the output (bit-identical to the
native model) and only records what the selector would choose.

Routing is GLOBAL state on the model while the context is open. It is installed and removed in
ONE ``try/finally``; classes and transformers source are never touched. On exit each patched
attribute is restored exactly: deleted when the instance had none, or set back to the very object
it held before (accelerate hooks put their own ``forward`` on the instance; when such a hook wraps
the block, the patch goes to accelerate's ``_old_forward`` so the hook keeps running). Routing the
same block twice at once (nested ``route`` on overlapping layers) raises ``RuntimeError``; nested
contexts on disjoint layers are fine.

The router module itself is not called by a patched block, except when the forward call records
router outputs (``output_router_logits=True``): transformers collects those with a hook on the
router, so the block then calls it (its return value unused) to keep ``router_logits`` and the
auxiliary loss available.

Examples
--------
>>> from bh_helpers.patching import route, TopKSelector
>>> with route(model, TopKSelector(4)) as rec:  # doctest: +SKIP
...     out = model(**batch)
>>> rec.summary()["mean_k"]  # doctest: +SKIP
4.0
"""

from __future__ import annotations

import types
import weakref
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch
from torch import nn
from torch.nn import functional as F

from bh_helpers._cuda import capture_stream
from bh_helpers.auto_dispatch import fast_dispatch_experts, sync_free_dispatch, sync_free_supported
from bh_helpers.capture import ForwardInputs, forward_inputs
from bh_helpers.fused_select import fused_select_experts, select_from_bank
from bh_helpers.moe_adapters import (
    LayerSpec,
    MoEBlock,
    find_moe_blocks,
    materialized,
    router_logits,
    router_outputs_requested,
    select_layers,
)
from bh_helpers.selection import FDR_METHODS, WEIGHT_MODES, Selection, _check_alpha, select_experts

__all__ = [
    "MODES",
    "BHSelector",
    "NativeSelector",
    "RoutingRecorder",
    "Selector",
    "TokenCounts",
    "TopKSelector",
    "TopPSelector",
    "route",
]

#: What ``route`` does with the selection: run it, or only record it.
MODES = ("patch", "analyze")
#: Default cap on per-token counts kept per layer (exact aggregates are always kept).
DEFAULT_MAX_TOKENS = 1_000_000
#: Per-token counts kept on the device before one copy to the CPU (elements, int16).
_FLUSH_ELEMENTS = 1 << 23

# Blocks currently patched by an open ``route`` (weak: a dropped model is not kept alive).
_ACTIVE: weakref.WeakSet[nn.Module] = weakref.WeakSet()


class Selector(Protocol):
    """A routing rule: ``(logits[T, E] float32, layer) -> Selection`` (``indices`` ``[T, K]``)."""

    def __call__(self, logits: torch.Tensor, layer: int) -> Selection: ...


# ----------------------------------------------------------------------------------------------
# Ready-made selectors
# ----------------------------------------------------------------------------------------------


def _check_weights(weights: str) -> None:
    if weights not in WEIGHT_MODES:
        raise ValueError(f"`weights` must be one of {WEIGHT_MODES}; got {weights!r}.")


def _check_k(name: str, value: int, low: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ValueError(f"`{name}` must be an int >= {low}; got {value!r}.")


@dataclass(frozen=True)
class BHSelector:
    """Multiple-testing routing: p-values from a null bank, then BH (or BY, Bonferroni, Holm).

    Parameters
    ----------
    null_bank : NullBank
        Anything with ``.pvalues(logits[T, E], layer) -> [T, E]``.
    method : {"bh", "by", "bonferroni", "holm"}, default "bh"
    alpha : float, default 0.05
        Level of the procedure, in (0, 1].
    min_k, max_k : int, default 1 and 8
        Floor and ceiling on experts per token; ``max_k`` may exceed the model's native k.
    weights : {"renorm", "softmax", "uniform"}, default "renorm"
    """

    null_bank: Any = field(repr=False)
    method: str = "bh"
    alpha: float = 0.05
    min_k: int = 1
    max_k: int = 8
    weights: str = "renorm"
    validate: bool = field(default=False, repr=False)

    def __post_init__(self) -> None:
        if self.method not in FDR_METHODS:
            raise ValueError(f"`method` must be one of {FDR_METHODS}; got {self.method!r}.")
        _check_alpha(self.alpha)
        _check_k("max_k", self.max_k, 1)
        _check_k("min_k", self.min_k, 0)
        if self.min_k > self.max_k:
            raise ValueError(f"`min_k`={self.min_k} exceeds `max_k`={self.max_k}; pass min_k <= max_k.")
        _check_weights(self.weights)
        if not callable(getattr(self.null_bank, "pvalues", None)):
            raise ValueError("`null_bank` needs a `.pvalues(logits, layer)` method (bh_helpers.nulls.NullBank).")

    def __call__(self, logits: torch.Tensor, layer: int) -> Selection:
        # Fused on CUDA (pooled null: logit cuts + one sort; per expert: p-values in the kernel);
        # NullBank.pvalues + select_experts elsewhere.
        return select_from_bank(
            logits,
            self.null_bank,
            layer,
            method=self.method,
            alpha=self.alpha,
            min_k=self.min_k,
            max_k=self.max_k,
            weights=self.weights,
            validate=self.validate,
        )


@dataclass(frozen=True)
class TopKSelector:
    """Static top-k routing with a chosen weight convention (``min_k = max_k = k``)."""

    k: int
    weights: str = "renorm"
    validate: bool = field(default=False, repr=False)

    def __post_init__(self) -> None:
        _check_k("k", self.k, 1)
        _check_weights(self.weights)

    @property
    def min_k(self) -> int:
        return self.k

    @property
    def max_k(self) -> int:
        return self.k

    def __call__(self, logits: torch.Tensor, layer: int) -> Selection:
        return fused_select_experts(
            logits, method="topk", k=self.k, max_k=self.k, weights=self.weights, validate=self.validate
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
    """Top-p routing: the fewest most-probable experts whose softmax mass reaches ``p``."""

    p: float
    min_k: int = 1
    max_k: int = 8
    weights: str = "renorm"
    validate: bool = field(default=False, repr=False)

    def __post_init__(self) -> None:
        if not 0.0 < float(self.p) <= 1.0:
            raise ValueError(f"`p` must be in (0, 1]; got {self.p!r}.")
        _check_k("max_k", self.max_k, 1)
        _check_k("min_k", self.min_k, 0)
        if self.min_k > self.max_k:
            raise ValueError(f"`min_k`={self.min_k} exceeds `max_k`={self.max_k}; pass min_k <= max_k.")
        _check_weights(self.weights)

    def __call__(self, logits: torch.Tensor, layer: int) -> Selection:
        return select_experts(
            logits, method="top_p", top_p=self.p, min_k=self.min_k, max_k=self.max_k, weights=self.weights,
            validate=self.validate,
        )


# ----------------------------------------------------------------------------------------------
# Recorder
# ----------------------------------------------------------------------------------------------


@dataclass
class TokenCounts:
    """Experts per token, aligned with the forwarded tokens (padding excluded).

    Attributes
    ----------
    token_ids : torch.LongTensor, shape ``[N]``
        Input id of each recorded token (``-1`` when unknown, e.g. ``inputs_embeds``).
    call_index : torch.LongTensor, shape ``[N]``
        Forward call that processed the token (one per ``generate`` step).
    sequence_index : torch.LongTensor, shape ``[N]``
        Row of the token in its call's batch.
    positions : torch.LongTensor, shape ``[N]``
        Position of the token in its sequence (padding excluded).
    counts : dict of int to torch.LongTensor
        ``{layer: [N]}`` experts chosen for each token (``-1`` where the layer did not run).
    truncated : bool
        True when the per-token cap was hit (later tokens are missing here, not in ``summary``).
    """

    token_ids: torch.Tensor
    call_index: torch.Tensor
    sequence_index: torch.Tensor
    positions: torch.Tensor
    counts: dict[int, torch.Tensor]
    truncated: bool

    def matrix(self) -> torch.Tensor:
        """Counts as one ``[N, L]`` tensor, columns in increasing layer order."""
        return torch.stack([self.counts[layer] for layer in sorted(self.counts)], dim=1)  # (N, L)


def _grow_add(total: torch.Tensor | None, part: torch.Tensor) -> torch.Tensor:
    """``total + part`` for 1-D histograms that may differ in length."""
    if total is None:
        return part.clone()
    n = max(total.numel(), part.numel())
    out = torch.zeros(n, dtype=torch.long, device=total.device)  # (n,)
    out[: total.numel()] += total
    out[: part.numel()] += part.to(total.device)
    return out


def _hist_stats(hist: torch.Tensor, floor: int | None, ceiling: int | None) -> dict[str, float]:
    """Mean, population std, min, max and floor/ceiling rates of a count histogram."""
    hist = hist.double().cpu()  # (K+1,)
    n = float(hist.sum())
    if n == 0:
        nan = float("nan")
        return {"tokens": 0, "mean_k": nan, "std_k": nan, "min_k": nan, "max_k": nan,
                "floor_rate": nan, "ceiling_rate": nan, "activations": 0}
    k = torch.arange(hist.numel(), dtype=torch.float64)  # (K+1,)
    mean = float((k * hist).sum() / n)
    std = float((((k - mean) ** 2) * hist).sum() / n) ** 0.5
    seen = hist.nonzero().squeeze(-1)  # (m,)

    def rate(level: int | None) -> float:
        if level is None:
            return float("nan")
        return float(hist[level] / n) if level < hist.numel() else 0.0

    return {
        "tokens": int(n),
        "mean_k": mean,
        "std_k": std,
        "min_k": int(seen[0]),
        "max_k": int(seen[-1]),
        "floor_rate": rate(floor),
        "ceiling_rate": rate(ceiling),
        "activations": int((k * hist).sum()),
    }


def _aggregate(hist: torch.Tensor, experts: torch.Tensor, counts: torch.Tensor, indices: torch.Tensor,
               valid_long: torch.Tensor, valid_col: torch.Tensor) -> None:
    """Exact aggregates of one layer, in place, without a host synchronisation (graph-capturable)."""
    width = indices.shape[-1]
    hist.scatter_add_(0, counts.clamp(0, width), valid_long)  # (K+1,)
    used = ((indices >= 0) & valid_col).reshape(-1).long()  # (T*K,) 1 at valid slots of kept rows
    experts.scatter_add_(0, indices.clamp(min=0).reshape(-1), used)  # (E,)


class RoutingRecorder:
    """What a routed model chose: exact aggregates always, per-token counts up to a cap.

    Yielded by :func:`route`; read it with :meth:`summary` and :meth:`per_token_counts`.

    Parameters
    ----------
    blocks : list of MoEBlock
        The routed blocks.
    selector : Selector
        Its ``min_k`` attribute (when present) defines the floor of the floor-hit rate.
    mode : {"patch", "analyze"}
    max_tokens_per_layer : int
        Cap on the per-token counts kept per layer.
    """

    def __init__(self, blocks: list[MoEBlock], selector: Selector, mode: str, max_tokens_per_layer: int) -> None:
        self.mode = mode
        self.selector = selector
        self.layers = [b.layer for b in blocks]
        self.native_k = {b.layer: b.native_k for b in blocks}
        self.num_experts = {b.layer: b.num_experts for b in blocks}
        self.floor = getattr(selector, "min_k", None)
        self.max_tokens_per_layer = max_tokens_per_layer
        self.truncated = False
        self.forward_calls = 0
        self._hist: dict[int, torch.Tensor | None] = {layer: None for layer in self.layers}  # (K+1,)
        self._experts: dict[int, torch.Tensor | None] = {layer: None for layer in self.layers}  # (E,)
        self._ceiling: dict[int, int] = {}
        # Per-token store: per call its kept tokens, per layer per call their counts.
        self._calls: dict[int, ForwardInputs] = {}
        self._keep: dict[int, int | None] = {}
        self._token_counts: dict[int, dict[int, torch.Tensor]] = {layer: {} for layer in self.layers}
        self._kept_bound = 0  # tokens kept so far; an upper bound while some keeps are undecided
        self._pending_elements = 0  # per-token counts still on a device
        self._valid_cache: tuple | None = None
        self._current: ForwardInputs | None = None
        self._anonymous = 0

    # -- called by hooks and patched blocks --------------------------------------------------

    def _on_forward(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        self._current = forward_inputs(self.forward_calls, args, kwargs)
        self.forward_calls += 1

    def _on_forward_end(self, module: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
        self._current = None

    def _valid_for(self, inputs: ForwardInputs, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """``valid`` of a call as ``(long (T,), bool (T, 1))`` on ``device``, built once per call."""
        cached = self._valid_cache
        if cached is not None and cached[0] is inputs and cached[1] == device:
            return cached[2], cached[3]
        valid = inputs.valid.to(device)  # (T,)
        out = (valid.long(), valid.unsqueeze(-1))
        self._valid_cache = (inputs, device, *out)
        return out

    def _record(self, layer: int, selection: Selection) -> None:
        # No host synchronisation here (once per layer per forward on the hot path): aggregates
        # are accumulated on the counts' device with scatter_add_ (CUDA bincount and boolean
        # indexing both synchronise), per-token counts stay on the device until read or until
        # ``_FLUSH_ELEMENTS`` of them are pending. Only near ``max_tokens_per_layer`` does the
        # first layer of a call synchronise once to count its valid tokens.
        counts = selection.counts.reshape(-1)  # (T,)
        rows = counts.shape[0]
        indices = selection.indices.reshape(rows, -1)  # (T, K)
        width = indices.shape[-1]
        device = counts.device
        inputs = self._inputs_for(rows, device)
        valid_long, valid_col = self._valid_for(inputs, device)  # (T,), (T, 1)
        hist, experts = self._buffers(layer, width, device)
        _aggregate(hist, experts, counts, indices, valid_long, valid_col)
        self._store_tokens(layer, inputs, counts.to(torch.int16))

    # -- the pieces of _record (the graphed block forward runs the device part in its graph) ---

    def _inputs_for(self, rows: int, device: torch.device) -> ForwardInputs:
        """The current call's inputs, or anonymous ones for a block called outside a forward."""
        inputs = self._current
        if inputs is None or inputs.num_rows != rows:
            # A block called outside a model forward (or with other rows): every row counts,
            # token ids unknown.
            self._anonymous -= 1
            inputs = ForwardInputs(
                call=self._anonymous,
                valid=torch.ones(rows, dtype=torch.bool, device=device),
                token_ids=torch.full((rows,), -1, dtype=torch.long, device=device),
                positions=torch.arange(rows, device=device),
                sequence=torch.zeros(rows, dtype=torch.long, device=device),
            )
        return inputs

    def _buffers(self, layer: int, width: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """The layer's aggregate buffers ``hist (>= K+1,)`` and ``experts (E,)`` on ``device``."""
        self._ceiling[layer] = max(self._ceiling.get(layer, 0), width)
        hist = self._hist[layer]
        if hist is None or hist.device != device or hist.numel() < width + 1:
            hist = _grow_add(torch.zeros(width + 1, dtype=torch.long, device=device), hist) if hist is not None \
                else torch.zeros(width + 1, dtype=torch.long, device=device)
        self._hist[layer] = hist
        experts = self._experts[layer]
        if experts is None or experts.device != device:
            fresh = torch.zeros(self.num_experts[layer], dtype=torch.long, device=device)
            experts = fresh if experts is None else _grow_add(fresh, experts)
        self._experts[layer] = experts
        return hist, experts

    def _store_tokens(self, layer: int, inputs: ForwardInputs, counts16: torch.Tensor) -> None:
        """Keep the per-token counts ``(T,)`` int16 of ``inputs``' call (padding rows included)."""
        # Per-token counts: the first call to reach a layer decides how many of its tokens fit.
        call = inputs.call
        rows = counts16.shape[0]
        if call not in self._keep:
            self._decide_keep(call, inputs, rows)
        if self._keep[call] != 0:
            self._token_counts[layer][call] = counts16  # (T,) padding rows included
            if counts16.device.type != "cpu":
                self._pending_elements += rows
                if self._pending_elements > _FLUSH_ELEMENTS:
                    self._flush()

    def _decide_keep(self, call: int, inputs: ForwardInputs, rows: int) -> None:
        """Set ``_keep[call]``: None (all valid rows, decided from the row count alone) or an int."""
        cap = self.max_tokens_per_layer
        if self._kept_bound + rows <= cap:
            # Every valid token fits even if all rows are valid: no need to count them now.
            keep: int | None = None
            self._kept_bound += rows
        else:
            self._settle()  # exact count of the tokens kept so far (one synchronisation)
            room = max(cap - self._kept_bound, 0)
            if room == 0 and self.truncated:
                keep = 0
            else:
                n_valid = int(inputs.valid.sum())  # one synchronisation, only near the cap
                keep = min(n_valid, room)
                self.truncated = self.truncated or keep < n_valid
            self._kept_bound += keep
        self._keep[call] = keep
        if keep != 0:
            self._calls[call] = inputs

    def _settle(self) -> None:
        """Replace every undecided keep (None: all valid rows) by its number of valid tokens."""
        pending = [c for c, k in self._keep.items() if k is None]
        if not pending:
            return
        sums = torch.stack([self._calls[c].valid.sum().cpu() for c in pending]).tolist()
        for c, n in zip(pending, sums):
            self._keep[c] = int(n)
            if n == 0:
                del self._calls[c]
                for store in self._token_counts.values():
                    store.pop(c, None)
        self._kept_bound = sum(k for k in self._keep.values() if k)

    def _flush(self) -> None:
        """Move the per-token counts still on a device to the CPU."""
        for store in self._token_counts.values():
            for c, t in store.items():
                if t.device.type != "cpu":
                    store[c] = t.to("cpu")
        self._pending_elements = 0

    # -- public -------------------------------------------------------------------------------

    def summary(self) -> dict[str, Any]:
        """Aggregate statistics over every token routed so far (padding excluded).

        Returns
        -------
        dict
            ``mode``, ``selector`` (repr), ``forward_calls``, ``tokens`` (per layer),
            ``mean_k``/``std_k`` (population std)/``min_k``/``max_k`` of experts per token over
            all layers and tokens, ``floor_rate``/``ceiling_rate`` (share of token-layers at the
            selector's ``min_k`` / at the selection width ``max_k``), ``expert_activations``
            (sum of counts), ``native_activations`` (native k x tokens, summed over layers),
            ``activation_ratio``, ``truncated``, and ``per_layer``: ``{layer: {...}}`` with the
            same statistics plus ``expert_counts`` (activations per expert), ``utilisation_cv``
            (coefficient of variation of ``expert_counts``) and ``unused_share`` (share of experts
            never chosen).
        """
        per_layer: dict[int, dict[str, Any]] = {}
        pooled: torch.Tensor | None = None
        native = 0
        for layer in self.layers:
            hist = self._hist[layer]
            if hist is None:
                continue
            ceiling = self._ceiling.get(layer)
            stats = _hist_stats(hist, self.floor, ceiling)
            experts = self._experts[layer].double().cpu()  # (E,)
            mean_use = float(experts.mean())
            stats["expert_counts"] = [int(x) for x in experts.tolist()]
            stats["utilisation_cv"] = float(experts.std(correction=0)) / mean_use if mean_use > 0 else float("nan")
            stats["unused_share"] = float((experts == 0).double().mean())
            stats["native_activations"] = self.native_k[layer] * stats["tokens"]
            native += stats["native_activations"]
            per_layer[layer] = stats
            pooled = _grow_add(pooled, hist.cpu())
        ceilings = set(self._ceiling.values())
        overall = _hist_stats(
            pooled if pooled is not None else torch.zeros(1, dtype=torch.long),
            self.floor,
            ceilings.pop() if len(ceilings) == 1 else None,
        )
        tokens = max((s["tokens"] for s in per_layer.values()), default=0)
        activations = overall.pop("activations")
        overall.pop("tokens")
        return {
            "mode": self.mode,
            "selector": repr(self.selector),
            "forward_calls": self.forward_calls,
            "tokens": tokens,
            **overall,
            "expert_activations": activations,
            "native_activations": native,
            "activation_ratio": activations / native if native else float("nan"),
            "truncated": self.truncated,
            "per_layer": per_layer,
        }

    def per_token_counts(self) -> TokenCounts:
        """Per-token counts aligned with the forwarded tokens, in call order.

        Only the first ``max_tokens_per_layer`` tokens are kept (``truncated`` says whether
        later ones were dropped); padding rows are excluded when the forward call had an
        ``attention_mask``.
        """
        self._settle()
        self._flush()
        calls = sorted(self._calls, key=lambda c: (c < 0, abs(c)))
        parts: dict[str, list[torch.Tensor]] = {"tok": [], "call": [], "seq": [], "pos": []}
        counts: dict[int, list[torch.Tensor]] = {layer: [] for layer in self.layers}
        for call in calls:
            inputs, keep = self._calls[call], self._keep[call]
            valid = inputs.valid.cpu()  # (T,)
            parts["tok"].append(inputs.token_ids.cpu()[valid][:keep])
            parts["seq"].append(inputs.sequence.cpu()[valid][:keep])
            parts["pos"].append(inputs.positions.cpu()[valid][:keep])
            parts["call"].append(torch.full((keep,), call, dtype=torch.long))
            for layer in self.layers:
                c = self._token_counts[layer].get(call)  # (T,) with padding rows
                counts[layer].append(c[valid][:keep].long() if c is not None else torch.full((keep,), -1, dtype=torch.long))
        cat = lambda xs: torch.cat(xs).long() if xs else torch.empty(0, dtype=torch.long)  # noqa: E731
        return TokenCounts(
            token_ids=cat(parts["tok"]),
            call_index=cat(parts["call"]),
            sequence_index=cat(parts["seq"]),
            positions=cat(parts["pos"]),
            counts={layer: cat(v) for layer, v in counts.items()},
            truncated=self.truncated,
        )

    def __repr__(self) -> str:
        return f"RoutingRecorder(mode={self.mode!r}, layers={self.layers}, forward_calls={self.forward_calls})"


# ----------------------------------------------------------------------------------------------
# The patched forward
# ----------------------------------------------------------------------------------------------


def _check_fingerprint(bank: Any, model: nn.Module, allow_other_model: bool) -> None:
    """Refuse a bank fitted on a model whose routers differ from ``model``'s (unless allowed)."""
    from bh_helpers.moe_adapters import fingerprints_differ, router_fingerprint

    fitted = bank.metadata.router_fingerprint
    if fitted is None or allow_other_model:
        return
    differ = fingerprints_differ(fitted, router_fingerprint(model, layers=list(fitted)))
    if differ:
        raise ValueError(
            f"the selector's null bank was fitted on another model ({bank.metadata.model_id!r}): its router weights "
            f"differ at layers {differ}. Fit a bank for this model (`bh-routing capture` + `bh-routing fit`), or "
            "pass route(..., allow_other_model=True) to use it anyway."
        )


def _check_selection_values(selection: Selection, num_experts: int, layer: int) -> None:
    """Validate mode (``selector.validate=True``): the selection's values, with host synchronisation.

    Indices in ``[-1, E)`` with no expert twice in a row, counts equal to the used slots, finite
    non-negative weights; a violation names the layer and the first token. (Without validation
    these are the selector's responsibility: route checks shapes only, which costs no sync.)
    """
    indices, weights = selection.indices, selection.weights  # (T, K) each
    counts = selection.counts.reshape(-1)  # (T,)
    used = indices >= 0  # (T, K)
    problems = {
        "an expert id outside [-1, num_experts)": (indices < -1) | (indices >= num_experts),
        "non-finite or negative weights": ~torch.isfinite(weights) | (weights < 0),
    }
    for what, mask in problems.items():
        rows = mask.any(dim=-1).nonzero()
        if rows.numel():
            raise ValueError(f"the selector returned {what} at layer {layer}, token {int(rows[0, 0])}.")
    wrong = (counts != used.sum(dim=-1)).nonzero()
    if wrong.numel():
        t = int(wrong[0, 0])
        raise ValueError(f"the selector's counts disagree with its indices at layer {layer}, token {t}: count "
                         f"{int(counts[t])}, {int(used[t].sum())} experts used.")
    ordered = torch.where(used, indices, num_experts + torch.arange(indices.shape[-1], device=indices.device))
    ordered = ordered.sort(dim=-1).values  # unused slots get distinct ids past E
    repeated = (ordered[:, 1:] == ordered[:, :-1]).any(dim=-1).nonzero()
    if repeated.numel():
        raise ValueError(f"the selector chose one expert twice at layer {layer}, token {int(repeated[0, 0])}.")


def _check_selection(selection: Any, rows: int, layer: int) -> None:
    """A selector's answer must be a Selection of ``[T, K]`` indices and weights."""
    if not isinstance(selection, Selection):
        raise TypeError(
            f"the selector returned {type(selection).__name__} for layer {layer}; it must return a Selection."
        )
    indices, weights = selection.indices, selection.weights
    if indices.dim() != 2 or indices.shape[0] != rows or weights.shape != indices.shape:
        raise ValueError(
            f"the selector returned indices {tuple(selection.indices.shape)} / weights "
            f"{tuple(selection.weights.shape)} for {rows} tokens at layer {layer}; both must be [T, K]."
        )


class _GateWeightCache:
    """The float32 copy of one block's router weight, kept while ``route`` is open.

    Rebuilt when the weight's storage (``data_ptr``), version counter (in-place updates), dtype,
    device or the input's device change. Not used (the copy is made per call, as in
    :func:`~bh_helpers.moe_adapters.router_logits`) when an accelerate hook sits on the router
    (offloaded weights live on ``meta`` between calls), for weights on ``meta``, for inference
    tensors (no version counter), and when gradients flow to the weight.
    """

    __slots__ = ("key", "weight")

    def __init__(self) -> None:
        self.key: tuple | None = None
        self.weight: torch.Tensor | None = None

    def clear(self) -> None:
        self.key, self.weight = None, None

    def weight_for(self, block: nn.Module, device: torch.device) -> torch.Tensor | None:
        """The cached float32 router weight ``(E, H)`` on ``device``, or None where no cache applies.

        A rebuild after an in-place update (or a new storage) copies INTO the existing buffer
        when shape, device and inference-mode status allow, so that CUDA graphs reading the
        buffer stay valid.
        """
        gate = block.gate
        weight = getattr(gate, "weight", None)
        if (
            not isinstance(weight, torch.Tensor)
            or "_hf_hook" in vars(gate)
            or weight.is_meta
            or (weight.requires_grad and torch.is_grad_enabled())
        ):
            return None
        try:
            version = weight._version
        except RuntimeError:  # inference tensor: no version counter, cannot see in-place updates
            return None
        key = (weight.data_ptr(), version, weight.dtype, weight.device, tuple(weight.shape), device)
        if key != self.key:
            cached = self.weight
            if (
                cached is not None
                and cached.shape == weight.shape
                and cached.device == device
                and (not cached.is_inference() or torch.is_inference_mode_enabled())
            ):
                with torch.no_grad():
                    cached.copy_(weight.detach())  # same buffer: captured graphs still read it
            else:
                self.weight = weight.detach().to(device=device, dtype=torch.float32)  # (E, H)
            self.key = key
        return self.weight

    def logits(self, block: nn.Module, hidden: torch.Tensor) -> torch.Tensor:
        """Router logits ``[T, E]`` float32 of ``hidden`` ``[T, H]``."""
        weight = self.weight_for(block, hidden.device)
        if weight is None:
            return router_logits(block, hidden)
        return F.linear(hidden.float(), weight)  # (T, E)


# ----------------------------------------------------------------------------------------------
# The whole patched block in one CUDA graph (decode shapes)
# ----------------------------------------------------------------------------------------------

#: Up to this many rows (tokens) a patched block forward is captured whole in a CUDA graph.
GRAPH_MAX_TOKENS = 64


def _graph_safe_selector(selector: Any, device: torch.device) -> bool:
    """Whether ``selector`` is a pure, sync-free device function of the logits (capturable).

    The ready-made fused selectors are (TopKSelector/NativeSelector, BHSelector over a
    NullBank, FusedBHSelector) when the Triton kernel runs on ``device`` and validation is off;
    any other selector may opt in with a ``graph_safe = True`` attribute.
    """
    from bh_helpers.fused_select import FusedBHSelector, fused_available

    if getattr(selector, "graph_safe", False) is True:
        return True
    if not fused_available(device) or getattr(selector, "validate", True):
        return False
    if type(selector) in (TopKSelector, NativeSelector, FusedBHSelector):
        return True
    if type(selector) is BHSelector:
        from bh_helpers.nulls import NullBank

        return isinstance(selector.null_bank, NullBank)
    return False


class _BlockGraph:
    """One patched block forward for one row count ``T``, captured in a CUDA graph.

    Static inputs: ``hidden (T, H)`` and ``valid (T,)`` (long); static outputs: the block output
    ``(T, H)`` and the per-token counts ``(T,)`` int16. The graph also reads the cached float32
    router weight, the expert weights, the selector's device tables, and adds into the recorder's
    aggregate buffers in place; ``key`` holds the addresses it depends on.
    """

    def __init__(self, compute: Callable, hidden: torch.Tensor, valid: torch.Tensor, hist: torch.Tensor,
                 experts: torch.Tensor, key: tuple, pool: Any) -> None:
        device = hidden.device
        self.key = key
        self.hidden = hidden.detach().clone()  # (T, H)
        self.valid = valid  # (T,) long, shared by the blocks of one route
        stream = capture_stream(device)
        stream.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(stream):
            for _ in range(2):  # warm-up into scratch aggregates: compilation, tables, handles
                compute(self.hidden, self.valid, torch.zeros_like(hist), torch.zeros_like(experts))
        torch.cuda.current_stream(device).wait_stream(stream)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph, pool=pool):
            self.out, self.counts = compute(self.hidden, self.valid, hist, experts)

    def __call__(self, hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        self.hidden.copy_(hidden)
        self.graph.replay()
        return self.out.clone(), self.counts.clone()


class _BlockGraphs:
    """The captured graphs of one routed block, per row count; dropped when ``route`` exits."""

    __slots__ = ("disabled", "graphs", "shared")

    def __init__(self, shared: dict | None = None) -> None:
        # shared (one per route): "pool" and, per key, [static valid (T,), its current source]
        self.shared: dict = {} if shared is None else shared
        self.clear()

    def clear(self) -> None:
        self.graphs: dict[tuple, _BlockGraph] = {}
        self.disabled = False
        self.shared.clear()

    def valid(self, key: tuple, source: torch.Tensor) -> torch.Tensor:
        """The route's static ``valid`` buffer for ``key``, holding ``source`` (copied once per call)."""
        entry = self.shared.get(key)
        if entry is None:
            entry = [torch.empty_like(source), None]
            self.shared[key] = entry
        if entry[1] is not source:
            entry[0].copy_(source)
            entry[1] = source
        return entry[0]

    def pool(self) -> Any:
        if "pool" not in self.shared:
            self.shared["pool"] = torch.cuda.graph_pool_handle()
        return self.shared["pool"]


def _make_forward(
    block: MoEBlock,
    original: Callable[..., torch.Tensor],
    selector: Selector,
    recorder: RoutingRecorder,
    mode: str,
    gate_cache: _GateWeightCache,
    graphs: _BlockGraphs | None = None,
) -> Callable[..., torch.Tensor]:
    """Build (without installing) the replacement forward of one block."""
    layer, adapter = block.layer, block.adapter
    validate = getattr(selector, "validate", False) is True  # slow, thorough checks only when asked

    def compute(module: nn.Module, weight: torch.Tensor, hidden: torch.Tensor, valid: torch.Tensor,
                hist: torch.Tensor, experts_count: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The device part of the patched forward (no host synchronisation): captured whole."""
        logits = F.linear(hidden.float(), weight)  # (T, E) float32
        selection = selector(logits, layer)
        _check_selection(selection, hidden.shape[0], layer)
        counts = selection.counts.reshape(-1)  # (T,)
        indices = selection.indices.reshape(counts.shape[0], -1)  # (T, K)
        _aggregate(hist, experts_count, counts, indices, valid, (valid != 0).unsqueeze(-1))
        out = sync_free_dispatch(module.experts, hidden, selection.indices, selection.weights)  # (T, H)
        shared = adapter.shared_output(module, hidden)  # (T, H) or None
        if shared is not None:
            out = out + shared.to(out.dtype)  # (T, H)
        return out, counts.to(torch.int16)

    def graphed(module: nn.Module, hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
        """Output and per-token counts through the block's CUDA graph, or None (use eager)."""
        device = hidden.device
        if (
            graphs is None
            or graphs.disabled
            or mode != "patch"
            or device.type != "cuda"
            or hidden.shape[0] > GRAPH_MAX_TOKENS
            or hidden.shape[0] == 0
            or torch.is_grad_enabled()
            or torch.cuda.is_current_stream_capturing()
            or router_outputs_requested()
            or "_hf_hook" in vars(module)
            or "_hf_hook" in vars(module.experts)
        ):
            return None
        experts = module.experts
        if not (sync_free_supported(experts, device) and _graph_safe_selector(selector, device)):
            return None
        weight = gate_cache.weight_for(module, device)
        if weight is None:
            return None
        rows = hidden.shape[0]
        inputs = recorder._inputs_for(rows, device)
        valid_long, _ = recorder._valid_for(inputs, device)
        width = getattr(selector, "max_k", None)
        if not isinstance(width, int):
            return None
        hist, experts_count = recorder._buffers(layer, width, device)
        inference = torch.is_inference_mode_enabled()
        key = (rows, hidden.dtype, device, inference)
        deps = (weight.data_ptr(), experts.gate_up_proj.data_ptr(), experts.down_proj.data_ptr(),
                hist.data_ptr(), hist.numel(), experts_count.data_ptr())
        valid = graphs.valid(key, valid_long)  # (T,) static, shared by the route's blocks
        g = graphs.graphs.get(key)
        if g is None or g.key != deps:
            graphs.graphs.pop(key, None)
            try:
                g = _BlockGraph(lambda h, v, hs, ex: compute(module, weight, h, v, hs, ex), hidden, valid, hist,
                                experts_count, deps, graphs.pool())
            except Exception:  # noqa: BLE001 - anything not capturable: eager from now on
                graphs.disabled = True
                return None
            graphs.graphs[key] = g
        out, counts16 = g(hidden)
        recorder._store_tokens(layer, inputs, counts16)
        return out, counts16

    def forward(module: nn.Module, hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        shape = hidden_states.shape  # (B, S, H)
        hidden = hidden_states.reshape(-1, shape[-1])  # (T, H)
        done = graphed(module, hidden)
        if done is not None:
            return done[0].reshape(shape)  # (B, S, H)
        logits = gate_cache.logits(module, hidden)  # (T, E) float32
        if validate:
            try:
                selection = selector(logits, layer)
            except ValueError as err:  # the selector's own checks: say which layer
                raise ValueError(f"layer {layer}: {err}") from None
        else:
            selection = selector(logits, layer)
        _check_selection(selection, hidden.shape[0], layer)  # shapes only: no host synchronisation
        if validate:
            _check_selection_values(selection, logits.shape[-1], layer)
        recorder._record(layer, selection)
        if mode == "analyze":
            return original(hidden_states, *args, **kwargs)
        if router_outputs_requested():
            # Only so that transformers' hook on the router records router_logits (and the aux
            # loss can be computed); its return value is not used.
            module.gate(hidden)
        with materialized(module.experts):
            # bh_helpers.auto_dispatch picks grouped GEMMs, the T4 path or the reference.
            out = fast_dispatch_experts(module.experts, hidden, selection.indices, selection.weights)  # (T, H)
        shared = adapter.shared_output(module, hidden)  # (T, H) or None
        if shared is not None:
            out = out + shared.to(out.dtype)  # (T, H)
        return out.reshape(shape)  # (B, S, H)

    return forward


def _patch_target(module: nn.Module) -> str:
    """The instance attribute to replace: accelerate's ``_old_forward`` when a hook wraps it."""
    own = vars(module)
    return "_old_forward" if "_hf_hook" in own and "_old_forward" in own else "forward"


@contextmanager
def route(
    model: nn.Module,
    selector: Selector,
    *,
    mode: str = "patch",
    layers: LayerSpec = None,
    max_tokens_per_layer: int = DEFAULT_MAX_TOKENS,
    allow_other_model: bool = False,
) -> Iterator[RoutingRecorder]:
    """Route the model's MoE blocks with ``selector`` inside a ``with`` block.

    Parameters
    ----------
    model : nn.Module
        A causal LM of a supported family (OLMoE, Mixtral, Qwen2-MoE, Qwen3-MoE).
    selector : Selector
        ``(logits[T, E] float32, layer) -> Selection``, e.g. :class:`BHSelector`,
        :class:`TopKSelector`, :class:`TopPSelector`, ``NativeSelector.for_model(model)``.
    mode : {"patch", "analyze"}, default "patch"
        "patch": the model computes with the selected experts only. "analyze": the model runs
        natively (outputs bit-identical) and the selection is only recorded.
    layers : None, int, list of int, or callable, optional
        MoE layers to route (default all); the others run natively and are not recorded.
    max_tokens_per_layer : int, default 1_000_000
        Cap on per-token counts kept by the recorder (aggregates are exact regardless).
    allow_other_model : bool, default False
        Route with a null bank whose recorded router fingerprint differs from this model's
        (a bank of another checkpoint of the same shape); refused by default.

    Yields
    ------
    RoutingRecorder
        Statistics of what was chosen; stays readable after the context exits.

    Raises
    ------
    ValueError
        Unknown ``mode``, bad ``layers``, an unsupported model, or a selector whose null bank was
        fitted for other layers or expert counts. With a selector built with ``validate=True``
        also, during the forward pass, non-finite router logits (NaN, +inf, or -inf for every
        expert) and selections with bad values (expert ids outside ``[-1, E)``, an expert twice,
        counts that disagree with the used slots, non-finite or negative weights), naming the
        layer and the first token.
    RuntimeError
        When a chosen block is already routed by an enclosing ``route``.

    Notes
    -----
    Validation is a choice made once, on the selector: ``validate=True`` checks values with host
    synchronisations (for developing selectors and for debugging); the default checks shapes only
    and never synchronises, so decoding stays fast, and then non-finite logits reach the selector
    as they are.
    """
    # Input validation (before anything is installed)
    if mode not in MODES:
        raise ValueError(f"`mode` must be one of {MODES}; got {mode!r}.")
    if not callable(selector):
        raise ValueError(f"`selector` must be callable as selector(logits, layer); got {selector!r}.")
    _check_k("max_tokens_per_layer", max_tokens_per_layer, 0)
    bank = getattr(selector, "null_bank", None)
    from bh_helpers.nulls import NullBank

    if isinstance(bank, NullBank):  # a bank of another model routed silently (mean k 1.0) before
        bank.check_compatible(model, what="the routed model")
        _check_fingerprint(bank, model, allow_other_model)
    blocks = select_layers(find_moe_blocks(model), layers)
    if isinstance(bank, NullBank):
        missing = [b.layer for b in blocks if b.layer not in set(bank)]
        if missing:
            raise ValueError(
                f"the selector's null bank has no null for MoE layers {missing} (it has layers {list(bank)}); "
                "pass `layers` to route only those it has, or fit a bank on every layer "
                "(`bh-routing capture` + `bh-routing fit`)."
            )
    busy = [b.layer for b in blocks if b.module in _ACTIVE]
    if busy:
        raise RuntimeError(
            f"MoE layers {busy} are already routed by an enclosing `route`; exit it first or pass "
            "disjoint `layers` to the inner one."
        )
    recorder = RoutingRecorder(blocks, selector, mode, max_tokens_per_layer)

    # Install -> yield -> restore, in ONE try/finally.
    installed: list[tuple[nn.Module, str, bool, Any]] = []
    handles = []
    gate_caches: list[_GateWeightCache] = []
    graph_sets: list[_BlockGraphs] = []
    graph_shared: dict = {}  # the graphs' pool and static inputs, shared by the routed blocks
    try:
        handles.append(model.register_forward_pre_hook(recorder._on_forward, with_kwargs=True))
        handles.append(model.register_forward_hook(recorder._on_forward_end, with_kwargs=True, always_call=True))
        for block in blocks:
            module = block.module
            attr = _patch_target(module)
            had_own = attr in vars(module)
            previous = vars(module).get(attr)
            original = getattr(module, attr)  # the callable to use in "analyze" mode
            gate_cache = _GateWeightCache()
            gate_caches.append(gate_cache)
            block_graphs = _BlockGraphs(graph_shared)
            graph_sets.append(block_graphs)
            replacement = types.MethodType(
                _make_forward(block, original, selector, recorder, mode, gate_cache, block_graphs), module
            )
            installed.append((module, attr, had_own, previous))
            setattr(module, attr, replacement)
            _ACTIVE.add(module)
        yield recorder
    finally:
        for module, attr, had_own, previous in reversed(installed):
            if had_own:
                setattr(module, attr, previous)
            else:
                vars(module).pop(attr, None)
            _ACTIVE.discard(module)
        for handle in handles:
            handle.remove()
        for gate_cache in gate_caches:
            gate_cache.clear()
        for block_graphs in graph_sets:
            block_graphs.clear()  # the graphs and their pool go with the context
