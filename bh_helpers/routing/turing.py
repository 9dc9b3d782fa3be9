"""Variable-k expert dispatch for CUDA GPUs without grouped GEMMs (the Colab T4: sm_75, float16).

Same contract as :func:`bh_helpers.routing.dispatch.dispatch_experts` (the plain-torch reference and the
oracle in tests): ``out[t] = sum_k weights[t, k] * expert_{indices[t, k]}(hidden[t])`` over the
valid slots (``indices >= 0``), accumulated in float32 and cast once.

On such a card transformers' own "grouped_mm" becomes ``_grouped_mm_fallback``: slots sorted by
expert, a per-expert ``torch.mm`` loop with a host synchronisation for the group offsets (two per
layer: one per projection). The two variants here do at most that, over the SELECTED pairs only:

- :func:`looped_dispatch_experts` (prefill, many tokens; the layouts the Triton kernels lack):
  slots sorted by expert with unused slots mapped to a sentinel that sorts last, ONE host
  synchronisation per call for the group sizes, the reference's per-expert loop
  (:func:`bh_helpers.routing.dispatch.expert_mlp`) over the valid rows, and the weighted
  per-token sum in one Triton kernel (``grouped._combine``: float32 accumulation, no atomics).
- :func:`gemv_dispatch_experts` (decode, a few tokens): no sort and no host synchronisation, so it
  can be captured in a CUDA graph. Two Triton kernels: (1) per slot, the gate/up rows of its expert
  times the token's hidden state, then ``silu(gate) * up`` (float32); (2) per token, the down rows
  of each of its experts times that activation, weighted and summed in float32. The kernels use
  only loads, multiplies and sums (no ``tl.dot``), so they run on any card Triton supports,
  sm_75 included, and under the Triton interpreter (the CPU test oracle).
"""

from __future__ import annotations

import importlib.util
import os

import torch
from torch import nn

from bh_helpers._cuda import on_device
from bh_helpers.routing.dispatch import check_dispatch_inputs, dispatch_experts, expert_mlp, needs_autograd
from bh_helpers.routing.grouped import _combine, _sorted_slots, is_default_silu_gate

__all__ = [
    "GEMV_MAX_TOKENS",
    "TILE_M",
    "gemv_dispatch_experts",
    "gemv_supported",
    "looped_dispatch_experts",
    "tiled_dispatch_experts",
]

#: Up to this many tokens the sync-free GEMV variant is used (it reads an expert's weights once per
#: slot, the looped variant once per expert: the GEMV wins while slots barely outnumber experts).
GEMV_MAX_TOKENS = 16
#: Rows per tile of the tiled (grouped GEMM) variant: one expert per tile.
TILE_M = 64

HAS_TRITON = importlib.util.find_spec("triton") is not None

