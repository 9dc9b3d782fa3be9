"""The alpha explorer's engine: routing settings answered on cached router logits in milliseconds.

:class:`RoutingExplorer` captures nothing and fits nothing: it takes router logits captured once
(``capture_router_logits``) and one fitted :class:`~bh_helpers.nulls.bank.NullBank` per kernel,
precomputes every p-value once, and then answers "how many experts would each token get with
these settings?" in milliseconds. The sliders of :class:`bh_helpers.app.widgets.AlphaExplorer`
(this engine plus drawing and ipywidgets) call :meth:`RoutingExplorer.update`, and so can tests
and scripts (no widget needed).

Why an update is cheap: the number of rejections of BH, BY, Bonferroni and Holm depends only on
the multiset of a token's p-values, so the p-values are stored sorted per token (ascending) and an
update is one vectorised count over ``[L, N, E]`` (the step-up of :func:`~bh_helpers.selection.reference.fdr_counts` on the cached sorted p-values) plus
one :func:`~bh_helpers.selection.reference.select_experts` on the displayed layer. Nothing touches the model
until the "run on the model" button (or :meth:`AlphaExplorer.run_live`) is used.

Examples
--------
>>> explorer = RoutingExplorer(captured, banks, captured.token_ids, tokenizer=tok)  # doctest: +SKIP
>>> state = explorer.update(alpha=0.01, kernel="gaussian")  # doctest: +SKIP
>>> state.mean_k_per_layer, state.elapsed_ms  # doctest: +SKIP
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, replace
from typing import Any

import numpy as np
import torch

from bh_helpers._validate import check_choice, check_finite_logits, check_int, check_level
from bh_helpers.models.families import moe_shape
from bh_helpers.routing.recorder import bound_warning
from bh_helpers.selection.budget import alpha_at, layer_alphas
from bh_helpers.selection.reference import FDR_METHODS, Selection, _counts_from_sorted, select_experts

__all__ = ["EXPLORER_METHODS", "ExplorerSettings", "ExplorerState", "RoutingExplorer"]

#: Methods offered by the explorer: the multiple-testing rules, and static top-k (k = ``max_k``).
EXPLORER_METHODS = FDR_METHODS + ("topk",)
#: Default number of cached tokens kept (the first ones, so the per-token view reads as text).
DEFAULT_MAX_TOKENS = 4096
#: Tokens shown in the per-token view.
DEFAULT_VIEW_TOKENS = 48


@dataclass(frozen=True)
class ExplorerSettings:
    """One position of the sliders.

    Attributes
    ----------
    alpha : float, or mapping of int to float
        Level of the multiple-testing procedure, in (0, 1] (ignored by "topk"); or one per layer
        (adaptive FDR; a sequence is indexed by layer number, see
        :func:`~bh_helpers.selection.budget.layer_alphas`).
    max_k, min_k : int
        Ceiling and floor on experts per token ("topk" uses ``k = max_k``).
    method : {"bh", "by", "bonferroni", "holm", "topk"}
    kernel : str
        Key of ``null_banks_by_kernel`` whose p-values are used.
    layer : int
        Layer shown in the histogram and the per-token view.
    """

    alpha: float | Mapping[int, float] = 0.05
    max_k: int = 8
    min_k: int = 1
    method: str = "bh"
    kernel: str = "gaussian"
    layer: int = 0


@dataclass
class ExplorerState:
    """What one :meth:`AlphaExplorer.update` computed.

    Attributes
    ----------
    settings : ExplorerSettings
    counts : torch.LongTensor, shape ``[N, L]``
        Experts per token in every cached layer (columns in ``layers`` order).
    layers : list of int
    histogram : numpy.ndarray, shape ``[max_k + 1]``
        Number of tokens of the displayed layer with 0, 1, ..., ``max_k`` experts.
    histogram_all_layers : numpy.ndarray, shape ``[max_k + 1]``
        The same, pooled over all layers (token-layers).
    mean_k_per_layer : numpy.ndarray, shape ``[L]``
    mean_k : float
        Mean experts per token over all layers.
    relative_compute : float
        ``mean_k / native_k`` (expert compute relative to the native top-k).
    selection : Selection
        The selection of the displayed layer for the first ``view_rows`` tokens (the per-token
        view; ``indices`` ``[view_rows, max_k]``).
    elapsed_ms : float
        Wall time of the computation (not of any drawing), in milliseconds.
    bound_warning : str or None
        :func:`~bh_helpers.routing.recorder.bound_warning` of this setting: which layers have most of
        their tokens at ``min_k`` or ``max_k`` (that setting is the bound, not BH), and how to choose alpha.
    """

    settings: ExplorerSettings
    counts: torch.Tensor
    layers: list[int]
    histogram: np.ndarray
    histogram_all_layers: np.ndarray
    mean_k_per_layer: np.ndarray
    mean_k: float
    relative_compute: float
    selection: Selection
    elapsed_ms: float
    bound_warning: str | None = None  # most tokens of a layer at min_k or max_k: the bound, not BH


@contextmanager
def _intra_op_threads(n: int | None) -> Iterator[None]:
    """Run a block with ``n`` torch intra-op threads, restoring the previous number."""
    previous = torch.get_num_threads()
    if n is None or n == previous:
        yield
        return
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def _decode_tokens(tokens: Any, tokenizer: Any, n: int) -> list[str]:
    if isinstance(tokens, torch.Tensor):
        ids = tokens.reshape(-1)[:n].tolist()
    elif isinstance(tokens, np.ndarray):
        ids = tokens.reshape(-1)[:n].tolist()
    else:
        seq = list(tokens)[:n]
        if all(isinstance(t, str) for t in seq):
            return seq
        ids = [int(t) for t in seq]
    if tokenizer is None:
        return [str(i) for i in ids]
    return tokenizer.batch_decode([[i] for i in ids])


class RoutingExplorer:
    """Explore BH routing settings on cached router logits (no drawing, no widgets).

    Parameters
    ----------
    cached_logits : mapping of int to Tensor ``[N, E]``
        Router logits per layer, row-aligned across layers (a ``CapturedLogits`` works). Only the
        first ``max_tokens`` rows are kept.
    null_banks_by_kernel : mapping of str to NullBank
        One fitted bank per kernel name; each must cover every cached layer.
    tokens : sequence of str, or token ids (Tensor / sequence of int)
        The token of each row (at least ``N`` of them); ids are decoded with ``tokenizer``.
    model, tokenizer : optional
        The live model for :meth:`run_live` (the button), and its tokenizer.
    max_tokens : int, default 4096
        Rows kept from the cache.
    native_k : int, optional
        The model's own top-k; read from ``model`` when given, else 8 (OLMoE).
    weights : {"softmax", "renorm", "uniform", "inverse_p"}, default "softmax"
        Mixing weights of the selected experts in :meth:`run_live`. "softmax" (the raw router
        probabilities) is OLMoE's own convention (``norm_topk_prob=False``) and the sweep's
        default in :mod:`bh_helpers.app.pipeline`, so top-8 equals the native model.
    view_tokens : int, default 48
        Tokens shown in the per-token view.
    threads : int or None, default 1
        torch intra-op threads during an update (restored afterwards; None leaves them alone).
        One thread is fastest for these small tensors on a busy 2-core machine (Colab), where
        thread hand-offs cost more than the work.

    Raises
    ------
    ValueError
        Empty inputs, layers with different row counts, banks missing a cached layer, or fewer
        tokens than rows.
    """

    def __init__(
        self,
        cached_logits: Mapping[int, torch.Tensor],
        null_banks_by_kernel: Mapping[str, Any],
        tokens: Any,
        model: Any = None,
        tokenizer: Any = None,
        *,
        max_tokens: int = DEFAULT_MAX_TOKENS,
        native_k: int | None = None,
        weights: str = "softmax",
        view_tokens: int = DEFAULT_VIEW_TOKENS,
        threads: int | None = 1,
    ) -> None:
        # Input validation
        if not cached_logits:
            raise ValueError("`cached_logits` is empty: capture router logits first.")
        if not null_banks_by_kernel:
            raise ValueError("`null_banks_by_kernel` is empty: fit at least one NullBank.")
        check_int("max_tokens", max_tokens, 1)
        self.layers = sorted(int(layer) for layer in cached_logits)
        rows = {int(cached_logits[layer].shape[0]) for layer in self.layers}
        if len(rows) != 1:
            raise ValueError(f"`cached_logits` layers have different row counts {sorted(rows)}; they must be aligned.")
        n = min(rows.pop(), max_tokens)
        if n == 0:
            raise ValueError("`cached_logits` has no rows.")
        for kernel, bank in null_banks_by_kernel.items():
            missing = [layer for layer in self.layers if layer not in bank]
            if missing:
                raise ValueError(f"null bank {kernel!r} has no null for cached layers {missing}.")
        self.tokens = _decode_tokens(tokens, tokenizer, n)
        if len(self.tokens) < n:
            raise ValueError(f"`tokens` has {len(self.tokens)} entries but the cache keeps {n} rows.")

        self.model = model
        self.tokenizer = tokenizer
        self.weights = weights
        self.view_tokens = int(view_tokens)
        self.threads = threads
        self.view_rows = min(n, 4 * self.view_tokens)  # rows of the per-token HTML view
        self.kernels = list(null_banks_by_kernel)
        self.banks = dict(null_banks_by_kernel)
        self.logits = {layer: cached_logits[layer][:n].detach().to("cpu", torch.float32) for layer in self.layers}
        for layer, x in self.logits.items():  # the rows it keeps: every p-value and alpha is computed on them
            check_finite_logits(f"cached_logits[{layer}]", x)
        self.num_experts = int(next(iter(self.logits.values())).shape[-1])
        if native_k is None:
            native_k = moe_shape(model).top_k if model is not None else 8
        self.native_k = int(native_k)
        self.num_tokens = n
        # Precomputed once: p-values per kernel and layer, and the same sorted ascending per
        # token (the rejection counts depend only on the sorted values).
        self.pvalues: dict[str, dict[int, torch.Tensor]] = {}
        self.sorted_pvalues: dict[str, torch.Tensor] = {}  # kernel -> (L, N, E)
        for kernel, bank in self.banks.items():
            self.pvalues[kernel] = {
                layer: bank.pvalues(self.logits[layer], layer).to(torch.float32).contiguous()  # (N, E)
                for layer in self.layers
            }
            stacked = torch.stack([self.pvalues[kernel][layer] for layer in self.layers])  # (L, N, E)
            # float64 once here, not at every move (the thresholds are float64: the same comparisons)
            self.sorted_pvalues[kernel] = stacked.sort(dim=-1).values.double().contiguous()  # (L, N, E)
        self.settings = ExplorerSettings(
            kernel=self.kernels[0], layer=self.layers[0], max_k=min(8, self.num_experts)
        )
        self.timings_ms: list[float] = []
        self.state: ExplorerState | None = None

    # -- computation ------------------------------------------------------------------------

    def _check(self, s: ExplorerSettings) -> None:
        check_choice("method", s.method, EXPLORER_METHODS)
        check_choice("kernel", s.kernel, self.kernels)
        check_choice("layer", s.layer, self.layers)
        missing = set(self.layers) - set(s.alpha) if isinstance(s.alpha, Mapping) else ()
        if missing:
            raise ValueError(f"`alpha` has no level for layers {sorted(missing)}; give one per layer {self.layers}.")
        if not 1 <= s.max_k <= self.num_experts:
            raise ValueError(f"`max_k` must be in [1, {self.num_experts}]; got {s.max_k!r}.")
        if not 0 <= s.min_k <= s.max_k:
            raise ValueError(f"`min_k` must be in [0, max_k={s.max_k}]; got {s.min_k!r} (lower min_k first, or raise "
                             "max_k).")

    def _counts(self, s: ExplorerSettings) -> torch.Tensor:
        """Experts per token in every layer, ``[N, L]``: one vectorised call over all layers."""
        if s.method == "topk":
            return torch.full((self.num_tokens, len(self.layers)), s.max_k, dtype=torch.long)
        p = self.sorted_pvalues[s.kernel]  # (L, N, E), sorted per token
        # the cached p-values are sorted already: count from them directly (fdr_counts would sort again)
        if isinstance(s.alpha, Mapping):  # one level per layer: one call per layer
            counts = torch.stack([_counts_from_sorted(p[i], check_level("alpha", s.alpha[layer]), s.method)
                                  for i, layer in enumerate(self.layers)])  # (L, N)
        else:
            counts = _counts_from_sorted(p, check_level("alpha", s.alpha), s.method)  # (L, N)
        return counts.clamp(s.min_k, s.max_k).T  # (N, L)

    def update(self, **settings: Any) -> ExplorerState:
        """Recompute every selection for new settings (the sliders call this).

        Parameters
        ----------
        **settings
            Any fields of :class:`ExplorerSettings` (``alpha``, ``max_k``, ``min_k``, ``method``,
            ``kernel``, ``layer``); the others keep their current values. A ``min_k`` above
            ``max_k`` is an error (nothing is clamped; the widget's floor slider ends at the ceiling).

        Returns
        -------
        ExplorerState
            Also stored as ``self.state``; ``elapsed_ms`` is appended to ``self.timings_ms``.
        """
        unknown = set(settings) - set(ExplorerSettings.__dataclass_fields__)
        if unknown:
            raise ValueError(f"unknown settings {sorted(unknown)}; use {list(ExplorerSettings.__dataclass_fields__)}.")
        s = replace(self.settings, **settings)
        max_k = int(s.max_k)
        s = replace(s, alpha=layer_alphas(s.alpha), max_k=max_k, min_k=int(s.min_k), layer=int(s.layer))
        self._check(s)
        with _intra_op_threads(self.threads):
            return self._update(s)

    def _update(self, s: ExplorerSettings) -> ExplorerState:
        start = time.perf_counter()
        counts = self._counts(s)  # (N, L)
        # Which experts: only for the rows the per-token view shows (the costly part of a selection).
        logits = self.logits[s.layer][: self.view_rows]  # (V, E)
        pvalues = self.pvalues[s.kernel][s.layer][: self.view_rows]  # (V, E)
        if s.method == "topk":
            selection = select_experts(
                logits, pvalues, method="topk", k=s.max_k, max_k=s.max_k, weights=self.weights, validate=False
            )
        else:
            selection = select_experts(
                logits, pvalues, method=s.method, alpha=alpha_at(s.alpha, s.layer),
                min_k=s.min_k, max_k=s.max_k, weights=self.weights, validate=False,
            )
        column = self.layers.index(s.layer)
        histogram = torch.bincount(counts[:, column], minlength=s.max_k + 1).numpy()  # (max_k+1,)
        histogram_all = torch.bincount(counts.reshape(-1), minlength=s.max_k + 1).numpy()  # (max_k+1,)
        mean_per_layer = counts.double().mean(0).numpy()  # (L,)
        bound = None if s.method == "topk" else bound_warning(
            {layer: (float(f), float(c)) for layer, f, c in zip(self.layers, (counts == s.min_k).double().mean(0),
                                                                (counts == s.max_k).double().mean(0))},
            s.min_k, s.max_k)
        elapsed_ms = (time.perf_counter() - start) * 1e3
        mean_k = float(mean_per_layer.mean())
        self.settings = s
        self.state = ExplorerState(
            settings=s,
            counts=counts,
            layers=list(self.layers),
            histogram=histogram,
            histogram_all_layers=histogram_all,
            mean_k_per_layer=mean_per_layer,
            mean_k=mean_k,
            relative_compute=mean_k / self.native_k,
            selection=selection,
            elapsed_ms=elapsed_ms,
            bound_warning=bound,
        )
        self.timings_ms.append(elapsed_ms)
        return self.state

    def alpha_for_target(self, target_mean_k: float, *, per_layer: bool = False,
                         **settings: Any) -> float | dict[int, float]:
        """The alpha at which the current (or given) settings use ``target_mean_k`` experts per token.

        Mean over every layer's cached tokens, or (``per_layer``) one alpha per layer reaching the
        target in each layer (:func:`bh_helpers.selection.budget.alpha_for_mean_k`); a ValueError
        names the reachable range when the target is outside it.
        """
        from bh_helpers.selection.budget import alpha_for_mean_k

        s = replace(self.settings, **settings)
        return alpha_for_mean_k(self.banks[s.kernel], self.logits, target_mean_k, method=s.method, min_k=s.min_k,
                                max_k=s.max_k, per_layer=per_layer)

    def median_update_ms(self) -> float:
        """Median of the recorded update times (NaN before the first update)."""
        return statistics.median(self.timings_ms) if self.timings_ms else float("nan")

    def alpha_table(self, alphas: Sequence[float], **settings: Any):
        """Mean experts per token for several alphas (other settings as given or current).

        Returns
        -------
        pandas.DataFrame
            One row per alpha: ``alpha``, ``mean_k``, ``relative_compute``, ``floor_rate``,
            ``ceiling_rate`` (shares of token-layers at ``min_k`` / ``max_k``) and one column per
            layer (``L<i>``: mean k of layer i).
        """
        import pandas as pd

        previous = self.settings
        rows = []
        try:
            for alpha in alphas:
                st = self.update(alpha=alpha, **settings)
                counts = st.counts
                row = {
                    "alpha": float(alpha),
                    "mean_k": st.mean_k,
                    "relative_compute": st.relative_compute,
                    "floor_rate": float((counts == st.settings.min_k).double().mean()),
                    "ceiling_rate": float((counts == st.settings.max_k).double().mean()),
                }
                row.update({f"L{layer}": float(m) for layer, m in zip(st.layers, st.mean_k_per_layer)})
                rows.append(row)
        finally:
            self.update(**asdict(previous))
        return pd.DataFrame(rows)

    # -- the live model ---------------------------------------------------------------------

    def selector(self, settings: ExplorerSettings | None = None):
        """The routing selector of the current (or given) settings, for ``patching.route``."""
        from bh_helpers.selection.selectors import BHSelector, TopKSelector

        s = settings or self.settings
        if s.method == "topk":
            return TopKSelector(k=s.max_k, weights=self.weights,
                                null_bank=self.banks[s.kernel] if self.weights == "inverse_p" else None)
        return BHSelector(null_bank=self.banks[s.kernel], method=s.method, alpha=s.alpha,
                          min_k=s.min_k, max_k=s.max_k, weights=self.weights)

    def run_live(
        self,
        prompt: str = "The",
        *,
        eval_texts: Sequence[str] | None = None,
        max_new_tokens: int = 24,
        window: int = 128,
    ) -> dict[str, Any]:
        """Generate (greedy) and measure perplexity with the current settings on the live model.

        Parameters
        ----------
        prompt : str
            Prompt for greedy generation, native and routed.
        eval_texts : sequence of str, optional
            Texts for perplexity (window ``window``, stride ``window // 2``); skipped when None.
        max_new_tokens : int
        window : int

        Returns
        -------
        dict
            ``routed_text``, ``native_text``, ``routed_mean_k``, ``generate_s`` (routed),
            ``native_generate_s`` and, with ``eval_texts``, ``routed_ppl`` and ``native_ppl``.

        Raises
        ------
        ValueError
            When the explorer was built without ``model`` and ``tokenizer``.
        """
        if self.model is None or self.tokenizer is None:
            raise ValueError("run_live needs the explorer built with `model=` and `tokenizer=`.")
        from bh_helpers.evaluation.scoring import perplexity
        from bh_helpers.routing.patch import route

        model, tok = self.model, self.tokenizer
        device = next(model.parameters()).device
        batch = tok([prompt], return_tensors="pt").to(device)
        gen_kwargs = dict(max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=tok.pad_token_id)
        out: dict[str, Any] = {"settings": asdict(self.settings)}
        with torch.no_grad():
            start = time.perf_counter()
            native = model.generate(**batch, **gen_kwargs)
            out["native_generate_s"] = time.perf_counter() - start
            with route(model, self.selector()) as rec:
                start = time.perf_counter()
                routed = model.generate(**batch, **gen_kwargs)
                out["generate_s"] = time.perf_counter() - start
            out["routed_mean_k"] = rec.summary()["mean_k"]
            if eval_texts:
                texts = list(eval_texts)
                out["native_ppl"] = perplexity(model, tok, texts, window=window, progress=False).perplexity
                with route(model, self.selector()):
                    out["routed_ppl"] = perplexity(model, tok, texts, window=window, progress=False).perplexity
        out["native_text"] = tok.decode(native[0], skip_special_tokens=True)
        out["routed_text"] = tok.decode(routed[0], skip_special_tokens=True)
        return out
