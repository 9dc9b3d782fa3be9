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
"""

from __future__ import annotations

import importlib.resources
import json
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from bh_helpers._markdown import markdown_table
from bh_helpers._validate import check_int

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
# Statistics
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class BootstrapCI:
    """Percentile bootstrap confidence interval of a mean.

    Attributes
    ----------
    mean : float
        Sample mean.
    low, high : float
        Percentile interval ``[q((1 - ci) / 2), q((1 + ci) / 2)]`` of the bootstrap means
        (``numpy.quantile``, linear method).
    n : int
    n_boot : int
    ci : float
    seed : int
    """

    mean: float
    low: float
    high: float
    n: int
    n_boot: int
    ci: float
    seed: int

    def to_dict(self) -> dict:
        return asdict(self)


def _check_ci(ci: float, n_boot: int) -> None:
    if not 0.0 < float(ci) < 1.0:
        raise ValueError(f"`ci` must be in (0, 1), e.g. 0.95; got {ci!r}.")
    check_int("n_boot", n_boot, 1)


def _as_1d(values, name: str) -> np.ndarray:
    x = np.asarray(values, dtype=float).reshape(-1)
    if x.size == 0:
        raise ValueError(f"`{name}` is empty.")
    if not np.all(np.isfinite(x)):
        raise ValueError(f"`{name}` holds NaN or inf values.")
    return x


def bootstrap_mean_ci(values, *, n_boot: int = 2000, ci: float = 0.95, seed: int = 0,
                      rng: np.random.Generator | None = None) -> BootstrapCI:
    """Percentile bootstrap interval of the mean of ``values``.

    Parameters
    ----------
    values : array-like of float
    n_boot : int, default 2000
        Bootstrap resamples.
    ci : float, default 0.95
        Coverage.
    seed : int, default 0
        Seed of ``numpy.random.default_rng`` (ignored when ``rng`` is given).
    rng : numpy.random.Generator, optional
        Generator to draw from (so several calls can share one stream).

    Returns
    -------
    BootstrapCI

    Notes
    -----
    The resample indices are one draw ``rng.integers(0, n, size=(n_boot, n))``; resample
    ``b`` is row ``b``.

    Examples
    --------
    >>> r = bootstrap_mean_ci([1.0, 2.0, 3.0, 4.0], n_boot=500, seed=0)
    >>> r.low <= r.mean <= r.high
    True
    """
    _check_ci(ci, n_boot)
    x = _as_1d(values, "values")
    gen = rng if rng is not None else np.random.default_rng(seed)
    idx = gen.integers(0, x.size, size=(int(n_boot), x.size))  # (B, n)
    means = x[idx].mean(axis=1)  # (B,)
    lo, hi = np.quantile(means, [(1 - ci) / 2, (1 + ci) / 2])
    return BootstrapCI(mean=float(x.mean()), low=float(lo), high=float(hi), n=int(x.size),
                       n_boot=int(n_boot), ci=float(ci), seed=int(seed))


@dataclass(frozen=True)
class TrendTest:
    """Is mean k ordered by category? (see :func:`trend_test`).

    Attributes
    ----------
    spearman_rho, spearman_pvalue : float
        ``scipy.stats.spearmanr(category rank, per-prompt value)``, two-sided.
    kruskal_h, kruskal_pvalue : float
        ``scipy.stats.kruskal`` across categories.
    n : int
        Prompts.
    categories : list of str
        In rank order.
    """

    spearman_rho: float
    spearman_pvalue: float
    kruskal_h: float
    kruskal_pvalue: float
    n: int
    categories: list[str]

    def to_dict(self) -> dict:
        return asdict(self)


def trend_test(values_by_category: Mapping[str, Sequence[float]]) -> TrendTest:
    """Spearman trend over ordered categories and Kruskal-Wallis across them.

    Parameters
    ----------
    values_by_category : mapping of str to sequence of float
        Per-prompt values (e.g. mean experts per token), categories in their order (rank 0, 1, ...).

    Returns
    -------
    TrendTest

    Raises
    ------
    ValueError
        Fewer than two categories, or an empty one.
    """
    from scipy import stats

    if not isinstance(values_by_category, Mapping) or len(values_by_category) < 2:
        raise ValueError("`values_by_category` needs at least two categories {name: values}.")
    groups = [_as_1d(v, f"values_by_category[{k!r}]") for k, v in values_by_category.items()]
    ranks = np.concatenate([np.full(g.size, i, dtype=float) for i, g in enumerate(groups)])
    values = np.concatenate(groups)
    rho = stats.spearmanr(ranks, values)
    try:
        kw = stats.kruskal(*groups)
        h, p = float(kw.statistic), float(kw.pvalue)
    except ValueError:  # all values identical
        h, p = math.nan, math.nan
    return TrendTest(spearman_rho=float(rho.statistic), spearman_pvalue=float(rho.pvalue), kruskal_h=h,
                     kruskal_pvalue=p, n=int(values.size), categories=[str(k) for k in values_by_category])


@dataclass(frozen=True)
class PairedTest:
    """Paired comparison of two configurations on the same prompts (``d = a - b``).

    Attributes
    ----------
    name_a, name_b : str
    n : int
    mean_a, mean_b, mean_diff, sd_diff : float
        ``sd_diff`` with ``ddof=1``.
    t_statistic, t_pvalue : float
        ``scipy.stats.ttest_rel(a, b)``, two-sided.
    wilcoxon_statistic, wilcoxon_pvalue : float
        ``scipy.stats.wilcoxon(a, b)``, two-sided (NaN when every difference is 0).
    cohens_dz : float
        ``mean_diff / sd_diff`` (NaN when ``sd_diff`` is 0).
    """

    name_a: str
    name_b: str
    n: int
    mean_a: float
    mean_b: float
    mean_diff: float
    sd_diff: float
    t_statistic: float
    t_pvalue: float
    wilcoxon_statistic: float
    wilcoxon_pvalue: float
    cohens_dz: float

    def to_dict(self) -> dict:
        return asdict(self)


def paired_comparison(a, b, *, name_a: str = "a", name_b: str = "b") -> PairedTest:
    """Paired t-test, Wilcoxon signed-rank test and Cohen's d_z of ``a - b``.

    Parameters
    ----------
    a, b : array-like of float
        Per-prompt values of two configurations, aligned (same prompts, same order).
    name_a, name_b : str
        Labels kept in the result.

    Returns
    -------
    PairedTest

    Raises
    ------
    ValueError
        Different lengths, fewer than 2 pairs, or non-finite values.
    """
    from scipy import stats

    x, y = _as_1d(a, "a"), _as_1d(b, "b")
    if x.size != y.size:
        raise ValueError(f"`a` and `b` must be paired (same length); got {x.size} and {y.size}.")
    if x.size < 2:
        raise ValueError("`a` and `b` need at least 2 pairs for a paired test.")
    d = x - y
    sd = float(d.std(ddof=1))
    t = stats.ttest_rel(x, y)
    if np.all(d == 0):
        w_stat, w_p = math.nan, math.nan
    else:
        w = stats.wilcoxon(x, y)
        w_stat, w_p = float(w.statistic), float(w.pvalue)
    return PairedTest(
        name_a=name_a, name_b=name_b, n=int(x.size), mean_a=float(x.mean()), mean_b=float(y.mean()),
        mean_diff=float(d.mean()), sd_diff=sd, t_statistic=float(t.statistic), t_pvalue=float(t.pvalue),
        wilcoxon_statistic=w_stat, wilcoxon_pvalue=w_p, cohens_dz=float(d.mean()) / sd if sd > 0 else math.nan,
    )


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
    _check_ci(ci, n_boot)
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
