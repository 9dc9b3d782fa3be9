"""What one sweep row measures, and the perplexity sweep that writes those rows.

:func:`make_evaluate_fn` is the ``evaluate_fn(config, dataset)`` of
:func:`bh_helpers.experiments.sweep.run_sweep`: it routes the model with the configuration's
selector and scores perplexity under one protocol. :func:`perplexity_sweep` wires it to the
evaluation texts and to a resumable results file whose identity (:func:`sweep_grid_id`) covers
everything besides the configurations that changes the numbers.

Evaluation protocol (stated in every report): perplexity with
:func:`bh_helpers.evaluation.scoring.perplexity` (documents joined by EOS, windows of ``window``
tokens with stride ``stride``, token-weighted mean NLL); the text of each data set is cut to its
first ``max_tokens`` tokens (whole documents, the last one truncated). Mean experts per token is
measured by the routing recorder over every routed token and layer.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from bh_helpers._locks import check_kind
from bh_helpers._validate import check_choice, check_int
from bh_helpers.evaluation.scoring import MIN_WINDOW, PerplexityResult, perplexity, resolve_window, scoring_window_count
from bh_helpers.evaluation.speed import compute_summary
from bh_helpers.experiments.bootstrap import MIN_WINDOWS
from bh_helpers.experiments.configs import bank_name
from bh_helpers.experiments.grids import check_grid_fits
from bh_helpers.experiments.static_allocation import mix_windows
from bh_helpers.experiments.sweep import run_sweep
from bh_helpers.models.texts import check_datasets, data_file_sha256, evaluation_texts
from bh_helpers.nulls.bank import NullBank
from bh_helpers.routing.patch import route, routed_model
from bh_helpers.selection.reference import WEIGHT_MODES
from bh_helpers.selection.selectors import NativeSelector, check_null_bank
from bh_helpers.selection.static import StaticLayerSelector

__all__ = ["check_enough_text", "check_protocol", "make_evaluate_fn", "perplexity_sweep", "sweep_grid_id",
           "sweep_results_path"]


def make_evaluate_fn(model, tokenizer, data: dict[str, list[str]], *, null_bank, window: int = 256,
                     stride: int = 256, batch_size: int = 8, weights: str = "softmax",
                     static_path: Any = None) -> Callable[[Any, str], dict]:
    """The ``evaluate_fn(config, dataset)`` of :func:`bh_helpers.experiments.sweep.run_sweep`.

    Metrics per row: the :class:`~bh_helpers.evaluation.scoring.PerplexityResult` fields (with
    ``protocol`` and the per-window NLL the bootstrap pairs on), :func:`~bh_helpers.evaluation.speed.compute_summary`
    (``mean_experts_per_token``, ``relative_compute``, ...), ``std_k``, ``floor_rate``,
    ``ceiling_rate``, ``per_layer_mean_k`` (``{layer: mean k}``), the load balance per layer
    (``per_layer_utilisation_cv``: coefficient of variation of the activations over experts,
    ``per_layer_unused_share``: share of experts never chosen) and ``k_hist`` (token-layer pairs
    with 0, 1, 2, ... experts).

    ``null_bank`` is one :class:`~bh_helpers.nulls.bank.NullBank` or a mapping of
    :func:`~bh_helpers.experiments.configs.bank_name` to banks. A ``"mixed"`` control runs at the
    per-layer mean k its adaptive configuration reached on the same data set (evaluated again
    when a resumed sweep did not evaluate it in this process). A ``"static_chord"`` control
    (needs ``static_path``) scores the two static allocations whose totals bracket the adaptive
    row's realised mean k and mixes their per-window NLL with the probabilities that match that
    compute (:func:`~bh_helpers.experiments.static_allocation.mix_windows`: the expected NLL of
    the per-window random policy); each allocation is scored once per data set.
    """
    native_k = NativeSelector.for_model(model).k
    if isinstance(null_bank, NullBank):  # itself a Mapping (layer -> null): name it
        meta = null_bank.metadata
        banks = {bank_name(meta.kernel, meta.statistic, meta.trim): null_bank}
    else:
        banks = dict(null_bank) if null_bank is not None else None
    reached: dict[tuple[str, str], dict[int, float]] = {}  # (adaptive key, data set) -> per-layer mean k

    def run(config, name: str, **kwargs) -> dict:
        selector = config.to_selector(model, null_bank=banks, weights=weights, **kwargs)
        with route(model, selector) as rec:
            ppl = perplexity(model, tokenizer, data[name], window=window, stride=stride, batch_size=batch_size,
                             progress=False)
        summary = rec.summary()
        counts = rec.per_token_counts().matrix().reshape(-1)
        counts = counts[counts >= 0]
        per_layer = {layer: s["mean_k"] for layer, s in summary["per_layer"].items()}
        reached[(config.key(), name)] = per_layer
        return {
            **ppl.to_dict(),
            **compute_summary(summary, native_k=native_k),
            "std_k": summary["std_k"],
            "floor_rate": summary["floor_rate"],
            "ceiling_rate": summary["ceiling_rate"],
            "per_layer_mean_k": {str(layer): k for layer, k in per_layer.items()},
            # load balance: spread of activations over experts, and experts never chosen
            "per_layer_utilisation_cv": {str(layer): s["utilisation_cv"] for layer, s in summary["per_layer"].items()},
            "per_layer_unused_share": {str(layer): s["unused_share"] for layer, s in summary["per_layer"].items()},
            "k_hist": np.bincount(counts.numpy()).tolist(),
        }

    static_scores: dict[tuple[tuple[int, ...], str], PerplexityResult] = {}

    def static_score(ks: tuple[int, ...], name: str) -> PerplexityResult:
        if (ks, name) not in static_scores:
            selector = StaticLayerSelector(dict(zip(static_path.layers, ks)), weights=weights)
            with route(model, selector):
                static_scores[ks, name] = perplexity(model, tokenizer, data[name], window=window, stride=stride,
                                                     batch_size=batch_size, progress=False)
        return static_scores[ks, name]

    def chord(per_layer: dict[int, float], name: str) -> dict:
        if static_path is None:
            raise ValueError("the static chord control needs `static_path` (a StaticAllocationPath of this model).")
        mean_k = sum(per_layer.values()) / len(per_layer)
        parts = static_path.chord(mean_k)
        mixed = mix_windows([(static_score(ks, name), p) for ks, p in parts])
        return {
            **mixed.to_dict(),
            **compute_summary({"mean_k": mean_k}, native_k=native_k),
            "per_layer_mean_k": {str(layer): sum(p * ks[i] for ks, p in parts)
                                 for i, layer in enumerate(static_path.layers)},
            "chord": [{"ks": list(ks), "probability": p} for ks, p in parts],
        }

    def evaluate(config, name: str) -> dict:
        if config.method not in ("mixed", "static_chord"):
            return run(config, name)
        adaptive = config.adaptive()
        if (adaptive.key(), name) not in reached:  # resumed after the adaptive row: measure it again
            run(adaptive, name)
        target = reached[(adaptive.key(), name)]
        metrics = run(config, name, mean_k=target) if config.method == "mixed" else chord(target, name)
        metrics["target_per_layer_mean_k"] = {str(k): v for k, v in target.items()}
        return metrics

    return evaluate


def check_protocol(*, datasets: Sequence[str], max_tokens: int, window: int, stride: int, batch_size: int,
                   weights: str = "softmax", model: Any = None) -> None:
    """The evaluation protocol's options, checked before anything loads or is written.

    The one check of these options: the demo's settings, ``bh-routing sweep`` (before the model
    loads) and :func:`perplexity_sweep` run it. With ``model`` (a model, or its config) the window
    is checked against the model's context length too. Raises ValueError naming the argument.
    """
    check_choice("weights", weights, WEIGHT_MODES)
    check_datasets(datasets)  # none, unknown names, empty .txt files
    check_int("max_tokens", max_tokens, 1)
    check_int("window", window, MIN_WINDOW)
    check_int("stride", stride, 1)
    check_int("batch_size", batch_size, 1)
    if stride > window:
        raise ValueError(f"`stride` ({stride}) must not exceed `window` ({window}).")
    if model is not None:
        resolve_window(model, window, stride)


def check_enough_text(datasets: Sequence[str], tokenizer, *, max_tokens: int, window: int, stride: int) -> None:
    """Refuse a data set whose text gives fewer scoring windows than an interval needs (:data:`MIN_WINDOWS`).

    ``max_tokens`` is checked against the windows it would give before a model loads; the text
    itself (a short ``.txt`` file) only once the tokenizer is here: the demo runs this before it
    writes anything, so a run that could state no interval is refused, not reported as "no verdict".
    """
    for name in datasets:
        tokens, windows = scoring_window_count(tokenizer, evaluation_texts(name, tokenizer, max_tokens=max_tokens),
                                               window=window, stride=stride)
        if windows < MIN_WINDOWS:
            raise ValueError(
                f"`datasets` {name!r} holds {tokens} tokens: {windows} scoring window{'s' * (windows != 1)} of "
                f"{window}; a paired-bootstrap interval needs at least {MIN_WINDOWS}: give it at least "
                f"{window + (MIN_WINDOWS - 1) * stride} tokens of text (or a smaller `window`).")


def perplexity_sweep(model, tokenizer, configs, *, null_bank, results_path: str | os.PathLike,
                     datasets: Sequence[str] = ("prose", "code"), max_tokens: int = 2048, window: int = 256,
                     stride: int = 256, batch_size: int = 8, weights: str = "softmax", model_id: str = "tiny",
                     static_path: Any = None, progress: bool = True):
    """Run (or resume) a perplexity sweep; returns :func:`~bh_helpers.experiments.sweep.load_results`.

    Parameters
    ----------
    model, tokenizer
    configs : list of SweepConfig
        E.g. from :func:`bh_helpers.experiments.grids.sweep_grid`.
    null_bank : NullBank or mapping of str to NullBank
        Nulls of ``model`` (for the multiple-testing configurations); a mapping is keyed by
        :func:`~bh_helpers.experiments.configs.bank_name` (one bank per statistic and trim).
    results_path : path-like
        JSON Lines results; an existing file of another grid raises ``ValueError`` untouched.
    datasets : sequence of str
        Names from :data:`bh_helpers.models.texts.EVAL_DATASETS` or ``.txt`` paths.
    max_tokens : int, default 2048
        Tokens per data set.
    window, stride, batch_size : int
        Perplexity protocol (:func:`bh_helpers.evaluation.scoring.perplexity`); ``batch_size``
        is used as given (the caller fits it to the GPU's free memory).
    weights : {"softmax", "renorm", "uniform", "inverse_p"}, default "softmax"
        Weights of the selected experts for BH-family, top-k and top-p configurations.
        ``"softmax"`` (raw router probabilities) is OLMoE's own convention
        (``norm_topk_prob=False``), so top-8 equals the native model; ``"renorm"`` rescales the
        selected probabilities to sum to 1, which the tiny model was not trained for.
    model_id : str
    static_path : StaticAllocationPath, optional
        Needed when ``configs`` hold static-chord controls (see :func:`make_evaluate_fn`).
    progress : bool

    Returns
    -------
    pandas.DataFrame
    """
    datasets = list(datasets)
    check_kind(results_path, "`results_path`")
    check_protocol(datasets=datasets, max_tokens=max_tokens, window=window, stride=stride, batch_size=batch_size,
                   weights=weights, model=model)
    for config in configs:  # per-layer levels of another model would fail at their row, after the header is written
        if config.layer_alphas is not None:
            check_grid_fits(model, max_ks=(), min_ks=(), topk_max=1, layer_alphas=(config.layer_alphas,))
    target = routed_model(model)  # every check route() makes of a bank, before the header is written
    for bank in ([null_bank] if isinstance(null_bank, NullBank) else list(null_bank.values())):
        check_null_bank(bank, target)
    data = {name: evaluation_texts(name, tokenizer, max_tokens=max_tokens) for name in datasets}
    grid_id = sweep_grid_id(model_id=model_id, null_bank=null_bank, datasets=datasets, max_tokens=max_tokens,
                            window=window, stride=stride, weights=weights, static_path=static_path)
    evaluate = make_evaluate_fn(model, tokenizer, data, null_bank=null_bank, window=window, stride=stride,
                                batch_size=batch_size, weights=weights, static_path=static_path)
    protocol = {"window": int(window), "stride": int(stride), "max_tokens": int(max_tokens), "weights": weights}
    return run_sweep(configs, datasets, evaluate, results_path, grid_id=grid_id, protocol=protocol, progress=progress)


def bank_identity(bank) -> dict | list:
    """What identifies a null bank (or, for a mapping of named banks, each of them) in a grid id."""
    if not isinstance(bank, NullBank):  # a mapping {bank name: NullBank}
        return [[name, bank_identity(b)] for name, b in sorted(bank.items())]
    meta = bank.metadata
    out = {"model_id": meta.model_id, "kernel": meta.kernel, "created": meta.created,
           "n_samples": {str(k): v for k, v in meta.n_samples.items()}}
    if meta.statistic != "raw" or meta.trim:  # raw banks keep the identity they had before statistics
        out.update(statistic=meta.statistic, trim=meta.trim)
    return out


def sweep_grid_id(*, model_id: str, null_bank, datasets: Sequence[str], max_tokens: int, window: int,
                  stride: int, weights: str, static_path: Any = None) -> str:
    """The ``grid_id`` of a sweep: everything besides the configurations that changes its numbers.

    A static allocation path (the static chord's allocations) enters by the digest of its JSON; a
    data set that is a ``.txt`` file by the sha256 of its bytes (``data_files``; absent when every
    data set is a named one, so their grid ids are what they were), so a file replaced before a
    resume is refused (:func:`~bh_helpers.experiments.sweep.run_sweep` names it).
    """
    ident = {"model": model_id, "nulls": bank_identity(null_bank), "datasets": list(datasets),
             "max_tokens": int(max_tokens), "window": int(window), "stride": int(stride), "weights": weights}
    files = {name: digest for name in datasets if (digest := data_file_sha256(name)) is not None}
    if files:
        ident["data_files"] = files
    if static_path is not None:
        text = json.dumps(static_path.to_dict(), sort_keys=True)
        ident["static_path"] = hashlib.sha256(text.encode()).hexdigest()[:16]
    return json.dumps(ident, sort_keys=True, separators=(",", ":"))


def sweep_results_path(out: str | os.PathLike, bank: Any, configs: Sequence[Any], **settings: Any) -> Path:
    """A results file named after everything that defines a sweep (null bank, configurations,
    evaluation settings), so changing any of them starts a new file instead of colliding with
    the old grid (``run_sweep`` refuses another grid's file); rerunning the same sweep resumes."""
    meta = bank.metadata
    ident = json.dumps(
        [meta.model_id, meta.kernel, meta.created, sorted(meta.n_samples.items()),
         [c.key() for c in configs], sorted(settings.items())],
        default=str,
    )
    digest = hashlib.sha256(ident.encode()).hexdigest()[:10]
    return Path(out) / f"sweep_{meta.kernel}_{digest}.jsonl"
