"""Figures of routing sweeps: every function takes data and returns a matplotlib ``Figure``.

Nothing here calls ``plt.show()`` or changes global matplotlib state beyond creating figures
(``matplotlib.figure.Figure`` objects, not pyplot-managed ones, so they never pile up in a
long-running kernel and need no backend). Show one in a notebook by leaving it as the cell's
value, or save it with ``fig.savefig(...)``.

- :func:`plot_frontier`: metric against mean experts per token: the static top-k curve with
  its k labels, multiple-testing configurations coloured by method and sized/labelled by alpha,
  top-p and native points.
- :func:`plot_layer_heatmap`: a per-layer quantity (mean k, load balance) per configuration and layer.
- :func:`plot_k_histogram`: distribution of experts per token (token-layer pairs).
- :func:`plot_saturation`: mean k and ceiling-hit rate against ``max_k``, per alpha.
- :func:`plot_error_rates`: empirical FDR (with Monte-Carlo intervals) per token group and setting.
- :func:`token_view_html` / :func:`plot_token_view`: text coloured by experts per token.

Why one module: every figure of a sweep's results, sharing one colour and marker code per method
and family, so a reader finds any figure of the report here (figures of captured logits and nulls
are in :mod:`bh_helpers.report.logit_plots`, the explorer's in :mod:`bh_helpers.report.explorer_figure`).
"""

from __future__ import annotations

import html
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from bh_helpers.experiments.configs import adaptive_of

__all__ = [
    "METHOD_COLORS",
    "plot_frontier",
    "plot_controls",
    "layer_matrix",
    "plot_layer_heatmap",
    "plot_k_histogram",
    "plot_saturation",
    "plot_error_rates",
    "token_view_html",
    "plot_token_view",
]

METHOD_COLORS = {
    "bh": "tab:blue",
    "by": "tab:orange",
    "bonferroni": "tab:green",
    "holm": "tab:purple",
    "top_p": "tab:red",
    "native": "black",
    "topk": "0.35",
}
_MARKERS = {"bh": "o", "by": "s", "bonferroni": "^", "holm": "v", "top_p": "D", "native": "*"}


def _new_figure(figsize=(7.0, 4.5)):
    from matplotlib.figure import Figure

    fig = Figure(figsize=figsize, layout="constrained")
    return fig, fig.add_subplot()


def _check_columns(df, columns) -> None:
    missing = [c for c in columns if c not in df.columns]
    if missing:
        raise ValueError(f"`results` lacks columns {missing}; pass bh_helpers.experiments.sweep.load_results output.")


