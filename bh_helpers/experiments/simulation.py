"""Empirical FDR and power on known truth: router-like rows with a known set of relevant experts.

Each simulated token has ``num_experts`` logits. The null part is Gaussian with unit variance
and a chosen within-token dependence:

- ``"independent"``: i.i.d. N(0, 1);
- ``"equicorrelated"``: ``sqrt(rho) z + sqrt(1 - rho) e`` with one shared ``z`` per token
  (positive dependence: BH's guarantee holds);
- ``"factor"``: ``L f + sqrt(1 - rowsum(L^2)) e`` with ``factors`` shared factors and loadings
  of both signs (``|L_e|^2 = rho``): arbitrary dependence, where only BY is guaranteed;
- ``"scale"``: ``exp(rho z) e`` with one shared ``z`` per token: tokens differ in the spread of
  their logits, as router logits do. P-values stay uniform over all tokens, so BH's FDR over all
  tokens holds, but a pooled raw null calls the nulls of a wide token too often: conditional on
  the token's spread the guarantee breaks (``spread_groups``), and a per-token statistic
  (``statistic="zscore"``) restores it.

A random subset of ``relevant`` experts per token gets ``+signal``. P-values go through the
package's own path: a :class:`~bh_helpers.nulls.bank.NullBank` fitted on pure-null rows of the
same model, then :func:`~bh_helpers.selection.reference.select_experts` with ``min_k=0`` and
``max_k=E`` (so the procedure alone decides). Reported per method: empirical FDR (mean over
tokens of false / max(selected, 1)), power (mean share of relevant experts selected) and FWER
(share of tokens with any false selection), each with a normal Monte-Carlo 95% interval over
tokens (independent draws).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from bh_helpers._validate import check_choice, check_int
from bh_helpers.nulls.fit import fit_null_bank
from bh_helpers.selection.reference import FDR_METHODS, select_experts

__all__ = ["DEPENDENCE", "ErrorRates", "empirical_error_rates", "rates_frame", "simulate_router_rows"]

DEPENDENCE = ("independent", "equicorrelated", "factor", "scale")


@dataclass(frozen=True)
class ErrorRates:
    """Empirical error rates of one method on simulated tokens (95% Monte-Carlo intervals)."""

    method: str
    alpha: float
    fdr: float
    fdr_ci: tuple[float, float]
    power: float
    power_ci: tuple[float, float]
    fwer: float
    fwer_ci: tuple[float, float]
    mean_selected: float
    tokens: int
    group: str = "all tokens"


def simulate_router_rows(n_tokens: int, num_experts: int = 64, *, relevant: int = 8, signal: float = 3.0,
                         dependence: str = "independent", rho: float = 0.0, factors: int = 4,
                         seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Router-logit-like rows with known relevant experts.

    Returns
    -------
    logits : torch.Tensor, shape (n_tokens, num_experts), float32
    truth : torch.BoolTensor, same shape
        True at each token's ``relevant`` experts (those given ``+signal``).
    """
    check_int("n_tokens", n_tokens, 1)
    check_int("num_experts", num_experts, 2)
    check_int("relevant", relevant, 0, num_experts)
    check_int("factors", factors, 1)
    check_choice("dependence", dependence, DEPENDENCE)
    if not (isinstance(rho, (int, float)) and 0.0 <= rho < 1.0):
        raise ValueError(f"`rho` must be in [0, 1) (the dependence's shared variance, or for 'scale' the sd of "
                         f"the log spread); got {rho!r}.")
    if not (isinstance(signal, (int, float)) and math.isfinite(signal)):
        raise ValueError(f"`signal` must be a finite number (the relevant experts' shift); got {signal!r}.")
    rng = np.random.default_rng(seed)
    noise = rng.standard_normal((n_tokens, num_experts))  # (N, E)
    if dependence == "equicorrelated":
        null = math.sqrt(rho) * rng.standard_normal((n_tokens, 1)) + math.sqrt(1 - rho) * noise
    elif dependence == "scale":
        null = np.exp(rho * rng.standard_normal((n_tokens, 1))) * noise  # rho: sd of the log spread
    elif dependence == "factor":
        loadings = rng.standard_normal((num_experts, factors))  # (E, F), signs mixed
        loadings *= math.sqrt(rho) / np.linalg.norm(loadings, axis=1, keepdims=True)  # each row's |L|^2 = rho
        null = rng.standard_normal((n_tokens, factors)) @ loadings.T + math.sqrt(1 - rho) * noise
    else:
        null = noise
    truth = np.zeros((n_tokens, num_experts), dtype=bool)
    if relevant:
        picks = np.argsort(rng.random((n_tokens, num_experts)), axis=1)[:, :relevant]  # (N, relevant)
        np.put_along_axis(truth, picks, True, axis=1)
    logits = null + signal * truth
    return torch.from_numpy(logits.astype(np.float32)), torch.from_numpy(truth)