if HAS_TRITON:
    import triton
    import triton.language as tl

    @triton.jit
    def _gate_up_kernel(
        x_ptr, idx_ptr, w_ptr, act_ptr,
        stride_we, stride_wo, stride_wh,
        H: tl.constexpr, I: tl.constexpr, K: tl.constexpr, BLOCK_I: tl.constexpr, BLOCK_H: tl.constexpr,
    ):
        """act[s, i] = silu(W[e, i, :] . x[t]) * (W[e, I + i, :] . x[t]) for slot s = t*K + k (float32)."""
        s = tl.program_id(0).to(tl.int64)
        e = tl.load(idx_ptr + s)
        if e >= 0:
            t = s // K
            rows = tl.program_id(1) * BLOCK_I + tl.arange(0, BLOCK_I)  # (BLOCK_I,)
            rmask = rows < I
            w_base = w_ptr + e.to(tl.int64) * stride_we
            acc_g = tl.zeros([BLOCK_I], dtype=tl.float32)
            acc_u = tl.zeros([BLOCK_I], dtype=tl.float32)
            for h0 in range(0, H, BLOCK_H):
                cols = h0 + tl.arange(0, BLOCK_H)  # (BLOCK_H,)
                cmask = cols < H
                x = tl.load(x_ptr + t * H + cols, mask=cmask, other=0.0).to(tl.float32)  # (BLOCK_H,)
                m2 = rmask[:, None] & cmask[None, :]
                offs = rows[:, None] * stride_wo + cols[None, :] * stride_wh  # (BLOCK_I, BLOCK_H)
                wg = tl.load(w_base + offs, mask=m2, other=0.0).to(tl.float32)
                wu = tl.load(w_base + I * stride_wo + offs, mask=m2, other=0.0).to(tl.float32)
                acc_g += tl.sum(wg * x[None, :], axis=1)
                acc_u += tl.sum(wu * x[None, :], axis=1)
            act = acc_g / (1.0 + tl.exp(-acc_g)) * acc_u  # silu(gate) * up
            tl.store(act_ptr + s * I + rows, act, mask=rmask)

    # Its loop over a token's K slots looks like grouped._combine_kernel's, but only the loop
    # header is shared: here each slot's down projection is computed inside the loop (fused for
    # decode sizes), there each slot reads a finished GEMM row. Kept as two kernels: a shared
    # jitted helper would take the per-slot body as a constexpr function for three common lines.
    @triton.jit
    def _down_combine_kernel(
        act_ptr, idx_ptr, wt_ptr, d_ptr, out_ptr,
        stride_de, stride_do, stride_di,
        H: tl.constexpr, I: tl.constexpr, K: tl.constexpr, BLOCK_O: tl.constexpr, BLOCK_I: tl.constexpr,
    ):
        """out[t, o] = sum_k wt[t, k] * (D[e_k, o, :] . act[t*K + k]) over valid slots (float32)."""
        t = tl.program_id(0).to(tl.int64)
        rows = tl.program_id(1) * BLOCK_O + tl.arange(0, BLOCK_O)  # (BLOCK_O,)
        rmask = rows < H
        acc = tl.zeros([BLOCK_O], dtype=tl.float32)
        for k in tl.static_range(K):
            e = tl.load(idx_ptr + t * K + k)
            if e >= 0:
                wt = tl.load(wt_ptr + t * K + k).to(tl.float32)
                d_base = d_ptr + e.to(tl.int64) * stride_de
                inner = tl.zeros([BLOCK_O], dtype=tl.float32)
                for i0 in range(0, I, BLOCK_I):
                    cols = i0 + tl.arange(0, BLOCK_I)  # (BLOCK_I,)
                    cmask = cols < I
                    a = tl.load(act_ptr + (t * K + k) * I + cols, mask=cmask, other=0.0)  # (BLOCK_I,)
                    d = tl.load(d_base + rows[:, None] * stride_do + cols[None, :] * stride_di,
                                mask=rmask[:, None] & cmask[None, :], other=0.0).to(tl.float32)
                    inner += tl.sum(d * a[None, :], axis=1)
                acc += wt * inner
        tl.store(out_ptr + t * H + rows, acc.to(out_ptr.dtype.element_ty), mask=rmask)

    @triton.jit
    def _grouped_up_kernel(
        x_ptr, tok_ptr, w_ptr, act_ptr, tile_e_ptr, tile_r0_ptr, tile_r1_ptr,
        stride_we, stride_wo, stride_wh,
        E: tl.constexpr, H: tl.constexpr, I: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    ):
        """act[r, n] = silu(x[tok[r]] . W[e, n]) * (x[tok[r]] . W[e, I + n]) for the rows r of one tile."""
        tile = tl.program_id(0)
        e = tl.load(tile_e_ptr + tile)
        if e < E:  # tiles past the last expert's rows have nothing to do
            rows = tl.load(tile_r0_ptr + tile) + tl.arange(0, BLOCK_M)  # (BM,) sorted-slot rows
            rmask = rows < tl.load(tile_r1_ptr + tile)
            tok = tl.load(tok_ptr + rows, mask=rmask, other=0).to(tl.int64)  # (BM,) token of each row
            cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)  # (BN,)
            cmask = cols < I
            w_base = w_ptr + e.to(tl.int64) * stride_we
            acc_g = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
            acc_u = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
            for k0 in range(0, H, BLOCK_K):
                ks = k0 + tl.arange(0, BLOCK_K)  # (BK,)
                kmask = ks < H
                a = tl.load(x_ptr + tok[:, None] * H + ks[None, :], mask=rmask[:, None] & kmask[None, :], other=0.0)
                b_off = cols[None, :] * stride_wo + ks[:, None] * stride_wh  # (BK, BN)
                bmask = kmask[:, None] & cmask[None, :]
                bg = tl.load(w_base + b_off, mask=bmask, other=0.0)
                bu = tl.load(w_base + I * stride_wo + b_off, mask=bmask, other=0.0)
                acc_g = tl.dot(a, bg, acc_g)  # (BM, BN) float32
                acc_u = tl.dot(a, bu, acc_u)
            act = acc_g / (1.0 + tl.exp(-acc_g)) * acc_u  # silu(gate) * up
            tl.store(act_ptr + rows.to(tl.int64)[:, None] * I + cols[None, :],
                     act.to(act_ptr.dtype.element_ty), mask=rmask[:, None] & cmask[None, :])

    @triton.jit
    def _grouped_down_kernel(
        act_ptr, w_ptr, y_ptr, tile_e_ptr, tile_r0_ptr, tile_r1_ptr,
        stride_we, stride_wo, stride_wi,
        E: tl.constexpr, H: tl.constexpr, I: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    ):
        """y[r, n] = act[r] . D[e, n] for the rows r of one tile (rows in sorted-slot order)."""
        tile = tl.program_id(0)
        e = tl.load(tile_e_ptr + tile)
        if e < E:
            rows = tl.load(tile_r0_ptr + tile) + tl.arange(0, BLOCK_M)  # (BM,)
            rmask = rows < tl.load(tile_r1_ptr + tile)
            rows64 = rows.to(tl.int64)
            cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)  # (BN,)
            cmask = cols < H
            w_base = w_ptr + e.to(tl.int64) * stride_we
            acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
            for k0 in range(0, I, BLOCK_K):
                ks = k0 + tl.arange(0, BLOCK_K)  # (BK,)
                kmask = ks < I
                a = tl.load(act_ptr + rows64[:, None] * I + ks[None, :], mask=rmask[:, None] & kmask[None, :], other=0.0)
                b = tl.load(w_base + cols[None, :] * stride_wo + ks[:, None] * stride_wi,
                            mask=kmask[:, None] & cmask[None, :], other=0.0)
                acc = tl.dot(a, b, acc)
            tl.store(y_ptr + rows64[:, None] * H + cols[None, :], acc.to(y_ptr.dtype.element_ty),
                     mask=rmask[:, None] & cmask[None, :])


