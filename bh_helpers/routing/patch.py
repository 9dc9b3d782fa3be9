"""Change which experts a model uses, reversibly: the ``route`` context manager.

``route(model, selector)`` replaces, on each chosen MoE block INSTANCE, the bound ``forward``
with one that

1. computes the router logits itself (float32, ``F.linear(h, gate.weight)``),
2. asks the selector which experts each token gets (a :class:`~bh_helpers.selection.reference.Selection`
   of variable width, ``-1`` at unused slots),
3. runs only the selected (token, expert) pairs on the model's own expert weights through
   :func:`bh_helpers.routing.auto.fast_dispatch_experts` (grouped GEMMs on sm80+ CUDA, per-expert
   loops and Triton GEMVs on a T4, the reference
   :func:`bh_helpers.routing.dispatch.dispatch_experts` elsewhere) and adds the shared expert where the family has one.

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
>>> from bh_helpers import TopKSelector, route
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
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from bh_helpers._validate import check_choice, check_int
from bh_helpers.models.families import (
    LayerSpec,
    MoEBlock,
    find_moe_blocks,
    materialized,
    router_fingerprint,
    router_logits,
    router_outputs_requested,
    select_layers,
)
from bh_helpers.routing.auto import fast_dispatch_experts, sync_free_dispatch
from bh_helpers.routing.graphs import BlockGraphs
from bh_helpers.routing.grouped import clear_graphs
from bh_helpers.routing.aggregates import aggregate
from bh_helpers.routing.recorder import DEFAULT_MAX_TOKENS, RoutingRecorder
from bh_helpers.selection.reference import Selection
from bh_helpers.selection.selectors import RoutedModel, Selector

__all__ = ["MODES", "route"]

#: What ``route`` does with the selection: run it, or only record it.
MODES = ("patch", "analyze")

# Blocks currently patched by an open ``route`` (weak: a dropped model is not kept alive).
_ACTIVE: weakref.WeakSet[nn.Module] = weakref.WeakSet()


# ----------------------------------------------------------------------------------------------
# The patched forward
# ----------------------------------------------------------------------------------------------


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
    """A selector's answer must be a Selection of ``[T, K]`` integer indices, float weights, ``T`` counts.

    Host-side checks of shapes and dtypes only (no synchronisation); the values are screened on
    the device by :func:`~bh_helpers.routing.aggregates.aggregate`.
    """
    if not isinstance(selection, Selection):
        raise TypeError(
            f"the selector returned {type(selection).__name__} for layer {layer}; it must return a Selection."
        )
    indices, weights, counts = selection.indices, selection.weights, selection.counts
    if indices.dim() != 2 or indices.shape[0] != rows or weights.shape != indices.shape or counts.numel() != rows:
        raise ValueError(
            f"the selector returned indices {tuple(indices.shape)} / weights {tuple(weights.shape)} / counts "
            f"{tuple(counts.shape)} for {rows} tokens at layer {layer}; indices and weights must be [T, K], "
            "counts [T]."
        )
    if indices.dtype.is_floating_point or indices.dtype.is_complex or indices.dtype == torch.bool \
            or counts.dtype.is_floating_point or counts.dtype == torch.bool or not weights.dtype.is_floating_point:
        raise TypeError(
            f"the selector returned indices {indices.dtype}, counts {counts.dtype} and weights {weights.dtype} at "
            f"layer {layer}; indices and counts must be integer tensors, weights floating point."
        )


class _GateWeightCache:
    """The float32 copy of one block's router weight, kept while ``route`` is open.

    Rebuilt when the weight's storage (``data_ptr``), version counter (in-place updates), dtype,
    device or the input's device change. Not used (the copy is made per call, as in
    :func:`~bh_helpers.models.families.router_logits`) when an accelerate hook sits on the router
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


