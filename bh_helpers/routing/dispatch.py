"""Variable-k expert dispatch: run only the selected (token, expert) pairs on a model's experts.

This is the plain-torch reference path. transformers' own expert dispatch
(``config._experts_implementation`` = "eager", "batched_mm", "grouped_mm") expects a fixed
``[T, k]`` index with every slot valid; a variable-k selection would need a sentinel index in
the unused slots, and sentinels are not safe there (measured on an H100 with torch 2.11 and
transformers 5.23: NaN logits in "grouped_mm", a device-side index assert in "batched_mm"; README.md,
"Routing in the model"). So the selection is flattened to its valid pairs and
dispatched here, and no transformers expert code is ever called with it.

Algorithm: flatten the valid (token, slot) pairs, sort them by expert, gather their rows, run
:func:`expert_mlp` (for every expert that received at least one row: up/gate projection ->
activation -> down projection), scale by the mixing weights and ``index_add_`` into a float32
accumulator. The loop is over experts (at most E iterations, one host synchronisation for the
group sizes), never over tokens. :func:`expert_mlp` is THE per-expert loop of the package: the T4
path's :func:`~bh_helpers.routing.turing.looped_dispatch_experts` runs it too, with another sort
and another weighted sum.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

__all__ = ["check_dispatch_inputs", "dispatch_experts", "expert_mlp", "flatten_selection", "needs_autograd"]


def flatten_selection(
    indices: torch.Tensor, weights: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The valid (token, expert, weight) triples of a selection, sorted by expert.

    Parameters
    ----------
    indices : torch.LongTensor, shape ``[T, K]``
        Expert ids, ``-1`` (or any negative value) at unused slots.
    weights : torch.Tensor, shape ``[T, K]``
        Mixing weights.

    Returns
    -------
    token : torch.LongTensor, shape ``[S]``
        Token row of each pair (S = number of valid slots), grouped by expert.
    expert : torch.LongTensor, shape ``[S]``
        Expert id of each pair, non-decreasing.
    weight : torch.Tensor, shape ``[S]``
        Mixing weight of each pair.
    order : torch.LongTensor, shape ``[S]``
        Flat slot index (``t * K + k``) of each pair, for callers that need the original slots.
    """
    flat_idx = indices.reshape(-1)  # (T*K,)
    valid = flat_idx >= 0  # (T*K,)
    slots = valid.nonzero().squeeze(-1)  # (S,) flat slot ids, row-major
    expert = flat_idx.index_select(0, slots)  # (S,)
    # Stable sort keeps tokens in increasing order inside each expert's group.
    expert, perm = torch.sort(expert, stable=True)  # (S,), (S,)
    slots = slots.index_select(0, perm)  # (S,)
    token = torch.div(slots, indices.shape[-1], rounding_mode="floor")  # (S,)
    weight = weights.reshape(-1).index_select(0, slots)  # (S,)
    return token, expert, weight, slots


def check_dispatch_inputs(hidden: torch.Tensor, indices: torch.Tensor, weights: torch.Tensor) -> None:
    """Raise ValueError unless ``hidden`` is ``[T, H]`` and ``indices``/``weights`` are both ``[T, K]``."""
    if hidden.dim() != 2:
        raise ValueError(f"`hidden` must be [T, H]; got shape {tuple(hidden.shape)}.")
    if indices.shape != weights.shape or indices.dim() != 2 or indices.shape[0] != hidden.shape[0]:
        raise ValueError(
            f"`indices` {tuple(indices.shape)} and `weights` {tuple(weights.shape)} must both be "
            f"[T, K] with T = {hidden.shape[0]} (the rows of `hidden`)."
        )


def needs_autograd(experts: nn.Module, hidden: torch.Tensor) -> bool:
    """Whether gradients must flow through a dispatch (only this reference path has a backward)."""
    return torch.is_grad_enabled() and (experts.gate_up_proj.requires_grad or hidden.requires_grad)


def _gate_activation(experts: nn.Module, proj: torch.Tensor) -> torch.Tensor:
    """The gated activation ``act(gate) * up`` of a ``[S, 2I]`` gate-up projection."""
    apply_gate = getattr(experts, "_apply_gate", None)
    if apply_gate is not None:
        # transformers' own per-family gating (handles interleaved layouts and custom gates).
        return apply_gate(proj)  # (S, I)
    gate, up = proj.chunk(2, dim=-1)  # (S, I), (S, I)
    return experts.act_fn(gate) * up  # (S, I)