def plot_frontier(results, *, dataset: str | None = None, metric: str = "perplexity",
                  cost: str = "mean_experts_per_token", logy: bool = True, title: str | None = None,
                  comparison=None):
    """Quality against mean experts per token for one data set: every policy at its realised compute.

    Native, uniform top-k (a line), static per-layer allocations (a line), the controls that ran at
    each adaptive row's compute (mixed top-k, static chord; joined to their row by a thin line),
    top-p, and the multiple-testing rows by family (one alpha, one alpha per layer, static budget).

    Parameters
    ----------
    results : pandas.DataFrame
        Sweep results (columns ``dataset``, ``method``, ``cost``, ``metric``; ``k``, ``alpha``,
        ``label``, ``layer_alphas``, ``budget`` and ``control_of`` used when present).
    dataset : str, optional
        Required when ``results`` holds several data sets.
    metric, cost : str
        Column names (y and x).
    logy : bool, default True
        Log-scale y axis (natural for perplexity).
    title : str, optional
    comparison : pandas.DataFrame, optional
        :func:`~bh_helpers.experiments.comparison.compare_with_controls` of ``results``: each
        adaptive point gets the 95% paired interval of its difference to its strongest control
        as an error bar (placed on the point).

    Returns
    -------
    matplotlib.figure.Figure
    """
    _check_columns(results, ["dataset", "method", metric, cost])
    names = list(dict.fromkeys(results["dataset"]))
    if dataset is None:
        if len(names) != 1:
            raise ValueError(f"`results` holds data sets {names}; pass `dataset=` to pick one.")
        dataset = names[0]
    elif dataset not in names:
        raise ValueError(f"`dataset` {dataset!r} is not in the results; it has {names}.")
    df = results[results["dataset"] == dataset]
    fig, ax = _new_figure()
    topk = df[df["method"] == "topk"].sort_values(cost)
    if len(topk):
        ax.plot(topk[cost], topk[metric], "-", color=METHOD_COLORS["topk"], marker=".", label="uniform top-k", zorder=2)
        for _, r in topk.iterrows():
            k = r["k"] if "k" in r and r["k"] == r["k"] else r[cost]
            ax.annotate(f"k={int(k)}", (r[cost], r[metric]), textcoords="offset points", xytext=(4, 4),
                        fontsize=8, color=METHOD_COLORS["topk"])
    static = df[df["method"] == "static"].sort_values(cost)
    if len(static):
        ax.plot(static[cost], static[metric], "--", color="tab:brown", marker="s", ms=4,
                label="static per-layer allocation", zorder=2)
    adaptive = df[df["method"].isin(["bh", "by", "bonferroni", "holm"])]
    for control, marker, name in (("mixed", "o", "mixed top-k"), ("static_chord", "s", "static chord")):
        part = df[df["method"] == control]
        if not len(part) or "control_of" not in df.columns:
            continue
        # each control beside its adaptive point, joined by a thin line (same compute)
        for _, r in part.iterrows():
            owner = adaptive[adaptive["label"] == adaptive_of(r["control_of"]).label()]
            if len(owner):
                o = owner.iloc[0]
                ax.plot([o[cost], r[cost]], [o[metric], r[metric]], "-", color="0.6", lw=0.8, zorder=1)
        ax.scatter(part[cost], part[metric], facecolors="none", edgecolors="0.25", marker=marker, s=36,
                   label=f"{name} control (same compute)", zorder=3)
    if len(adaptive) and comparison is not None and len(comparison):
        rows = comparison[(comparison["dataset"] == dataset) & comparison["strongest_ci_low"].notna()]
        err = rows.merge(adaptive[["key", cost, metric]], on="key", suffixes=("_c", ""))
        if len(err):
            ax.errorbar(err[cost], err[metric], yerr=[err["delta_vs_strongest"] - err["strongest_ci_low"],
                                                      err["strongest_ci_high"] - err["delta_vs_strongest"]],
                        fmt="none", ecolor="0.4", elinewidth=0.8, capsize=2, zorder=2,
                        label="95% paired interval vs strongest control")
    for label, kind, part in _families(adaptive):
        ax.scatter(part[cost], part[metric], color=METHOD_COLORS[part["method"].iloc[0]], marker=_FAMILY_MARKERS[kind],
                   s=36, label=label, zorder=3)
    for method in ("top_p", "native"):
        part = df[df["method"] == method]
        if not len(part):
            continue
        ax.scatter(part[cost], part[metric], color=METHOD_COLORS[method], marker=_MARKERS[method],
                   s=70 if method == "native" else 36, label=method if method != "top_p" else "top-p", zorder=3)
    if logy:
        from matplotlib.ticker import LogLocator, NullFormatter, ScalarFormatter

        ax.set_yscale("log")
        ax.yaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 1.5, 2.0, 3.0, 5.0, 7.0)))
        ax.yaxis.set_major_formatter(ScalarFormatter())
        ax.yaxis.set_minor_formatter(NullFormatter())
    ax.set_xlabel("mean experts per token (all layers)")
    ax.set_ylabel(metric)
    ax.set_title(title or f"{metric} vs compute, {dataset}")
    ax.grid(True, alpha=0.3, which="both")
    ax.legend(fontsize=8)
    return fig


#: Marker of each family of multiple-testing rows in :func:`plot_frontier`.
_FAMILY_MARKERS = {"one alpha": "o", "one alpha per layer": "v", "static budget": "P"}