def _make_forward(
    block: MoEBlock,
    original: Callable[..., torch.Tensor],
    selector: Selector,
    recorder: RoutingRecorder,
    mode: str,
    gate_cache: _GateWeightCache,
    graphs: BlockGraphs | None = None,
) -> Callable[..., torch.Tensor]:
    """Build (without installing) the replacement forward of one block."""
    layer, adapter = block.layer, block.adapter
    validate = getattr(selector, "validate", False) is True  # slow, thorough checks only when asked

    # Selectors that draw over a call's tokens (the compute-matched controls) are told which rows
    # are padding, so that padding takes no part in their draws; others get (logits, layer) only.
    reads_valid = getattr(selector, "reads_valid_rows", False) is True

    def select(logits: torch.Tensor, valid: torch.Tensor | None) -> Selection:
        return selector(logits, layer, valid=valid) if reads_valid else selector(logits, layer)

    def body(module: nn.Module, hidden: torch.Tensor, logits: torch.Tensor, valid: torch.Tensor | None, *,
             checked: bool, record: Callable[[Selection, torch.Tensor], torch.Tensor],
             dispatch: Callable[..., torch.Tensor]) -> tuple[torch.Tensor | None, Selection]:
        """The patched block on ``hidden (T, H)`` with router ``logits (T, E)``: ``(output (T, H), selection)``.

        The one body of the eager and the CUDA-graph forward, which differ only in ``record`` (the
        recorder, or its aggregates into the graph's buffers), ``dispatch`` and ``checked`` (the
        validate-mode checks, which synchronise and so never run under capture). ``valid (T,)``
        bool (False at padding rows, None when unknown) goes to selectors that read it. The output
        is None in "analyze" mode (the caller runs the native forward).
        """
        if checked:
            try:
                selection = select(logits, valid)
            except ValueError as err:  # the selector's own checks: say which layer
                raise ValueError(f"layer {layer}: {err}") from None
        else:
            selection = select(logits, valid)
        _check_selection(selection, hidden.shape[0], layer)  # shapes and dtypes: no host synchronisation
        if checked:
            _check_selection_values(selection, logits.shape[-1], layer)
        safe = record(selection, logits)  # (T, K); broken rows and non-finite logits counted on the device
        if mode == "analyze":
            return None, selection
        if router_outputs_requested():
            # Only so that transformers' hook on the router records router_logits (and the aux
            # loss can be computed); its return value is not used.
            module.gate(hidden)
        with materialized(module.experts):
            out = dispatch(module.experts, hidden, safe, selection.weights)  # (T, H)
        shared = adapter.shared_output(module, hidden)  # (T, H) or None
        if shared is not None:
            out = out + shared.to(out.dtype)  # (T, H)
        return out, selection

    def compute(module: nn.Module, weight: torch.Tensor, hidden: torch.Tensor, valid: torch.Tensor,
                hist: torch.Tensor, experts_count: torch.Tensor,
                faults: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The device part of the patched forward (no host synchronisation): captured whole."""
        valid_col = (valid != 0).unsqueeze(-1)  # (T, 1)

        def record(selection: Selection, logits: torch.Tensor) -> torch.Tensor:
            return aggregate(hist, experts_count, faults, selection.counts.reshape(-1), selection.indices,
                             selection.weights, valid, valid_col, logits)  # (T, K)

        logits = F.linear(hidden.float(), weight)  # (T, E) float32
        out, selection = body(module, hidden, logits, valid_col.reshape(-1), checked=False, record=record,
                              dispatch=sync_free_dispatch)
        return out, selection.counts.reshape(-1).to(torch.int16)  # (T, H), (T,)

    def forward(module: nn.Module, hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        shape = hidden_states.shape  # (B, S, H)
        hidden = hidden_states.reshape(-1, shape[-1])  # (T, H)
        if graphs is not None and mode == "patch":
            out = graphs.run(module, hidden, layer=layer, selector=selector, recorder=recorder,
                             gate_cache=gate_cache, compute=compute)
            if out is not None:
                return out.reshape(shape)  # (B, S, H)
        logits = gate_cache.logits(module, hidden)  # (T, E) float32
        # bh_helpers.routing.auto picks grouped GEMMs, the T4 path or the reference.
        valid = recorder.valid_rows(hidden.shape[0], hidden.device) if reads_valid else None  # (T,) or None
        out, _ = body(module, hidden, logits, valid, checked=validate,
                      record=lambda selection, logits: recorder.record(layer, selection, logits),
                      dispatch=fast_dispatch_experts)
        if out is None:  # analyze: the native output
            return original(hidden_states, *args, **kwargs)
        return out.reshape(shape)  # (B, S, H)

    return forward


def routed_model(model: nn.Module, blocks: list[MoEBlock] | None = None, *,
                 allow_other_model: bool = False) -> RoutedModel:
    """What :meth:`Selector.check` sees of ``model`` routed at ``blocks`` (default: every MoE block).

    Lets a caller that will route later (a sweep, before it writes its header) run the same checks
    as :func:`route` up front.
    """
    blocks = find_moe_blocks(model) if blocks is None else blocks
    return RoutedModel(
        layers=tuple(b.layer for b in blocks),
        num_experts=blocks[0].num_experts,
        num_hidden_layers=getattr(getattr(model, "config", None), "num_hidden_layers", None),
        router_fingerprint=lambda layers: router_fingerprint(model, layers=layers),
        allow_other_model=allow_other_model,
    )


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
        :class:`TopKSelector`, :class:`TopPSelector`, ``NativeSelector.for_model(model)``. Its
        ``check(RoutedModel)``, where it has one, runs before anything is installed.
    mode : {"patch", "analyze"}, default "patch"
        "patch": the model computes with the selected experts only. "analyze": the model runs
        natively (outputs bit-identical) and the selection is only recorded.
    layers : None, int, list of int, or callable, optional
        MoE layers to route (default all); the others run natively and are not recorded.
    max_tokens_per_layer : int, default 1_000_000
        Cap on per-token counts kept by the recorder (aggregates are exact regardless).
    allow_other_model : bool, default False
        Route with a null bank whose recorded router fingerprint differs from this model's
        (a bank of another checkpoint of the same shape); refused by default. Passed to the
        selector's check in :class:`~bh_helpers.selection.selectors.RoutedModel`.

    Yields
    ------
    RoutingRecorder
        Statistics of what was chosen; stays readable after the context exits.

    Raises
    ------
    ValueError
        Unknown ``mode``, bad ``layers``, an unsupported model, or a model the selector's
        :meth:`~bh_helpers.selection.selectors.Selector.check` refuses (e.g. a null bank fitted
        for other layers, expert counts or router weights). With a selector built with ``validate=True``
        also, during the forward pass, non-finite router logits (NaN, +inf, or -inf for every
        expert) and selections with bad values (expert ids outside ``[-1, E)``, an expert twice,
        counts that disagree with the used slots, non-finite or negative weights), naming the
        layer and the first token. On a normal exit (after restoring the model), when any
        token had non-finite router logits (NaN or +inf, or -inf for every expert; whatever the
        selector and its weights) or a broken selection: expert ids outside ``[-1, E)``, NaN,
        infinite or negative weights, or counts that disagree with the used slots; naming the
        layers.
    TypeError
        A selector that returns something other than a :class:`Selection` of integer indices and
        counts and floating-point weights.
    RuntimeError
        When a chosen block is already routed by an enclosing ``route``.

    Notes
    -----
    Every selection is screened on the device at no synchronisation (shapes and dtypes on the
    host; the router logits, ids, weights and counts counted into a per-layer buffer that ``route``
    reads once when it exits), so a broken selector or non-finite logits never give quietly wrong
    results, also with weights that do not come from the logits (uniform, inverse-p). Ids
    out of range are dropped before the dispatch so that they cannot read past the expert bank.
    ``validate=True`` on the selector adds the thorough checks with host synchronisations (for
    developing selectors and for debugging): they stop at the first broken token, also catch an
    expert chosen twice, and refuse non-finite logits before selection.
    """
    # Input validation (before anything is installed)
    check_choice("mode", mode, MODES)
    if not callable(selector):
        raise ValueError(f"`selector` must be callable as selector(logits, layer); got {selector!r}.")
    check_int("max_tokens_per_layer", max_tokens_per_layer, 0)
    if not isinstance(allow_other_model, bool):  # the string "no" is true: it would route another model's bank
        raise ValueError(f"`allow_other_model` must be True or False; got {allow_other_model!r}.")
    blocks = select_layers(find_moe_blocks(model), layers)
    check = getattr(selector, "check", None)
    if callable(check):  # the selector's own checks (its null bank, its levels): see Selector.check
        check(routed_model(model, blocks, allow_other_model=allow_other_model))
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
    graph_sets: list[BlockGraphs] = []
    graph_shared: dict = {}  # the graphs' pool and static inputs, shared by the routed blocks
    try:
        handles.append(model.register_forward_pre_hook(recorder.on_forward, with_kwargs=True))
        handles.append(model.register_forward_hook(recorder.on_forward_end, with_kwargs=True, always_call=True))
        for block in blocks:
            module = block.module
            attr = _patch_target(module)
            had_own = attr in vars(module)
            previous = vars(module).get(attr)
            original = getattr(module, attr)  # the callable to use in "analyze" mode
            gate_cache = _GateWeightCache()
            gate_caches.append(gate_cache)
            block_graphs = BlockGraphs(graph_shared)
            graph_sets.append(block_graphs)
            replacement = types.MethodType(
                _make_forward(block, original, selector, recorder, mode, gate_cache, block_graphs), module
            )
            installed.append((module, attr, had_own, previous))
            setattr(module, attr, replacement)
            _ACTIVE.add(module)
        yield recorder
        recorder.raise_on_invalid()  # one synchronisation, on a normal exit only (after restoring, below)
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
        for block in blocks:
            clear_graphs(block.module.experts)  # and the grouped dispatch's decode graphs
