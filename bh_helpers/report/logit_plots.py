"""Figures of captured router logits and of fitted nulls (notebooks 01 and 02).

Like :mod:`bh_helpers.report.plots` (figures of sweep results), every function takes data and
returns a matplotlib ``Figure`` built without pyplot.

- :func:`plot_logit_distributions`: per layer, all router logits and each token's top-1 and k-th.
- :func:`plot_expert_usage`: share of tokens per expert under native top-k, heatmap and sorted curve.
- :func:`plot_null_fits`: one layer's null CDFs and upper tails against held-out logits, and the
  histogram of held-out p-values.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
import torch

from bh_helpers.capture import CapturedLogits

__all__ = ["plot_expert_usage", "plot_logit_distributions", "plot_null_fits"]


def _figure(rows: int, cols: int, *, size: tuple[float, float]):
    from matplotlib.figure import Figure

    fig = Figure(figsize=size, layout="constrained")
    axes = fig.subplots(rows, cols, squeeze=False)
    return fig, axes


def plot_logit_distributions(captured: CapturedLogits, *, k: int = 8, bins: int = 120):
    """Per layer: histogram of all router logits, and of the top-1 and k-th largest (log y)."""
    layers = captured.layers
    cols = min(4, len(layers))
    rows = -(-len(layers) // cols)
    fig, axes = _figure(rows, cols, size=(3.4 * cols, 2.6 * rows))
    for ax, layer in zip(axes.flat, layers):
        x = captured[layer]  # (N, E)
        top = x.topk(k, dim=-1).values  # (N, k)
        edges = np.linspace(float(x.min()), float(x.max()), bins + 1)
        ax.hist(x.reshape(-1).numpy(), bins=edges, density=True, color="0.6", label="all logits")
        ax.hist(top[:, 0].numpy(), bins=edges, density=True, histtype="step", color="tab:red", label="top-1")
        ax.hist(top[:, -1].numpy(), bins=edges, density=True, histtype="step", color="tab:blue", label=f"top-{k}")
        ax.set_yscale("log")
        ax.set_title(f"layer {layer}", fontsize=10)
        ax.set_xlabel("router logit")
    for ax in list(axes.flat)[len(layers):]:
        ax.set_visible(False)
    axes.flat[0].legend(fontsize=7)
    fig.suptitle(f"router logit distributions ({captured.num_tokens} tokens per layer)")
    return fig


def plot_expert_usage(captured: CapturedLogits, *, k: int = 8):
    """Share of tokens routed to each expert under native top-k, per layer (heatmap), and the
    sorted usage curve per layer (flat = balanced)."""
    layers = captured.layers
    usage = []
    for layer in layers:
        chosen = captured[layer].topk(k, dim=-1).indices  # (N, k)
        hits = torch.bincount(chosen.reshape(-1), minlength=captured[layer].shape[-1])  # (E,)
        usage.append(hits.double() / captured.num_tokens)
    mat = torch.stack(usage).numpy()  # (L, E)
    fig, axes = _figure(1, 2, size=(13, 3.6))
    ax_map, ax_curve = axes[0]
    im = ax_map.imshow(mat, aspect="auto", cmap="magma", interpolation="nearest")
    ax_map.set(xlabel="expert", ylabel="layer", title=f"share of tokens using each expert (top-{k})")
    ax_map.set_yticks(range(len(layers)), [str(layer) for layer in layers])
    fig.colorbar(im, ax=ax_map)
    for row, layer in zip(mat, layers):
        ax_curve.plot(np.sort(row)[::-1], label=f"L{layer}")
    ax_curve.axhline(k / mat.shape[1], color="k", ls="--", lw=1, label="balanced")
    ax_curve.set(xlabel="expert rank", ylabel="share of tokens", title="sorted expert usage")
    ax_curve.legend(fontsize=7, ncol=2)
    return fig


def plot_null_fits(banks_by_kernel: Mapping[str, Any], held_out: Mapping[int, torch.Tensor], *, layer: int):
    """One layer: CDF of each null vs the held-out ECDF, the upper tail on a log scale (where BH
    works), and the histogram of held-out p-values (flat when calibrated)."""
    x = held_out[layer].reshape(-1).double()
    xs = torch.sort(x).values
    n = xs.numel()
    ecdf_sf = 1.0 - torch.arange(1, n + 1, dtype=torch.float64) / n  # P(X > x_(i))
    lo, hi = float(xs[0]), float(xs[-1])
    grid = torch.linspace(lo - 0.1 * (hi - lo), hi + 0.25 * (hi - lo), 600, dtype=torch.float64)
    fig, axes = _figure(1, 3, size=(15, 3.8))
    ax_cdf, ax_tail, ax_pit = axes[0]
    step = max(1, n // 4000)
    ax_cdf.plot(xs[::step], 1 - ecdf_sf[::step], color="k", lw=2.5, alpha=0.35, label="held-out ECDF")
    ax_tail.plot(xs[::step], ecdf_sf[::step].clamp(min=0.5 / n), color="k", lw=2.5, alpha=0.35, label="held-out")
    pit_bins = np.linspace(0, 1, 21)
    for kernel, bank in banks_by_kernel.items():
        null = bank[layer]
        ax_cdf.plot(grid, null.cdf(grid).numpy(), lw=1, label=kernel)
        ax_tail.plot(grid, null.sf(grid).numpy(), lw=1, label=kernel)
        p = null.sf(x).numpy()
        ax_pit.hist(p, bins=pit_bins, density=True, histtype="step", lw=1.2, alpha=0.8, label=kernel)
    ax_cdf.set(xlabel="router logit", ylabel="CDF", title=f"layer {layer}: null CDFs vs held-out")
    ax_tail.set_yscale("log")
    ax_tail.set_ylim(0.1 / n, 1.0)
    ax_tail.set_xlim(float(xs[n // 2]), hi + 0.25 * (hi - lo))  # upper half and beyond the data
    ax_tail.set(xlabel="router logit", ylabel="P(X > x)  (p-value)", title="upper tail (log scale)")
    ax_pit.axhline(1.0, color="k", ls="--", lw=1)
    ax_pit.set(xlabel="held-out p-value", ylabel="density", title="PIT histogram (flat = calibrated)")
    ax_tail.legend(fontsize=7)
    return fig
