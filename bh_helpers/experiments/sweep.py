"""Resumable sweeps over routing configurations, one JSON line per finished result.

A sweep is a list of :class:`SweepConfig` (built by hand or by :func:`expand_grid`) times a list
of data set names. :func:`run_sweep` calls ``evaluate_fn(config, dataset_name) -> dict`` for every
pair not yet in the results file and appends one line per finished pair the moment it finishes
(write, flush, ``os.fsync``), so a sweep killed at any moment (Colab disconnects, SIGKILL, a
power cut) resumes where it stopped and loses no finished result.

The results file (JSON Lines: a header, then one row per finished pair) and its one reader are
:mod:`bh_helpers.experiments.results_file`.

On resume the header must describe the same grid (same configurations in the same order, same
data sets, same ``grid_id``); otherwise :func:`run_sweep` raises ``ValueError`` naming what
differs and leaves the file untouched (or, with ``overwrite=True``, moves it aside to
``<name>.bak-<timestamp>``). A last line without its newline (the process was killed mid-write)
is truncated away; complete lines are never dropped. One process at a time may write a results file.
:func:`run_sweep` also refuses to resume into a file that holds lines of another grid.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from bh_helpers._clock import utc_timestamp
from bh_helpers._locks import exclusive, lock_path
# The configurations and grids live in experiments.configs and experiments.grids; they are
# re-exported here because a sweep is where users meet them
# (``from bh_helpers.experiments.sweep import SweepConfig``).
from bh_helpers.experiments.configs import (
    CONTROLS,
    FDR_METHODS,
    METHODS,
    SweepConfig,
    _canonical_json,
    bank_name,
    grid_hash,
    with_controls,
)
from bh_helpers.experiments.grids import expand_grid
from bh_helpers.experiments.results_file import (FORMAT_VERSION, encode_metrics, load_results, read_results_file,
                                                 seal_row)

__all__ = [
    "METHODS",
    "FDR_METHODS",
    "CONTROLS",
    "SweepConfig",
    "bank_name",
    "expand_grid",
    "with_controls",
    "grid_hash",
    "run_sweep",
    "load_results",
    "load_balance_table",
    "read_results_file",
]



# ----------------------------------------------------------------------------------------------
# Results file
# ----------------------------------------------------------------------------------------------


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # pragma: no cover - not supported on every platform
        return
    try:
        os.fsync(fd)
    except OSError:  # pragma: no cover
        pass
    finally:
        os.close(fd)


def _move_aside(path: Path) -> Path:
    stamp = _dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    target = path.with_name(f"{path.name}.bak-{stamp}")
    n = 1
    while target.exists():
        target = path.with_name(f"{path.name}.bak-{stamp}-{n}")
        n += 1
    os.replace(path, target)
    return target


def _append_line(fh, record: Mapping[str, Any]) -> None:
    fh.write((_canonical_json(record) + "\n").encode("utf-8"))
    fh.flush()
    os.fsync(fh.fileno())


def run_sweep(
    configs: Sequence[SweepConfig],
    datasets: Sequence[str] | Mapping[str, Any],
    evaluate_fn: Callable[[SweepConfig, str], Mapping[str, Any]],
    results_path: str | os.PathLike,
    *,
    grid_id: str | None = None,
    protocol: Mapping[str, Any] | None = None,
    overwrite: bool = False,
    progress: bool = True,
):
    """Evaluate every (configuration, data set) pair, resuming from ``results_path``.

    Parameters
    ----------
    configs : sequence of SweepConfig
        The grid (distinct keys), in the order to run it.
    datasets : sequence of str or mapping
        Data set names (a mapping's keys are used), passed to ``evaluate_fn``.
    evaluate_fn : callable
        ``evaluate_fn(config, dataset_name) -> dict`` of metrics (JSON-serialisable values,
        nested dicts, numpy/torch scalars, or result objects with ``to_dict``). An exception
        stops the sweep; finished rows stay in the file and the pair is retried on resume.
    results_path : path-like
        JSON Lines results file; created (with its header) when missing.
    grid_id : str, optional
        A label that becomes part of the grid's identity.
    protocol : mapping, optional
        How the metrics were measured (e.g. window, stride, tokens per data set), written to the
        header as it is for reports to state; not part of the identity (``grid_id`` is).
    overwrite : bool
        When the file belongs to a different grid (or is not a results file): ``False`` raises
        ``ValueError`` and leaves it untouched; ``True`` renames it to
        ``<name>.bak-<timestamp>`` and starts afresh. A file of this same grid is always resumed.
    progress : bool
        Show a tqdm bar.

    Returns
    -------
    pandas.DataFrame
        All rows of the file (see :func:`load_results`).

    Raises
    ------
    ValueError
        Duplicate configurations, no data sets, or a results file of another grid (without
        ``overwrite``).

    Examples
    --------
    A perplexity-and-compute sweep (``banks`` maps kernel names to fitted null banks)::

        from bh_helpers.evaluation.scoring import perplexity
        from bh_helpers.evaluation.speed import compute_summary
        from bh_helpers.routing.patch import route

        data = {"wikitext2": embedded_fixture("wikitext2")}

        def evaluate(config, name):
            with route(model, config.to_selector(model, null_bank=banks)) as rec:
                ppl = perplexity(model, tokenizer, data[name], window=512, stride=256, progress=False)
            return {**ppl.to_dict(), **compute_summary(rec.summary(), native_k=8)}

        df = run_sweep(expand_grid(alphas=[0.01, 0.05]), data, evaluate, "outputs/sweep.jsonl")
    """
    configs = list(configs)
    if isinstance(datasets, str):
        names = [datasets]
    else:
        names = list(datasets.keys()) if isinstance(datasets, Mapping) else list(datasets)
    if not configs:
        raise ValueError("`configs` is empty.")
    if not names:
        raise ValueError("`datasets` is empty.")
    if not all(isinstance(c, SweepConfig) for c in configs):
        raise ValueError("`configs` must hold SweepConfig objects (see expand_grid).")
    keys = [c.key() for c in configs]
    if len(set(keys)) != len(keys):
        dup = sorted({c.label() for c, k in zip(configs, keys) if keys.count(k) > 1})
        raise ValueError(f"`configs` has duplicates: {dup} (a value given twice in one list of the grid, e.g. "
                         "top_ps 0.8 and 0.8); give each value once.")
    if len(set(names)) != len(names):
        raise ValueError(f"`datasets` has duplicate names: {names}.")
    identity = grid_hash(configs, names, grid_id)
    path = Path(results_path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with exclusive(lock_path(path), what=f"results file {str(path)!r}",
                   flag="results file (--results)"):
        return _run_sweep_locked(configs, keys, names, evaluate_fn, path, identity, grid_id, protocol, overwrite,
                                 progress)


def _run_sweep_locked(configs, keys, names, evaluate_fn, path: Path, identity: str, grid_id, protocol,
                      overwrite: bool, progress: bool):
    """:func:`run_sweep` once it holds the results file's lock (checks done)."""
    done: set[tuple[str, str]] = set()
    if path.exists():
        try:
            existing = read_results_file(path)
            header, rows, complete = existing.header, existing.rows, existing.complete
            if header is not None and header.get("grid_hash") != identity:
                raise ValueError(
                    f"{str(path)!r} holds results of a different grid (grid_hash "
                    f"{header.get('grid_hash')!r}, datasets {header.get('datasets')}; this grid is "
                    f"{identity!r}, datasets {names}{_grid_difference(header, grid_id)}); pass another "
                    "`results_path`, or move the old file aside (`overwrite=True`)."
                )
            if existing.foreign:
                raise ValueError(
                    f"{str(path)!r} holds {existing.foreign_summary()}: a results file holds one sweep; remove "
                    "those lines, pass another `results_path`, or move the file aside (`overwrite=True`)."
                )
        except ValueError:
            if not overwrite:
                raise
            _move_aside(path)
        else:
            if complete < path.stat().st_size:
                with path.open("r+b") as fh:  # drop a last line cut short by a kill mid-write
                    fh.truncate(complete)
                    fh.flush()
                    os.fsync(fh.fileno())
            if header is None:  # not even the header was complete: start afresh
                path.unlink()
            else:
                known = set(keys)
                done = {
                    (row.get("key"), row.get("dataset"))
                    for row in rows
                    if row.get("key") in known and row.get("dataset") in names
                }

    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        with path.open("xb") as fh:
            _append_line(
                fh,
                {
                    "type": "header",
                    "format": FORMAT_VERSION,
                    "grid_hash": identity,
                    "grid_id": grid_id,
                    "protocol": dict(protocol) if protocol is not None else None,
                    "datasets": names,
                    "configs": [c.to_dict() for c in configs],
                    "created": utc_timestamp(),
                },
            )
        _fsync_dir(path.parent)

    todo = [(c, k, d) for c, k in zip(configs, keys) for d in names if (k, d) not in done]
    total = len(configs) * len(names)
    with path.open("ab") as fh, tqdm(total=total, initial=total - len(todo), desc="sweep", disable=not progress) as bar:
        for config, key, name in todo:
            bar.set_postfix_str(f"{config.label()} | {name}", refresh=False)
            t0 = time.perf_counter()
            metrics = evaluate_fn(config, name)
            elapsed = time.perf_counter() - t0
            row = {
                "type": "row",
                "grid_hash": identity,  # so that a row pasted into another grid's file is told apart
                "key": key,
                "dataset": name,
                "config": config.to_dict(),
                "metrics": encode_metrics(metrics),
                "elapsed_s": round(elapsed, 6),
                "finished": utc_timestamp(),
            }
            _append_line(fh, seal_row(row))  # a value edited later is told apart on reading
            bar.update(1)
    return load_results(path)


def _grid_difference(header: Mapping[str, Any], grid_id: str | None) -> str:
    """What differs between the ``grid_id`` of a file's header and this sweep's, when both are JSON objects
    (as :func:`bh_helpers.experiments.evaluate.sweep_grid_id` writes): a replaced data file is named."""
    try:
        old, new = json.loads(header.get("grid_id") or ""), json.loads(grid_id or "")
    except (TypeError, json.JSONDecodeError):
        return ""
    if not isinstance(old, dict) or not isinstance(new, dict):
        return ""
    changed = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
    files = old.get("data_files") or {}, new.get("data_files") or {}
    replaced = [name for name in files[1] if name in files[0] and files[0][name] != files[1][name]]
    notes = [f"data file {name!r} changed since these results were written (sha256 {files[0][name][:12]}... now "
             f"{files[1][name][:12]}...): its rows were measured on other text" for name in replaced]
    return "; " + "; ".join(notes or [f"it differs in {', '.join(changed)}"]) if changed else ""


def load_balance_table(results):
    """Per configuration and data set, how evenly its tokens spread over a layer's experts.

    Parameters
    ----------
    results : pandas.DataFrame
        :func:`load_results` output with the routing recorder's ``per_layer_utilisation_cv.*``
        and ``per_layer_unused_share.*`` columns; the controls' rows are left out.

    Returns
    -------
    pandas.DataFrame
        ``dataset``, ``configuration``, ``mean k``, ``mean CV over layers`` and ``worst layer CV``
        (coefficient of variation of the expert activations; 0 is perfectly even) and
        ``unused experts (share)`` (mean over layers of the share never chosen).
    """
    import pandas as pd

    cv = [c for c in results.columns if str(c).startswith("per_layer_utilisation_cv.")]
    unused = [c for c in results.columns if str(c).startswith("per_layer_unused_share.")]
    if not cv:
        raise ValueError("`results` has no per_layer_utilisation_cv.* columns; rerun the sweep with this version.")
    rows = results[~results["method"].isin(CONTROLS)]
    return pd.DataFrame({
        "dataset": rows["dataset"], "configuration": rows["label"], "mean k": rows["mean_experts_per_token"],
        "mean CV over layers": rows[cv].mean(axis=1), "worst layer CV": rows[cv].max(axis=1),
        "unused experts (share)": rows[unused].mean(axis=1),
    })
