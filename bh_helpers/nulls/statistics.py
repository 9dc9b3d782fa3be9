"""Per-token test statistics: what is compared with a layer's null, and on which values it is fitted.

Why more than the raw logit. The router's softmax is shift-invariant: adding a constant to a
token's 64 logits changes neither its top-k experts nor their weights, but with a null pooled over
raw logits it changes how many experts BH rejects. The raw statistic therefore confounds a
token's overall logit level with the relevance of an expert. Two per-token transforms remove
that level, applied the same way when fitting and when routing:

- ``"raw"``: the router logit itself (the behaviour before statistics existed; the default);
- ``"centred"``: the logit minus the token's mean logit over experts (shift-invariant, as the
  router is);
- ``"zscore"``: centred, then divided by the token's standard deviation over experts
  (population, ``correction=0``), so tokens with flat and peaked routers are on one scale. A
  token whose logits are all equal gets 0 for every expert.

The null is also contaminated by the experts each token chose: its largest values sit in the
calibration sample. ``trim=m`` fits the null on each token's values without its ``m`` largest
(the "trimmed distributions" of the earlier research); p-values are then computed for all values.

Every transform is monotone increasing within a token, so a token's ranking of experts is the
raw logits' ranking; only the comparison with the null changes. Selection computes each token's
shift and scale with float64 sums rounded once to float32 (:func:`token_affine`), then the
statistic with one float32 subtraction and division (:func:`apply_statistic`); the fused CUDA
kernel does the same inside its row, so both paths select the same experts.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from bh_helpers._validate import check_choice, check_int, is_int

__all__ = ["STATISTICS", "apply_statistic", "check_statistic", "check_trim", "fit_values", "token_affine"]

#: Per-token statistics, in the order the reports list them.
STATISTICS = ("raw", "centred", "zscore")


def check_statistic(statistic: Any) -> str:
    """``statistic`` as given, or a ValueError naming the choices."""
    return check_choice("statistic", statistic, STATISTICS)


def check_trim(trim: Any, num_experts: int | None = None) -> int:
    """``trim`` as an int in ``[0, num_experts - 2]`` (two values per token must remain)."""
    high = None if num_experts is None else num_experts - 2
    try:
        return check_int("trim", trim, 0, high)
    except ValueError as err:  # say where the bound comes from: the experts, not the option
        if high is None or not is_int(trim) or trim < 0:
            raise
        raise ValueError(f"{err} (with {num_experts} experts a trim of at most {high} leaves the 2 values per "
                         "token that a null needs)") from None


def token_affine(logits: torch.Tensor, statistic: str) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """Per-token ``(shift, scale)`` of a statistic, float32 ``(..., 1)`` each, or None where unused.

    ``statistic = (logits - shift) / scale``; ``"raw"`` gives ``(None, None)``, ``"centred"``
    ``(mean, None)``. Mean and population standard deviation are accumulated in float64 and
    rounded to float32 once: a float64 sum of float32 logits does not depend on the order of
    the additions (it is exact for router-sized values), so the fused kernel, which sums in
    its own order, gets the same shift and scale. Zero spread (all logits equal) gets scale 1.
    """
    if statistic == "raw":
        return None, None
    x = logits.double()  # (..., E)
    mean = x.sum(dim=-1, keepdim=True) / x.shape[-1]  # (..., 1) float64
    shift = mean.float()
    if statistic == "centred":
        return shift, None
    var = ((x - mean) ** 2).sum(dim=-1, keepdim=True) / x.shape[-1]  # (..., 1)
    scale = var.sqrt().float()
    return shift, torch.where(scale > 0, scale, torch.ones_like(scale))


def apply_statistic(logits: torch.Tensor, statistic: str) -> torch.Tensor:
    """The statistic of every logit, float32 (float64 for float64 logits), same shape ``(..., E)``.

    ``(logits - shift) / scale`` in float32 with the float32 shift and scale of
    :func:`token_affine` (what the fused kernel computes); float64 logits stay in float64.
    """
    if statistic == "raw":
        return logits
    if logits.dtype == torch.float64:  # the float64 reference path stays in float64
        shift = logits.mean(dim=-1, keepdim=True)
        out = logits - shift
        if statistic == "zscore":
            scale = logits.std(dim=-1, keepdim=True, correction=0)
            out = out / torch.where(scale > 0, scale, torch.ones_like(scale))
        return out
    shift, scale = token_affine(logits, statistic)
    out = logits.float() - shift  # (..., E)
    return out if scale is None else out / scale


def fit_values(logits: Any, statistic: str, trim: int) -> Any:
    """The values a null is fitted on: the statistic of each token's logits, without its ``trim`` largest.

    Parameters
    ----------
    logits : Tensor or ndarray of shape (N, E)
    statistic : one of :data:`STATISTICS`
    trim : int
        Per token, drop the ``trim`` largest values (after the statistic is computed on all E).

    Returns
    -------
    The same kind as ``logits`` (tensor or ndarray), shape ``(N, E - trim)``; ``logits`` itself
    when ``statistic == "raw"`` and ``trim == 0``.
    """
    if statistic == "raw" and trim == 0:
        return logits
    is_tensor = isinstance(logits, torch.Tensor)
    x = logits.detach().to("cpu", torch.float32) if is_tensor else torch.as_tensor(np.asarray(logits, dtype=np.float32))
    if x.dim() != 2:
        raise ValueError(f"`logits` must have shape [N, E] for statistic={statistic!r} or trim={trim}, got {tuple(x.shape)}")
    values = apply_statistic(x, statistic)  # (N, E) float32, as at routing time
    if trim:
        values = values.sort(dim=-1).values[:, : x.shape[-1] - trim]  # (N, E - trim): the m largest dropped
    return values if is_tensor else values.numpy()
