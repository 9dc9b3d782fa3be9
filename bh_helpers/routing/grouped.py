"""Fast variable-k expert dispatch: grouped GEMMs over the selected (token, expert) pairs only.

Same contract as :func:`bh_helpers.routing.dispatch.dispatch_experts` (the plain-torch reference, which
stays the path on CPU and the oracle in tests):
``out[t] = sum_k weights[t, k] * expert_{indices[t, k]}(hidden[t])`` over the valid slots
(``indices >= 0``), accumulated in float32 and cast once.

How it works on CUDA (bf16/fp16 weights, ``torch._grouped_mm`` present, compute capability >= 8.0):

1. the slot ids are sorted by expert with the unused slots (``-1``) mapped to a sentinel ``E``, so
   they sort to the tail; ``histc`` drops the sentinel from the group sizes and their cumulative
   sum (int32) is the ``offs`` of ``torch._grouped_mm``;
2. gate-up grouped GEMM -> gated activation -> down grouped GEMM, each over the valid rows only
   (rows past ``offs[-1]`` are never computed and never read);
3. one Triton kernel gathers, for every token, its up-to-K result rows, multiplies by the
   mixing weights and sums them in float32 (no ``[T*K, H]`` float32 buffer, no atomics).

Two variants of step 1-2:

- ``sync_free`` (decode and evaluation-sized prefill): every buffer has the static size ``T*K``;
  no ``.item()``, ``nonzero`` or ``tolist`` anywhere, so the dispatch can be captured in a CUDA
  graph (``use_graphs`` for decode sizes; ``route`` captures whole blocks). The row gather and
  the ``silu(gate) * up`` activation are Triton kernels whose programs past the valid pairs
  (``offs[-1]``, read on the device) exit at once, and the grouped GEMMs stop at ``offs[-1]``,
  so the work follows the selected pairs, not ``T*K``.
- ``compact`` (large prefill, from ``COMPACT_MIN_PAIRS`` slots): one host synchronisation per
  call reads the number of valid pairs ``S`` so the intermediate buffers are ``S`` rows, not ``T*K``.

Without grouped GEMMs (Turing T4 sm_75, float16 weights) :mod:`bh_helpers.routing.turing` runs instead,
and the reference on CPU; :mod:`bh_helpers.routing.auto` makes that choice.
"""

from __future__ import annotations

import weakref
from typing import Any

import torch
from torch import nn

from bh_helpers._cuda import capture_stream, device_capability, on_device
from bh_helpers.routing.dispatch import _gate_activation, check_dispatch_inputs

__all__ = [
    "COMPACT_MIN_PAIRS",
    "GRAPH_MAX_PAIRS",
    "clear_graphs",
    "grouped_dispatch_experts",
    "grouped_mm_supported",
]

#: From this many slots (T*K) on, the "compact" variant is used: its buffers hold the valid pairs
#: only (one host synchronisation reads how many); below, the sync-free variant's static
#: ``T*K``-row buffers (about 12 KiB per slot at OLMoE's shape) are cheap and its work follows the
#: valid pairs all the same.
COMPACT_MIN_PAIRS = 65536
#: Up to this many slots the sync-free variant is captured in a CUDA graph.
GRAPH_MAX_PAIRS = 1024

try:
    import triton
    import triton.language as tl

    HAS_TRITON = True
except ImportError:  # pragma: no cover - depends on the environment
    HAS_TRITON = False


def grouped_mm_supported(device: torch.device | str, dtype: torch.dtype) -> bool:
    """Whether ``torch._grouped_mm`` runs for ``dtype`` weights on ``device``."""
    device = torch.device(device)
    if device.type != "cuda" or not hasattr(torch, "_grouped_mm") or dtype != torch.bfloat16:
        return False
    major, _ = device_capability(device)
    return major >= 8


