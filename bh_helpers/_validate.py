"""Argument checks shared by every public entry point: integers, levels, choices.

Each check names the argument as the caller typed it and says what would be accepted; nothing is
coerced silently (``True`` is not the integer 1 here, ``"0.05"`` is not a level). A value of the
wrong type raises :class:`ArgumentTypeError`, which is both a ``TypeError`` and a ``ValueError``
(as numpy's ``AxisError`` is both an ``IndexError`` and a ``ValueError``), so callers that catch
either keep working; a value of the right type out of range raises ``ValueError``.
"""

from __future__ import annotations

import numbers
import os
import re
from collections.abc import Collection
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["LARGEST_LOGIT", "ArgumentTypeError", "as_flags", "check_choice", "check_finite_logits", "check_int",
           "check_level", "check_number", "existing_file", "is_int"]


class ArgumentTypeError(TypeError, ValueError):
    """An argument of the wrong type (e.g. a bool or a float where an integer is needed)."""


def is_int(value: Any) -> bool:
    """Whether ``value`` is an integer (Python or numpy), bools excluded."""
    return isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_))


def check_int(name: str, value: Any, low: int | None = None, high: int | None = None) -> int:
    """``value`` as an ``int`` in ``[low, high]`` (either bound optional).

    Raises
    ------
    ArgumentTypeError
        When ``value`` is not an integer (bools and floats included).
    ValueError
        When it lies outside the bounds.
    """
    bounds = " and ".join(s for s in (f">= {low}" if low is not None else "",
                                       f"<= {high}" if high is not None else "") if s)
    wanted = "a positive integer" if (low, high) == (1, None) else f"an integer {bounds}".rstrip()
    if not is_int(value):
        raise ArgumentTypeError(f"`{name}` must be {wanted}; got {value!r}.")
    if (low is not None and value < low) or (high is not None and value > high):
        raise ValueError(f"`{name}` must be {wanted}; got {value!r}.")
    return int(value)


def check_choice(name: str, value: Any, choices: Collection[Any]) -> Any:
    """``value`` when it is one of ``choices``; else a ``ValueError`` listing them."""
    if not isinstance(value, str | int | float | type(None)) or value not in choices:
        raise ValueError(f"`{name}` must be one of {tuple(choices)}; got {value!r}.")
    return value


def check_level(name: str, value: Any, *, example: str = "0.05") -> float:
    """``value`` as a float in (0, 1]: a significance level (alpha) or a probability mass.

    Real numbers only: ``True`` (== 1), ``"0.05"`` and ``None`` are refused, never coerced.
    """
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Real):
        raise ArgumentTypeError(
            f"`{name}` must be a number in (0, 1], e.g. {name}={example}; got {value!r} ({type(value).__name__})."
        )
    value = float(value)
    if not 0.0 < value <= 1.0:  # also rejects NaN
        raise ValueError(f"`{name}` must be in (0, 1]; got {value}.")
    return value


#: The largest router logit accepted (float16's largest finite value): a null is applied to
#: float16 logits on the T4 path, and real routers stay within a few tens of zero.
LARGEST_LOGIT = 65504.0


def check_finite_logits(name: str, logits: Any) -> None:
    """Refuse captured router logits (a tensor or array, ``[N, E]`` or any shape) with NaN, inf or a damaged value.

    The one finiteness check of every entry point that takes calibration or held-out logits
    (fitting a null, choosing alpha by compute, saturation, goodness of fit, the explorer), run on
    the logits as given: before any statistic, trim or subsample could hide a bad row.

    Raises
    ------
    ValueError
        Naming ``name``, how many values are non-finite and the first row that holds one, and the
        fix (re-capture in float32, or drop the rows); also for values that are not numbers, and for
        finite values beyond float16's range (:data:`LARGEST_LOGIT`).
    """
    import torch

    if isinstance(logits, torch.Tensor):
        # on the tensor's device, in its dtype (a synchronisation: offline entry points only)
        magnitude = logits.detach().abs()
        bad, huge = (~torch.isfinite(magnitude)).cpu().numpy(), (magnitude > LARGEST_LOGIT).cpu().numpy()
    else:
        try:
            magnitude = np.abs(np.asarray(logits, dtype=np.float64))
        except (TypeError, ValueError) as err:
            raise ValueError(f"`{name}` must be a tensor or array of numbers: {err}") from None
        bad, huge = ~np.isfinite(magnitude), magnitude > LARGEST_LOGIT
    def first_row(mask: np.ndarray) -> int:  # the first row (token) holding a flagged value
        rows = mask.reshape(mask.shape[0], -1).any(axis=-1) if mask.ndim > 1 else mask.reshape(-1)  # (N,)
        return int(np.flatnonzero(rows)[0])

    n_bad, n_huge = int(bad.sum()), int(huge.sum())
    if n_bad:
        raise ValueError(
            f"`{name}` has {n_bad} NaN/inf values (the first in row {first_row(bad)}); router logits must be finite: "
            "re-capture them in float32 (float16 overflows), or drop the non-finite rows "
            "(x[torch.isfinite(x).all(-1)])."
        )
    if n_huge:
        raise ValueError(
            f"`{name}` has {n_huge} value{'s' if n_huge > 1 else ''} beyond +-{LARGEST_LOGIT:g} (the largest "
            f"{float(magnitude.max()):.3g}, the first in row {first_row(huge)}): no router gives such a logit, and a "
            "null fitted on it could not be applied in float16; it is a damaged value: drop the row or capture again."
        )


