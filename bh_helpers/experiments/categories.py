"""Does harder text get more experts? Per-prompt-category analysis with tested claims.

Prompt sets are ordered categories (default, committed in
``bh_helpers/data/prompts/categories.json``: ``simple`` < ``medium`` < ``complex`` <
``technical``, prose and Python code, the embedded model's domains). For one routing
configuration :func:`measure_prompts` gives, per prompt, the mean number of experts per token
(over the prompt's tokens and all routed layers) and the mean next-token negative
log-likelihood. On top of that:

- :func:`bootstrap_mean_ci`: percentile bootstrap confidence interval of a mean (prompts
  resampled with replacement, ``numpy.random.default_rng(seed)``);
- :func:`category_summary`: mean k per category with its bootstrap interval;
- :func:`trend_test`: Spearman correlation between category rank and per-prompt mean k
  (one-sided alternatives are not assumed: the p-value is two-sided), and a Kruskal-Wallis
  test of equal distributions across categories;
- :func:`paired_comparison`: paired per-prompt comparison of two configurations (e.g. BH
  against compute-matched top-k) with ``scipy.stats.ttest_rel``, ``scipy.stats.wilcoxon`` and
  Cohen's ``d_z = mean(d) / sd(d)`` (``ddof=1``).

The three tests live in :mod:`bh_helpers.experiments.category_stats` (re-exported here); this
module holds the prompt sets, the measuring and the analysis that ties them together.
"""

from __future__ import annotations

import importlib.resources
import json
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from bh_helpers._markdown import markdown_table
from bh_helpers._validate import check_int
from bh_helpers.experiments.category_stats import (
    BootstrapCI,
    PairedTest,
    TrendTest,
    bootstrap_mean_ci,
    check_ci,
    paired_comparison,
    trend_test,
)

__all__ = [
    "DEFAULT_PROMPTS_PATH",
    "load_prompt_sets",
    "BootstrapCI",
    "bootstrap_mean_ci",
    "TrendTest",
    "trend_test",
    "PairedTest",
    "paired_comparison",
    "measure_prompts",
    "category_summary",
    "CategoryAnalysis",
    "analyze_categories",
]

DEFAULT_PROMPTS_PATH = Path(str(importlib.resources.files("bh_helpers") / "data" / "prompts" / "categories.json"))


# ----------------------------------------------------------------------------------------------
# Prompt sets
# ----------------------------------------------------------------------------------------------


def _validate_sets(sets: Mapping[str, Any], where: str) -> dict[str, list[str]]:
    if not isinstance(sets, Mapping) or not sets:
        raise ValueError(f"{where} must be a non-empty mapping {{category: [prompts]}}.")
    out: dict[str, list[str]] = {}
    for name, prompts in sets.items():
        if isinstance(prompts, str) or not isinstance(prompts, Sequence):
            raise ValueError(f"{where}[{name!r}] must be a list of prompt strings, got {type(prompts).__name__}.")
        if not prompts:
            raise ValueError(f"{where}[{name!r}] is empty; give each category at least one prompt.")
        bad = [i for i, p in enumerate(prompts) if not isinstance(p, str) or not p.strip()]
        if bad:
            raise ValueError(f"{where}[{name!r}] has empty or non-string prompts at positions {bad}.")
        out[str(name)] = list(prompts)
    return out


def load_prompt_sets(source: Mapping[str, Sequence[str]] | str | os.PathLike | None = None) -> dict[str, list[str]]:
    """Prompt sets by category, in category order (easiest first).

    Parameters
    ----------
    source : None, mapping, or path
        None: the committed default sets. A mapping ``{category: [prompt, ...]}`` (its order is
        the category order). A path to a JSON file of that shape, or to a directory of
        ``<category>.txt`` files (prompts separated by lines holding only ``---``; categories
        in file-name order, so prefix them ``1_simple.txt``, ``2_medium.txt``, ...).

    Returns
    -------
    dict of str to list of str

    Raises
    ------
    ValueError
        A missing path, an empty category, or an empty prompt.
    """
    if source is None:
        source = DEFAULT_PROMPTS_PATH
    if isinstance(source, Mapping):
        return _validate_sets(source, "`source`")
    path = Path(source)
    if path.is_dir():
        files = sorted(path.glob("*.txt"))
        if not files:
            raise ValueError(f"`source` directory {str(path)!r} has no *.txt prompt files.")
        sets = {}
        for f in files:
            chunks = [c.strip("\n") for c in _split_prompts(f.read_text(encoding="utf-8"))]
            sets[f.stem] = [c for c in chunks if c.strip()]
        return _validate_sets(sets, f"prompt files in {str(path)!r}")
    if not path.is_file():
        raise ValueError(f"`source` {str(path)!r} is neither a JSON file nor a directory of *.txt prompt files.")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise ValueError(f"`source` {str(path)!r} is not valid JSON ({err.msg}).") from None
    return _validate_sets(data, f"{str(path)!r}")


def _split_prompts(text: str) -> list[str]:
    chunks, current = [], []
    for line in text.splitlines():
        if line.strip() == "---":
            chunks.append("\n".join(current))
            current = []
        else:
            current.append(line)
    chunks.append("\n".join(current))
    return chunks


