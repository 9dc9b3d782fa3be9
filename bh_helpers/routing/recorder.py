"""What a routed model chose: :class:`RoutingRecorder` (exact aggregates, per-token counts).

:func:`bh_helpers.routing.patch.route` yields one recorder per context. Its forward hooks on the
model note each call's tokens (:meth:`RoutingRecorder.on_forward`); each patched block reports its
selection (:meth:`RoutingRecorder.record`, or :meth:`RoutingRecorder.store_tokens` from a CUDA
graph that already added into :meth:`RoutingRecorder.buffers`). Aggregates stay on the device and
never synchronise; per-token counts are copied to the CPU in large batches, up to a cap.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from bh_helpers.capture import ForwardInputs, forward_inputs
from bh_helpers.models.families import MoEBlock
from bh_helpers.routing.aggregates import aggregate
from bh_helpers.selection.reference import Selection
from bh_helpers.selection.selectors import Selector

__all__ = ["BOUND_ADVICE", "BOUND_SHARE", "DEFAULT_MAX_TOKENS", "BoundWarning", "RoutingRecorder", "TokenCounts", "bound_warning"]

#: Default cap on per-token counts kept per layer (exact aggregates are always kept).
DEFAULT_MAX_TOKENS = 1_000_000
#: Per-token counts kept on the device before one copy to the CPU (elements, int16).
_FLUSH_ELEMENTS = 1 << 23


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


#: Share of a layer's tokens at ``min_k`` (or ``max_k``) above which a configuration is its bound, not BH.
BOUND_SHARE = 0.5


class BoundWarning(UserWarning):
    """Most tokens of a layer sit at the floor ``min_k`` or the ceiling ``max_k`` of an adaptive selector."""


#: What to do about a configuration at its bound (the end of :func:`bound_warning`).
BOUND_ADVICE = ("there the configuration is its bound (static top-k at that k for most tokens), not BH: at this "
                "alpha the test rejects almost nothing beyond the floor, or almost everything up to the ceiling. To "
                "route by BH, choose a number of experts well between min_k and max_k and the alpha that reaches it: "
                "alpha_for_mean_k(bank, calibration_logits, target_mean_k), `--mean-ks` on the command line, the "
                "'target k' slider in the explorer.")


def bound_warning(rates: Mapping[Any, tuple[float, float]], min_k: int | None, max_k: int | None, *,
                  what: str = "layer", advice: bool = True) -> str | None:
    """One sentence when more than :data:`BOUND_SHARE` of the tokens of some layer sit at a bound.

    Parameters
    ----------
    rates : mapping of layer (or any label) to (floor rate, ceiling rate)
        Shares of tokens at ``min_k`` and at ``max_k``.
    min_k, max_k : int or None
        The bounds; nothing is said when either is unknown or they are equal (static top-k).
    what : str, default "layer"
        What the keys of ``rates`` are, for the sentence.
    advice : bool, default True
        End with :data:`BOUND_ADVICE`.

    Returns
    -------
    str or None
        Which keys sit at which bound, that the configuration is then the bound and not BH, and how
        to choose alpha for a target number of experts instead; None when no key passes the share.
    """
    if min_k is None or max_k is None or min_k >= max_k:
        return None
    parts = []
    for bound, index, name in ((min_k, 0, "min_k"), (max_k, 1, "max_k")):
        hits = {key: r[index] for key, r in rates.items() if r[index] == r[index] and r[index] > BOUND_SHARE}
        if hits:
            where = ", ".join(f"{key} ({share:.0%})" for key, share in hits.items())
            parts.append(f"most tokens sit at {name}={bound} in {what + ' ' if what else ''}{where}")
    if not parts:
        return None
    return "; ".join(parts) + (": " + BOUND_ADVICE if advice else "")


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
        self._faults: dict[int, torch.Tensor | None] = {layer: None for layer in self.layers}  # (1,)
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

    def on_forward(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        self._current = forward_inputs(self.forward_calls, args, kwargs)
        self.forward_calls += 1

    def on_forward_end(self, module: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
        self._current = None

    def valid_for(self, inputs: ForwardInputs, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """``valid`` of a call as ``(long (T,), bool (T, 1))`` on ``device``, built once per call."""
        cached = self._valid_cache
        if cached is not None and cached[0] is inputs and cached[1] == device:
            return cached[2], cached[3]
        valid = inputs.valid.to(device)  # (T,)
        out = (valid.long(), valid.unsqueeze(-1))
        self._valid_cache = (inputs, device, *out)
        return out

    def valid_rows(self, rows: int, device: torch.device) -> torch.Tensor | None:
        """The current call's ``valid (T,)`` bool (False at padding), or None when unknown (every row counts)."""
        inputs = self._current
        return None if inputs is None or inputs.num_rows != rows else self.valid_for(inputs, device)[1].reshape(-1)

    def record(self, layer: int, selection: Selection, logits: torch.Tensor) -> torch.Tensor:
        """Add one layer's selection of ``logits (T, E)`` to the aggregates; returns indices safe to dispatch (T, K)."""
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
        inputs = self.inputs_for(rows, device)
        valid_long, valid_col = self.valid_for(inputs, device)  # (T,), (T, 1)
        hist, experts, faults = self.buffers(layer, width, device)
        weights = selection.weights.reshape(rows, width)  # (T, K)
        safe = aggregate(hist, experts, faults, counts, indices, weights, valid_long, valid_col,
                         logits.reshape(rows, -1))
        self.store_tokens(layer, inputs, counts.to(torch.int16))
        return safe

    # -- the pieces of _record (the graphed block forward runs the device part in its graph) ---

    def inputs_for(self, rows: int, device: torch.device) -> ForwardInputs:
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

    def buffers(self, layer: int, width: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The layer's aggregate buffers ``hist (>= K+1,)``, ``experts (E,)`` and ``faults (1,)`` on ``device``."""
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
        faults = self._faults[layer]
        if faults is None or faults.device != device:
            fresh = torch.zeros(1, dtype=torch.long, device=device)
            faults = fresh if faults is None else _grow_add(fresh, faults)
        self._faults[layer] = faults
        return hist, experts, faults

    def store_tokens(self, layer: int, inputs: ForwardInputs, counts16: torch.Tensor) -> None:
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

    def invalid_tokens(self) -> dict[int, int]:
        """Per layer, the valid tokens whose selection was broken (one synchronisation).

        See :func:`aggregate` for what counts as broken; :func:`route` raises when any is non-zero.
        """
        layers = [layer for layer in self.layers if self._faults[layer] is not None]
        if not layers:
            return {}
        values = torch.cat([self._faults[layer].cpu() for layer in layers]).tolist()
        return dict(zip(layers, values))

    def raise_on_invalid(self) -> None:
        """Raise ``ValueError`` naming the layers where the selector returned broken selections."""
        bad = {layer: n for layer, n in self.invalid_tokens().items() if n}
        if bad:
            where = ", ".join(f"layer {layer}: {n}" for layer, n in bad.items())
            raise ValueError(
                f"the selector returned broken selections for some tokens ({where}): non-finite router logits "
                "(NaN or inf: float16 overflow in the hidden states?), expert ids outside [-1, num_experts), NaN, "
                "infinite or negative weights, or counts that disagree with the used slots. The outputs computed "
                "inside this `route` are wrong. Build the selector with validate=True to stop at the first one."
            )

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
            ``activation_ratio``, ``truncated``, ``invalid_tokens`` (tokens whose selection was
            broken; :func:`route` raises on them), ``bound_warning`` (:func:`bound_warning`: a sentence
            when most tokens of a layer sit at ``min_k`` or ``max_k``, also issued as a
            :class:`BoundWarning`; else None), and ``per_layer``: ``{layer: {...}}`` with the
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
            stats["invalid_tokens"] = int(self._faults[layer].sum())
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
            "invalid_tokens": sum(s["invalid_tokens"] for s in per_layer.values()),
            "bound_warning": self._bound_warning(per_layer),
            "per_layer": per_layer,
        }

    def _bound_warning(self, per_layer: dict[int, dict[str, Any]]) -> str | None:
        """:func:`bound_warning` of the routed layers (also issued as a :class:`BoundWarning`)."""
        if not hasattr(self.selector, "alpha"):  # BH and its relatives only: top-k and top-p sit at k by design
            return None
        ceilings = set(self._ceiling.values())
        text = bound_warning({layer: (s["floor_rate"], s["ceiling_rate"]) for layer, s in per_layer.items()},
                             self.floor, ceilings.pop() if len(ceilings) == 1 else None)
        if text:
            import warnings

            warnings.warn(f"{self.selector!r}: {text}", BoundWarning, stacklevel=3)
        return text

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