if HAS_TRITON:

    @triton.jit
    def _combine_kernel(y_ptr, pos_ptr, idx_ptr, w_ptr, out_ptr, H, K: tl.constexpr, BLOCK_H: tl.constexpr):
        """out[t, h] = sum_k w[t, k] * y[pos[t, k], h] over slots with idx[t, k] >= 0 (float32)."""
        t = tl.program_id(0).to(tl.int64)
        cols = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
        cmask = cols < H
        acc = tl.zeros([BLOCK_H], dtype=tl.float32)
        for k in tl.static_range(K):
            e = tl.load(idx_ptr + t * K + k)
            if e >= 0:
                p = tl.load(pos_ptr + t * K + k).to(tl.int64)
                w = tl.load(w_ptr + t * K + k).to(tl.float32)
                y = tl.load(y_ptr + p * H + cols, mask=cmask, other=0.0).to(tl.float32)
                acc += w * y
        tl.store(out_ptr + t * H + cols, acc.to(out_ptr.dtype.element_ty), mask=cmask)


    @triton.jit
    def _gather_valid_rows_kernel(x_ptr, perm_ptr, n_valid_ptr, out_ptr, H, K: tl.constexpr, BLOCK_H: tl.constexpr):
        """out[r] = x[perm[r] // K] for the sorted rows r < n_valid (the valid pairs); others untouched."""
        r = tl.program_id(0).to(tl.int64)
        if r < tl.load(n_valid_ptr):
            t = tl.load(perm_ptr + r) // K
            cols = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)  # (BLOCK_H,)
            cmask = cols < H
            row = tl.load(x_ptr + t * H + cols, mask=cmask, other=0.0)
            tl.store(out_ptr + r * H + cols, row.to(out_ptr.dtype.element_ty), mask=cmask)

    @triton.jit
    def _silu_gate_valid_rows_kernel(proj_ptr, n_valid_ptr, act_ptr, I, BLOCK_I: tl.constexpr):
        """act[r] = silu(proj[r, :I]) * proj[r, I:] for the rows r < n_valid (float32 math, one rounding)."""
        r = tl.program_id(0).to(tl.int64)
        if r < tl.load(n_valid_ptr):
            cols = tl.program_id(1) * BLOCK_I + tl.arange(0, BLOCK_I)  # (BLOCK_I,)
            cmask = cols < I
            gate = tl.load(proj_ptr + r * 2 * I + cols, mask=cmask, other=0.0).to(tl.float32)
            up = tl.load(proj_ptr + r * 2 * I + I + cols, mask=cmask, other=0.0).to(tl.float32)
            act = gate / (1.0 + tl.exp(-gate)) * up
            tl.store(act_ptr + r * I + cols, act.to(act_ptr.dtype.element_ty), mask=cmask)


def is_default_silu_gate(experts: nn.Module) -> bool:
    """Whether the experts compute ``silu(gate) * up`` on a concatenated ``[gate; up]`` projection."""
    try:
        from transformers.integrations.moe import _default_apply_gate
    except ImportError:  # pragma: no cover - depends on the transformers version
        return False
    apply_gate = getattr(type(experts), "_apply_gate", None)
    act = getattr(experts, "act_fn", None)
    return (
        apply_gate is _default_apply_gate
        and getattr(experts, "is_concatenated", True)
        and "silu" in type(act).__name__.lower()
    )