def _families(adaptive):
    """``(label, family, rows)`` per method and family: one alpha, one alpha per layer, per-layer static budget."""
    def family(r) -> str:
        if isinstance(r.get("budget"), str):
            return "static budget"
        levels = r.get("layer_alphas")
        return "one alpha per layer" if isinstance(levels, (list, tuple)) else "one alpha"

    if not len(adaptive):
        return []
    kinds = adaptive.apply(family, axis=1)
    return [(f"{method}, {kind}" if kind != "one alpha" else method, kind, part)
            for (method, kind), part in adaptive.groupby([adaptive["method"], kinds], sort=False)]


def plot_controls(comparison, *, title: str | None = None):
    """Each adaptive configuration's perplexity minus its mixed top-k control's, with 95% intervals.

    One panel per data set, one row per configuration (coloured by test statistic); the
    shuffled control's difference is drawn as a hollow marker on the same row. Left of the
    dashed zero line: the adaptive rule beat a policy that ran at its compute.

    Parameters
    ----------
    comparison : pandas.DataFrame
        :func:`bh_helpers.experiments.comparison.compare_with_controls` output.
    title : str, optional

    Returns
    -------
    matplotlib.figure.Figure
    """
    import seaborn as sns
    from matplotlib.figure import Figure

    if comparison is None or not len(comparison):
        raise ValueError("`comparison` has no rows; run a sweep with controls (with_controls).")
    names = list(dict.fromkeys(comparison["dataset"]))
    labels = list(dict.fromkeys(comparison["label"]))
    statistics = list(dict.fromkeys(comparison["statistic"]))
    palette = dict(zip(statistics, sns.color_palette("colorblind", len(statistics))))
    fig = Figure(figsize=(4.2 * len(names) + 2.5, 0.32 * len(labels) + 1.6), layout="constrained")
    axes = fig.subplots(1, len(names), sharey=True, squeeze=False)[0]
    y = {label: i for i, label in enumerate(labels)}
    for ax, name in zip(axes, names):
        part = comparison[comparison["dataset"] == name]
        for _, r in part.iterrows():
            colour = palette[r["statistic"]]
            yy = y[r["label"]]
            ax.errorbar(r["delta_vs_mixed"], yy, xerr=[[r["delta_vs_mixed"] - r["ci_low"]], [r["ci_high"] - r["delta_vs_mixed"]]],
                        fmt="o", color=colour, ms=4, capsize=2, lw=1)
            ax.plot(r["delta_vs_shuffled"], yy, marker="D", mfc="none", mec=colour, ms=4, ls="none")
        ax.axvline(0.0, color="0.3", ls="--", lw=0.8)
        ax.set_title(name, fontsize=9)
        ax.set_xlabel("perplexity minus control (95% CI)")
        ax.grid(True, axis="x", alpha=0.3)
    axes[0].set_yticks(range(len(labels)), labels, fontsize=7)
    axes[0].invert_yaxis()
    from matplotlib.lines import Line2D

    handles = [Line2D([], [], marker="o", color=palette[s], ls="none", label=f"{s}: vs mixed top-k") for s in statistics]
    handles.append(Line2D([], [], marker="D", mfc="none", mec="0.3", ls="none", label="vs its shuffled counts"))
    axes[-1].legend(handles=handles, fontsize=7, loc="best")
    fig.suptitle(title or "adaptive routing against compute-matched controls", fontsize=10)
    return fig


def layer_matrix(results, *, dataset: str | None = None, prefix: str = "per_layer_mean_k."):
    """Configurations x layers table of mean experts per token from flattened sweep columns.

    Parameters
    ----------
    results : pandas.DataFrame
        Sweep results with columns ``<prefix><layer>`` (e.g. ``per_layer_mean_k.0``).
    dataset : str, optional
        Keep one data set (default: the first).
    prefix : str

    Returns
    -------
    pandas.DataFrame
        Index: configuration labels; columns: layer indices (int), sorted.
    """
    cols = [c for c in results.columns if str(c).startswith(prefix)]
    if not cols:
        raise ValueError(f"`results` has no per-layer columns {prefix!r}<layer>; record them in the sweep metrics.")
    names = list(dict.fromkeys(results["dataset"]))
    dataset = dataset if dataset is not None else names[0]
    df = results[results["dataset"] == dataset]
    layers = sorted(cols, key=lambda c: int(str(c)[len(prefix):]))
    out = df.set_index("label")[layers].astype(float)
    out.columns = [int(str(c)[len(prefix):]) for c in layers]
    return out


