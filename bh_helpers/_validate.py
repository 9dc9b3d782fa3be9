"""Argument checks shared by every public entry point: integers, levels, choices.

Each check names the argument as the caller typed it and says what would be accepted; nothing is
coerced silently (``True`` is not the integer 1 here, ``"0.05"`` is not a level). A value of the
wrong type raises :class:`ArgumentTypeError`, which is both a ``TypeError`` and a ``ValueError``
(as numpy's ``AxisError`` is both an ``IndexError`` and a ``ValueError``), so callers that catch
either keep working; a value of the right type out of range raises ``ValueError``.
"""

from __future__ import annotations

import numbers
import re
from collections.abc import Collection
from typing import Any

import numpy as np

__all__ = ["ArgumentTypeError", "as_flags", "check_choice", "check_int", "check_level", "is_int"]


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


#: API names whose flag is not simply ``--name`` or its plural (``alpha`` -> ``--alphas`` is found by itself).
_IRREGULAR_FLAGS = {"mean_k": "--mean-ks", "target_mean_k": "--mean-ks", "out_dir": "--out", "results_path": "--results",
                    "text_file": "--text-file", "num_threads": "--threads", "null_bank": "--nulls", "path": "--results",
                    "allow_unverified": "--allow-unverified-bank"}


def as_flags(message: str, options: set[str]) -> str:
    """``message`` with each backticked parameter name (`alpha`, `min_k`) replaced by the flag the user typed.

    The checks here name Python parameters; a command line reports the option among ``options`` that
    sets it: ``--name``, its plural ``--names`` (``alpha`` -> ``--alphas``), or :data:`_IRREGULAR_FLAGS`.
    Names with no option stay as they are. The one mapping from API names to ``bh-routing`` flags.
    """

    def flag(match: "re.Match[str]") -> str:
        name = match.group(1)
        dashed = "--" + name.replace("_", "-")
        for candidate in (dashed, dashed + "s", _IRREGULAR_FLAGS.get(name)):
            if candidate in options:
                return candidate
        return match.group(0)

    flagged = re.sub(r"`([a-z][a-z0-9_]*)`", flag, message)
    # a setting checked layer by layer applies to every layer: "layer 0: --grid-size ..." names no layer
    return re.sub(r"^layer \d+: (?=--)", "", flagged)
