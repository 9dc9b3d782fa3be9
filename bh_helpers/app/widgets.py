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
import time
from collections.abc import Mapping, Sequence
from typing import Any

from bh_helpers.experiments.explorer import (
    EXPLORER_METHODS,
    ExplorerSettings,
    ExplorerState,
    RoutingExplorer,
)
from bh_helpers.report.explorer_figure import ExplorerFigure

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
        scene = ExplorerFigure(self, st.settings.max_k, animated=False)
        scene.show(st)
        return scene.fig

    def png(self, state: ExplorerState | None = None) -> bytes:
        """PNG of :meth:`figure` for the widget, fast: one cached figure per ``max_k`` whose axes, ticks
        and labels are drawn once; a move redraws only the artists that changed (blitting) and encodes
        the image with light compression (about 30 ms where a fresh figure took about 200 ms)."""
        st = state or self.state or self.update()
        scenes = self.__dict__.setdefault("_scenes", {})
        if st.settings.max_k not in scenes:
            scenes[st.settings.max_k] = ExplorerFigure(self, st.settings.max_k, animated=True)
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
        # long: one UI, its controls and the callbacks that join them, read together
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
                + (f"<br><b>Warning:</b> {html.escape(st.bound_warning)}" if st.bound_warning else "")
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
