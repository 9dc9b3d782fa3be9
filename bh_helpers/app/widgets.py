"""The alpha explorer of notebook 04: the engine's states drawn, and its ipywidgets UI.

:class:`AlphaExplorer` is :class:`bh_helpers.experiments.explorer.RoutingExplorer` (the computation:
counts per token and layer for any setting, in milliseconds, on cached router logits) plus a
matplotlib figure of a state, an HTML per-token view, and :meth:`AlphaExplorer.widget` (sliders,
dropdowns, a compute-target box and the "run on the model" button).

Examples
--------
>>> explorer = AlphaExplorer(captured, banks, captured.token_ids, tokenizer=tok)  # doctest: +SKIP
>>> explorer.widget()  # doctest: +SKIP
"""

from __future__ import annotations

import html
import io
import time
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from bh_helpers.experiments.explorer import (
    EXPLORER_METHODS,
    ExplorerSettings,
    ExplorerState,
    RoutingExplorer,
)

__all__ = ["EXPLORER_METHODS", "AlphaExplorer", "ExplorerSettings", "ExplorerState"]


class AlphaExplorer(RoutingExplorer):
    """:class:`~bh_helpers.experiments.explorer.RoutingExplorer` with a figure, an HTML view and widgets.

    Takes the same arguments; see there.
    """

    _ui: dict[str, Any] | None = None

    # -- drawing ----------------------------------------------------------------------------

    def figure(self, state: ExplorerState | None = None):
        """Matplotlib figure of a state: histogram, mean k per layer, per-token counts.

        Built with ``matplotlib.figure.Figure`` (not pyplot), so it is never displayed twice.
        """
        st = state or self.state or self.update()
        scene = _Scene(self, st.settings.max_k, animated=False)
        scene.show(st)
        return scene.fig

    def png(self, state: ExplorerState | None = None) -> bytes:
        """PNG of :meth:`figure` for the widget, fast: one cached figure per ``max_k`` whose axes, ticks
        and labels are drawn once; a move redraws only the artists that changed (blitting) and encodes
        the image with light compression (about 30 ms where a fresh figure took about 200 ms)."""
        st = state or self.state or self.update()
        scenes = self.__dict__.setdefault("_scenes", {})
        if st.settings.max_k not in scenes:
            scenes[st.settings.max_k] = _Scene(self, st.settings.max_k, animated=True)
        return scenes[st.settings.max_k].png(st)

    def token_html(self, state: ExplorerState | None = None, limit: int | None = None) -> str:
        """The first tokens coloured by their experts in the displayed layer (HTML)."""
        st = state or self.state or self.update()
        s = st.settings
        t = min(limit or self.view_rows, self.view_rows)
        column = st.layers.index(s.layer)
        counts = st.counts[:t, column].tolist()
        top = st.selection.indices[:t]
        spans = []
        for i, (tok, c) in enumerate(zip(self.tokens[:t], counts)):
            share = c / max(s.max_k, 1)
            experts = [e for e in top[i].tolist() if e >= 0]
            spans.append(
                f'<span title="{c} experts: {experts}" style="background: rgba(31,119,180,{0.1 + 0.8 * share:.2f});'
                f' padding:1px; margin:0 1px; border-radius:3px">{html.escape(tok)}</span>'
            )
        return (
            f"<div style='line-height:1.9; font-family:monospace; white-space:pre-wrap'><b>layer {s.layer}</b>"
            f" (darker = more experts; hover for the expert ids): " + "".join(spans) + "</div>"
        )

    # -- widgets ----------------------------------------------------------------------------

    def widget(self, *, prompt: str = "The", eval_texts: Sequence[str] | None = None, max_new_tokens: int = 24):
        """Build the ipywidgets UI (sliders, plots, per-token view, "run on the model" button).

        Returns
        -------
        ipywidgets.VBox
            Display it (last expression of a cell). Every slider move calls :meth:`update` and
            redraws; the timing label shows the computation time of the last update.
        """
        import ipywidgets as w

        s = self.settings
        k_limit = min(self.num_experts, 2 * self.native_k)
        controls = {
            "alpha": w.FloatLogSlider(value=min(s.alpha.values()) if isinstance(s.alpha, Mapping) else s.alpha,
                                      base=10, min=-12, max=0, step=0.05, description="alpha", readout_format=".3g",
                                      continuous_update=True),
            "max_k": w.IntSlider(value=s.max_k, min=1, max=k_limit, description="max_k"),
            "min_k": w.IntSlider(value=s.min_k, min=0, max=s.max_k, description="min_k"),
            "method": w.Dropdown(options=list(EXPLORER_METHODS), value=s.method, description="method"),
            "kernel": w.Dropdown(options=self.kernels, value=s.kernel, description="kernel"),
            "layer": w.Dropdown(options=self.layers, value=s.layer, description="layer"),
        }
        target = w.FloatSlider(value=round(self.update().mean_k, 1), min=0.5, max=float(k_limit), step=0.1,
                               description="target k", tooltip="experts per token to reach: sets alpha",
                               continuous_update=False)
        per_layer = w.Checkbox(value=isinstance(s.alpha, Mapping), description="target in every layer")
        layer_levels = dict(s.alpha) if per_layer.value else {}  # per-layer alphas, used while per_layer is ticked
        image = w.Image(format="png")
        tokens_view = w.HTML()
        timing = w.HTML()
        button = w.Button(description="run on the model", icon="play",
                          disabled=self.model is None or self.tokenizer is None,
                          tooltip="greedy generation and perplexity with these settings (native alongside)")
        live = w.Output()

        syncing = [False]  # set while redraw moves a slider itself (its own observer then does nothing)

        def redraw(*_: Any) -> None:
            if syncing[0]:
                return
            syncing[0] = True
            try:  # the floor slider ends at the ceiling: min_k > max_k cannot be chosen, and the slider shows it
                controls["min_k"].max = controls["max_k"].value  # lowers min_k's value with it when above
            finally:
                syncing[0] = False
            values = {name: c.value for name, c in controls.items()}
            st = self.update(**{**values, "alpha": layer_levels} if per_layer.value and layer_levels else values)
            start = time.perf_counter()
            image.value = self.png(st)
            tokens_view.value = self.token_html(st)
            draw_ms = (time.perf_counter() - start) * 1e3
            timing.value = (
                f"update {st.elapsed_ms:.1f} ms (median {self.median_update_ms():.1f} ms over "
                f"{len(self.timings_ms)}), drawing {draw_ms:.0f} ms; mean k {st.mean_k:.2f} "
                f"({st.relative_compute:.0%} of native top-{self.native_k})"
            )

        def run_clicked(_: Any) -> None:
            from IPython.display import display

            from bh_helpers.app.notebook import live_run_html

            with live:
                live.clear_output()
                button.disabled = True
                try:
                    res = self.run_live(prompt, eval_texts=eval_texts, max_new_tokens=max_new_tokens)
                    display(live_run_html(res))
                finally:
                    button.disabled = False

        def target_moved(change: Any) -> None:
            try:
                found = self.alpha_for_target(
                    change["new"], per_layer=per_layer.value, method=controls["method"].value,
                    min_k=controls["min_k"].value, max_k=controls["max_k"].value, kernel=controls["kernel"].value)
            except ValueError as err:  # out of reach with these min_k/max_k: say so, change nothing
                timing.value = f"<b>target k {change['new']:.1f}:</b> {html.escape(str(err))}"
                return
            if per_layer.value:
                layer_levels.clear()
                layer_levels.update(found)
                redraw()
            else:
                controls["alpha"].value = found

        # moving the alpha slider by hand leaves the per-layer levels (before it redraws)
        controls["alpha"].observe(lambda _: setattr(per_layer, "value", False), names="value")
        for control in controls.values():
            control.observe(redraw, names="value")
        target.observe(target_moved, names="value")
        per_layer.observe(lambda c: target_moved({"new": target.value}) if c["new"] else redraw(), names="value")
        button.on_click(run_clicked)
        redraw()
        self._ui = {"controls": controls, "target": target, "per_layer": per_layer, "image": image,
                    "tokens": tokens_view, "timing": timing, "live": live}
        return w.VBox([
            w.HBox([w.VBox([target, per_layer, controls["alpha"], controls["max_k"], controls["min_k"]]),
                    w.VBox([controls["method"], controls["kernel"], controls["layer"]])]),
            timing, image, tokens_view, w.HBox([button]), live,
        ])


class _Scene:
    """The explorer's figure for one ``max_k``: axes, ticks and colour bar fixed; bars, step, image and
    titles set from a state. With ``animated=True`` the fixed part is rendered once and kept as a
    background, and :meth:`png` redraws only the changing artists over it."""

    DPI = 80

    def __init__(self, explorer: AlphaExplorer, max_k: int, *, animated: bool) -> None:
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
        self.titles[0].set_text(f"layer {s.layer}: {s.method} alpha={_alpha_text(s.alpha)} kernel={s.kernel} "
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


def _alpha_text(a: float | Mapping[int, float]) -> str:
    return f"{min(a.values()):.3g}..{max(a.values()):.3g} per layer" if isinstance(a, Mapping) else f"{a:.3g}"
