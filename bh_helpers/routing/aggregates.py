"""The device-side aggregates of one routed layer and the always-on router-logit screen.

Both run inside the patched block's forward (eagerly or inside a CUDA graph), so neither may
synchronise with the host: counts and faults are added into device tensors that
:class:`~bh_helpers.routing.recorder.RoutingRecorder` reads when asked, and :func:`route` raises on
the faults when it exits.
"""

from __future__ import annotations

import torch

__all__ = ["aggregate", "non_finite_rows"]


def non_finite_rows(logits: torch.Tensor) -> torch.Tensor:
    """``(T,)`` True where a token's router logits ``(T, E)`` hold a NaN or +inf, or are -inf for every expert.

    The always-on screen of :func:`aggregate`: one reduction, no host synchronisation. Its own
    function so that ``benchmarks/k_scaling.py`` can time a forward without it.
    """
    return ~torch.isfinite(logits.amax(dim=-1))  # (T,) max: NaN/+inf if any, -inf only if all


def aggregate(hist: torch.Tensor, experts: torch.Tensor, faults: torch.Tensor, counts: torch.Tensor,
              indices: torch.Tensor, weights: torch.Tensor, valid_long: torch.Tensor,
              valid_col: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    """Exact aggregates of one layer, in place, without a host synchronisation (graph-capturable).

    Also the always-on screen: ``faults (1,)`` counts the valid tokens whose router logits
    ``(T, E)`` are non-finite (NaN or +inf, or -inf for every expert: ``validate=True``'s rule;
    screened themselves, as uniform and inverse-p weights stay finite for a NaN row) or whose
    selection is broken (an expert id outside ``[-1, E)``, a used slot with a NaN, infinite or
    negative weight, a count that disagrees with the used slots); :func:`route` raises on them
    when it exits. Repeated experts are found only in validate mode (they need a sort).

    Returns
    -------
    torch.Tensor
        ``indices (T, K)`` with out-of-range ids replaced by ``-1``: safe to dispatch (an id past
        the expert bank would read out of bounds on the GPU before the error could be raised).
    """
    width, num_experts = indices.shape[-1], experts.shape[0]
    used = indices >= 0  # (T, K)
    bad_id = (indices < -1) | (indices >= num_experts)  # (T, K)
    bad_weight = used & ~((weights >= 0) & (weights < float("inf")))  # (T, K): NaN fails both tests
    bad_logits = non_finite_rows(logits)  # (T,)
    broken = (bad_id | bad_weight).any(dim=-1) | (counts != used.sum(dim=-1)) | bad_logits  # (T,)
    faults.add_((broken.long() * valid_long).sum())  # (1,) a device add: no synchronisation
    safe = indices.masked_fill(bad_id, -1)  # (T, K)
    hist.scatter_add_(0, counts.clamp(0, width), valid_long)  # (K+1,)
    used = ((safe >= 0) & valid_col).reshape(-1).long()  # (T*K,) 1 at valid slots of kept rows
    experts.scatter_add_(0, safe.clamp(min=0).reshape(-1), used)  # (E,)
    return safe
