"""Tests for bh_helpers.experiments.frontier: compute-matched top-k against hand-computed values."""

from __future__ import annotations

import math

import numpy as np
import pytest

pd = pytest.importorskip("pandas")

from bh_helpers.experiments.sweep import expand_grid, load_results, run_sweep  # noqa: E402
from bh_helpers.experiments.frontier import (  # noqa: E402
    STATUS_ABOVE,
    STATUS_BELOW,
    STATUS_MISSING,
    STATUS_OK,
    compute_frontier,
    interpolate_topk,
    topk_curve,
)
from bh_helpers.report.write import frontier_markdown  # noqa: E402


def _results(bh_points, *, dataset="d", topk=((1, 40.0), (2, 20.0), (3, 15.0))):
    rows = [{"dataset": dataset, "key": f"t{k}", "label": f"top-{k}", "method": "topk", "alpha": np.nan,
             "max_k": np.nan, "k": k, "mean_experts_per_token": float(k), "perplexity": ppl} for k, ppl in topk]
    for i, (mean_k, ppl) in enumerate(bh_points):
        rows.append({"dataset": dataset, "key": f"b{i}", "label": f"bh {i}", "method": "bh", "alpha": 0.1 * (i + 1),
                     "max_k": 8, "k": np.nan, "mean_experts_per_token": mean_k, "perplexity": ppl})
    return pd.DataFrame(rows)


def test_hand_computed_linear():
    # top-k curve (1, 40), (2, 20), (3, 15)
    # k=1.25: 40 + 0.25 * (20 - 40) = 35;  k=2.5: 20 + 0.5 * (15 - 20) = 17.5;  k=3: 15 (end point)
    fr = compute_frontier(_results([(1.25, 30.0), (2.5, 18.0), (3.0, 14.0)]))
    assert fr["topk_matched"].tolist() == pytest.approx([35.0, 17.5, 15.0])
    assert fr["delta"].tolist() == pytest.approx([-5.0, 0.5, -1.0])
    assert fr["relative"].tolist() == pytest.approx([-5 / 35, 0.5 / 17.5, -1 / 15])
    assert fr["status"].tolist() == [STATUS_OK] * 3
    assert fr["better"].tolist() == [True, False, True]
    assert fr["bracket"].tolist() == ["top-1..top-2", "top-2..top-3", "top-3"]
    assert fr.attrs["interpolation"] == "linear"


def test_hand_computed_log():
    # log-linear at k = 1.5 between 40 and 20: exp((log 40 + log 20) / 2) = sqrt(800)
    fr = compute_frontier(_results([(1.5, 25.0)]), interpolation="log")
    assert fr.loc[0, "topk_matched"] == pytest.approx(math.sqrt(800.0))
    assert fr.loc[0, "delta"] == pytest.approx(25.0 - math.sqrt(800.0))


def test_outside_range_is_flagged_not_extrapolated():
    fr = compute_frontier(_results([(0.9, 50.0), (3.2, 14.0), (float("nan"), 10.0)]))
    assert fr["status"].tolist() == [STATUS_BELOW, STATUS_ABOVE, STATUS_MISSING]
    assert fr["topk_matched"].isna().all() and fr["delta"].isna().all() and fr["relative"].isna().all()
    assert fr["better"].tolist() == [None, None, None]
    table = frontier_markdown(fr)
    assert table.count("n/a") >= 6 and STATUS_ABOVE in table and STATUS_BELOW in table


@pytest.mark.fault("bad arguments", "clear error")
def test_missing_metric_is_flagged():
    fr = compute_frontier(_results([(1.5, float("nan"))]))
    assert fr.loc[0, "status"] == STATUS_MISSING and math.isnan(fr.loc[0, "delta"])


def test_interpolate_topk_vectorised_and_edges():
    curve = topk_curve(_results([]))
    matched, status = interpolate_topk(curve, [1.0, 1.5, 3.0, 3.0 + 1e-12, 3.1])
    assert matched[:4] == pytest.approx([40.0, 30.0, 15.0, 15.0])
    assert math.isnan(matched[4]) and status.tolist() == [STATUS_OK] * 4 + [STATUS_ABOVE]


def test_per_dataset_curves_and_unsorted_topk():
    a = _results([(1.5, 25.0)], dataset="a")
    b = _results([(1.5, 9.0)], dataset="b", topk=((3, 6.0), (1, 10.0), (2, 8.0)))  # unsorted on purpose
    fr = compute_frontier(pd.concat([a, b], ignore_index=True))
    assert fr["dataset"].tolist() == ["a", "b"]
    assert fr["topk_matched"].tolist() == pytest.approx([30.0, 9.0])
    assert fr["delta"].tolist() == pytest.approx([-5.0, 0.0])


def test_higher_is_better_and_top_p_methods():
    df = _results([(1.5, 25.0)])
    df.loc[len(df)] = {"dataset": "d", "key": "p", "label": "top-p 0.5", "method": "top_p", "alpha": np.nan,
                       "max_k": 8, "k": np.nan, "mean_experts_per_token": 2.0, "perplexity": 21.0}
    fr = compute_frontier(df, methods=("bh", "top_p"), higher_is_better=True)
    assert fr["method"].tolist() == ["bh", "top_p"]
    assert fr["better"].tolist() == [False, True]


@pytest.mark.fault("bad arguments", "clear error")
def test_errors():
    with pytest.raises(ValueError, match="static top-k"):
        compute_frontier(_results([(1.5, 25.0)], topk=()))
    with pytest.raises(ValueError, match="interpolation"):
        compute_frontier(_results([(1.5, 25.0)]), interpolation="cubic")
    with pytest.raises(ValueError, match="lacks columns"):
        compute_frontier(_results([(1.5, 25.0)]).drop(columns=["perplexity"]))
    dup = _results([], topk=((1, 40.0), (1, 41.0)))
    with pytest.raises(ValueError, match="repeat"):
        topk_curve(dup)


def test_markdown_table_shape():
    fr = compute_frontier(_results([(1.25, 30.0), (2.5, 18.0)]))
    lines = frontier_markdown(fr, caption=False).splitlines()
    assert len(lines) == 2 + 2
    assert lines[0].startswith("| dataset | configuration | mean k | perplexity |")
    assert "| d | bh 0 | 1.25 | 30.000 | 35.000 | top-1..top-2 | -5.000 | -14.3% | ok |" == lines[2]
    assert "interpolated linearly" in frontier_markdown(fr)


def test_on_real_sweep_results(tmp_path):
    configs = expand_grid(methods=["bh"], alphas=[0.1, 0.5], max_ks=[4], topk=True, native=True)

    def evaluate(config, name):  # deterministic fake: k experts -> perplexity 10 + 20 / k
        k = {"topk": config.k, "native": 4}.get(config.method) or (1.5 if config.alpha < 0.3 else 3.5)
        return {"perplexity": 10 + 20 / k, "mean_experts_per_token": float(k)}

    run_sweep(configs, ["prose"], evaluate, tmp_path / "r.jsonl", progress=False)
    fr = compute_frontier(load_results(tmp_path / "r.jsonl"))
    assert len(fr) == 2 and fr["status"].tolist() == [STATUS_OK, STATUS_OK]
    # k=1.5: between top-1 (30) and top-2 (20): 25; k=3.5 between top-3 (16.67) and top-4 (15): 15.83
    assert fr["topk_matched"].tolist() == pytest.approx([25.0, (10 + 20 / 3 + 15) / 2])