def gemv_supported(experts: nn.Module, device: torch.device) -> bool:
    """Whether :func:`gemv_dispatch_experts` implements this experts bank on ``device``.

    Needs Triton, CUDA (or the Triton interpreter on CPU), gated experts with the default
    ``silu(gate) * up`` activation, no biases and no post-expert norm.
    """
    on_cuda = device.type == "cuda" or os.environ.get("TRITON_INTERPRET") == "1"
    return (
        HAS_TRITON
        and on_cuda
        and getattr(experts, "has_gate", True)
        and not getattr(experts, "has_bias", False)
        and not getattr(experts, "has_post_expert_norm", False)
        and is_default_silu_gate(experts)
    )


def _weight_strides(weight: torch.Tensor, transposed: bool) -> tuple[int, int, int]:
    """Strides (expert, output row, input column) of a ``[E, out, in]`` (or transposed) weight."""
    if transposed:  # [E, in, out]
        return weight.stride(0), weight.stride(2), weight.stride(1)
    return weight.stride(0), weight.stride(1), weight.stride(2)


def _kernel_layout(experts: nn.Module, hidden: torch.Tensor, indices: torch.Tensor, weights: torch.Tensor,
                   variant: str) -> tuple[bool, int]:
    """Check the inputs of a Triton variant; return ``(is_transposed, intermediate size)``."""
    check_dispatch_inputs(hidden, indices, weights)
    if not gemv_supported(experts, hidden.device):
        raise ValueError(
            f"{type(experts).__name__} on {hidden.device} is not supported by the {variant} dispatch (needs "
            "Triton on CUDA and bias-free silu-gated experts); use bh_helpers.routing.auto.fast_dispatch_experts."
        )
    transposed = bool(getattr(experts, "is_transposed", False))
    down = experts.down_proj  # [E, H, I], or [E, I, H] when transposed
    return transposed, down.shape[1] if transposed else down.shape[2]