def plot_layer_heatmap(matrix, *, title: str = "mean experts per token by layer", cmap: str = "viridis",
                       annotate: bool = True, label: str = "mean k", fmt: str = ".1f"):
    """Heatmap of a per-layer quantity (mean experts per token by default), configurations x layers.

    Parameters
    ----------
    matrix : pandas.DataFrame or array-like
        A :func:`layer_matrix` (row labels = configurations, columns = layers) or a 2-D array.
    title, cmap : str
    annotate : bool, default True
        Write the value in each cell.
    label : str, default "mean k"
        What the values are (the colour bar's label), e.g. "coefficient of variation".
    fmt : str, default ".1f"
        Format of the cell values.

    Returns
    -------
    matplotlib.figure.Figure
    """
    values = np.asarray(getattr(matrix, "values", matrix), dtype=float)
    if values.ndim != 2 or values.size == 0:
        raise ValueError(f"`matrix` must be a non-empty 2-D table (configurations x layers), got shape {values.shape}.")
    rows = [str(r) for r in getattr(matrix, "index", range(values.shape[0]))]
    cols = [str(c) for c in getattr(matrix, "columns", range(values.shape[1]))]
    import seaborn as sns

    fig, ax = _new_figure(figsize=(1.2 + 0.7 * values.shape[1] + 2.5, 1.0 + 0.32 * values.shape[0]))
    sns.heatmap(values, ax=ax, cmap=cmap, annot=annotate, fmt=fmt, annot_kws={"fontsize": 7},
                xticklabels=cols, yticklabels=rows, cbar_kws={"label": label})
    ax.tick_params(axis="y", labelsize=8)
    ax.set_xlabel("layer")
    ax.set_title(title)
    return fig


def plot_k_histogram(counts: Mapping[str, Any], *, max_k: int | None = None,
                     title: str = "experts per token (token-layer pairs)"):
    """Histogram of experts per token, one bar series per configuration.

    Parameters
    ----------
    counts : mapping of str to array-like
        ``{label: per-token counts}`` (any shape, e.g. ``TokenCounts.matrix()``; negative values,
        i.e. layers that did not run, are ignored) or ``{label: histogram}`` given as a
        ``dict(hist=[n_0, n_1, ...])``.
    max_k : int, optional
        Largest k on the x axis (default: the largest observed).
    title : str

    Returns
    -------
    matplotlib.figure.Figure
    """
    if not isinstance(counts, Mapping) or not counts:
        raise ValueError("`counts` must be a non-empty mapping {label: counts}.")
    hists = {}
    for label, c in counts.items():
        if isinstance(c, Mapping) and "hist" in c:
            h = np.asarray(c["hist"], dtype=float)
        else:
            a = np.asarray(getattr(c, "numpy", lambda: c)(), dtype=np.int64).reshape(-1)
            a = a[a >= 0]
            if a.size == 0:
                raise ValueError(f"`counts[{label!r}]` holds no non-negative counts.")
            h = np.bincount(a).astype(float)
        if h.sum() <= 0:
            raise ValueError(f"`counts[{label!r}]` is empty.")
        hists[str(label)] = h / h.sum()
    top = max_k if max_k is not None else max(len(h) - 1 for h in hists.values())
    fig, ax = _new_figure()
    width = 0.8 / len(hists)
    for i, (label, h) in enumerate(hists.items()):
        h = np.pad(h, (0, max(0, top + 1 - len(h))))[: top + 1]
        x = np.arange(top + 1) + (i - (len(hists) - 1) / 2) * width
        ax.bar(x, h, width=width, label=label)
    ax.set_xticks(range(top + 1))
    ax.set_xlabel("experts per token")
    ax.set_ylabel("share of token-layers")
    ax.set_title(title)
    ax.legend(fontsize=8)
    return fig