# ----------------------------------------------------------------------------------------------
# Measuring prompts under a routing
# ----------------------------------------------------------------------------------------------


def measure_prompts(model, tokenizer, prompt_sets: Mapping[str, Sequence[str]], selector, *,
                    batch_size: int = 16, label: str | None = None, progress: bool = False):
    """Per-prompt mean experts per token and mean NLL under one routing.

    Parameters
    ----------
    model, tokenizer
        A supported MoE causal LM (:func:`bh_helpers.models.loading.load_model`).
    prompt_sets : mapping of str to sequence of str
        See :func:`load_prompt_sets`.
    selector : Selector
        Routing for :func:`bh_helpers.routing.patch.route` (mode ``"patch"``).
    batch_size : int, default 16
        Prompts per forward pass (right-padded; padding is neither counted nor scored).
    label : str, optional
        Stored in the ``config`` column (default: ``repr(selector)``).
    progress : bool, default False
        Show a tqdm bar over batches.

    Returns
    -------
    pandas.DataFrame
        One row per prompt: ``category``, ``rank`` (category order), ``prompt_index``,
        ``n_tokens``, ``mean_k`` (over the prompt's tokens and all routed layers), ``nll``
        (mean over the predicted tokens ``1 .. n-1``, nats), ``config``. Prompts must have at
        least two tokens.
    """
    import pandas as pd
    import torch
    from tqdm.auto import tqdm

    from bh_helpers.evaluation.scoring import scored_token_nll
    from bh_helpers.routing.patch import route

    sets = _validate_sets(prompt_sets, "`prompt_sets`")
    check_int("batch_size", batch_size, 1)
    items = [(cat, rank, i, p) for rank, (cat, ps) in enumerate(sets.items()) for i, p in enumerate(ps)]
    encoded = [tokenizer(p, add_special_tokens=False)["input_ids"] for _, _, _, p in items]
    short = [items[j][0] + f"[{items[j][2]}]" for j, ids in enumerate(encoded) if len(ids) < 2]
    if short:
        raise ValueError(f"prompts {short} have fewer than 2 tokens; nothing to score.")
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    device = next(model.parameters()).device
    nll = np.zeros(len(items))
    batches = [list(range(s, min(s + batch_size, len(items)))) for s in range(0, len(items), batch_size)]
    model.eval()
    with torch.no_grad(), route(model, selector) as rec:
        for rows in tqdm(batches, desc="prompts", disable=not progress):
            width = max(len(encoded[j]) for j in rows)
            ids = torch.full((len(rows), width), pad, dtype=torch.long)  # (B, T)
            mask = torch.zeros((len(rows), width), dtype=torch.long)  # (B, T)
            for r, j in enumerate(rows):
                ids[r, : len(encoded[j])] = torch.tensor(encoded[j])
                mask[r, : len(encoded[j])] = 1
            scored = mask[:, 1:].bool()  # (B, T-1): real next tokens only
            tok_nll, _ = scored_token_nll(model, ids.to(device), mask.to(device), scored.to(device))  # (n,)
            row_of = torch.arange(len(rows))[:, None].expand_as(scored)[scored]  # (n,)
            sums = torch.zeros(len(rows), dtype=torch.float64).index_add_(0, row_of, tok_nll.double().cpu())
            nll[rows] = (sums / scored.sum(1).double()).numpy()
    counts = rec.per_token_counts()
    k = counts.matrix().double()  # (N, L)
    k = k.where(k >= 0, torch.nan).nanmean(dim=1).numpy()  # (N,) mean over layers
    prompt_of = counts.call_index.numpy() * batch_size + counts.sequence_index.numpy()  # (N,)
    sums = np.bincount(prompt_of, weights=k, minlength=len(items))
    ns = np.bincount(prompt_of, minlength=len(items))
    df = pd.DataFrame({
        "category": [c for c, _, _, _ in items],
        "rank": [r for _, r, _, _ in items],
        "prompt_index": [i for _, _, i, _ in items],
        "n_tokens": [len(e) for e in encoded],
        "mean_k": sums / np.maximum(ns, 1),
        "nll": nll,
        "config": label if label is not None else repr(selector),
    })
    if counts.truncated or np.any(ns != df["n_tokens"].to_numpy()):
        raise RuntimeError("the routing recorder did not keep every prompt token; lower `batch_size`.")
    return df


