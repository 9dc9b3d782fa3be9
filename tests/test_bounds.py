"""Issue 26, item 7: a BH configuration whose tokens mostly sit at ``min_k`` (or ``max_k``) is that bound,
not BH; ``route``'s summary, the explorer and the report say so and how to choose alpha instead."""

from __future__ import annotations

import warnings

import pytest
import torch

from bh_helpers import BHSelector, NullBank, TopKSelector, load_model, route
from bh_helpers.app.paths import default_null_bank_dir
from bh_helpers.routing.recorder import BoundWarning, bound_warning


@pytest.fixture(scope="module")
def tiny():
    model, tok = load_model("tiny", device="cpu", dtype=torch.float32)
    bank = NullBank.load(default_null_bank_dir("tiny")).check_compatible(model)
    ids = tok(["def fibonacci(n):\n    return n if n < 2 else fibonacci(n - 1) + fibonacci(n - 2)\n"],
              return_tensors="pt")["input_ids"]
    return model, bank, ids


def _summary(model, selector, ids):
    with torch.no_grad(), route(model, selector) as rec:
        model(input_ids=ids, use_cache=False)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        summary = rec.summary()
    return summary, [w for w in caught if issubclass(w.category, BoundWarning)]


def test_bh_at_a_tiny_alpha_is_the_floor_and_says_so(tiny):
    model, bank, ids = tiny
    summary, caught = _summary(model, BHSelector(bank, alpha=1e-9, min_k=1, max_k=8, weights="softmax"), ids)
    assert summary["floor_rate"] > 0.5
    text = summary["bound_warning"]
    assert text and "most tokens sit at min_k=1 in layer 0 (" in text and "not BH" in text and "static top-k" in text
    assert "alpha_for_mean_k" in text and "--mean-ks" in text and "target k" in text
    assert len(caught) == 1 and text in str(caught[0].message)


def test_bh_in_its_range_and_top_k_say_nothing(tiny):
    model, bank, ids = tiny
    summary, caught = _summary(model, BHSelector(bank, alpha=0.5, min_k=1, max_k=8, weights="softmax"), ids)
    per_layer = summary["per_layer"].values()
    if all(s["floor_rate"] <= 0.5 and s["ceiling_rate"] <= 0.5 for s in per_layer):
        assert summary["bound_warning"] is None and not caught
    summary, caught = _summary(model, TopKSelector(k=2), ids)
    assert summary["bound_warning"] is None and not caught  # top-k sits at k by design


def test_bound_warning_names_layers_and_the_ceiling():
    text = bound_warning({0: (0.9, 0.0), 1: (0.2, 0.1), 2: (0.0, 0.7)}, 1, 8)
    assert "min_k=1 in layer 0 (90%)" in text and "max_k=8 in layer 2 (70%)" in text and "layer 1" not in text
    assert bound_warning({0: (1.0, 1.0)}, 4, 4) is None  # a floor equal to the ceiling is static top-k
    assert bound_warning({0: (0.5, 0.5)}, 1, 8) is None  # half is not most


def test_explorer_says_when_a_setting_is_the_floor():
    from bh_helpers.app.widgets import AlphaExplorer

    g = torch.Generator().manual_seed(0)
    logits = {layer: torch.randn(256, 64, generator=g) for layer in range(3)}
    from bh_helpers.nulls.fit import fit_null_bank

    explorer = AlphaExplorer(logits, {"gaussian": fit_null_bank(logits, kernel="gaussian")},
                             [f"t{i}" for i in range(256)], max_tokens=256)
    state = explorer.update(alpha=1e-9, min_k=1, max_k=8)
    assert state.bound_warning and "most tokens sit at min_k=1 in layer 0 (" in state.bound_warning
    assert "target k" in state.bound_warning
    assert explorer.update(method="topk").bound_warning is None


def test_report_lists_the_rows_at_a_bound_with_the_advice():
    import pandas as pd

    from bh_helpers.report.assemble import _bound_note

    rows = pd.DataFrame([
        {"label": "bh a=0.05 k=1..8", "dataset": "prose", "method": "bh", "min_k": 1.0, "max_k": 8.0,
         "floor_rate": 0.93, "ceiling_rate": 0.0},
        {"label": "bh a=0.5 k=1..8", "dataset": "prose", "method": "bh", "min_k": 1.0, "max_k": 8.0,
         "floor_rate": 0.2, "ceiling_rate": 0.1},
        {"label": "top-2", "dataset": "prose", "method": "topk", "min_k": 2.0, "max_k": 2.0,
         "floor_rate": 1.0, "ceiling_rate": 1.0},
    ])
    note = _bound_note(rows)
    assert note.startswith("**Warning: configurations at a bound.**")
    assert "- bh a=0.05 k=1..8 on prose: most token-layers sit at min_k=1 in all layers pooled (93%)" in note
    assert "a=0.5" not in note and "top-2" not in note and "alpha_for_mean_k" in note


def test_saturation_tables_print_small_alphas():
    import pandas as pd

    from bh_helpers.report.assemble import _saturation_section

    table = pd.DataFrame({"alpha": [2.448e-06, 2.448e-06, 0.05, 0.05], "max_k": [2, 4, 2, 4],
                          "mean_k": [1.0, 1.0, 1.9, 2.7], "ceiling_rate": [0.0, 0.0, 0.4, 0.1]})
    table.attrs["setting"] = "bh, gaussian"
    points = pd.DataFrame({"alpha": [2.448e-06, 0.05], "saturation_max_k": [2, 4], "mean_k_there": [1.0, 2.7]})
    text = _saturation_section(table, points)
    assert "2.45e-06" in text and "| 0.000 |" not in text.split("\n\n")[1]


def test_category_line_says_what_was_found(tiny):
    from bh_helpers.experiments.categories import analyze_categories
    from bh_helpers.report.assemble import _category_finding
    from bh_helpers.selection.controls import MixedTopKSelector

    model, bank, _ = tiny
    _, tok = load_model("tiny", device="cpu", dtype=torch.float32)
    prompts = {"prose": ["The cat sat on the mat.", "It was a dark and stormy night.", "Time flies like an arrow.",
                         "All happy families are alike."],
               "code": ["def f(x):\n    return x + 1", "for i in range(10):\n    print(i)", "import os\nos.getcwd()",
                        "class A:\n    pass"]}
    analysis = analyze_categories(model, tok, adaptive=BHSelector(bank, alpha=0.5, weights="softmax"),
                                  baseline=MixedTopKSelector(3.0, seed=0), prompt_sets=prompts, n_boot=200)
    text = _category_finding(analysis, "bh a=0.5", "prose")
    assert text.startswith("Category analysis (bh a=0.5, the featured configuration on prose")
    assert "mean experts per token from" in text and "Spearman rho" in text and "Wilcoxon p" in text