def gemv_dispatch_experts(
    experts: nn.Module, hidden: torch.Tensor, indices: torch.Tensor, weights: torch.Tensor
) -> torch.Tensor:
    """Sync-free dispatch for a few tokens (decode): two Triton kernels, CUDA-graph capturable.

    Parameters
    ----------
    experts, hidden, indices, weights
        As in :func:`bh_helpers.routing.dispatch.dispatch_experts`.

    Returns
    -------
    torch.Tensor, shape ``[T, H]``, dtype of ``hidden``

    Raises
    ------
    ValueError
        Bad shapes, or an experts bank :func:`gemv_supported` rejects.
    """
    transposed, inter = _kernel_layout(experts, hidden, indices, weights, "GEMV")
    w_up, w_down = experts.gate_up_proj, experts.down_proj
    n_tokens, k = indices.shape
    hidden_dim = hidden.shape[1]
    out = torch.empty_like(hidden)  # (T, H)
    if n_tokens == 0:
        return out
    x = hidden.contiguous()
    idx = indices.contiguous()
    wt = weights.float().contiguous()
    act = torch.empty((n_tokens * k, inter), dtype=torch.float32, device=hidden.device)  # (T*K, I)
    block_i, block_h = 32, 128
    block_o = 16 if n_tokens <= 2 else 32  # enough programs to fill the card at batch 1
    with on_device(hidden.device):
        _gate_up_kernel[(n_tokens * k, triton.cdiv(inter, block_i))](
            x, idx, w_up, act, *_weight_strides(w_up, transposed), H=hidden_dim, I=inter,
            K=k, BLOCK_I=block_i, BLOCK_H=block_h, num_warps=4)
        _down_combine_kernel[(n_tokens, triton.cdiv(hidden_dim, block_o))](
            act, idx, wt, w_down, out, *_weight_strides(w_down, transposed), H=hidden_dim, I=inter,
            K=k, BLOCK_O=block_o, BLOCK_I=128, num_warps=4)
    return out


