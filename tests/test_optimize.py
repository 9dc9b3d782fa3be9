"""The budget optimiser against exhaustive search on small results frames (issue 16, item 5)."""

from __future__ import annotations

import itertools
import json
import warnings

import numpy as np
import pandas as pd
import pytest

from bh_helpers.experiments.configs import CONTROLS, SweepConfig, with_controls
from bh_helpers.experiments.optimize import optimize


def _frame(seed: int) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    configs = [SweepConfig("native")] + [SweepConfig("topk", k=k) for k in (1, 2, 4)] + with_controls(
        [SweepConfig("bh", alpha=a, max_k=8, min_k=1, kernel="gaussian") for a in (0.1, 0.5)])
    rows = []
    for name in ("prose", "code"):
        for c in configs:
            rows.append({"key": c.key(), "dataset": name, "label": c.label(), **c.to_dict(),
                         "mean_experts_per_token": float(rng.uniform(1, 8)), "perplexity": float(rng.uniform(10, 40))})
    return pd.DataFrame.from_records(rows)


def _brute(df, name, budget=None, weights=None):
    """Every candidate scored by hand; the first of the best (the results' order breaks ties)."""
    cand = [r for _, r in df.iterrows() if r["dataset"] == name and r["method"] not in ("mixed", "shuffled", "static_chord")]
    if budget is not None:
        fits = [r for r in cand if r["mean_experts_per_token"] <= budget]
        return min(fits, key=lambda r: r["perplexity"])["label"] if fits else None
    q = [r["perplexity"] for r in cand]
    c = [r["mean_experts_per_token"] for r in cand]
    scores = [weights[0] * (max(q) - r["perplexity"]) / (max(q) - min(q))
              + weights[1] * (max(c) - r["mean_experts_per_token"]) / (max(c) - min(c)) for r in cand]
    return cand[int(np.argmax(scores))]["label"]


@pytest.mark.parametrize("seed", range(5))
def test_optimiser_equals_exhaustive_search(seed):
    df = _frame(seed)
    for budget, weights in itertools.product((1.5, 3.0, 6.0, 9.0), [None]):
        nothing_fits = [name for name in ("prose", "code") if _brute(df, name, budget=budget) is None]
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            got = optimize(df, budget=budget).set_index("dataset")["label"]
        said = [str(w.message) for w in caught if "has mean k <=" in str(w.message)]
        assert len(said) == len(nothing_fits), said  # a budget below every row is said in words, per data set
        for name, message in zip(nothing_fits, said):
            cheapest = df[(df["dataset"] == name) & ~df["method"].isin(CONTROLS)]
            cheapest = cheapest.loc[cheapest["mean_experts_per_token"].idxmin()]
            assert f"{name!r} has mean k <= {budget:g}: the cheapest measured is {cheapest['label']}" in message
        for name in ("prose", "code"):
            want = _brute(df, name, budget=budget)
            assert (got[name] if isinstance(got[name], str) else None) == want
    for weights in ((0.7, 0.3), (1.0, 0.0), (0.0, 1.0), (0.5, 0.5)):
        got = optimize(df, quality_weight=weights[0], speed_weight=weights[1]).set_index("dataset")["label"]
        for name in ("prose", "code"):
            assert got[name] == _brute(df, name, weights=weights)


def test_adaptive_pick_shows_its_controls():
    df = _frame(0)
    bh = df[(df["method"] == "bh") & (df["dataset"] == "prose")].index[0]
    df.loc[bh, ["perplexity", "mean_experts_per_token"]] = [5.0, 1.2]  # the best by far, and cheap
    pick = optimize(df, budget=2.0).set_index("dataset").loc["prose"]
    assert pick["method"] == "bh"
    mixed = df[(df["method"] == "mixed") & (df["dataset"] == "prose")
               & (df["control_of"].map(lambda s: isinstance(s, str) and json.loads(s)["alpha"] == 0.1))]
    assert pick["mixed_perplexity"] == mixed["perplexity"].iloc[0]


@pytest.mark.fault("bad arguments", "clear error")
@pytest.mark.parametrize("kwargs,match", [
    ({}, "`budget`"), (dict(budget=-1), "`budget`"), (dict(budget="3"), "`budget` must be a positive number"),
    (dict(budget=True), "`budget`"),  # the API's own names, not the command line's flags (issue 25 re-run)
    (dict(budget=2, quality_weight=1, speed_weight=0), "either"),
    (dict(quality_weight=0, speed_weight=0), "both be 0"),
    (dict(quality_weight=-1, speed_weight=1), "`quality_weight`"),
    (dict(budget=2, metric="ppl"), r"`metric` 'ppl' is not a column of `results`; the numeric columns are"),
    (dict(budget=2, cost="mean_k"), r"`cost` 'mean_k' is not a column"),
])
def test_optimiser_bad_input(kwargs, match):
    with pytest.raises(ValueError, match=match):
        optimize(_frame(0), **kwargs)


@pytest.mark.fault("damaged files", "clear error")
def test_optimiser_refuses_what_is_not_one_sweeps_results():
    """A list of dicts gave an AttributeError; two sweeps concatenated (a softmax and a renorm sweep share keys
    and labels) were ranked as one (issue 25 re-run)."""
    with pytest.raises(ValueError, match="`results` must be the DataFrame of .*load_results; got list"):
        optimize(_frame(0).to_dict("records"), budget=2)
    edited = _frame(0)
    edited.loc[3, "mean_experts_per_token"] = -1.0  # ranked first (the cheapest) before
    with pytest.raises(ValueError, match="`results` has rows with a negative 'mean_experts_per_token'"):
        optimize(edited, budget=4)
    twice = pd.concat([_frame(0), _frame(1)], ignore_index=True)
    with pytest.raises(ValueError, match=r"holds configuration \w+ on data set 'prose' twice: rows of two sweeps"):
        optimize(twice, budget=4)
    from bh_helpers.experiments.optimize import save_routing_config

    with pytest.raises(ValueError, match=r"twice: rows of two sweeps"):  # its weights: whose protocol?
        save_routing_config(twice, twice["key"].iloc[1], "never-written.json")


@pytest.mark.fault("command line", "clear error")
def test_cli_optimize_one_line_errors(tmp_path, capsys):
    from bh_helpers.app import cli

    assert cli.main(["optimize", "--results", str(tmp_path / "none.jsonl"), "--budget", "2"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err
    assert cli.main(["optimize", "--results", str(tmp_path / "none.jsonl"), "--quality-weight", "1"]) == 2
    assert "--speed-weight" in capsys.readouterr().err
