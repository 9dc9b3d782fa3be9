"""Reading the earlier research code's nulls: pickled ``distribution_model_layer_<i>.pkl`` files.

Only arrays are unpickled (a restricted unpickler refuses any other object), and only when the
caller opts in (``NullBank.load(..., allow_pickle=True)``).
"""

from __future__ import annotations

import importlib
import math
import pickle
import re
from pathlib import Path
from typing import Any

import numpy as np

from bh_helpers.nulls.kernels import _LEGACY_KERNEL
from bh_helpers.nulls.model import NullModel

__all__ = ["LEGACY_PATTERN", "legacy_layer_files"]

LEGACY_PATTERN = re.compile(r"^distribution_model_layer_(\d+)\.pkl$")


def legacy_layer_files(directory: Path) -> dict[int, Path]:
    """``{layer: path}`` of the ``distribution_model_layer_<i>.pkl`` files in ``directory``.

    Raises
    ------
    ValueError
        When two files name one layer (``..._layer_1.pkl`` and ``..._layer_01.pkl``): which of them
        holds the null is not for this reader to guess, and keeping one would drop the other
        silently. The message names both files.
    """
    files: dict[int, Path] = {}
    for path in sorted(Path(directory).glob("distribution_model_layer_*.pkl")):
        match = LEGACY_PATTERN.match(path.name)
        if not match:
            continue
        layer = int(match.group(1))
        if layer in files:
            raise ValueError(
                f"`directory` {str(directory)!r} has two legacy null files for layer {layer}: "
                f"{files[layer].name!r} and {path.name!r}; move or delete the one that is not this "
                "layer's null, then load again."
            )
        files[layer] = path
    return files


# ---------------------------------------------------------------------------------------------
# Legacy pickles (earlier research code), read through a restricted unpickler
# ---------------------------------------------------------------------------------------------

# Globals a pickled dict of float64 arrays needs, and nothing else: array reconstruction
# (protocol <= 4: _reconstruct + ndarray + dtype; protocol 2 also encodes the raw bytes with
# _codecs.encode; protocol 5: _frombuffer), plus plain built-in containers and scalars.
_SAFE_BUILTINS = frozenset(
    {
        "dict",
        "list",
        "tuple",
        "set",
        "frozenset",
        "str",
        "bytes",
        "bytearray",
        "int",
        "float",
        "complex",
        "bool",
    }
)
_SAFE_NUMPY = {
    ("numpy.core.multiarray", "_reconstruct"): ("multiarray", "_reconstruct"),
    ("numpy._core.multiarray", "_reconstruct"): ("multiarray", "_reconstruct"),
    ("numpy.core.numeric", "_frombuffer"): ("numeric", "_frombuffer"),
    ("numpy._core.numeric", "_frombuffer"): ("numeric", "_frombuffer"),
    ("numpy", "ndarray"): (None, "ndarray"),
    ("numpy", "dtype"): (None, "dtype"),
}


def _numpy_global(submodule: str | None, name: str) -> Any:
    if submodule is None:
        return getattr(np, name)
    # numpy >= 2 keeps these in numpy._core; importing numpy.core there only warns and forwards.
    for prefix in ("numpy._core.", "numpy.core."):
        try:
            return getattr(importlib.import_module(prefix + submodule), name)
        except (ImportError, AttributeError):
            continue
    raise pickle.UnpicklingError(f"this numpy has no {submodule}.{name}")


class _ArrayOnlyUnpickler(pickle.Unpickler):
    """Unpickler that can rebuild dicts of numpy arrays and refuses every other global."""

    def find_class(self, module: str, name: str) -> Any:
        if module in ("builtins", "__builtin__") and name in _SAFE_BUILTINS:
            return getattr(__import__("builtins"), name)
        if (module, name) == ("_codecs", "encode"):
            import codecs

            return codecs.encode
        if (module, name) in _SAFE_NUMPY:
            return _numpy_global(*_SAFE_NUMPY[(module, name)])
        raise pickle.UnpicklingError(
            f"refusing to load global '{module}.{name}': legacy null pickles may only contain "
            "numpy arrays and plain containers"
        )


def _read_legacy_pickle(path: Path) -> tuple[np.ndarray, np.ndarray]:
    try:
        with open(path, "rb") as fh:
            obj = _ArrayOnlyUnpickler(fh).load()
    except pickle.UnpicklingError:
        raise
    except (EOFError, ValueError, TypeError, AttributeError, IndexError, KeyError) as err:
        raise ValueError(f"`{path}` is not a readable legacy null pickle: {err}") from err
    if not isinstance(obj, dict) or "x" not in obj or "cdf" not in obj:
        raise ValueError(f"`{path}` must hold a dict with keys 'x' and 'cdf', got {type(obj).__name__}")
    x = np.asarray(obj["x"], dtype=np.float64)
    cdf = np.asarray(obj["cdf"], dtype=np.float64)
    if x.ndim != 1 or x.shape != cdf.shape or x.size < 2:
        raise ValueError(
            f"`{path}`: 'x' and 'cdf' must be 1-D of equal length >= 2, got {x.shape}, {cdf.shape}"
        )
    if not (np.all(np.isfinite(x)) and np.all(np.isfinite(cdf))):
        raise ValueError(f"`{path}`: 'x' and 'cdf' must be finite")
    if np.any(np.diff(x) <= 0) or np.any(np.diff(cdf) < 0) or cdf[0] < 0 or cdf[-1] > 1:
        raise ValueError(f"`{path}`: 'x' must increase and 'cdf' must be a non-decreasing CDF in [0, 1]")
    return x, cdf


def _log_slope_scale(x_far: float, x_near: float, p_far: float, p_near: float, fallback: float) -> float:
    """Exponential scale through two tail points ``(x, p)``, or ``fallback`` if degenerate."""
    drop = math.log(p_near) - math.log(p_far)
    scale = abs(x_far - x_near) / drop if drop > 0 else fallback
    return scale if math.isfinite(scale) and scale > 0 else fallback


def _null_from_legacy(x: np.ndarray, cdf: np.ndarray, path: Path) -> NullModel:
    # Old grids run past the data with cdf exactly 0 / 1; keep the part strictly inside (0, 1),
    # where the exponential tails can be attached, and fit their scales to the last decade.
    inside = np.flatnonzero((cdf > 0) & (cdf < 1))
    if inside.size < 2:
        raise ValueError(f"`{path}`: the cdf needs at least 2 points strictly between 0 and 1")
    x, cdf = x[inside[0] : inside[-1] + 1], cdf[inside[0] : inside[-1] + 1]
    sf = 1.0 - cdf
    spacing = (x[-1] - x[0]) / (x.size - 1)
    a = int(np.argmax(sf <= min(10.0 * sf[-1], sf[0])))
    a = min(a, x.size - 2)
    beta_upper = _log_slope_scale(x[-1], x[a], sf[-1], sf[a], spacing)
    b = int(x.size - 1 - np.argmax((cdf <= min(10.0 * cdf[0], cdf[-1]))[::-1]))
    b = max(b, 1)
    beta_lower = _log_slope_scale(x[0], x[b], cdf[0], cdf[b], spacing)
    return NullModel(
        grid=x,
        sf=sf,
        cdf=cdf,
        pdf=np.maximum(np.gradient(cdf, x), 0.0),
        tail_scale_upper=beta_upper,
        tail_scale_lower=beta_lower,
        kernel=_LEGACY_KERNEL,
        bandwidth=float("nan"),
        n_samples=0,
    )