def _combine(y: torch.Tensor, pos: torch.Tensor, indices: torch.Tensor, weights: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Weighted per-token sum of the rows ``y[pos[t, k]]`` of the valid slots."""
    n_tokens, k = indices.shape
    hidden = y.shape[-1]
    if HAS_TRITON and y.is_cuda:
        out = torch.empty((n_tokens, hidden), dtype=dtype, device=y.device)
        block_h = 1024 if hidden >= 1024 else triton.next_power_of_2(hidden)
        grid = (n_tokens, triton.cdiv(hidden, block_h))
        with on_device(y.device):
            _combine_kernel[grid](y, pos, indices, weights.float().contiguous(), out, hidden, K=k, BLOCK_H=block_h,
                                  num_warps=4)
        return out
    # Plain torch: gather [T, K, H] (only used off CUDA)
    valid = indices >= 0  # (T, K)
    rows = y.index_select(0, pos.clamp(0, y.shape[0] - 1).reshape(-1)).reshape(n_tokens, k, hidden).float()
    # where, not a product: rows of unused slots may be uninitialised memory (0 * NaN = NaN)
    rows = torch.where(valid[..., None], rows, 0.0)  # (T, K, H)
    return (rows * weights.float()[..., None]).sum(1).to(dtype)


def _project(experts: nn.Module, x_g: torch.Tensor, ids_g: torch.Tensor, offs: torch.Tensor,
             n_valid: torch.Tensor | None = None) -> torch.Tensor:
    """gate-up GEMM -> activation -> down GEMM over the grouped rows ``x_g`` (valid rows first).

    ``n_valid`` (a device scalar, ``offs[-1:]``) is given when ``x_g`` has rows past the valid ones
    (the sync-free variant): the default ``silu(gate) * up`` then runs on the valid rows only.
    """
    transposed = bool(getattr(experts, "is_transposed", False))
    has_bias = bool(getattr(experts, "has_bias", False))
    w_up = experts.gate_up_proj if transposed else experts.gate_up_proj.transpose(-2, -1)  # (E, H, 2I)
    proj = torch._grouped_mm(x_g, w_up, offs=offs)  # (S, 2I); rows past offs[-1] not computed
    if has_bias:
        proj = proj + experts.gate_up_proj_bias[ids_g.clamp(max=experts.gate_up_proj.shape[0] - 1)]
    if n_valid is not None and proj.is_cuda and not has_bias and HAS_TRITON and is_default_silu_gate(experts):
        inter = proj.shape[-1] // 2
        act = torch.empty((proj.shape[0], inter), dtype=proj.dtype, device=proj.device)  # (S, I), tail unused
        block_i = 1024 if inter >= 1024 else triton.next_power_of_2(inter)
        with on_device(proj.device):
            _silu_gate_valid_rows_kernel[(proj.shape[0], triton.cdiv(inter, block_i))](
                proj, n_valid, act, inter, BLOCK_I=block_i, num_warps=4)
    else:
        act = _gate_activation(experts, proj)  # (S, I)
    w_down = experts.down_proj if transposed else experts.down_proj.transpose(-2, -1)  # (E, I, H)
    y = torch._grouped_mm(act, w_down, offs=offs)  # (S, H)
    if has_bias:
        y = y + experts.down_proj_bias[ids_g.clamp(max=experts.down_proj.shape[0] - 1)]
    return y


def _sorted_slots(indices: torch.Tensor, num_experts: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Slots sorted by expert (unused last), their inverse positions and the int32 group offsets."""
    flat = indices.reshape(-1)  # (T*K,)
    ids = torch.where(flat < 0, num_experts, flat)  # sentinel E sorts last
    ids_g, perm = torch.sort(ids)  # (T*K,)
    pos = torch.empty_like(perm)
    pos[perm] = torch.arange(perm.numel(), device=perm.device)  # slot -> row of the grouped buffers
    # histc (not bincount) is CUDA-graph safe; values == E fall outside [0, E-1] and are dropped.
    # (CUDA histc takes integers, CPU histc only floats.)
    values = ids_g.int() if ids_g.is_cuda else ids_g.float()
    sizes = torch.histc(values, bins=num_experts, min=0, max=num_experts - 1)
    offs = torch.cumsum(sizes, dim=0, dtype=torch.int32)  # (E,)
    return ids_g, perm, pos, offs


def _gather_valid_rows(hidden: torch.Tensor, perm: torch.Tensor, k: int, n_valid: torch.Tensor,
                       dtype: torch.dtype) -> torch.Tensor:
    """``hidden[perm // k]`` in ``dtype`` for the first ``n_valid`` sorted slots; the tail is left unset.

    The sync-free gather: its cost follows the valid pairs, not ``T*K`` (the tail programs exit).
    """
    n_slots, hidden_dim = perm.shape[0], hidden.shape[1]
    x_g = torch.empty((n_slots, hidden_dim), dtype=dtype, device=hidden.device)  # (T*K, H)
    if HAS_TRITON and hidden.is_cuda:
        block_h = 1024 if hidden_dim >= 1024 else triton.next_power_of_2(hidden_dim)
        with on_device(hidden.device):
            _gather_valid_rows_kernel[(n_slots, triton.cdiv(hidden_dim, block_h))](
                hidden.contiguous(), perm, n_valid, x_g, hidden_dim, K=k, BLOCK_H=block_h, num_warps=4)
        return x_g
    return hidden.index_select(0, perm // k).to(dtype)  # off CUDA: every row (same values)


def _dispatch_sync_free(experts: nn.Module, hidden: torch.Tensor, indices: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    num_experts = experts.gate_up_proj.shape[0]
    k = indices.shape[1]
    ids_g, perm, pos, offs = _sorted_slots(indices, num_experts)
    n_valid = offs[-1:]  # (1,) int32 on the device: the valid pairs, no host synchronisation
    x_g = _gather_valid_rows(hidden, perm, k, n_valid, experts.gate_up_proj.dtype)  # (T*K, H); tail unset
    y = _project(experts, x_g, ids_g, offs, n_valid)  # (T*K, H); rows past offs[-1] never computed or read
    return _combine(y, pos.reshape(indices.shape), indices, weights, hidden.dtype)


def _dispatch_compact(experts: nn.Module, hidden: torch.Tensor, indices: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    num_experts = experts.gate_up_proj.shape[0]
    k = indices.shape[1]
    ids_g, perm, pos, offs = _sorted_slots(indices, num_experts)
    n_valid = int(offs[-1])  # the one host synchronisation
    if n_valid == 0:
        return torch.zeros_like(hidden)
    ids_g, perm = ids_g[:n_valid], perm[:n_valid]
    x_g = hidden.index_select(0, perm // k).to(experts.gate_up_proj.dtype)  # (S, H)
    y = _project(experts, x_g, ids_g, offs)  # (S, H)
    return _combine(y, pos.reshape(indices.shape), indices, weights, hidden.dtype)


# ----------------------------------------------------------------------------------------------
# CUDA graphs for the decode shapes
# ----------------------------------------------------------------------------------------------


class _GraphedDispatch:
    """The sync-free dispatch of one experts bank for one (T, K, dtype), captured once."""

    def __init__(self, experts: nn.Module, n_tokens: int, k: int, dtype: torch.dtype, device: torch.device, pool: Any) -> None:
        hidden_dim = experts.gate_up_proj.shape[-1] if not getattr(experts, "is_transposed", False) else experts.gate_up_proj.shape[1]
        num_experts = experts.gate_up_proj.shape[0]
        self.hidden = torch.zeros((n_tokens, hidden_dim), dtype=dtype, device=device)
        # Placeholder routing: every expert id appears, so capture sees non-empty groups.
        self.indices = (torch.arange(n_tokens * k, device=device) % num_experts).reshape(n_tokens, k)
        self.weights = torch.zeros((n_tokens, k), dtype=torch.float32, device=device)
        stream = capture_stream(device)
        stream.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(stream):
            for _ in range(2):  # warm-up: Triton compilation, cuBLAS/CUTLASS handles
                _dispatch_sync_free(experts, self.hidden, self.indices, self.weights)
        torch.cuda.current_stream(device).wait_stream(stream)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph, pool=pool):
            self.out = _dispatch_sync_free(experts, self.hidden, self.indices, self.weights)
        self.key = (experts.gate_up_proj.data_ptr(), experts.down_proj.data_ptr())

    def __call__(self, hidden: torch.Tensor, indices: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        self.hidden.copy_(hidden)
        self.indices.copy_(indices)
        self.weights.copy_(weights)
        self.graph.replay()
        return self.out.clone()


_GRAPHS: weakref.WeakKeyDictionary[nn.Module, dict[tuple, _GraphedDispatch]] = weakref.WeakKeyDictionary()
# One memory pool per experts bank (and device), living exactly as long as that bank's graphs: a
# pool handle shared across banks outlived the graphs of a freed model, and the next capture with
# it tripped the caching allocator's "use_count > 0" assert (GPU test run after run_demo).
_POOLS: weakref.WeakKeyDictionary[nn.Module, dict[str, Any]] = weakref.WeakKeyDictionary()


def clear_graphs(experts: nn.Module | None = None) -> None:
    """Forget the captured dispatch graphs of ``experts`` (all of them when None), and their pools.

    ``route`` calls this for every routed block on exit, so graphs captured inside a ``route`` do
    not outlive it (their memory is freed once unreferenced).
    """
    if experts is None:
        _GRAPHS.clear()
        _POOLS.clear()
    else:
        _GRAPHS.pop(experts, None)
        _POOLS.pop(experts, None)


def _graphed(experts: nn.Module, hidden: torch.Tensor, indices: torch.Tensor) -> _GraphedDispatch:
    per_module = _GRAPHS.setdefault(experts, {})
    key = (hidden.shape[0], indices.shape[1], hidden.dtype, str(hidden.device))
    graphed = per_module.get(key)
    weights_key = (experts.gate_up_proj.data_ptr(), experts.down_proj.data_ptr())
    if graphed is None or graphed.key != weights_key:
        pools = _POOLS.setdefault(experts, {})
        pool = pools.setdefault(str(hidden.device), torch.cuda.graph_pool_handle())
        graphed = _GraphedDispatch(experts, hidden.shape[0], indices.shape[1], hidden.dtype, hidden.device, pool)
        per_module[key] = graphed
    return graphed


# ----------------------------------------------------------------------------------------------
# Public entry points
# ----------------------------------------------------------------------------------------------


def grouped_dispatch_experts(
    experts: nn.Module,
    hidden: torch.Tensor,
    indices: torch.Tensor,
    weights: torch.Tensor,
    *,
    variant: str = "auto",
    use_graphs: bool | None = None,
) -> torch.Tensor:
    """Mixture output of the selected experts through grouped GEMMs (CUDA, bf16).

    Parameters
    ----------
    experts, hidden, indices, weights
        As in :func:`bh_helpers.routing.dispatch.dispatch_experts`.
    variant : {"auto", "sync_free", "compact"}
        "auto": "compact" when ``T*K >= COMPACT_MIN_PAIRS``, else "sync_free".
    use_graphs : bool, optional
        Replay a captured CUDA graph for the sync-free variant; default: when ``T*K <=
        GRAPH_MAX_PAIRS``, gradients are off and no stream capture is already running.

    Raises
    ------
    ValueError
        Bad shapes, an unsupported experts layout, or a device/dtype without grouped GEMMs
        (use :func:`fast_dispatch_experts` for the automatic fallback).
    """
    check_dispatch_inputs(hidden, indices, weights)
    if variant not in ("auto", "sync_free", "compact"):
        raise ValueError(f"`variant` must be 'auto', 'sync_free' or 'compact'; got {variant!r}.")
    if not getattr(experts, "has_gate", True) or getattr(experts, "has_post_expert_norm", False):
        raise ValueError(f"{type(experts).__name__} has a layout (no gate or a post-expert norm) that is not implemented.")
    if not grouped_mm_supported(hidden.device, experts.gate_up_proj.dtype):
        raise ValueError(
            f"grouped GEMMs need CUDA (compute capability >= 8.0) and bf16 weights; got {hidden.device}, "
            f"{experts.gate_up_proj.dtype}."
        )
    pairs = indices.numel()
    if pairs == 0:
        return torch.zeros_like(hidden)
    if variant == "auto":
        variant = "compact" if pairs >= COMPACT_MIN_PAIRS else "sync_free"
    if variant == "compact":
        return _dispatch_compact(experts, hidden, indices, weights)
    if use_graphs is None:
        use_graphs = (
            pairs <= GRAPH_MAX_PAIRS
            and not torch.is_grad_enabled()
            and not torch.cuda.is_current_stream_capturing()
        )
    if use_graphs:
        return _graphed(experts, hidden, indices)(hidden, indices, weights)
    return _dispatch_sync_free(experts, hidden, indices, weights)
