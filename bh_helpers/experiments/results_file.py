"""The results file of a sweep: how a row's metrics are written, and the one reader of the file.

Format (JSON Lines, UTF-8; written by :func:`bh_helpers.experiments.sweep.run_sweep`)::

    {"type": "header", "format": 1, "grid_hash": "...", "grid_id": ..., "datasets": [...],
     "configs": [...], "created": "..."}
    {"type": "row", "grid_hash": "...", "key": "<config key>", "dataset": "...", "config": {...},
     "metrics": {...}, "elapsed_s": 1.23, "finished": "..."}

Non-finite metric values (a perplexity that overflowed) are written as the strings ``"nan"``,
``"inf"`` and ``"-inf"`` (strict JSON has no such numbers) and read back as the floats they were.

Every reader goes through :func:`read_results_file`: it keeps the rows of the header's grid and
sets aside, counted by reason, lines that do not belong to it (lines after the header of another
grid, as in two concatenated files; a row that names another grid; a data set or configuration the
header does not list; a key that is not its configuration's). :func:`load_results` warns once with
the counts and never ranks or reports them.
"""

from __future__ import annotations

import json
import math
import os
import warnings
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from bh_helpers._validate import existing_file
from bh_helpers.experiments.configs import FDR_METHODS, SweepConfig, _canonical_json, _short_hash

__all__ = ["FORMAT_VERSION", "ROW_DIGEST", "ResultsFile", "decode_metrics", "encode_metrics", "finite_rows",
           "load_results", "read_results_file", "row_digest", "seal_row"]

#: Format of the results files written now: 2 = every row carries :data:`ROW_DIGEST` (format 1, older
#: files, has none: their rows are read as they are).
FORMAT_VERSION = 2
#: The field of a row that holds the SHA-256 of the rest of the row: a value edited by hand after the
#: sweep wrote it (a perplexity or mean k changed to a plausible number) is told apart and set aside.
ROW_DIGEST = "row_sha256"


def row_digest(record: Mapping[str, Any]) -> str:
    """SHA-256 (hex) of a results row's canonical JSON, without its own :data:`ROW_DIGEST` field."""
    import hashlib

    body = {k: v for k, v in record.items() if k != ROW_DIGEST}
    return hashlib.sha256(_canonical_json(body).encode("utf-8")).hexdigest()


def seal_row(record: Mapping[str, Any]) -> dict:
    """``record`` with its :data:`ROW_DIGEST` (re)computed: how the sweep writes every row."""
    return {**{k: v for k, v in record.items() if k != ROW_DIGEST}, ROW_DIGEST: row_digest(record)}


