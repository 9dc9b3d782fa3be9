"""The demo's output folder: its file names, its settings record (``run.json``) and when it may be resumed.

A demo writes its steps' outputs one after another (capture, null banks, static allocation,
sweep, confirmation, report). A rerun on the same folder reuses the outputs that are there, so it
must refuse settings those outputs were not made with. It must not refuse more: a step that fails
late (a compute target that only the fitted nulls show to be out of reach) leaves the capture and
the banks behind, and the corrected command (another ``--mean-ks``) must run in the same folder,
reusing them. So each output names the settings it depends on (:data:`DEPENDS_ON`), and only those
of the outputs present are compared; ``run.json`` is then rewritten with the settings of the run
that now owns the folder (the settings of the outputs kept are the same in both).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from bh_helpers._clock import utc_timestamp

__all__ = ["CAPTURED_NAME", "CONFIRM_NAME", "DEPENDS_ON", "NULLS_DIR", "RESULTS_NAME", "SETTINGS_NAME", "STATIC_NAME",
           "STEPS_NAME", "check_run_folder", "record_settings"]

CAPTURED_NAME = "captured_logits.safetensors"
NULLS_DIR = "nulls"
RESULTS_NAME = "sweep.jsonl"  # the whole grid (on the tuning halves when the data sets are split)
CONFIRM_NAME = "confirm.jsonl"  # the configurations chosen on the tuning halves, on the confirmation halves
SETTINGS_NAME = "run.json"
STATIC_NAME = "static_allocation.json"  # the static per-layer allocations (the static chord control)
STEPS_NAME = "steps.json"  # seconds and peak GPU memory per step of the last demo run

_CAPTURE = ("model", "calibration_tokens", "window")

#: The settings (``DemoSettings`` field names) each output of the demo depends on, its inputs' included.
#: ``None``: every setting (the sweep's rows and all that follows from them).
DEPENDS_ON: dict[str, tuple[str, ...] | None] = {
    CAPTURED_NAME: _CAPTURE,
    NULLS_DIR: (*_CAPTURE, "kernel", "grid_size", "statistics", "trims"),
    STATIC_NAME: ("model", "static_allocation", "allocation_tokens", "window", "weights", "topk_max", "max_ks"),
    RESULTS_NAME: None,
    CONFIRM_NAME: None,
}


def check_run_folder(out: Path, settings: Mapping[str, Any], defaults: Mapping[str, Any]) -> bool:
    """Raise when ``out`` holds outputs made with other settings; True when it holds outputs to reuse.

    Parameters
    ----------
    out : Path
        The demo's output folder (it need not exist).
    settings : mapping
        The new run's settings (``DemoSettings.to_dict()``).
    defaults : mapping
        The default settings: a setting added after the folder was written reads as its default there.

    Raises
    ------
    ValueError
        ``run.json`` is corrupt, outputs lie there without it, or a setting an output there depends
        on differs (naming the setting, both values and the outputs); nothing is changed.
    """
    path = out / SETTINGS_NAME
    made = [name for name in DEPENDS_ON if (out / name).exists()]
    if not made:  # a run that stopped before its first output holds nothing to protect
        return False
    if not path.is_file():
        raise ValueError(f"output folder {str(out)!r} holds results without {SETTINGS_NAME}; nothing was changed. "
                         "Pass another --out folder.")
    old = _recorded(path)
    diff: dict[str, list[str]] = {}
    for name in made:
        for key in DEPENDS_ON[name] or settings:
            if old.get(key, defaults[key]) != settings[key]:
                diff.setdefault(key, []).append(name)
    if diff:
        text = "; ".join(f"{_named(key, old.get(key, defaults[key]), settings[key])} (used by {', '.join(names)})"
                         for key, names in diff.items())
        raise ValueError(
            f"output folder {str(out)!r} holds a run with different settings ({text}); nothing was changed. "
            "Pass another --out folder, or rerun with the same options to resume."
        )
    return True


def record_settings(out: Path, settings: Mapping[str, Any]) -> None:
    """Write ``run.json`` (atomically) unless it records these settings already; its creation time is kept."""
    path = out / SETTINGS_NAME
    record = {"settings": dict(settings), "created": utc_timestamp()}
    try:
        old = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):  # none yet, or one of a run that wrote nothing else: replaced
        old = None
    if isinstance(old, dict):
        if old.get("settings") == record["settings"]:
            return
        record["created"] = old.get("created", record["created"])
        record["updated"] = utc_timestamp()
    tmp = out / (SETTINGS_NAME + ".tmp")
    tmp.write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")
    tmp.replace(path)


def _named(key: str, there: Any, now: Any) -> str:
    """One difference, the setting backticked (the command line shows its flag); a switch in words."""
    if isinstance(now, bool):  # categories, split, k_matching: flags --no-categories etc. (inverted)
        return f"{key.replace('_', ' ')}: {'on' if there else 'off'} there, {'on' if now else 'off'} now"
    return f"`{key}`: {there!r} there, {now!r} now"


def _recorded(path: Path) -> dict:
    try:
        return json.loads(path.read_text(encoding="utf-8")).get("settings", {})
    except (json.JSONDecodeError, AttributeError):
        raise ValueError(f"{str(path)!r} is corrupt; pass another --out folder or delete it.") from None
