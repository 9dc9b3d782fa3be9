"""Argument checks shared by every public entry point: integers, levels, choices.

Each check names the argument as the caller typed it and says what would be accepted; nothing is
coerced silently (``True`` is not the integer 1 here, ``"0.05"`` is not a level). A value of the
wrong type raises :class:`ArgumentTypeError`, which is both a ``TypeError`` and a ``ValueError``
(as numpy's ``AxisError`` is both an ``IndexError`` and a ``ValueError``), so callers that catch
either keep working; a value of the right type out of range raises ``ValueError``.
"""

from __future__ import annotations

import numbers
from collections.abc import Collection
from typing import Any

import numpy as np

__all__ = ["ArgumentTypeError", "check_choice", "check_int", "check_level", "is_int"]


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
