"""A markdown report of a routing sweep: tables, plots, protocol and provenance, in one call.

:func:`write_report` writes ``report.md`` into a folder, saves every figure next to it as a PNG
and links it from the markdown, so the folder is self-contained (view it on GitHub, in VS Code
or with any markdown viewer). Tables are plain GitHub markdown written by
:func:`markdown_table` (no ``tabulate`` dependency; it lives in :mod:`bh_helpers._markdown`, below every
floor, and is re-exported here).

The report's folder may be the user's: a file there that a report did not write (their own
``report.md``, ``summary.json`` or a PNG of the same name) is never replaced;
:func:`check_replaceable` is the one check, run by every writer before it writes anything.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from bh_helpers._clock import utc_timestamp
from bh_helpers._markdown import markdown_table
from bh_helpers.experiments.frontier import STATUS_OK
from bh_helpers.report.verdict import comparison_markdown, verdict_markdown

__all__ = ["check_replaceable", "figure_files", "frontier_markdown", "markdown_table", "results_table",
           "write_report", "REPORT_NAME", "SUMMARY_NAME"]

REPORT_NAME = "report.md"
#: The machine-readable twin of ``report.md`` (:func:`bh_helpers.report.assemble.write_summary`).
SUMMARY_NAME = "summary.json"
_SAFE_NAME = re.compile(r"[^A-Za-z0-9_.-]+")
#: How every report.md this module writes begins (its title, then the time it was written).
_REPORT_HEAD = re.compile(r"# [^\n]*\n\nWritten \d{4}-\d\d-\d\dT")
#: The PNG text chunk that marks a figure a report saved (matplotlib's ``metadata``).
_PNG_MARK = {"Source": "bh-routing report"}


def frontier_markdown(frontier, *, digits: int = 3, caption: bool = True) -> str:
    """The frontier table (from :func:`compute_frontier`) as a GitHub markdown table.

    Parameters
    ----------
    frontier : pandas.DataFrame
    digits : int, default 3
        Significant decimals of the metric columns.
    caption : bool, default True
        Append one line stating the metric, interpolation and sign convention.

    Returns
    -------
    str
    """
    metric = frontier.attrs.get("metric", "metric")
    interp = frontier.attrs.get("interpolation", "linear")
    rows = []
    for _, r in frontier.iterrows():
        ok = r["status"] == STATUS_OK
        rows.append({
            "dataset": r["dataset"],
            "configuration": r["label"],
            "mean k": f"{r['mean_k']:.2f}",
            metric: f"{r['value']:.{digits}f}",
            f"top-k {metric} at same k": f"{r['topk_matched']:.{digits}f}" if ok else "n/a",
            "matched between": r["bracket"] if ok else "",
            "delta": f"{r['delta']:+.{digits}f}" if ok else "n/a",
            "relative": f"{100 * r['relative']:+.1f}%" if ok else "n/a",
            "status": r["status"],
        })
    table = markdown_table(rows)
    if caption:
        better = "higher" if frontier.attrs.get("higher_is_better") else "lower"
        space = "log-" if interp == "log" else ""
        table += (
            f"\n\nTop-k {metric} interpolated {space}linearly in mean experts per token between neighbouring "
            f"static k (no extrapolation: points outside the top-k range are flagged); "
            f"delta = configuration minus matched top-k ({better} {metric} is better). "
            f"The curve is convex in k, so the interpolated top-k value is slightly pessimistic between "
            f"integer k (it favours the configuration).\n"
        )
    return table


def results_table(results, *, metric: str = "perplexity", cost: str = "mean_experts_per_token") -> str:
    """Markdown table of a sweep: one row per (configuration, data set), in file order.

    Columns: data set, configuration, ``metric``, mean experts per token, relative compute
    (when present), share of token-layers at the floor/ceiling (when present), seconds.
    """
    wanted = [("dataset", "dataset"), ("label", "configuration"), (metric, metric), (cost, "mean k"),
              ("relative_compute", "compute vs native"), ("floor_rate", "at floor"), ("ceiling_rate", "at ceiling"),
              ("elapsed_s", "seconds")]
    present = [(c, name) for c, name in wanted if c in results.columns]
    rows = [{name: r[c] for c, name in present} for _, r in results.iterrows()]
    return markdown_table(rows, columns=[name for _, name in present])


def _json_block(obj: Any) -> str:
    return "```json\n" + json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n```"


def _save_figure(fig: Any, path: Path) -> None:
    fig.savefig(path, dpi=110, bbox_inches="tight", metadata=_PNG_MARK)  # marked: see check_replaceable


def figure_files(figures: Mapping[str, Any]) -> dict[str, str]:
    """``{figure name: PNG file name}`` as :func:`write_report` saves them (names sanitised, made unique)."""
    files: dict[str, str] = {}
    for name in figures:
        stem = _SAFE_NAME.sub("_", str(name)).strip("_") or "figure"
        while f"{stem}.png" in files.values():
            stem += "_"
        files[name] = f"{stem}.png"
    return files


def _head(path: Path, size: int = 4096) -> bytes:
    with open(path, "rb") as handle:
        return handle.read(size)


def _written_by_report(path: Path, linked: set[str]) -> bool:
    """Whether ``path`` is a file a report wrote: recognised by its contents, which survive a copy.

    ``report.md`` begins with its title and "Written <time>"; ``summary.json`` holds the verdict and
    the bh-routing version; a PNG carries the report's text chunk, or (saved before the chunk) is
    linked from a report.md the report wrote.
    """
    if not path.is_file():
        return False
    try:
        if path.name == REPORT_NAME:
            return bool(_REPORT_HEAD.match(_head(path).decode("utf-8", errors="replace")))
        if path.name == SUMMARY_NAME:
            summary = json.loads(path.read_text(encoding="utf-8"))
            return (isinstance(summary, dict) and "verdict" in summary
                    and "bh-routing" in (summary.get("versions") or {}))
        if path.suffix == ".png":
            mark = b"".join(k.encode() + b"\0" + v.encode() for k, v in _PNG_MARK.items())
            return mark in _head(path, 1 << 16) or path.name in linked
    except (OSError, ValueError):  # unreadable, or not the JSON a report writes
        return False
    return False


def check_replaceable(out_dir: str | os.PathLike, names: Sequence[str], name: str = "`out_dir`") -> None:
    """Raise ValueError when writing ``names`` into ``out_dir`` would replace a file a report did not write.

    Parameters
    ----------
    out_dir : path-like
        The report folder.
    names : sequence of str
        The files about to be written there (``report.md``, ``summary.json``, figures' PNGs).
    name : str, default "`out_dir`"
        The argument that chose the folder, as the user typed it (the command line shows ``--out``).

    Raises
    ------
    ValueError
        Naming the files, the folder and the fix; nothing has been written.
    """
    out = Path(out_dir)
    if not out.is_dir():
        return
    report = out / REPORT_NAME
    # PNGs of a report saved before they were marked: the ones its own report.md links to
    linked = (set(re.findall(r"!\[[^\]]*\]\(([^)]+\.png)\)", report.read_text(encoding="utf-8", errors="replace")))
              if _written_by_report(report, set()) else set())
    foreign = [n for n in names if (out / n).exists() and not _written_by_report(out / n, linked)]
    if foreign:
        raise ValueError(
            f"{name} {str(out_dir)!r} holds {', '.join(foreign)}, which a bh-routing report did not write; nothing "
            f"was changed (a report replaces only its own files). Pass another {name} (a new folder), or move "
            f"{'it' if len(foreign) == 1 else 'them'} aside."
        )


def _table_or_text(value: Any) -> str:
    if isinstance(value, str):
        return value
    if hasattr(value, "columns"):
        return markdown_table(value)
    if isinstance(value, Sequence):
        return markdown_table(value)
    raise ValueError(f"a table must be a markdown string, a DataFrame or a list of dicts, got {type(value).__name__}.")


def write_report(
    out_dir: str | os.PathLike,
    *,
    results,
    frontier=None,
    figures: Mapping[str, Any] | None = None,
    protocol: Mapping[str, Any] | str | None = None,
    model_info: Mapping[str, Any] | None = None,
    null_metadata: Mapping[str, Any] | Any | None = None,
    tables: Mapping[str, Any] | None = None,
    title: str = "BH routing report",
    notes: str | None = None,
    metric: str = "perplexity",
    comparison=None,
) -> Path:
    """Write ``report.md`` (and one PNG per figure) into ``out_dir``.

    Parameters
    ----------
    out_dir : path-like
        Folder (created when missing); a ``report.md`` and PNGs a report wrote there are replaced,
        anything else of those names is refused (:func:`check_replaceable`).
    results : pandas.DataFrame
        Sweep results (:func:`bh_helpers.experiments.sweep.load_results`).
    frontier : pandas.DataFrame, optional
        :func:`bh_helpers.experiments.frontier.compute_frontier` output (its markdown table is included).
    figures : mapping of str to Figure, optional
        ``{name: matplotlib Figure}``; saved as ``<name>.png`` (name sanitised) and embedded
        in insertion order, with the name as caption. Figures are not closed.
    protocol : mapping or str, optional
        The evaluation protocol (window, stride, token weighting, data, tokens scored).
    model_info : mapping, optional
        Model id, layers, experts, native k, dtype, device, ...
    null_metadata : mapping or NullBankMetadata, optional
        Provenance of the null bank (a dataclass is converted with ``asdict``).
    tables : mapping of str to table, optional
        Extra sections ``{heading: markdown string, DataFrame or list of dicts}``.
    title : str
    notes : str, optional
        Free text placed after the title.
    metric : str, default "perplexity"
        Metric column of the results table.
    comparison : pandas.DataFrame, optional
        :func:`bh_helpers.experiments.comparison.compare_with_controls` output: the report then
        opens with ``## Verdict`` (:func:`bh_helpers.report.verdict.verdict_markdown`) and lists
        every adaptive row beside its controls.

    Returns
    -------
    Path
        The written ``report.md``.

    Raises
    ------
    ValueError
        ``results`` is not a DataFrame, a figure has no ``savefig``, or ``out_dir`` holds a
        ``report.md`` or PNG of the same name that a report did not write.
    """
    from dataclasses import asdict, is_dataclass

    if not (hasattr(results, "columns") and hasattr(results, "iterrows")):
        raise ValueError("`results` must be a pandas DataFrame (bh_helpers.experiments.sweep.load_results).")
    figures = dict(figures or {})
    for name, fig in figures.items():
        if not hasattr(fig, "savefig"):
            raise ValueError(f"`figures[{name!r}]` must be a matplotlib Figure, got {type(fig).__name__}.")
    out = Path(out_dir)
    files = figure_files(figures)
    check_replaceable(out, [REPORT_NAME, *files.values()])  # before anything is written
    out.mkdir(parents=True, exist_ok=True)

    parts = [f"# {title}", "", f"Written {utc_timestamp()}."]  # how check_replaceable knows it (_REPORT_HEAD)
    if comparison is not None:
        parts += ["", "## Verdict", "", verdict_markdown(comparison).rstrip()]
    if notes:
        parts += ["", notes.strip()]
    if comparison is not None:
        parts += ["", "## Against compute-matched controls", "",
                  "Delta = perplexity minus the control's on the same windows (negative: the adaptive rule is "
                  "better); 95% paired intervals: "
                  + ("delete-one-document jackknife with Student's t (the interval that held its level in the A/A "
                     "benchmark, benchmarks/aa_intervals.py)" if comparison.attrs.get("unit") == "document" else
                     f"percentile bootstrap over scoring windows ({comparison.attrs.get('resamples', '?')} "
                     "resamples)")
                  + ". Mixed top-k: each token gets the floor or "
                  "ceiling of the adaptive row's per-layer mean k at random; shuffled: the adaptive row's own "
                  "counts permuted across tokens; static chord: per window, one of the two static per-layer "
                  "allocations (fitted on calibration text) whose totals bracket the adaptive row's realised mean "
                  "k, with the probability that matches its compute (its expected per-window NLL).", "",
                  comparison_markdown(comparison).rstrip()]
    if frontier is not None and len(frontier):
        parts += ["", "## Compute-matched frontier", "", frontier_markdown(frontier).rstrip()]
    parts += ["", "## All results", "", results_table(results, metric=metric) if len(results) else "(no rows yet)"]
    for heading, table in (tables or {}).items():
        parts += ["", f"## {heading}", "", _table_or_text(table).rstrip()]
    if figures:
        parts += ["", "## Figures"]
        for name, fig in figures.items():
            _save_figure(fig, out / files[name])
            parts += ["", f"### {name}", "", f"![{name}]({files[name]})"]
    parts += ["", "## Evaluation protocol", ""]
    if protocol is None:
        parts.append("(not stated)")
    elif isinstance(protocol, str):
        parts.append(protocol.strip())
    else:
        parts.append(_json_block(dict(protocol)))
    if model_info is not None:
        parts += ["", "## Model", "", _json_block(dict(model_info))]
    if null_metadata is not None:
        meta = asdict(null_metadata) if is_dataclass(null_metadata) else dict(null_metadata)
        parts += ["", "## Null bank", "", _json_block(meta)]
    path = out / REPORT_NAME
    tmp = path.with_name(REPORT_NAME + ".tmp")
    tmp.write_text("\n".join(parts) + "\n", encoding="utf-8")
    tmp.replace(path)
    return path