def category_summary(per_prompt, *, value: str = "mean_k", n_boot: int = 2000, ci: float = 0.95, seed: int = 0):
    """Mean of ``value`` per category with percentile bootstrap intervals.

    Parameters
    ----------
    per_prompt : pandas.DataFrame
        :func:`measure_prompts` output (columns ``category``, ``rank`` and ``value``) for one
        configuration.
    value : str, default "mean_k"
    n_boot, ci, seed
        As in :func:`bootstrap_mean_ci`; one ``default_rng(seed)`` is shared by the categories,
        drawn in rank order.

    Returns
    -------
    pandas.DataFrame
        ``category``, ``n``, ``mean``, ``low``, ``high`` in rank order.
    """
    import pandas as pd

    for col in ("category", "rank", value):
        if col not in per_prompt.columns:
            raise ValueError(f"`per_prompt` lacks column {col!r}; pass the output of measure_prompts.")
    check_ci(ci, n_boot)
    rng = np.random.default_rng(seed)
    rows = []
    for cat, group in sorted(per_prompt.groupby("category", sort=False), key=lambda kv: kv[1]["rank"].iloc[0]):
        r = bootstrap_mean_ci(group[value].to_numpy(), n_boot=n_boot, ci=ci, seed=seed, rng=rng)
        rows.append({"category": cat, "n": r.n, "mean": r.mean, "low": r.low, "high": r.high})
    return pd.DataFrame(rows, columns=["category", "n", "mean", "low", "high"])


@dataclass
class CategoryAnalysis:
    """Everything :func:`analyze_categories` measured.

    Attributes
    ----------
    per_prompt : pandas.DataFrame
        :func:`measure_prompts` rows of both configurations (column ``config``).
    summary : pandas.DataFrame
        :func:`category_summary` of the adaptive configuration's mean k.
    trend : TrendTest
        Of the adaptive configuration's per-prompt mean k over categories.
    paired : PairedTest
        Per-prompt NLL, adaptive minus baseline.
    adaptive_label, baseline_label : str
    """

    per_prompt: Any
    summary: Any
    trend: TrendTest
    paired: PairedTest
    adaptive_label: str
    baseline_label: str

    def tables(self) -> dict[str, str]:
        """Markdown sections for :func:`bh_helpers.report.write.write_report` (``tables=``)."""
        s = self.summary
        ci = [{"category": r["category"], "prompts": r["n"], "mean k": f"{r['mean']:.3f}",
               "95% CI": f"[{r['low']:.3f}, {r['high']:.3f}]"} for _, r in s.iterrows()]
        t, p = self.trend, self.paired
        tests = [
            {"test": "Spearman(category rank, mean k)", "statistic": f"rho = {t.spearman_rho:.3f}",
             "p-value": f"{t.spearman_pvalue:.3g}", "n": t.n},
            {"test": "Kruskal-Wallis across categories", "statistic": f"H = {t.kruskal_h:.3f}",
             "p-value": f"{t.kruskal_pvalue:.3g}", "n": t.n},
            {"test": f"paired t, NLL {p.name_a} - {p.name_b}", "statistic": f"t = {p.t_statistic:.3f}",
             "p-value": f"{p.t_pvalue:.3g}", "n": p.n},
            {"test": "Wilcoxon signed-rank, same pairs", "statistic": f"W = {p.wilcoxon_statistic:.1f}",
             "p-value": f"{p.wilcoxon_pvalue:.3g}", "n": p.n},
        ]
        effect = (f"Mean per-prompt NLL {p.mean_a:.4f} ({p.name_a}) vs {p.mean_b:.4f} ({p.name_b}); "
                  f"mean difference {p.mean_diff:+.4f} nats, Cohen's d_z = {p.cohens_dz:.3f}. "
                  "Percentile bootstrap over prompts within each category (seeded).")
        return {
            f"Experts per token by prompt category ({self.adaptive_label})": markdown_table(ci),
            "Category trend and paired tests": markdown_table(tests) + "\n\n" + effect,
        }


def analyze_categories(model, tokenizer, *, adaptive, baseline, prompt_sets=None, adaptive_label: str = "adaptive",
                       baseline_label: str = "baseline", n_boot: int = 2000, ci: float = 0.95, seed: int = 0,
                       batch_size: int = 16, progress: bool = False) -> CategoryAnalysis:
    """Measure both configurations on every prompt and run the tests of this module.

    Parameters
    ----------
    model, tokenizer
    adaptive, baseline : Selector
        E.g. a ``BHSelector`` and the ``TopKSelector`` of about the same mean k.
    prompt_sets : None, mapping or path
        See :func:`load_prompt_sets`.
    adaptive_label, baseline_label : str
    n_boot, ci, seed
        Bootstrap settings of :func:`category_summary`.
    batch_size : int
    progress : bool

    Returns
    -------
    CategoryAnalysis
    """
    import pandas as pd

    sets = load_prompt_sets(prompt_sets)
    a = measure_prompts(model, tokenizer, sets, adaptive, batch_size=batch_size, label=adaptive_label, progress=progress)
    b = measure_prompts(model, tokenizer, sets, baseline, batch_size=batch_size, label=baseline_label, progress=progress)
    trend = trend_test({c: g["mean_k"].to_numpy() for c, g in a.groupby("category", sort=False)})
    paired = paired_comparison(a["nll"], b["nll"], name_a=adaptive_label, name_b=baseline_label)
    return CategoryAnalysis(
        per_prompt=pd.concat([a, b], ignore_index=True),
        summary=category_summary(a, n_boot=n_boot, ci=ci, seed=seed),
        trend=trend, paired=paired, adaptive_label=adaptive_label, baseline_label=baseline_label,
    )
