"""Which variable-k dispatch runs where (one place decides).

======================================  =============================================================
where                                   dispatch
======================================  =============================================================
CUDA, compute capability >= 8, bf16     :mod:`bh_helpers.routing.grouped` (``torch._grouped_mm``)
other CUDA (T4: sm_75, float16), up to  :func:`bh_helpers.routing.turing.gemv_dispatch_experts`
``GEMV_MAX_TOKENS`` tokens (decode)     (sync-free, two Triton GEMV kernels)
other CUDA, more tokens (prefill)       :func:`bh_helpers.routing.turing.tiled_dispatch_experts`
                                        (sync-free, two Triton grouped-GEMM kernels)
other CUDA, layouts those two lack      :func:`bh_helpers.routing.turing.looped_dispatch_experts`
(biases, other gates)                   (per-expert ``torch.mm``, one host synchronisation)
CPU, anything else                      :func:`bh_helpers.routing.dispatch.dispatch_experts` (the reference)
======================================  =============================================================

The capability is read through :func:`bh_helpers._cuda.device_capability`, so
``BH_ROUTING_CUDA_CAPABILITY=7.5`` takes the T4 rows on any GPU.
"""

from __future__ import annotations

import torch
from torch import nn

from bh_helpers.routing.dispatch import dispatch_experts, needs_autograd
from bh_helpers.routing.grouped import grouped_dispatch_experts, grouped_mm_supported
from bh_helpers.routing.turing import (
    GEMV_MAX_TOKENS,
    gemv_dispatch_experts,
    gemv_supported,
    looped_dispatch_experts,
    tiled_dispatch_experts,
)

__all__ = ["fast_dispatch_experts", "sync_free_dispatch", "sync_free_supported"]


def _grouped(experts: nn.Module, device: torch.device) -> bool:
    """Whether the grouped-GEMM dispatch runs this bank on ``device`` (sm80+, bf16, gated, no post norm)."""
    return (
        grouped_mm_supported(device, experts.gate_up_proj.dtype)
        and getattr(experts, "has_gate", True)
        and not getattr(experts, "has_post_expert_norm", False)
    )


def sync_free_supported(experts: nn.Module, device: torch.device) -> bool:
    """Whether a host-sync-free (CUDA-graph capturable) dispatch exists for this bank on ``device``."""
    # the GEMV and tiled variants are both sync-free and cover the same layouts
    return _grouped(experts, device) or (device.type == "cuda" and gemv_supported(experts, device))


def sync_free_dispatch(experts: nn.Module, hidden: torch.Tensor, indices: torch.Tensor,
                       weights: torch.Tensor) -> torch.Tensor:
    """The sync-free dispatch where :func:`sync_free_supported` holds (called inside CUDA graphs)."""
    if _grouped(experts, hidden.device):
        return grouped_dispatch_experts(experts, hidden, indices, weights, variant="sync_free", use_graphs=False)
    if hidden.shape[0] <= GEMV_MAX_TOKENS:
        return gemv_dispatch_experts(experts, hidden, indices, weights)
    return tiled_dispatch_experts(experts, hidden, indices, weights)


def fast_dispatch_experts(experts: nn.Module, hidden: torch.Tensor, indices: torch.Tensor,
                          weights: torch.Tensor) -> torch.Tensor:
    """Automatic choice of dispatch (table in the module docstring).

    Drop-in for :func:`bh_helpers.routing.dispatch.dispatch_experts` (same signature and contract).
    """
    device = hidden.device
    if needs_autograd(experts, hidden):
        return dispatch_experts(experts, hidden, indices, weights)  # the fast paths have no backward
    if _grouped(experts, device):
        return grouped_dispatch_experts(experts, hidden, indices, weights)
    if device.type == "cuda":
        if gemv_supported(experts, device):
            return sync_free_dispatch(experts, hidden, indices, weights)  # GEMV or tiled
        return looped_dispatch_experts(experts, hidden, indices, weights)
    return dispatch_experts(experts, hidden, indices, weights)