def plot_saturation(table, points=None, *, title: str = "max_k saturation"):
    """Mean k (left) and ceiling-hit rate (right) against ``max_k`` (log2 axis), one line per alpha.

    Parameters
    ----------
    table : pandas.DataFrame
        :func:`bh_helpers.experiments.saturation.saturation_table` output.
    points : pandas.DataFrame, optional
        :func:`~bh_helpers.experiments.saturation.saturation_points` output: each alpha's
        saturation point is marked.
    """
    from matplotlib.figure import Figure

    _check_columns(table, ["alpha", "max_k", "mean_k", "ceiling_rate"])
    fig = Figure(figsize=(9.0, 3.8), layout="constrained")
    ax_k, ax_c = fig.subplots(1, 2)
    for alpha, group in table.sort_values("max_k").groupby("alpha"):
        line, = ax_k.plot(group["max_k"], group["mean_k"], marker="o", label=f"alpha={alpha:.3g}")
        ax_c.plot(group["max_k"], group["ceiling_rate"], marker="o", color=line.get_color())
        if points is not None:
            at = points[points["alpha"] == alpha]
            if len(at):
                ax_k.scatter(at["saturation_max_k"], at["mean_k_there"], s=140, facecolors="none",
                             edgecolors=line.get_color(), linewidths=1.5, zorder=3)
    ticks = sorted(table["max_k"].unique())
    for ax in (ax_k, ax_c):
        ax.set_xscale("log", base=2)
        ax.set_xticks(ticks, [str(t) for t in ticks])
        ax.grid(True, alpha=0.3)
    ax_k.set(xlabel="max_k (ceiling)", ylabel="mean experts per token",
             title=title + (" (circles: saturation point)" if points is not None else ""))
    ax_c.set(xlabel="max_k (ceiling)", ylabel="share of token-layers at the ceiling", ylim=(0, 1))
    ax_k.legend(fontsize=8)
    return fig


def plot_error_rates(frame, *, alpha: float, by: str = "setting", title: str = "empirical FDR on known truth"):
    """Empirical FDR with its 95% Monte-Carlo interval per token group, one series per ``by`` value.

    Parameters
    ----------
    frame : pandas.DataFrame
        :func:`bh_helpers.experiments.simulation.rates_frame` rows (columns ``group``, ``fdr``,
        ``fdr_low``, ``fdr_high`` and ``by``).
    alpha : float
        The nominal level, drawn as a dashed line.
    """
    _check_columns(frame, ["group", "fdr", "fdr_low", "fdr_high", by])
    fig, ax = _new_figure((7.5, 4.0))
    groups = list(dict.fromkeys(frame["group"]))
    series = list(dict.fromkeys(frame[by]))
    width = 0.8 / max(len(series), 1)
    for i, name in enumerate(series):
        part = frame[frame[by] == name].set_index("group").reindex(groups)
        x = np.arange(len(groups)) + (i - (len(series) - 1) / 2) * width
        err = np.vstack([part["fdr"] - part["fdr_low"], part["fdr_high"] - part["fdr"]])
        ax.bar(x, part["fdr"], width, yerr=err, capsize=3, label=str(name))
    ax.axhline(alpha, color="black", ls="--", lw=1, label=f"alpha = {alpha:g}")
    ax.set_xticks(np.arange(len(groups)), groups, rotation=15)
    ax.set(ylabel="empirical FDR (95% Monte-Carlo interval)", title=title)
    ax.legend(fontsize=8)
    return fig


def _colour(value: float, vmin: float, vmax: float, cmap: str) -> tuple[float, float, float, float]:
    from matplotlib import colormaps

    t = 0.5 if vmax <= vmin else (value - vmin) / (vmax - vmin)
    return colormaps[cmap](float(np.clip(t, 0.0, 1.0)))


def _check_tokens(tokens: Sequence[str], counts) -> np.ndarray:
    values = np.asarray(counts, dtype=float).reshape(-1)
    if len(tokens) != values.size:
        raise ValueError(f"`tokens` ({len(tokens)}) and `counts` ({values.size}) must have the same length.")
    if values.size == 0:
        raise ValueError("`tokens` is empty; pass at least one token.")
    return values