def encode_metrics(obj: Any) -> Any:
    """Metrics to plain JSON types (dataclass results, numpy/torch scalars, tuples)."""
    if hasattr(obj, "to_dict") and callable(obj.to_dict):
        obj = obj.to_dict()
    if isinstance(obj, Mapping):
        return {str(k): encode_metrics(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [encode_metrics(v) for v in obj]
    if isinstance(obj, (str, bool, int)) or obj is None:
        return obj
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else str(obj)  # "nan", "inf", "-inf": strict JSON has none
    if hasattr(obj, "item"):
        return encode_metrics(obj.item())
    raise ValueError(f"metric value {obj!r} of type {type(obj).__name__} is not JSON-serialisable.")


#: How :func:`encode_metrics` writes the non-finite floats, and what they read back as.
_NON_FINITE = {"nan": math.nan, "inf": math.inf, "-inf": -math.inf}


def decode_metrics(obj: Any) -> Any:
    """Metrics as written by :func:`encode_metrics`, with ``"nan"``/``"inf"``/``"-inf"`` back as floats."""
    if isinstance(obj, str):
        return _NON_FINITE.get(obj, obj)
    if isinstance(obj, dict):
        return {k: decode_metrics(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [decode_metrics(v) for v in obj]
    return obj


def _config_key(config: Any) -> str | None:
    """:meth:`SweepConfig.key` of a configuration as stored in a results file (None if it is not one)."""
    if not isinstance(config, dict):
        return None
    try:
        return _short_hash(_canonical_json({k: v for k, v in config.items() if v is not None}))
    except (TypeError, ValueError):
        return None


@dataclass
class ResultsFile:
    """A results file as read by :func:`read_results_file` (the file itself is never changed).

    Attributes
    ----------
    header : dict or None
        The first line; None when not even it is complete.
    rows : list of dict
        The rows of the header's grid, in file order, metrics decoded (``"inf"`` -> ``inf``).
    foreign : Counter
        Lines set aside, counted by why: not of the header's grid, or a row whose perplexity no run writes.
    complete : int
        Length in bytes of the prefix made of complete lines.
    """

    header: dict | None
    rows: list[dict] = field(default_factory=list)
    foreign: Counter = field(default_factory=Counter)
    complete: int = 0

    def foreign_summary(self) -> str:
        """``"3 lines that do not belong to its grid (2 after the header of another grid, 1 of a data set ...)"``."""
        n = sum(self.foreign.values())
        reasons = ", ".join(f"{count} {why}" for why, count in self.foreign.most_common())
        return f"{n} line{'s' if n != 1 else ''} that do{'es' if n == 1 else ''} not belong to its grid ({reasons})"


def read_results_file(path: str | os.PathLike) -> ResultsFile:
    """Read a results file without changing it: its header, its grid's rows, the foreign lines counted.

    The one reader of results files (:func:`load_results`, :func:`run_sweep`'s resume). A row
    belongs to the grid of the first header when no header of another grid (``grid_hash``)
    precedes it, its checksum (:data:`ROW_DIGEST`, format 2) holds, its own ``grid_hash`` (rows
    written since it exists) is that header's, its data
    set and configuration are in that header, and its key is its configuration's. Non-finite
    metrics are read back as floats.

    Raises
    ------
    ValueError
        A first line that is not a header, or a complete line that is not JSON.
    """
    path = Path(path)
    header, records, complete = _read_lines(path)
    out = ResultsFile(header, complete=complete)
    if header is None:
        return out
    datasets = set(header["datasets"]) if isinstance(header.get("datasets"), list) else None
    keys = {_config_key(c) for c in header["configs"]} if isinstance(header.get("configs"), list) else None
    in_grid = True  # False after the header of another grid (two files concatenated)
    checksummed = isinstance(header.get("format"), int) and header["format"] >= 2  # every row carries ROW_DIGEST
    for record in records:
        kind = record.get("type") if isinstance(record, dict) else None
        if kind == "header":
            in_grid = record.get("grid_hash") == header.get("grid_hash")
            if not in_grid:
                out.foreign["header of another grid"] += 1
            continue
        if kind != "row":
            why = "lines that are not result rows"
        elif not in_grid:
            why = "after the header of another grid"
        elif (checksummed or ROW_DIGEST in record) and record.get(ROW_DIGEST) != row_digest(record):
            why = "edited after the sweep wrote them (their checksum differs or is missing)"
        elif record.get("grid_hash", header.get("grid_hash")) != header.get("grid_hash"):  # older rows have none
            why = "of another grid"
        elif datasets is not None and record.get("dataset") not in datasets:
            why = "of a data set the header does not list"
        elif (keys is not None and record.get("key") not in keys) or \
                _config_key(record.get("config")) != record.get("key"):
            why = "of a configuration the header does not list"
        elif not _possible_perplexity(metrics := decode_metrics(record.get("metrics", {}))):
            why = "with a missing, non-numeric or impossible perplexity (below 1)"
        elif not _possible_mean_k(metrics, record.get("config")):
            why = "with a mean k its configuration cannot give (negative, or outside its k, min_k..max_k)"
        else:
            out.rows.append({**record, "metrics": metrics})
            continue
        out.foreign[why] += 1
    return out


def _possible_perplexity(metrics: Any) -> bool:
    """No perplexity (another metric's runner), or one a run can write: a number >= 1 (``exp`` of a
    mean NLL >= 0), or inf/nan (an overflow)."""
    if not isinstance(metrics, Mapping) or "perplexity" not in metrics:
        return True
    value = metrics["perplexity"]
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return False
    return not math.isfinite(value) or value >= 1.0 - 1e-9  # a perfect fit's exp(-0.0) may round just below 1


def _possible_mean_k(metrics: Any, config: Any) -> bool:
    """No mean k, an overflow (inf/nan: :func:`finite_rows` leaves it out), or a number the row's own
    configuration can realise: >= 0; exactly ``k`` (or the mean of ``ks``) for static top-k; >= 1 for
    native; within ``[min_k, max_k]`` for a BH-family or top-p row (controls are drawn from their row's
    counts, so only >= 0 holds for them)."""
    if not isinstance(metrics, Mapping) or "mean_experts_per_token" not in metrics:
        return True
    value = metrics["mean_experts_per_token"]
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return False
    if not math.isfinite(value):
        return True
    config = config if isinstance(config, Mapping) else {}
    low, high = 0.0, math.inf
    ks = config.get("ks")
    if config.get("method") == "topk" and isinstance(config.get("k"), int):
        low = high = config["k"]
    elif config.get("method") == "static" and isinstance(ks, list) and ks and all(isinstance(k, int) for k in ks):
        low = high = sum(ks) / len(ks)
    elif config.get("method") == "native":
        low = 1.0  # every MoE model routes at least one expert per token
    elif config.get("method") in FDR_METHODS + ("top_p",):
        low = config.get("min_k") if isinstance(config.get("min_k"), int) else 0
        high = config.get("max_k") if isinstance(config.get("max_k"), int) else math.inf
    return low - 1e-6 <= value <= high + 1e-6


def _read_lines(path: Path) -> tuple[dict | None, list[Any], int]:
    """Parse a results file's complete lines: ``(header, later records, complete_bytes)``."""
    data = path.read_bytes()
    complete = data.rfind(b"\n") + 1  # 0 when there is no newline at all
    lines = data[:complete].split(b"\n")[:-1]
    if not lines:
        return None, [], 0
    try:
        header = json.loads(lines[0])
    except (json.JSONDecodeError, UnicodeDecodeError):  # a binary file is not text at all
        header = None
    if not isinstance(header, dict) or header.get("type") != "header":
        raise ValueError(
            f"{str(path)!r} is not a sweep results file (its first line is not a header); pass "
            "another `results_path`, or move it aside (`overwrite=True`)."
        )
    rows = []
    for lineno, line in enumerate(lines[1:], 2):
        try:
            row = json.loads(line)
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise ValueError(
                f"{str(path)}:{lineno} is a complete but corrupt line ({getattr(err, 'msg', 'not UTF-8 text')}); "
                "fix or remove it "
                "by hand (only a last line without newline is dropped automatically)."
            ) from None
        rows.append(row)
    return header, rows, complete


def _flatten(prefix: str, obj: Mapping[str, Any], out: dict) -> None:
    for k, v in obj.items():
        name = f"{prefix}{k}"
        if isinstance(v, Mapping):
            _flatten(name + ".", v, out)
        else:
            out[name] = v


def load_results(path: str | os.PathLike):
    """Rows of a sweep results file as a :class:`pandas.DataFrame`, in file order.

    Columns: ``key``, ``dataset``, ``label``, the :class:`SweepConfig` fields, the metrics
    (nested dicts flattened with dots, e.g. ``protocol.window``), ``elapsed_s`` and
    ``finished``. A last line without newline is ignored (the file is not modified). The
    header is available as ``df.attrs["header"]``, the file's path as ``df.attrs["path"]``. Non-finite metrics are floats (``inf``,
    ``nan``). Lines that do not belong to the header's grid (:func:`read_results_file`) are left
    out with one warning that counts them.
    """
    import pandas as pd

    p = existing_file("`path`", path, missing="run a sweep first, or pass the results file it wrote.")
    existing = read_results_file(p)
    header, rows = existing.header, existing.rows
    if header is None:  # empty, or no complete line yet: an empty table would read as "nothing fits"
        raise ValueError(f"`path` {str(p)!r} holds no sweep results (it is empty or has no complete line); "
                         "run a sweep into it first, or pass the results file the sweep wrote.")
    if existing.foreign:
        warnings.warn(f"{str(p)!r} holds {existing.foreign_summary()}; they are set aside (not ranked, reported or "
                      "resumed): keep one sweep per results file.", stacklevel=2)
    records = []
    seen: set[tuple[str, str]] = set()
    duplicates = 0
    for row in rows:
        pair = (row.get("key"), row.get("dataset"))
        if pair in seen:  # written twice (two writers before the lock existed): the first one counts
            duplicates += 1
            continue
        seen.add(pair)
        rec = {"key": row["key"], "dataset": row["dataset"]}
        config = row.get("config", {})
        try:
            rec["label"] = SweepConfig.from_dict(config).label()
        except (ValueError, TypeError):
            rec["label"] = None
        rec.update(config)
        _flatten("", row.get("metrics", {}), rec)
        rec["elapsed_s"] = row.get("elapsed_s")
        rec["finished"] = row.get("finished")
        records.append(rec)
    columns = ["key", "dataset", "label"] + [f.name for f in fields(SweepConfig)]
    df = pd.DataFrame.from_records(records) if records else pd.DataFrame(columns=columns)
    df.attrs["header"] = header or {}
    df.attrs["path"] = str(p)  # named by the checks that rank the rows (finite_rows)
    if duplicates:
        warnings.warn(f"{str(p)!r} holds {duplicates} repeated (configuration, dataset) rows; the first of each "
                      "is used.", stacklevel=2)
    return df


def finite_rows(results, rows, columns: Sequence[str], *, dataset: str, what: str):
    """Which of ``rows`` (one data set's rows of ``results``) have finite values in every one of ``columns``.

    A row whose perplexity overflowed reads back as ``inf`` or ``nan``: a ranking leaves it out.
    When every one of ``rows`` is such a row there is nothing to rank; a table of empty picks
    would look like an answer, so that is an error.

    Parameters
    ----------
    results : pandas.DataFrame
        The results (:func:`load_results`; its ``attrs["path"]`` names the file in the error).
    rows : pandas.DataFrame
        The candidate rows of ``results`` for ``dataset``.
    columns : sequence of str
        The metric and cost columns the ranking reads.
    dataset, what : str
        For the message: the data set, and what the rows are (e.g. ``"static top-k row"``).

    Returns
    -------
    numpy.ndarray of bool
        ``(len(rows),)``: True for a row with finite values in every column.

    Raises
    ------
    ValueError
        ``rows`` is not empty and no row is finite, naming the file, the data set and the fix.
    """
    import numpy as np
    import pandas as pd

    finite = np.ones(len(rows), dtype=bool)  # (rows,)
    for column in columns:
        values = pd.to_numeric(rows[column], errors="coerce").to_numpy(dtype=float)
        finite &= np.isfinite(values)
    source = results.attrs.get("path")
    if finite.any() and not finite.all():  # left out of the ranking: said, not silent
        warnings.warn(f"{f'{source!r}: ' if source else ''}{int((~finite).sum())} of the {len(rows)} {what}s of data set "
                      f"{dataset!r} have no finite {' and '.join(map(repr, columns))} (overflowed, missing or edited) and "
                      "are left out of the ranking.", stacklevel=3)
    if len(rows) and not finite.any():
        raise ValueError(
            f"{f'{source!r}: ' if source else ''}no {what} of data set {dataset!r} has a finite "
            f"{' and '.join(map(repr, columns))} (all {len(rows)} are inf or nan: the runs overflowed, or the file "
            "was edited), so nothing can be ranked; rerun the sweep into a new results file (on CPU the model runs "
            "in float32)."
        )
    return finite