def _mean_ci(values: np.ndarray) -> tuple[float, tuple[float, float]]:
    mean = float(values.mean())
    half = 1.96 * float(values.std(ddof=1)) / math.sqrt(values.size) if values.size > 1 else math.nan
    return mean, (mean - half, mean + half)


def empirical_error_rates(*, alpha: float = 0.1, methods=FDR_METHODS, n_tokens: int = 20_000,
                          num_experts: int = 64, relevant: int = 8, signal: float = 3.0,
                          dependence: str = "independent", rho: float = 0.0, factors: int = 4,
                          calibration_tokens: int = 20_000, statistic: str = "raw", spread_groups: int = 1,
                          seed: int = 0) -> list[ErrorRates]:
    """Empirical FDR, power and FWER of each method on :func:`simulate_router_rows` tokens.

    The null bank is a Gaussian KDE fitted on ``calibration_tokens`` pure-null rows drawn from the
    same dependence model (another seed), as a user would fit it on calibration logits, with the
    per-token ``statistic`` (:mod:`bh_helpers.nulls.statistics`). With ``spread_groups`` > 1 the
    rates are also given per group of tokens by the spread (standard deviation) of their logits,
    equal-sized, narrowest first. Other arguments as in :func:`simulate_router_rows`.

    Returns
    -------
    list of ErrorRates
        One per method over all tokens, then (``spread_groups`` > 1) one per method and group.
    """
    for method in methods:
        check_choice("methods", method, FDR_METHODS)
    check_int("spread_groups", spread_groups, 1)
    null_rows, _ = simulate_router_rows(calibration_tokens, num_experts, relevant=0, dependence=dependence, rho=rho,
                                        factors=factors, seed=seed + 1)
    bank = fit_null_bank({0: null_rows}, statistic=statistic)
    logits, truth = simulate_router_rows(n_tokens, num_experts, relevant=relevant, signal=signal,
                                         dependence=dependence, rho=rho, factors=factors, seed=seed)
    pvalues = bank.pvalues(logits, 0)  # (N, E), the bank's statistic applied
    groups = [("all tokens", np.ones(n_tokens, dtype=bool))]
    if spread_groups > 1:
        rank = logits.double().std(dim=1).argsort().argsort().numpy()  # (N,) spread rank of each token
        which = rank * spread_groups // n_tokens  # (N,) 0 = narrowest
        groups += [(f"spread group {g + 1}/{spread_groups}", which == g) for g in range(spread_groups)]
    # each token's selection depends on its own row only: select once, count per group
    chosen = {method: select_experts(logits, pvalues, method=method, alpha=alpha, min_k=0,
                                     max_k=num_experts).expert_mask(num_experts) for method in methods}  # (N, E)
    return [_rates(chosen[method][rows], truth[rows], method, alpha, relevant, group)
            for group, rows in groups for method in methods]


def _rates(chosen: torch.Tensor, truth: torch.Tensor, method: str, alpha: float, relevant: int,
           group: str) -> ErrorRates:
    """Error rates of the selections ``chosen (N, E)`` against ``truth (N, E)``."""
    false = (chosen & ~truth).sum(dim=1).double().numpy()  # (N,)
    selected = chosen.sum(dim=1).double().numpy()
    hits = (chosen & truth).sum(dim=1).double().numpy()
    fdr, fdr_ci = _mean_ci(false / np.maximum(selected, 1.0))
    power, power_ci = _mean_ci(hits / relevant) if relevant else (math.nan, (math.nan, math.nan))
    fwer, fwer_ci = _mean_ci((false > 0).astype(float))
    return ErrorRates(method=method, alpha=alpha, fdr=fdr, fdr_ci=fdr_ci, power=power, power_ci=power_ci, fwer=fwer,
                      fwer_ci=fwer_ci, mean_selected=float(selected.mean()), tokens=int(chosen.shape[0]), group=group)


def rates_frame(rates: list[ErrorRates], **columns):
    """``rates`` as a DataFrame (one row each, intervals as ``*_low``/``*_high``), ``columns`` prepended."""
    import pandas as pd

    rows = []
    for r in rates:
        row = dict(columns)
        row.update(group=r.group, method=r.method, alpha=r.alpha, tokens=r.tokens, mean_selected=r.mean_selected)
        for name in ("fdr", "power", "fwer"):
            row[name] = getattr(r, name)
            row[f"{name}_low"], row[f"{name}_high"] = getattr(r, f"{name}_ci")
        rows.append(row)
    return pd.DataFrame(rows)