def expert_mlp(experts: nn.Module, hidden: torch.Tensor, rows: torch.Tensor, sizes: list[int]) -> torch.Tensor:
    """Each expert's MLP on the rows routed to it: the per-expert loop.

    Parameters
    ----------
    experts : nn.Module
        A transformers v5 experts bank (see :func:`dispatch_experts`).
    hidden : torch.Tensor, shape ``[T, H]``
        The block input.
    rows : torch.LongTensor, shape ``[S]``
        Rows of ``hidden`` grouped by expert in id order: the first ``sizes[0]`` go to expert 0,
        the next ``sizes[1]`` to expert 1, and so on (entries past ``sum(sizes)`` are ignored).
    sizes : list of int
        Rows per expert (a host list: the caller's one synchronisation).

    Returns
    -------
    torch.Tensor, shape ``[sum(sizes), H]``
        The expert outputs, in the order of ``rows``; differentiable (no ``out=``). Each group is
        gathered on its own, so gradients into ``hidden`` add up expert by expert.
    """
    transposed = bool(getattr(experts, "is_transposed", False))
    has_bias = bool(getattr(experts, "has_bias", False))
    parts = []
    start = 0
    for e, n in enumerate(sizes):
        if n == 0:
            continue
        x = hidden.index_select(0, rows[start : start + n])  # (n, H)
        w_up = experts.gate_up_proj[e]  # (2I, H) or (H, 2I)
        proj = x @ w_up if transposed else F.linear(x, w_up)  # (n, 2I)
        if has_bias:
            proj = proj + experts.gate_up_proj_bias[e]  # (n, 2I)
        act = _gate_activation(experts, proj)  # (n, I)
        w_down = experts.down_proj[e]  # (H, I) or (I, H)
        y = act @ w_down if transposed else F.linear(act, w_down)  # (n, H)
        if has_bias:
            y = y + experts.down_proj_bias[e]  # (n, H)
        parts.append(y)
        start += n
    return torch.cat(parts)  # (S, H)


def dispatch_experts(
    experts: nn.Module,
    hidden: torch.Tensor,
    indices: torch.Tensor,
    weights: torch.Tensor,
) -> torch.Tensor:
    """Mixture output of the selected experts for every token.

    ``out[t] = sum_k weights[t, k] * expert_{indices[t, k]}(hidden[t])`` over the valid slots
    (``indices >= 0``); a token with no valid slot gets zeros.

    Parameters
    ----------
    experts : nn.Module
        A transformers v5 experts bank: ``gate_up_proj`` ``[E, 2I, H]`` (``[E, H, 2I]`` when
        ``is_transposed``), ``down_proj`` ``[E, H, I]`` (``[E, I, H]``), optional
        ``gate_up_proj_bias`` / ``down_proj_bias`` when ``has_bias``, and ``act_fn``.
    hidden : torch.Tensor, shape ``[T, H]``
        Block input, any float dtype.
    indices : torch.LongTensor, shape ``[T, K]``
        Selected expert ids, ``-1`` at unused slots (K may exceed the model's native top-k).
    weights : torch.Tensor, shape ``[T, K]``
        Mixing weights (0 at unused slots).

    Returns
    -------
    torch.Tensor, shape ``[T, H]``, dtype of ``hidden``
        Accumulated in float32 and cast once at the end.

    Raises
    ------
    ValueError
        When shapes disagree, an index is ``>= E``, or the experts bank has a layout this
        reference path does not implement (no gate, or a post-expert norm).
    """
    # Input validation
    check_dispatch_inputs(hidden, indices, weights)
    if not getattr(experts, "has_gate", True) or getattr(experts, "has_post_expert_norm", False):
        raise ValueError(
            f"{type(experts).__name__} has a layout (no gate or a post-expert norm) that "
            "bh_helpers.routing.dispatch does not implement."
        )
    num_experts = experts.gate_up_proj.shape[0]

    # Main algorithm
    token, expert, weight, _ = flatten_selection(indices, weights)  # (S,) each
    out = torch.zeros(hidden.shape, dtype=torch.float32, device=hidden.device)  # (T, H)
    if token.numel() == 0:
        return out.to(hidden.dtype)
    group_sizes = torch.bincount(expert, minlength=num_experts)  # (E,)
    if group_sizes.numel() > num_experts:
        raise ValueError(f"`indices` contains an expert id >= num_experts={num_experts}.")
    sizes = group_sizes.tolist()  # one host synchronisation for all group boundaries
    y = expert_mlp(experts, hidden, token, sizes)  # (S, H) grouped by expert
    out.index_add_(0, token, y.float() * weight[:, None].float())  # in expert order, as the loop runs
    return out.to(hidden.dtype)