def token_view_html(tokens: Sequence[str], counts, *, vmin: float | None = None, vmax: float | None = None,
                    cmap: str = "YlOrRd") -> str:
    """HTML of the text with each token's background coloured by its number of experts.

    Parameters
    ----------
    tokens : sequence of str
        Token strings (decoded, with their leading spaces), in order.
    counts : array-like of float
        Experts per token (e.g. mean over layers), same length.
    vmin, vmax : float, optional
        Colour range (default: the data range).
    cmap : str
        Matplotlib colormap name.

    Returns
    -------
    str
        A ``<div>`` (show it with ``IPython.display.HTML``); hovering a token shows its value.
    """
    values = _check_tokens(tokens, counts)
    lo = float(values.min()) if vmin is None else float(vmin)
    hi = float(values.max()) if vmax is None else float(vmax)
    spans = []
    for tok, v in zip(tokens, values):
        r, g, b, _ = _colour(v, lo, hi, cmap)
        dark = 0.299 * r + 0.587 * g + 0.114 * b < 0.5
        text = html.escape(tok).replace("\n", "&#x21b5;<br>")
        spans.append(
            f'<span title="{v:.2f} experts" style="background-color: rgb({int(255 * r)},{int(255 * g)},'
            f'{int(255 * b)}); color: {"white" if dark else "black"}; white-space: pre-wrap;">{text}</span>'
        )
    legend = f'<div style="font-size: 80%; margin-top: 4px;">colour: experts per token, {lo:.2f} .. {hi:.2f} ({cmap})</div>'
    return '<div style="font-family: monospace; line-height: 1.6;">' + "".join(spans) + "</div>" + legend


def plot_token_view(tokens: Sequence[str], counts, *, vmin: float | None = None, vmax: float | None = None,
                    cmap: str = "YlOrRd", chars_per_line: int = 80, title: str = "experts per token"):
    """Matplotlib rendering of :func:`token_view_html` (for reports and PNGs).

    Tokens are laid out in a monospace grid, wrapped at ``chars_per_line`` characters and at
    newlines, each on a box coloured by its count.

    Parameters
    ----------
    tokens, counts, vmin, vmax, cmap
        As in :func:`token_view_html`.
    chars_per_line : int, default 80
    title : str

    Returns
    -------
    matplotlib.figure.Figure
    """
    from matplotlib import cm, colors
    from matplotlib.patches import Rectangle

    values = _check_tokens(tokens, counts)
    if chars_per_line < 10:
        raise ValueError(f"`chars_per_line` must be at least 10, got {chars_per_line!r}.")
    lo = float(values.min()) if vmin is None else float(vmin)
    hi = float(values.max()) if vmax is None else float(vmax)
    placed = []  # (line, column, text, value)
    line, col = 0, 0
    for tok, v in zip(tokens, values):
        pieces = tok.split("\n")
        for n, piece in enumerate(pieces):
            if n > 0:
                line, col = line + 1, 0
            piece = piece.replace("\t", "    ")
            if not piece:
                continue
            if col + len(piece) > chars_per_line and col > 0:
                line, col = line + 1, 0
            placed.append((line, col, piece[:chars_per_line], v))
            col += min(len(piece), chars_per_line)
    n_lines = line + 1
    fig, ax = _new_figure(figsize=(0.064 * chars_per_line + 1.6, 0.2 * n_lines + 1.0))
    for ln, c, text, v in placed:
        ax.add_patch(Rectangle((c, ln), len(text), 1, facecolor=_colour(v, lo, hi, cmap), edgecolor="white", lw=0.5))
        ax.text(c, ln + 0.75, text, family="monospace", fontsize=7)
    ax.set_xlim(0, chars_per_line)
    ax.set_ylim(n_lines, 0)
    ax.axis("off")
    ax.set_title(title)
    mappable = cm.ScalarMappable(norm=colors.Normalize(vmin=lo, vmax=hi if hi > lo else lo + 1), cmap=cmap)
    fig.colorbar(mappable, ax=ax, label="experts per token", shrink=0.8)
    return fig
