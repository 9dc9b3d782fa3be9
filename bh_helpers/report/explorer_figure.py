"""The alpha explorer's figure, redrawn at every slider move by blitting over a cached background.

One concern: keeping an explorer move under 100 ms end to end (``benchmarks/bench_widgets.py``). A
fresh matplotlib figure and ``savefig`` took about 200 ms a move on 2 CPU cores; here the axes,
ticks, legend and colour bar are drawn once per ``max_k`` and only the artists that change are
drawn again (``tests/test_widgets.py`` checks the PNG against a fresh :meth:`ExplorerFigure.show`).
"""

from __future__ import annotations

import io
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:  # for annotations only
    from bh_helpers.experiments.explorer import ExplorerState

__all__ = ["ExplorerFigure"]


class ExplorerFigure:
    """The alpha explorer's figure for one ``max_k``: histogram, mean k per layer, per-token counts.

    Axes, ticks, legend and colour bar are fixed; bars, step, image and titles are set from an
    :class:`~bh_helpers.experiments.explorer.ExplorerState` by :meth:`show`. With ``animated=True`` the
    fixed part is rendered once and kept as a background, and :meth:`png` redraws only the changing
    artists over it (blitting), which is what keeps a slider move under 100 ms.

    Parameters
    ----------
    explorer : RoutingExplorer
        Its ``native_k``, ``layers``, ``view_tokens``, ``num_tokens`` and ``tokens`` set the layout.
    max_k : int
        The ceiling: the histogram's bins and the colour scale.
    animated : bool
        Prepare for :meth:`png` (blitting) rather than for a plain ``fig.savefig``.
    """

    DPI = 80

    def __init__(self, explorer: Any, max_k: int, *, animated: bool) -> None:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure

        ex = explorer
        self.explorer, self.animated = ex, animated
        self.fig = Figure(figsize=(12, 6.4), dpi=self.DPI)
        self.canvas = FigureCanvasAgg(self.fig)
        # A fixed layout: constrained layout would cost more than the whole update.
        grid = self.fig.add_gridspec(2, 2, height_ratios=[1, 1.1], left=0.06, right=0.99, bottom=0.12,
                                     top=0.95, hspace=0.45, wspace=0.15)
        ax_hist, ax_mean = self.fig.add_subplot(grid[0, 0]), self.fig.add_subplot(grid[0, 1])
        ax_tok = self.fig.add_subplot(grid[1, :])
        k = np.arange(max_k + 1)
        self.hist = ax_hist.bar(k, np.zeros(len(k)), color="tab:blue", label="shown layer")
        self.step, = ax_hist.step(k, np.zeros(len(k)), where="mid", color="black", lw=1.2, label="all layers")
        native_line = ax_hist.axvline(ex.native_k, color="tab:red", ls="--", lw=1, label=f"native k={ex.native_k}")
        ax_hist.set(xlabel="experts per token", ylabel="share of tokens", ylim=(0, 1.02))
        ax_hist.set_xticks(k)
        legend = ax_hist.legend(fontsize=8, loc="upper right", framealpha=1, fancybox=False)  # opaque: see png
        layers = [str(layer) for layer in ex.layers]
        self.means = ax_mean.bar(layers, np.zeros(len(layers)), color="tab:green")
        native_level = ax_mean.axhline(ex.native_k, color="tab:red", ls="--", lw=1)
        ax_mean.set(xlabel="layer", ylabel="mean experts per token", ylim=(0, max(ex.native_k, max_k) + 0.5))
        self.t = min(ex.view_tokens, ex.num_tokens)
        self.image = ax_tok.imshow(np.zeros((len(layers), self.t)), aspect="auto", cmap="viridis", vmin=0, vmax=max_k,
                                   interpolation="nearest")
        ax_tok.set_yticks(range(len(layers)), layers)
        ax_tok.set_xticks(range(self.t), [repr(tok)[1:-1][:8] for tok in ex.tokens[:self.t]], rotation=90, fontsize=7)
        ax_tok.set(ylabel="layer", title=f"experts per token, first {self.t} cached tokens")
        self.fig.colorbar(self.image, ax=ax_tok, label="experts", pad=0.005, fraction=0.03)
        self.titles = (ax_hist.set_title(" "), ax_mean.set_title(" "))
        # what changes, and what is drawn over it (lines, spines, legend), in matplotlib's own z-order
        # what changes, and what is drawn over it (lines, spines), in matplotlib's own z-order; the legend
        # (opaque, square) is drawn once and its pixels pasted back over the bars
        self.dynamic = [*self.hist, self.step, native_line, *ax_hist.spines.values(), *self.means, native_level,
                        *ax_mean.spines.values(), self.image, *ax_tok.spines.values(), *self.titles]
        self.background = self.legend = None
        if animated:
            for artist in self.dynamic:
                artist.set_animated(True)
            self.canvas.draw()
            self.background = self.canvas.copy_from_bbox(self.fig.bbox)
            self.legend = self.canvas.copy_from_bbox(legend.get_window_extent())
            self.legend_after = len(self.hist) + 2 + len(ax_hist.spines)  # index in dynamic: after the histogram

    def show(self, st: ExplorerState) -> None:
        """Set the changing artists from ``st``."""
        s = st.settings
        for bar, height in zip(self.hist, st.histogram / max(int(st.histogram.sum()), 1)):
            bar.set_height(height)
        pooled = st.histogram_all_layers / max(int(st.histogram_all_layers.sum()), 1)
        self.step.set_ydata(pooled)
        for bar, height in zip(self.means, st.mean_k_per_layer):
            bar.set_height(height)
        self.image.set_data(st.counts[:self.t].T.numpy())  # (L, t)
        self.titles[0].set_text(f"layer {s.layer}: {s.method} alpha={_explorer_alpha(s.alpha)} kernel={s.kernel} "
                                f"k in [{s.min_k}, {s.max_k}]")
        self.titles[1].set_text(f"mean k {st.mean_k:.2f} = {st.relative_compute:.0%} of native expert compute")

    def png(self, st: ExplorerState) -> bytes:
        """The figure of ``st`` as PNG bytes (blitted over the cached background)."""
        from PIL import Image

        self.show(st)
        renderer = self.canvas.get_renderer()
        self.canvas.restore_region(self.background)
        for i, artist in enumerate(self.dynamic):
            if i == self.legend_after:
                self.canvas.restore_region(self.legend)
            artist.draw(renderer)
        width, height = self.canvas.get_width_height()
        buf = io.BytesIO()
        Image.frombuffer("RGBA", (width, height), self.canvas.buffer_rgba(), "raw", "RGBA", 0, 1).save(
            buf, format="png", compress_level=1)
        return buf.getvalue()


def _explorer_alpha(a: Any) -> str:
    return f"{min(a.values()):.3g}..{max(a.values()):.3g} per layer" if isinstance(a, Mapping) else f"{a:.3g}"
