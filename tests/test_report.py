"""Tests for bh_helpers.report.write and bh_helpers.report.plots: markdown, PNGs, figures from data."""

from __future__ import annotations

import numpy as np
import pytest

pd = pytest.importorskip("pandas")
matplotlib = pytest.importorskip("matplotlib")
matplotlib.use("Agg")

from matplotlib.figure import Figure  # noqa: E402

from bh_helpers.report import plots  # noqa: E402
from bh_helpers.experiments.frontier import compute_frontier  # noqa: E402
from bh_helpers.report.write import markdown_table, write_report  # noqa: E402


def _results():
    rows = []
    for k in range(1, 5):
        rows.append({"dataset": "prose", "key": f"t{k}", "label": f"top-{k}", "method": "topk", "k": k,
                     "alpha": np.nan, "max_k": np.nan, "top_p": np.nan, "mean_experts_per_token": float(k),
                     "perplexity": 10 + 40 / k, "relative_compute": k / 8})
    rows.append({"dataset": "prose", "key": "n", "label": "native", "method": "native", "k": np.nan,
                 "alpha": np.nan, "max_k": np.nan, "top_p": np.nan, "mean_experts_per_token": 8.0,
                 "perplexity": 14.0, "relative_compute": 1.0})
    rows.append({"dataset": "prose", "key": "p", "label": "top-p 0.5 k=1..8", "method": "top_p", "k": np.nan,
                 "alpha": np.nan, "max_k": 8, "top_p": 0.5, "mean_experts_per_token": 2.5, "perplexity": 26.0,
                 "relative_compute": 2.5 / 8})
    for i, (a, mk) in enumerate([(0.3, 1.6), (0.7, 3.2), (0.9, 5.0)]):
        rows.append({"dataset": "prose", "key": f"b{i}", "label": f"bh a={a:g} k=1..8 gaussian", "method": "bh",
                     "k": np.nan, "alpha": a, "max_k": 8, "top_p": np.nan, "mean_experts_per_token": mk,
                     "perplexity": 10 + 38 / mk, "relative_compute": mk / 8})
    df = pd.DataFrame(rows)
    for layer in range(3):
        df[f"per_layer_mean_k.{layer}"] = df["mean_experts_per_token"] + 0.1 * layer
    return df


def test_markdown_table():
    text = markdown_table([{"a": 1, "b": 0.123456, "c": "x|y"}, {"a": 2, "b": float("nan"), "c": None}])
    assert text.splitlines() == ["| a | b | c |", "|---|---|---|", "| 1 | 0.1235 | x\\|y |", "| 2 | n/a |  |"]
    df = pd.DataFrame({"x": [1.5], "y": ["z"]})
    assert markdown_table(df, columns=["y"]).splitlines()[2] == "| z |"
    with pytest.raises(ValueError, match="columns"):
        markdown_table(df, columns=["nope"])


def test_write_report(tmp_path):
    results = _results()
    frontier = compute_frontier(results)
    figures = {
        "frontier prose": plots.plot_frontier(results),
        "mean k per layer": plots.plot_layer_heatmap(plots.layer_matrix(results)),
    }
    path = write_report(tmp_path / "out", results=results, frontier=frontier, figures=figures,
                        protocol={"window": 256, "stride": 256, "weighting": "token"},
                        model_info={"model": "tiny", "layers": 6}, null_metadata={"kernel": "gaussian"},
                        tables={"Extra": [{"a": 1}]}, notes="Some notes.")
    text = path.read_text()
    assert path.name == "report.md"
    assert "## Compute-matched frontier" in text and "| dataset | configuration | mean k | perplexity |" in text
    assert "| prose | bh a=0.7 k=1..8 gaussian | 3.20 |" in text
    assert "## All results" in text and "| prose | native | 14 |" in text
    assert '"window": 256' in text and '"kernel": "gaussian"' in text and "## Extra" in text and "Some notes." in text
    for stem in ("frontier_prose", "mean_k_per_layer"):
        png = tmp_path / "out" / f"{stem}.png"
        assert f"]({stem}.png)" in text
        assert png.is_file() and png.stat().st_size > 1000
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # a second call replaces the report (no .tmp left behind)
    write_report(tmp_path / "out", results=results)
    assert not list((tmp_path / "out").glob("*.tmp"))


@pytest.mark.fault("bad arguments", "clear error")
def test_write_report_errors(tmp_path):
    with pytest.raises(ValueError, match="DataFrame"):
        write_report(tmp_path, results=[{"a": 1}])
    with pytest.raises(ValueError, match="Figure"):
        write_report(tmp_path, results=_results(), figures={"x": object()})


def test_plots_return_figures():
    results = _results()
    fig = plots.plot_frontier(results, dataset="prose", logy=False)
    assert isinstance(fig, Figure)
    labels = [t.get_text() for t in fig.axes[0].texts]
    assert labels == ["k=1", "k=2", "k=3", "k=4"]  # adaptive points are not annotated (labels overlapped)
    legend = [t.get_text() for t in fig.axes[0].get_legend().get_texts()]
    assert "uniform top-k" in legend and "native" in legend and any(m in legend for m in ("bh", "by"))
    fig = plots.plot_frontier(results, dataset="prose")  # log axis: more than two labelled ticks
    fig.canvas.draw() if hasattr(fig.canvas, "draw") else None
    ticks = [t for t in fig.axes[0].get_yticklabels() if t.get_text()]
    assert len(ticks) > 2
    with pytest.raises(ValueError, match="not in the results"):
        plots.plot_frontier(results, dataset="code")
    m = plots.layer_matrix(results)
    assert m.shape == (len(results), 3) and list(m.columns) == [0, 1, 2]
    assert isinstance(plots.plot_layer_heatmap(m), Figure)
    hist = plots.plot_k_histogram({"bh": np.array([[1, 2], [2, 3], [-1, 3]]), "top-2": {"hist": [0, 0, 10]}})
    assert isinstance(hist, Figure) and len(hist.axes[0].patches) == 2 * 4
    with pytest.raises(ValueError, match="non-empty"):
        plots.plot_k_histogram({})


def test_token_view():
    tokens = ["def", " f", "(x", "):\n", "    return", " <b>"]
    counts = [1.0, 2.0, 3.0, 4.0, 8.0, 5.0]
    html = plots.token_view_html(tokens, counts, vmin=1, vmax=8)
    assert html.count("<span") == 6 and "&lt;b&gt;" in html and "<b>" not in html
    assert 'title="8.00 experts"' in html
    fig = plots.plot_token_view(tokens, counts, chars_per_line=20)
    assert isinstance(fig, Figure)
    assert [t.get_text() for t in fig.axes[0].texts][:3] == ["def", " f", "(x"]
    with pytest.raises(ValueError, match="same length"):
        plots.token_view_html(tokens, counts[:-1])


def test_readme_answer_is_the_committed_demo_report():
    """The README's answer section is generated from docs/demo_report.md (never typed by hand)."""
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    res = subprocess.run([sys.executable, str(root / "scripts" / "readme_answer.py"), "--check"],
                         capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    report = (root / "docs" / "demo_report.md").read_text()
    assert report.index("## Verdict") < report.index("## Against compute-matched controls")
