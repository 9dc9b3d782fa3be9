"""Task accuracy beside perplexity: each verdict row and its strongest control on the task fixtures.

Perplexity stays the verdict's measure; this is a second look with the package's task fixtures
(``bh_helpers/data/fixtures``: ``lambada_style.jsonl``, last-word accuracy, and
``hellaswag_style.jsonl``, four-way multiple choice, lm-eval's ``acc``). For every row of the
comparison table (:func:`~bh_helpers.experiments.comparison.compare_with_controls`) the adaptive
configuration is routed over the fixtures first, then its strongest control runs at the compute
the configuration reached ON THE FIXTURES (their text differs from the evaluation text, so the
realised k does too):

- mixed top-k at its per-layer mean k there;
- its own per-token counts shuffled (the same counts by construction);
- the static chord: the two static per-layer allocations whose totals bracket its mean k there,
  each scored, the accuracy of each example their probability-weighted mean (the expected accuracy
  of the per-example random choice, as :func:`~bh_helpers.experiments.static_allocation.mix_windows`
  does for perplexity).

The difference (configuration minus control, in accuracy points) gets a paired 95% interval over
examples (Student's t on the per-example differences). With a few dozen examples per task the
interval spans several points, so most differences cannot be told apart:
:func:`bh_helpers.report.verdict.task_accuracy_markdown` says so row by row.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import numpy as np

from bh_helpers.evaluation.tasks import last_word_accuracy, multiple_choice_accuracy
from bh_helpers.experiments.comparison import compare_with_controls
from bh_helpers.experiments.configs import config_of, controls_by_adaptive
from bh_helpers.models.datasets import embedded_fixture
from bh_helpers.routing.patch import route
from bh_helpers.selection.static import StaticLayerSelector

__all__ = ["TASKS", "TASK_COLUMNS", "paired_accuracy_interval", "task_accuracy_table", "task_fixtures"]

#: Task name -> embedded fixture it is scored on.
TASKS = {"last word": "lambada", "multiple choice": "hellaswag"}
TASK_COLUMNS = ["dataset", "key", "label", "strongest", "task", "n_examples", "mean_k", "control_mean_k",
                "accuracy", "control_accuracy", "delta", "ci_low", "ci_high"]


def task_fixtures() -> dict[str, list]:
    """The examples of each task of :data:`TASKS` (the committed fixtures, no network)."""
    return {task: embedded_fixture(name) for task, name in TASKS.items()}


def paired_accuracy_interval(a: Any, b: Any, level: float = 0.95) -> tuple[float, float, float]:
    """``(delta, low, high)`` of mean(a) - mean(b) over paired examples, Student's t on the differences.

    Parameters
    ----------
    a, b : array-like of float, length n
        Per-example correctness (0/1, or a probability for a randomised policy) of two policies on
        the same examples.
    level : float, default 0.95

    Returns
    -------
    tuple of float
        The difference and its interval; the interval is the point when every difference is equal.
    """
    from scipy.stats import t as student_t

    d = np.asarray(a, dtype=float) - np.asarray(b, dtype=float)  # (n,)
    if d.ndim != 1 or d.size < 2:
        raise ValueError(f"need at least 2 paired examples of equal length; got shapes {np.shape(a)}, {np.shape(b)}.")
    delta = float(d.mean())
    half = float(student_t.ppf((1 + level) / 2, d.size - 1)) * float(d.std(ddof=1)) / math.sqrt(d.size)
    return delta, delta - half, delta + half


def _score(model, tokenizer, selector, fixtures: Mapping[str, list], batch_size: int):
    """Per-example correctness per task, and the per-layer mean k the selector reached on the fixtures."""
    with route(model, selector) as rec:
        correct = {
            "last word": np.asarray(last_word_accuracy(model, tokenizer, fixtures["last word"], batch_size=batch_size,
                                                       progress=False).correct, dtype=float),
            "multiple choice": np.asarray(multiple_choice_accuracy(
                model, tokenizer, fixtures["multiple choice"], batch_size=batch_size, progress=False).correct,
                dtype=float),
        }
    per_layer = {int(layer): float(s["mean_k"]) for layer, s in rec.summary()["per_layer"].items()}
    return correct, per_layer


def task_accuracy_table(model, tokenizer, results, *, null_bank, static_path=None, weights: str = "softmax",
                        seed: int = 0, batch_size: int = 8, comparison=None, fixtures: Mapping[str, list] | None = None):
    """Last-word and multiple-choice accuracy of every verdict row and of its strongest control.

    Parameters
    ----------
    model, tokenizer
    results : pandas.DataFrame
        Sweep results with controls (the confirmation sweep of the demo: its rows are the verdict's).
    null_bank : NullBank or mapping of str to NullBank
        The banks the sweep routed with (as :func:`~bh_helpers.experiments.evaluate.perplexity_sweep`).
    static_path : StaticAllocationPath, optional
        Needed when a row's strongest control is the static chord (else that row is left out).
    weights : str, default "softmax"
        The sweep's weight convention.
    seed : int, default 0
        Seed of the comparison and of the mixed control.
    batch_size : int, default 8
    comparison : pandas.DataFrame, optional
        :func:`~bh_helpers.experiments.comparison.compare_with_controls` of ``results`` (computed
        when not given).
    fixtures : mapping of str to list, optional
        Examples per task of :data:`TASKS` (default :func:`task_fixtures`, the committed fixtures).

    Returns
    -------
    pandas.DataFrame
        One row per (verdict row, task), columns :data:`TASK_COLUMNS`; accuracies and ``delta``
        (configuration minus control) in [0, 1].
    """
    import pandas as pd

    comparison = compare_with_controls(results, seed=seed) if comparison is None else comparison
    fixtures = task_fixtures() if fixtures is None else fixtures
    if set(fixtures) != set(TASKS):
        raise ValueError(f"`fixtures` must hold examples for the tasks {list(TASKS)}; got {sorted(fixtures)}.")
    controls = controls_by_adaptive(results)
    adaptive_scores: dict[str, tuple] = {}
    control_scores: dict[tuple[str, str], tuple] = {}
    static_scores: dict[tuple[int, ...], dict] = {}
    records = []
    for _, row in comparison.iterrows():
        strongest = row.get("strongest")
        if not isinstance(strongest, str) or (strongest == "static_chord" and static_path is None):
            continue
        key = row["key"]
        if key not in adaptive_scores:
            selector = config_of(results, key).to_selector(model, null_bank=null_bank, weights=weights)
            adaptive_scores[key] = _score(model, tokenizer, selector, fixtures, batch_size)
        correct, per_layer = adaptive_scores[key]
        mean_k = sum(per_layer.values()) / len(per_layer)
        if (key, strongest) not in control_scores:
            if strongest == "static_chord":
                parts = static_path.chord(mean_k)
                for ks, _ in parts:  # each allocation is scored once
                    if ks not in static_scores:
                        selector = StaticLayerSelector(dict(zip(static_path.layers, ks)), weights=weights)
                        static_scores[ks] = _score(model, tokenizer, selector, fixtures, batch_size)[0]
                mixed = {task: sum(p * static_scores[ks][task] for ks, p in parts) for task in TASKS}
                control_scores[key, strongest] = (mixed, sum(p * sum(ks) / len(ks) for ks, p in parts))
            else:
                config = config_of(results, controls[(key, row["dataset"], strongest)]["key"])
                extra = {"mean_k": per_layer} if strongest == "mixed" else {}
                selector = config.to_selector(model, null_bank=null_bank, weights=weights, **extra)
                c_correct, c_layer = _score(model, tokenizer, selector, fixtures, batch_size)
                control_scores[key, strongest] = (c_correct, sum(c_layer.values()) / len(c_layer))
        c_correct, c_mean_k = control_scores[key, strongest]
        for task in TASKS:
            delta, low, high = paired_accuracy_interval(correct[task], c_correct[task])
            records.append({"dataset": row["dataset"], "key": key, "label": row["label"], "strongest": strongest,
                            "task": task, "n_examples": int(correct[task].size), "mean_k": mean_k,
                            "control_mean_k": c_mean_k, "accuracy": float(correct[task].mean()),
                            "control_accuracy": float(c_correct[task].mean()), "delta": delta, "ci_low": low,
                            "ci_high": high})
    return pd.DataFrame.from_records(records, columns=TASK_COLUMNS)
