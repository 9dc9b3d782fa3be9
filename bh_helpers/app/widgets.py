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
        from matplotlib.figure import Figure

        st = state or self.state or self.update()
        s = st.settings
        # A fixed layout: constrained layout would cost more than the whole update.
        fig = Figure(figsize=(12, 6.4))
        grid = fig.add_gridspec(2, 2, height_ratios=[1, 1.1], left=0.06, right=0.99, bottom=0.12,
                                top=0.95, hspace=0.45, wspace=0.15)
        ax_hist, ax_mean = fig.add_subplot(grid[0, 0]), fig.add_subplot(grid[0, 1])
        ax_tok = fig.add_subplot(grid[1, :])

        k = np.arange(s.max_k + 1)
        total = max(int(st.histogram.sum()), 1)
        ax_hist.bar(k, st.histogram / total, color="tab:blue", label=f"layer {s.layer}")
        ax_hist.step(k, st.histogram_all_layers / max(int(st.histogram_all_layers.sum()), 1),
                     where="mid", color="black", lw=1.2, label="all layers")
        ax_hist.axvline(self.native_k, color="tab:red", ls="--", lw=1, label=f"native k={self.native_k}")
        ax_hist.set(xlabel="experts per token", ylabel="share of tokens",
                    title=f"{s.method} alpha={_alpha_text(s.alpha)} kernel={s.kernel} k in [{s.min_k}, {s.max_k}]")
        ax_hist.set_xticks(k)
        ax_hist.legend(fontsize=8)

        ax_mean.bar([str(layer) for layer in st.layers], st.mean_k_per_layer, color="tab:green")
        ax_mean.axhline(self.native_k, color="tab:red", ls="--", lw=1)
        ax_mean.set(xlabel="layer", ylabel="mean experts per token",
                    title=f"mean k {st.mean_k:.2f} = {st.relative_compute:.0%} of native expert compute")
        ax_mean.set_ylim(0, max(self.native_k, s.max_k) + 0.5)

        t = min(self.view_tokens, self.num_tokens)
        mat = st.counts[:t].T.numpy()  # (L, t)
        im = ax_tok.imshow(mat, aspect="auto", cmap="viridis", vmin=0, vmax=s.max_k, interpolation="nearest")
        ax_tok.set_yticks(range(len(st.layers)), [str(layer) for layer in st.layers])
        ax_tok.set_xticks(range(t), [repr(tok)[1:-1][:8] for tok in self.tokens[:t]], rotation=90, fontsize=7)
        ax_tok.set(ylabel="layer", title=f"experts per token, first {t} cached tokens")
        fig.colorbar(im, ax=ax_tok, label="experts", pad=0.005, fraction=0.03)
        return fig

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
            "min_k": w.IntSlider(value=s.min_k, min=0, max=k_limit, description="min_k"),
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

        def redraw(*_: Any) -> None:
            values = {name: c.value for name, c in controls.items()}
            st = self.update(**{**values, "alpha": layer_levels} if per_layer.value and layer_levels else values)
            start = time.perf_counter()
            buf = io.BytesIO()
            self.figure(st).savefig(buf, format="png", dpi=80)
            image.value = buf.getvalue()
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


def _alpha_text(a: float | Mapping[int, float]) -> str:
    return f"{min(a.values()):.3g}..{max(a.values()):.3g} per layer" if isinstance(a, Mapping) else f"{a:.3g}"
