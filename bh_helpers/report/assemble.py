"""The demo's report, assembled: frontier, figures, category analysis and token view -> ``report.md``.

Reads sweep results (a DataFrame or the JSONL file of :func:`bh_helpers.experiments.sweep.run_sweep`),
compares every adaptive configuration with static top-k at the same compute
(:func:`bh_helpers.experiments.frontier.compute_frontier`), draws the figures, and with a model
runs the per-category analysis and the per-token view of the featured configuration; then
:func:`bh_helpers.report.write.write_report` writes it all down with its protocol.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from bh_helpers._locks import check_kind, exclusive, lock_path
from bh_helpers.capture import _model_device
from bh_helpers.experiments.categories import analyze_categories, load_prompt_sets
from bh_helpers.experiments.comparison import compare_with_controls
from bh_helpers.experiments.frontier import compute_frontier
from bh_helpers.experiments.optimize import optimize
from bh_helpers.experiments.saturation import saturation_points, saturation_table
from bh_helpers.experiments.configs import CONTROLS, bank_name, config_of, controls_by_adaptive
from bh_helpers.experiments.sweep import load_balance_table, load_results
from bh_helpers.models.families import moe_shape
from bh_helpers.models.texts import dataset_description, encode
from bh_helpers.report import plots
from bh_helpers.report.verdict import comparison_markdown, static_versus_uniform_markdown, task_accuracy_markdown
from bh_helpers.report.write import REPORT_NAME, SUMMARY_NAME, check_replaceable, figure_files, write_report
from bh_helpers.routing.patch import route
from bh_helpers.nulls.bank import NullBank
from bh_helpers.selection.controls import MixedTopKSelector
from bh_helpers.selection.selectors import NativeSelector
from bh_helpers.selection.budget import check_calibration_fits_bank

__all__ = ["SUMMARY_NAME", "TASKS_HEADING", "report_step", "write_summary"]


def _protocol_from_results(results) -> dict:
    header = results.attrs.get("header", {}) or {}
    grid = header.get("protocol")
    if not isinstance(grid, dict):  # results written before the header held the protocol: read grid_id
        try:
            grid = json.loads(header.get("grid_id") or "{}")
        except (TypeError, json.JSONDecodeError):
            grid = {}
    proto: dict[str, Any] = {
        "metric": "perplexity = exp(token-weighted mean NLL); documents joined with EOS, sliding windows",
        "window": grid.get("window"),
        "stride": grid.get("stride"),
        "weighting": "token",
        "tokens_per_dataset_cap": grid.get("max_tokens"),
        "datasets": {name: dataset_description(name) for name in header.get("datasets", [])},
        "weights_of_selected_experts": _WEIGHT_NOTES.get(grid.get("weights"), grid.get("weights")),
        "compute": "mean experts per token over all routed tokens and layers (routing recorder)",
        "weights": grid.get("weights"),
    }
    if len(results) and "n_tokens" in results.columns:
        proto["tokens_scored"] = {d: int(g["n_tokens"].iloc[0]) for d, g in results.groupby("dataset", sort=False)}
    if len(results) and "protocol.tokenizer" in results.columns:
        proto["tokenizer"] = str(results["protocol.tokenizer"].iloc[0])
    return proto


_WEIGHT_NOTES = {
    "softmax": "softmax (router probabilities over all experts, not renormalised: OLMoE's norm_topk_prob=False)",
    "renorm": "renorm (router probabilities renormalised over the selected experts)",
    "uniform": "uniform (1/k per selected expert)",
    "inverse_p": "inverse_p (1/p of the selected experts under the layer's null, renormalised; static and "
                 "control rows weigh their experts by the same null)",
}


def _featured(frontier, comparison):
    """The featured adaptive row of the first data set: the BH row with the best (lowest) difference
    to its strongest control when controls ran, else the best relative difference to the top-k chord
    (BH preferred over the other methods)."""
    if comparison is not None and len(comparison) and comparison["delta_vs_strongest"].notna().any():
        rows = comparison[comparison["delta_vs_strongest"].notna()]
        rows = rows[rows["dataset"] == rows["dataset"].iloc[0]]
        bh = rows[rows["method"] == "bh"]
        rows = bh if len(bh) else rows
        return rows.loc[rows["delta_vs_strongest"].idxmin()]
    ok = frontier[frontier["status"] == "ok"]
    if not len(ok):
        return None
    first = ok[ok["dataset"] == ok["dataset"].iloc[0]]
    bh = first[first["method"] == "bh"]
    first = bh if len(bh) else first
    return first.loc[first["relative"].idxmin()]


def _model_info(model, model_id: str) -> dict:
    import torch
    import transformers

    cfg = model.config
    shape = moe_shape(cfg)
    return {
        "model": model_id,
        "model_type": getattr(cfg, "model_type", None),
        "layers": shape.num_layers,
        "experts": shape.num_experts,
        "native_k": NativeSelector.for_model(model).k,
        "norm_topk_prob": getattr(cfg, "norm_topk_prob", None),
        "parameters": int(sum(p.numel() for p in model.parameters())),
        "dtype": str(next(model.parameters()).dtype),
        "device": str(next(model.parameters()).device),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
    }


def report_step(out_dir: str | os.PathLike, *, results, model=None, tokenizer=None, null_bank=None,
                model_id: str = "tiny", categories: bool = True, prompt_sets=None, seed: int = 0,
                weights: str | None = None, extra_notes: str | None = None, calibration=None,
                tuning=None, tasks=None, static_path=None, progress: bool = True) -> Path:
    """Frontier, figures, optional category analysis and token view, then ``report.md``.

    Parameters
    ----------
    out_dir : path-like
    results : pandas.DataFrame or path-like
        Sweep results or the JSONL file.
    model, tokenizer, null_bank : optional
        Needed for the category analysis and the per-token view (skipped without them).
    model_id : str
    categories : bool, default True
        Run the per-prompt-category analysis (BH-family configuration with the best relative
        difference vs static top-k at the nearest integer k).
    prompt_sets : None, mapping or path
        See :func:`bh_helpers.experiments.categories.load_prompt_sets`.
    seed : int
        Bootstrap seed.
    weights : str, optional
        Weight convention of the category analysis and token view (default: the sweep's).
    extra_notes : str, optional
    calibration : mapping of int to Tensor, optional
        Calibration router logits: with ``null_bank``, the max_k saturation table and figure.
    tuning : pandas.DataFrame, optional
        The tuning sweep whose picks ``results`` confirms (``results`` then holds the
        confirmation split only, and the verdict is read there); its comparison goes into a
        "Tuning split" section.
    tasks : pandas.DataFrame, optional
        :func:`bh_helpers.experiments.task_accuracy.task_accuracy_table` of ``results``: a
        "Task accuracy beside perplexity" section and ``summary.json``'s ``tasks``.
    static_path : StaticAllocationPath, optional
        The static control's allocations: a section comparing them with uniform top-k on their
        calibration text.
    progress : bool

    Returns
    -------
    Path
        ``report.md``.

    Raises
    ------
    ValueError
        Among others: ``out_dir`` holds a ``report.md``, ``summary.json`` or figure PNG that a report
        did not write (:func:`bh_helpers.report.write.check_replaceable`; nothing is written).
    """
    check_kind(out_dir, "`out_dir`", folder=True)  # before the work, not when the report is written
    check_replaceable(out_dir, [REPORT_NAME, SUMMARY_NAME])  # a user's own files there: refused before the work
    if isinstance(results, (str, os.PathLike)):
        results = load_results(results)
    if not len(results):
        raise ValueError("`results` has no rows; run the sweep first.")
    frontier = compute_frontier(results)
    has_controls = "control_of" in results.columns and results["method"].isin(CONTROLS).any()
    comparison = compare_with_controls(results, seed=seed) if has_controls else None
    if comparison is not None and "window_nll" in results.columns:
        counts = [len(w) for w in results["window_nll"] if isinstance(w, list)]
        if counts:
            comparison.attrs["windows"] = min(counts)  # the verdict refuses to speak below MIN_WINDOWS
    weights = weights or _protocol_from_results(results).get("weights") or "softmax"  # default: the sweep's
    figures = _sweep_figures(results, comparison)
    first_set = results["dataset"].iloc[0]
    featured = _featured(frontier, comparison) if len(frontier) else None
    config = config_of(results, featured["key"]) if featured is not None else None
    tables: dict[str, Any] = {**({TASKS_HEADING: task_accuracy_markdown(tasks)} if tasks is not None else {}),
                              "Budget optimiser": _optimiser_section(results),
                              **({STATIC_HEADING: static_versus_uniform_markdown(static_path)} if static_path else {})}
    if any(str(c).startswith("per_layer_utilisation_cv.") for c in results.columns):
        tables["Load balance"] = load_balance_table(results).round(3).to_dict("records")
    if calibration is not None and null_bank is not None:
        saturation, points = _saturation(results, null_bank, calibration, config)
        tables["max_k saturation"] = _saturation_section(saturation, points)
        figures["max_k saturation"] = plots.plot_saturation(saturation, points)
    notes = [extra_notes] if extra_notes else []
    if tuning is not None and len(tuning):
        tables["Tuning split (the whole grid; configurations were chosen here)"] = comparison_markdown(
            compare_with_controls(tuning, seed=seed))
        notes.append(_tuning_note(tuning, results))
    notes += [note for note in (_bound_note(results),) if note]
    mixed_key = None
    if config is not None and comparison is not None:
        mixed = controls_by_adaptive(results).get((featured["key"], featured["dataset"], "mixed"))
        mixed_key = mixed["label"] if mixed is not None else None
    if "k_hist" in results.columns:
        first = results[results["dataset"] == first_set]
        wanted = ["native"] + ([config.label()] if config is not None else []) + ([mixed_key] if mixed_key else [])
        hist = {r["label"]: {"hist": r["k_hist"]} for _, r in first.iterrows()
                if r["label"] in wanted and isinstance(r["k_hist"], list)}
        if hist:
            figures[f"experts per token, {first_set}"] = plots.plot_k_histogram(
                hist, title=f"experts per token-layer ({first_set})")
    if config is not None and model is not None and tokenizer is not None and null_bank is not None:
        import torch


        selector = config.to_selector(model, null_bank=_banks_by_name(null_bank), weights=weights)
        if categories:
            # the compute-matched control: mixed top-k at the featured row's per-layer mean k
            row = results[(results["key"] == featured["key"]) & (results["dataset"] == featured["dataset"])].iloc[0]
            per_layer = {int(c.split(".")[-1]): float(row[c]) for c in results.columns
                         if str(c).startswith("per_layer_mean_k.") and row[c] == row[c]}
            control = MixedTopKSelector(per_layer, seed=seed, max_k=config.max_k, weights=weights,
                                        null_bank=selector.null_bank if weights == "inverse_p" else None)
            analysis = analyze_categories(
                model, tokenizer, adaptive=selector, baseline=control, prompt_sets=prompt_sets,
                adaptive_label=config.label(), baseline_label="mixed top-k (same per-layer mean k)", seed=seed,
                progress=progress)
            tables.update(analysis.tables())
            notes.append(_category_finding(analysis, config.label(), featured["dataset"]))
        sample = list(load_prompt_sets(prompt_sets).values())[-1][0]
        ids = encode(tokenizer, sample)
        with torch.no_grad(), route(model, selector) as rec:
            model(input_ids=torch.tensor([ids], device=_model_device(model)), use_cache=False)
        k = rec.per_token_counts().matrix().double().mean(dim=1).numpy()
        tokens = [tokenizer.decode([i]) for i in ids]
        figures[f"per-token experts, {config.label()}"] = plots.plot_token_view(
            tokens, k, vmin=1, vmax=config.max_k, title=f"experts per token (mean over layers), {config.label()}")
    info = _model_info(model, model_id) if model is not None else {"model": model_id}
    protocol = _protocol_from_results(results)
    return _write_folder(out_dir, figures,
                         report=dict(results=results, frontier=frontier, protocol=protocol, model_info=info,
                                     null_metadata=_bank_metadata(null_bank), tables=tables,
                                     notes="\n\n".join(notes) if notes else None, comparison=comparison),
                         summary=dict(results=results, comparison=comparison, protocol=protocol, model_info=info,
                                      tasks=tasks))


def _write_folder(out_dir: str | os.PathLike, figures: Mapping[str, Any], *, report: Mapping[str, Any],
                  summary: Mapping[str, Any]) -> Path:
    """``report.md`` with its PNGs (:func:`write_report`) and ``summary.json`` (:func:`write_summary`)."""
    # one writer: another process writing this folder (a demo, a report) is refused, not interleaved
    with exclusive(lock_path(out_dir, folder=True), what=f"report folder {str(out_dir)!r}", flag="`out_dir`"):
        # every file before the first is written (the figures' PNGs too): none half-replaced
        check_replaceable(out_dir, [REPORT_NAME, SUMMARY_NAME, *figure_files(figures).values()])
        path = write_report(out_dir, figures=figures, **report)
        for fig in figures.values():
            fig.clf()
        write_summary(out_dir, **summary)
    return path


#: The report section of :func:`bh_helpers.report.verdict.task_accuracy_markdown` (docs/results.md copies it).
TASKS_HEADING = "Task accuracy beside perplexity"
#: The report section of :func:`bh_helpers.report.verdict.static_versus_uniform_markdown`.
STATIC_HEADING = "The static control against uniform top-k"


def _finite(value: Any) -> Any:
    """JSON-safe scalars: NaN and infinities become None, numpy scalars plain Python."""
    if isinstance(value, (np.floating, float)):
        return float(value) if math.isfinite(value) else None
    if isinstance(value, np.integer):
        return int(value)
    return value


def write_summary(out_dir: str | os.PathLike, *, results, comparison=None, protocol: Mapping[str, Any] | None = None,
                  model_info: Mapping[str, Any] | None = None, tasks=None) -> Path:
    """``summary.json`` beside ``report.md``: the verdict, every row's numbers, versions and settings.

    The machine-readable twin of the report (as lm-eval's ``results.json``): ``verdict`` (the
    report's answer, the counts of adaptive rows better / worse / undecided against mixed top-k
    at their compute, and the smallest number of scoring windows), ``comparison`` (each adaptive
    row beside its controls, with 95% intervals), ``rows`` (every configuration and data set:
    perplexity and mean experts per token), ``versions`` and ``settings`` (the protocol, the
    model, and the demo's ``run.json`` settings when the folder has one), and ``tasks`` (last-word and
    multiple-choice accuracy of each verdict row and its strongest control, when measured).

    Returns
    -------
    Path

    Raises
    ------
    ValueError
        ``out_dir`` holds a ``summary.json`` that a report did not write (it is never replaced).
    """
    import platform

    import torch
    import transformers

    from bh_helpers import __version__
    from bh_helpers.report.verdict import verdict_markdown

    out = Path(out_dir)
    check_replaceable(out, [SUMMARY_NAME])  # a summary.json a report did not write is never replaced
    verdict: dict[str, Any] = {"answer": None, "better": 0, "worse": 0, "undecided": 0, "pairs": 0,
                               "windows": None, "text": None}
    records: list[dict] = []
    if comparison is not None and len(comparison):
        text = verdict_markdown(comparison)
        bold = text.split("**")
        verdict.update(text=text, answer=bold[1].split("? ")[-1].strip() if len(bold) > 2 else None,
                       windows=_finite(comparison.attrs.get("windows")))
        valid = comparison[comparison["ci_low"].notna() & comparison["ci_high"].notna()]
        better, worse = int((valid["ci_high"] < 0).sum()), int((valid["ci_low"] > 0).sum())
        verdict.update(better=better, worse=worse, undecided=len(valid) - better - worse, pairs=len(valid))
        records = [{k: _finite(v) for k, v in r.items()} for r in comparison.to_dict("records")]
    keep = [c for c in ("dataset", "label", "method", "alpha", "min_k", "max_k", "statistic", "trim",
                        "mean_experts_per_token", "perplexity", "control_of") if c in results.columns]
    rows = [{k: _finite(v) for k, v in r.items()} for r in results[keep].to_dict("records")]
    settings: dict[str, Any] = {"protocol": dict(protocol or {}), "model": dict(model_info or {})}
    run = out / "run.json"
    if run.is_file():
        settings["demo"] = json.loads(run.read_text(encoding="utf-8")).get("settings")
    task_rows = [{k: _finite(v) for k, v in r.items()} for r in tasks.to_dict("records")] if tasks is not None else []
    summary = {"verdict": verdict, "comparison": records, "rows": rows, "tasks": task_rows, "settings": settings,
               "versions": {"bh-routing": __version__, "torch": torch.__version__,
                            "transformers": transformers.__version__, "python": platform.python_version()}}
    path = out / SUMMARY_NAME
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(summary, indent=2, default=str) + "\n", encoding="utf-8")
    tmp.replace(path)
    return path


def _category_finding(analysis, label: str, dataset: str) -> str:
    """What the category analysis found, in one paragraph (the tables follow in their sections)."""
    t, p = analysis.trend, analysis.paired
    means = {r["category"]: r["mean"] for _, r in analysis.summary.iterrows()}
    spread = (f"mean experts per token from {min(means.values()):.2f} ({min(means, key=means.get)}) to "
              f"{max(means.values()):.2f} ({max(means, key=means.get)})") if means else "no categories"
    trend = ("rises with the category order" if t.spearman_rho > 0 else "falls with the category order") \
        if t.spearman_pvalue < 0.05 else "shows no trend across categories"
    nll = (f"{'lower' if p.mean_diff < 0 else 'higher'} per-prompt NLL than the control "
           f"({p.mean_diff:+.4f} nats, Wilcoxon p = {p.wilcoxon_pvalue:.3g})" if p.wilcoxon_pvalue < 0.05 else
           f"no per-prompt NLL difference from the control at the 5% level ({p.mean_diff:+.4f} nats, "
           f"Wilcoxon p = {p.wilcoxon_pvalue:.3g})")
    return (f"Category analysis ({label}, the featured configuration on {dataset}, against mixed top-k at its "
            f"per-layer mean k, {p.n} prompts): {spread}; the allocation {trend} (Spearman rho = "
            f"{t.spearman_rho:.2f}, p = {t.spearman_pvalue:.3g}); {nll}.")


def _bound_note(results) -> str | None:
    """The adaptive rows most of whose token-layers sat at ``min_k`` or ``max_k`` (the bound, not BH)."""
    from bh_helpers.routing.recorder import BOUND_ADVICE, bound_warning
    from bh_helpers.selection.reference import FDR_METHODS

    if not {"floor_rate", "ceiling_rate", "min_k", "max_k"} <= set(results.columns):
        return None
    lines = []
    for _, r in results[results["method"].isin(FDR_METHODS)].iterrows():
        text = bound_warning({"all layers pooled": (float(r["floor_rate"]), float(r["ceiling_rate"]))},
                             *(None if _none(r[c]) is None else int(r[c]) for c in ("min_k", "max_k")),
                             what="", advice=False)
        if text:
            lines.append(f"- {r['label']} on {r['dataset']}: {text.replace('most tokens sit', 'most token-layers sit')}")
    if not lines:
        return None
    return "\n".join(["**Warning: configurations at a bound.** In these rows more than half of the token-layers sat "
                      "at the floor or the ceiling:", "", *lines, "", BOUND_ADVICE[0].upper() + BOUND_ADVICE[1:]])


def _tuning_note(tuning, results) -> str:
    return ("Tune, then confirm: every data set is split by document. The whole grid ran on the tuning halves "
            f"({', '.join(sorted(set(tuning['dataset'])))}); per family and compute target the configuration with the "
            "lowest mean difference to its strongest control there was kept, and only those ran again, beside their "
            f"controls, on the confirmation halves ({', '.join(sorted(set(results['dataset'])))}), which nothing was "
            "chosen on. The verdict above is read on the confirmation halves.")


def _optimiser_section(results) -> str:
    """The best configuration per data set at two budgets and at the 0.7/0.3 weighting (``bh-routing optimize``)."""
    import pandas as pd

    from bh_helpers.report.write import markdown_table

    picks = pd.concat([optimize(results, budget=2.0), optimize(results, budget=4.0),
                       optimize(results, quality_weight=0.7, speed_weight=0.3)], ignore_index=True)
    return ("Per data set, the configuration with the lowest perplexity within a budget of mean experts per token, "
            "and the best by 0.7 x quality + 0.3 x speed (each min-max scaled over the configurations that ran); "
            "an adaptive pick shows its compute-matched controls (`bh-routing optimize --help`).\n\n"
            + markdown_table(picks, floatfmt=".3f"))


def _sweep_figures(results, comparison) -> dict[str, Any]:
    """The figures drawn from the results alone: frontiers, controls, per-layer mean k and load balance."""
    figures: dict[str, Any] = {}
    for name in dict.fromkeys(results["dataset"]):
        figures[f"frontier {name}"] = plots.plot_frontier(results, dataset=name, comparison=comparison)
    if comparison is not None and len(comparison):
        figures["against compute-matched controls"] = plots.plot_controls(comparison)
    first_set = results["dataset"].iloc[0]
    if any(str(c).startswith("per_layer_mean_k.") for c in results.columns):
        figures[f"mean k per layer, {first_set}"] = plots.plot_layer_heatmap(
            plots.layer_matrix(results[~results["method"].isin(CONTROLS)], dataset=first_set),
            title=f"mean experts per token by layer ({first_set})")
    if any(str(c).startswith("per_layer_utilisation_cv.") for c in results.columns):
        balance = plots.layer_matrix(results[~results["method"].isin(CONTROLS)], dataset=first_set,
                                     prefix="per_layer_utilisation_cv.")
        figures[f"load balance per layer, {first_set}"] = plots.plot_layer_heatmap(
            balance, title=f"coefficient of variation of expert activations by layer ({first_set})", cmap="magma",
            label="coefficient of variation", fmt=".2f")
    return figures


def _banks_by_name(null_bank) -> dict:
    """``{bank_name: NullBank}`` from one bank or a mapping of them."""
    if isinstance(null_bank, Mapping) and not isinstance(null_bank, NullBank):
        return dict(null_bank)
    meta = null_bank.metadata
    return {bank_name(meta.kernel, meta.statistic, meta.trim): null_bank}


def _saturation(results, null_bank, calibration, config):
    """The saturation table and points of the featured configuration's bank, method and floor, at
    the levels the sweep ran with that bank (at most six), or at 0.01..0.5 without a featured one."""
    banks = _banks_by_name(null_bank)
    name = config.bank_name() if config is not None and config.bank_name() in banks else next(iter(banks))
    method, min_k = (config.method, config.min_k) if config is not None else ("bh", 1)
    alphas = []
    if "alpha" in results.columns:
        rows = results[(results["method"] == method) & results["alpha"].notna()].drop_duplicates("key")
        alphas = sorted({float(r["alpha"]) for _, r in rows.iterrows()
                         if config_of(results, r["key"]).bank_name() == name})
    if len(alphas) > 6:
        alphas = [alphas[i] for i in np.linspace(0, len(alphas) - 1, 6).round().astype(int)]
    check_calibration_fits_bank(banks[name], calibration, every_layer=True)  # a table "over all layers"
    table = saturation_table(banks[name], calibration, alphas or [0.01, 0.05, 0.2, 0.5], method=method, min_k=min_k)
    table.attrs["setting"] = f"{method}, min_k={min_k}, null bank {name}"
    return table, saturation_points(table)


def _saturation_section(table, points) -> str:
    from bh_helpers.report.write import markdown_table

    wide = table.pivot(index="alpha", columns="max_k", values="mean_k").round(3)
    wide.columns = [f"mean k, max_k={m}" for m in wide.columns]
    hits = table.pivot(index="alpha", columns="max_k", values="ceiling_rate").round(3)
    hits.columns = [f"at ceiling, max_k={m}" for m in hits.columns]
    return (f"Mean experts per token as the ceiling max_k rises ({table.attrs['setting']}; on the calibration "
            "logits, native routing upstream), and the share of token-layers whose uncapped count reaches the "
            "ceiling. The saturation point is the smallest max_k whose mean k is within 5% of the largest "
            "ceiling's (`bh_helpers.experiments.saturation`).\n\n"
            + markdown_table(_alpha_text(points), floatfmt=".3f") + "\n\n"
            + markdown_table(_alpha_text(wide.reset_index()), floatfmt=".3f") + "\n\n"
            + markdown_table(_alpha_text(hits.reset_index()), floatfmt=".3f"))


def _alpha_text(table):
    """``table`` with its ``alpha`` column as text to 3 significant digits (2.4e-06, not 0.000)."""
    out = table.round({c: 3 for c in table.columns if c != "alpha"})
    out["alpha"] = [f"{a:.3g}" for a in table["alpha"]]
    return out


def _bank_metadata(null_bank):
    """The bank's metadata, or per bank name for a mapping of banks (None without a bank)."""
    if null_bank is None:
        return None
    if isinstance(null_bank, NullBank):
        return null_bank.metadata
    from dataclasses import asdict

    return {name: asdict(bank.metadata) for name, bank in null_bank.items()}


def _none(value):
    """A results cell: None for a missing (None or NaN) value."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return None
    return value