def existing_file(name: str, path: str | os.PathLike, *, missing: str) -> Path:
    """``path`` as a Path; ValueError naming ``name`` when it is a folder or missing (``missing`` says what to do).

    A folder is reported as a folder, never as "does not exist": the user can see that it exists.
    """
    path = Path(path)
    if path.is_dir():
        raise ValueError(f"{name} {str(path)!r} is a folder; pass a file in it instead.")
    if not path.is_file():
        raise ValueError(f"{name} {str(path)!r} does not exist; {missing}")
    return path


def check_number(name: str, value: Any, low: float | None = None, high: float | None = None, *,
                 low_open: bool = False, high_open: bool = False, hint: str = "") -> float:
    """``value`` as a finite ``float`` in the interval from ``low`` to ``high`` (either bound optional).

    The one numeric check of the selectors' and budgets' real-valued arguments: real numbers only,
    so ``True`` (== 1), ``"0.9"`` and ``None`` are refused, never coerced; NaN and inf too.

    Parameters
    ----------
    name : str
        The argument as the user typed it.
    low, high : float, optional
        Bounds; inclusive unless ``low_open`` / ``high_open``.
    hint : str, default ""
        What the number counts, for the message (e.g. "experts per token").

    Raises
    ------
    ArgumentTypeError
        A bool, a string, None or anything else that is not a real number.
    ValueError
        NaN, inf, or a value outside the bounds.
    """
    if low is not None and high is not None:
        wanted = f"a number in {'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}"
    elif low is not None:
        wanted = f"a number {'>' if low_open else '>='} {low:g}"
    elif high is not None:
        wanted = f"a number {'<' if high_open else '<='} {high:g}"
    else:
        wanted = "a finite number"
    wanted += f" ({hint})" if hint else ""
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Real):
        raise ArgumentTypeError(f"`{name}` must be {wanted}; got {value!r} ({type(value).__name__}).")
    value = float(value)
    if (value != value or value in (float("inf"), float("-inf"))
            or (low is not None and (value < low or (low_open and value == low)))
            or (high is not None and (value > high or (high_open and value == high)))):
        raise ValueError(f"`{name}` must be {wanted}; got {value!r}.")
    return value


#: API names whose flag is not simply ``--name`` or its plural (``alpha`` -> ``--alphas`` is found by itself).
#: ``max_tokens`` of a capture is ``--calibration-tokens`` (``--max-tokens``, where a command has it, comes first).
#: A key ``name=value`` is a setting that a switch makes (``split=False`` is ``--no-split``). A tuple
#: value names the flag by command, the first one the command has (a demo's results file is in its ``--out``).
_IRREGULAR_FLAGS = {"mean_k": "--mean-ks", "target_mean_k": "--mean-ks", "out_dir": "--out", "out_path": "--out",
                    "results_path": ("--results", "--out"), "max_tokens": "--calibration-tokens", "text_file": "--text-file",
                    "name": "--model", "num_threads": "--threads", "null_bank": "--nulls", "path": "--results",
                    "allow_unverified": "--allow-unverified-bank", "allow_unverified=True": "--allow-unverified-bank",
                    "split=False": "--no-split", "k_matching=False": "--no-k-matching",
                    "categories=False": "--no-categories", "controls=False": "--no-controls",
                    "directory": "--nulls", "logits_by_layer": "--captured"}


def _flag(name: str, options: set[str]) -> str | None:
    """The option among ``options`` that sets the API parameter (or ``name=value`` setting) ``name``, if any."""
    dashed = "--" + name.replace("_", "-")
    irregular = _IRREGULAR_FLAGS.get(name, ())  # a flag, or flags by command (the first the command has)
    for candidate in (dashed, dashed + "s", *((irregular,) if isinstance(irregular, str) else irregular)):
        if candidate in options:
            return candidate
    return None


def _setting_flag(name: str, value: str, options: set[str]) -> str | None:
    """``--flag`` (a switch) or ``--flag value`` for a backticked setting `name=value`; None when no option sets it."""
    switch = _flag(f"{name}={value}", options)
    if switch:
        return switch
    flag = _flag(name, options)
    if flag is None or value == "False":  # a switch that turns something off is a key of _IRREGULAR_FLAGS
        return None
    return flag if value == "True" else f"{flag} {value}"


_SETTING = r"`([a-z][a-z0-9_]*)=([^`\s]+)`"


def as_flags(message: str, options: set[str]) -> str:
    """``message`` with each backticked parameter name (`alpha`, `min_k`) replaced by the flag the user typed.

    The checks here name Python parameters; a command line reports the option among ``options`` that
    sets it: ``--name``, its plural ``--names`` (``alpha`` -> ``--alphas``), or :data:`_IRREGULAR_FLAGS`.
    A backticked setting (`allow_unverified=True`, `split=False`, `max_k=4`) becomes the option that
    makes it (``--allow-unverified-bank``, ``--no-split``, ``--max-ks 4``); a remedy in parentheses
    that only the Python API has (``(`overwrite=True`)`` where the command has no such option) is
    left out. Names with no option stay as they are. The one mapping from API names to ``bh-routing`` flags.
    """

    def api_only(match: "re.Match[str]") -> str:
        settings = re.findall(_SETTING, match.group(0))
        return "" if any(_setting_flag(n, v, options) is None for n, v in settings) else match.group(0)

    def setting(match: "re.Match[str]") -> str:
        return _setting_flag(match.group(1), match.group(2), options) or match.group(0)

    flagged = re.sub(r" ?\([^()]*`[a-z][a-z0-9_]*=[^()]*\)", api_only, message)
    flagged = re.sub(_SETTING, setting, flagged)
    flagged = re.sub(r"`([a-z][a-z0-9_]*)`", lambda m: _flag(m.group(1), options) or m.group(0), flagged)
    # a setting checked layer by layer applies to every layer: "layer 0: --grid-size ..." names no layer
    return re.sub(r"^layer \d+: (?=--)", "", flagged)