def looped_dispatch_experts(
    experts: nn.Module, hidden: torch.Tensor, indices: torch.Tensor, weights: torch.Tensor
) -> torch.Tensor:
    """The per-expert loop (:func:`~bh_helpers.routing.dispatch.expert_mlp`) over the selected pairs
    only, one host synchronisation, the weighted sum in one Triton kernel (prefill).

    Parameters
    ----------
    experts, hidden, indices, weights
        As in :func:`bh_helpers.routing.dispatch.dispatch_experts`.

    Returns
    -------
    torch.Tensor, shape ``[T, H]``, dtype of ``hidden``
    """
    check_dispatch_inputs(hidden, indices, weights)
    if (needs_autograd(experts, hidden) or not getattr(experts, "has_gate", True)
            or getattr(experts, "has_post_expert_norm", False)):
        # the combine kernel has no backward; unsupported layouts get the reference's error
        return dispatch_experts(experts, hidden, indices, weights)
    k = indices.shape[1]
    _, perm, pos, offs = _sorted_slots(indices, experts.gate_up_proj.shape[0])  # slots by expert, unused last
    ends = offs.tolist()  # the one host synchronisation: every group boundary
    n_valid = ends[-1] if ends else 0
    if n_valid == 0:
        return torch.zeros_like(hidden)
    sizes = [end - begin for begin, end in zip([0, *ends[:-1]], ends)]  # rows per expert
    y = expert_mlp(experts, hidden.to(experts.gate_up_proj.dtype), perm[:n_valid] // k, sizes)  # (S, H)
    return _combine(y, pos.reshape(indices.shape), indices, weights, hidden.dtype)  # (T, H)


def _tile_schedule(offs: torch.Tensor, n_slots: int, block_m: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per tile of ``block_m`` sorted rows: its expert (``E`` = idle tile), first row and row end.

    Computed on the device from the group ends ``offs`` (no host synchronisation): an expert with
    ``n`` rows gets ``ceil(n / block_m)`` tiles, and at most ``ceil(n_slots / block_m) + E`` tiles exist.
    """
    num_experts = offs.shape[0]
    ends = offs.long()  # (E,)
    starts = torch.cat([ends.new_zeros(1), ends[:-1]])  # (E,)
    tiles = torch.div(ends - starts + block_m - 1, block_m, rounding_mode="floor")  # (E,)
    tile_end = torch.cumsum(tiles, 0)  # (E,)
    max_tiles = -(-n_slots // block_m) + num_experts
    tile = torch.arange(max_tiles, device=offs.device)  # (M,)
    expert = torch.searchsorted(tile_end, tile, right=True)  # (M,) in [0, E]
    safe = expert.clamp(max=num_experts - 1)
    row0 = starts[safe] + (tile - (tile_end - tiles)[safe]) * block_m  # (M,)
    return expert.int(), row0.int(), ends[safe].int()


def tiled_dispatch_experts(
    experts: nn.Module, hidden: torch.Tensor, indices: torch.Tensor, weights: torch.Tensor
) -> torch.Tensor:
    """Grouped GEMMs in two Triton kernels over the selected pairs only (prefill), sync-free.

    Slots are sorted by expert (unused slots last) and cut into tiles of ``BLOCK_M`` rows of one
    expert each; kernel 1 gathers each row's token (fused), multiplies by the expert's gate and up
    rows and applies ``silu(gate) * up``; kernel 2 multiplies by the down projection; the
    weighted per-token sum is the combine kernel of :mod:`bh_helpers.routing.grouped` (float32).
    Two GEMM launches per layer whatever the number of experts, instead of two per expert, and
    no host synchronisation. The matrix products are ``tl.dot`` on float16 operands with float32
    accumulation, which Triton lowers to the mma instructions of sm_75 (and newer) cards.

    Parameters
    ----------
    experts, hidden, indices, weights
        As in :func:`bh_helpers.routing.dispatch.dispatch_experts`.

    Returns
    -------
    torch.Tensor, shape ``[T, H]``, dtype of ``hidden``

    Raises
    ------
    ValueError
        Bad shapes, or an experts bank :func:`gemv_supported` rejects (same layouts).
    """
    transposed, inter = _kernel_layout(experts, hidden, indices, weights, "tiled")
    w_up, w_down = experts.gate_up_proj, experts.down_proj
    num_experts = w_up.shape[0]
    n_tokens, k = indices.shape
    hidden_dim = hidden.shape[1]
    n_slots = n_tokens * k
    if n_slots == 0:
        return torch.zeros_like(hidden)
    _, perm, pos, offs = _sorted_slots(indices, num_experts)  # (T*K,) each; offs (E,) int32
    block_m, block_n, block_k = TILE_M, 64, 32
    tile_e, tile_r0, tile_r1 = _tile_schedule(offs, n_slots, block_m)
    tok = torch.div(perm, k, rounding_mode="floor").int()  # (T*K,) token of each sorted row
    x = hidden.to(w_up.dtype).contiguous()
    act = torch.empty((n_slots, inter), dtype=w_up.dtype, device=hidden.device)  # (T*K, I), tail unused
    y = torch.empty((n_slots, hidden_dim), dtype=w_up.dtype, device=hidden.device)  # (T*K, H), tail unused
    n_tiles = tile_e.shape[0]
    with on_device(hidden.device):
        _grouped_up_kernel[(n_tiles, triton.cdiv(inter, block_n))](
            x, tok, w_up, act, tile_e, tile_r0, tile_r1, *_weight_strides(w_up, transposed),
            E=num_experts, H=hidden_dim, I=inter, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k,
            num_warps=4, num_stages=2)
        _grouped_down_kernel[(n_tiles, triton.cdiv(hidden_dim, block_n))](
            act, w_down, y, tile_e, tile_r0, tile_r1, *_weight_strides(w_down, transposed),
            E=num_experts, H=hidden_dim, I=inter, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k,
            num_warps=4, num_stages=2)
    return _combine(y, pos.reshape(indices.shape), indices, weights, hidden.dtype)  # (T, H)
