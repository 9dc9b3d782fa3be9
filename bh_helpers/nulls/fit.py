"""Fitting nulls: one per layer from logged router logits (KDE with an exact CDF, or empirical).

:func:`fit_null` fits one :class:`~bh_helpers.nulls.model.NullModel` (pooled over experts or one
per expert) on a ``[N, E]`` logit matrix, with optional per-token statistics; :func:`fit_null_bank`
fits one per layer into a :class:`~bh_helpers.nulls.bank.NullBank`. The numerics of one column
(KDE, empirical, Efron, tails) are in :mod:`bh_helpers.nulls.columns`.
"""

from __future__ import annotations

import dataclasses
import math
import os
import warnings
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch

from bh_helpers._clock import utc_timestamp
from bh_helpers._locks import new_output, refuse_existing
from bh_helpers._validate import check_choice, check_finite_logits, check_int, is_int
from bh_helpers.nulls.kernels import _GRID_MIN_PER_EXPERT, VALID_BANDWIDTHS, VALID_KERNELS
from bh_helpers.nulls.columns import bandwidth_value, check_spread, default_grid_size, fit_column
from bh_helpers.nulls.model import NullModel
from bh_helpers.nulls.statistics import check_statistic, check_trim, fit_values
from bh_helpers.nulls.bank import NullBank
from bh_helpers.nulls.metadata import NullBankMetadata, library_version, parse_fingerprint, schema_version_for

__all__ = ["MIN_GRID_SIZE", "check_fit_options", "check_fitted_on", "fit_captured", "fit_null", "fit_null_bank"]

#: Fewest grid points of a null (a coarser grid misplaces the CDF's interpolation).
MIN_GRID_SIZE = 16
#: The finest grid a fit accepts: 16x the default's largest (65,536), far past any gain in precision,
#: and small enough that a fit's arrays fit in memory (a larger one failed after the demo had written).
MAX_GRID_SIZE = 1 << 20

# ---------------------------------------------------------------------------------------------
# Input validation
# ---------------------------------------------------------------------------------------------


def _check_kernel(kernel: Any) -> str:
    return check_choice("kernel", kernel, VALID_KERNELS)


def _check_bandwidth(bandwidth: Any, kernel: str) -> str | float:
    if isinstance(bandwidth, str):
        if bandwidth not in VALID_BANDWIDTHS:
            raise ValueError(
                f"`bandwidth` must be one of {VALID_BANDWIDTHS} or a positive number, got {bandwidth!r}"
            )
        return bandwidth
    if isinstance(bandwidth, bool) or not isinstance(bandwidth, (int, float, np.floating, np.integer)):
        raise ValueError(
            f"`bandwidth` must be one of {VALID_BANDWIDTHS} or a positive number, got {bandwidth!r}"
        )
    value = float(bandwidth)
    if not (math.isfinite(value) and value > 0.0):
        raise ValueError(f"`bandwidth` must be a positive finite number, got {bandwidth!r}")
    if kernel in ("empirical", "efron"):
        raise ValueError(
            f"`bandwidth` must be left at a rule name for kernel={kernel!r} (it does no "
            f"smoothing), got {bandwidth!r}; pick a smoothing kernel to use a numeric bandwidth"
        )
    return value


def _as_float64(logits: Any, *, per_expert: bool) -> np.ndarray:
    """Calibration logits as a float64 NumPy array ``[N, E]`` (per expert) or flat ``[N*E]``."""
    if isinstance(logits, torch.Tensor):
        arr = logits.detach().to(device="cpu", dtype=torch.float64).numpy()
    else:
        try:
            arr = np.asarray(logits, dtype=np.float64)
        except (TypeError, ValueError) as err:
            raise ValueError(f"`logits` must be a tensor or array of numbers: {err}") from err
    if per_expert:
        if arr.ndim != 2:
            raise ValueError(f"`logits` must have shape [N, E] with per_expert=True, got shape {arr.shape}")
    elif arr.ndim not in (1, 2):
        raise ValueError(f"`logits` must have shape [N, E] or [N], got shape {arr.shape}")
    if arr.size == 0:
        raise ValueError(
            f"`logits` is empty (shape {arr.shape}); log router logits on calibration text first"
        )
    # finite: checked on the logits as given (fit_null, before the statistic and the trim)
    return arr if per_expert else arr.reshape(-1)


def fit_null(
    logits: Any,
    kernel: str = "gaussian",
    bandwidth: str | float = "scott",
    per_expert: bool = False,
    *,
    grid_size: int | None = None,
    statistic: str = "raw",
    trim: int = 0,
) -> NullModel:
    """Fit a null distribution to calibration router logits of one layer.

    Parameters
    ----------
    logits : Tensor or ndarray of shape (N, E)
        Router logits logged on calibration text (any float dtype and device; copied to CPU
        float64). Pooled over all experts unless ``per_expert``; a 1-D array is accepted for a
        pooled null.
    kernel : {"gaussian", "tophat", "epanechnikov", "linear", "empirical", "efron"}, default="gaussian"
        Smoothing kernel (``"linear"`` is the triangular kernel, as in scikit-learn), or
        ``"empirical"`` for no smoothing: the mid-p empirical distribution
        ``P(X > x) + P(X = x) / 2`` at the distinct calibration values, linearly interpolated; or
        ``"efron"``: an empirical null in Efron's sense, a Gaussian whose centre and scale are
        estimated from the central part of the values only (central matching), so that the
        relevant experts in the upper tail do not widen it.
    bandwidth : {"scott", "silverman"} or float, default="scott"
        A positive number is the kernel scale in scikit-learn's ``KernelDensity`` convention
        (Gaussian standard deviation; half-width of tophat, epanechnikov and linear). The rules
        follow ``scipy.stats.gaussian_kde`` in 1-D: Scott ``sigma * n**(-1/5)``, Silverman
        ``sigma * (3n/4)**(-1/5)``, ``sigma`` the sample standard deviation (ddof=1) of the pooled
        logits (of each column when ``per_expert``); for the compact kernels that standard
        deviation is converted to the scale of a kernel with the same standard deviation
        (``* sqrt(3)``, ``* sqrt(5)``, ``* sqrt(6)``). Ignored by ``"empirical"`` and ``"efron"``
        (a number is an error).
    per_expert : bool, default=False
        Fit one null per expert column; the null then evaluates ``x[..., e]`` with column ``e``.
    grid_size : int, optional
        Number of grid points; default: spacing at most bandwidth / 32, clipped to
        [16384, 65536] ([4096, 65536] per expert, as E grids are stored), the same for every
        expert; for ``"empirical"``: every distinct value, up to 65536 (4096 per expert), else
        evenly spaced distinct values plus the 512 most extreme on each side.
    statistic : {"raw", "centred", "zscore"}, default="raw"
        Per-token statistic the null is fitted on and later evaluated with
        (:mod:`bh_helpers.nulls.statistics`); recorded on the returned null.
    trim : int, default=0
        Fit on each token's values without its ``trim`` largest (needs ``[N, E]`` logits and
        ``trim <= E - 2``).

    Returns
    -------
    NullModel

    Raises
    ------
    ValueError
        Empty logits, NaN/inf, zero variance, unknown ``kernel``, invalid ``bandwidth`` or
        ``grid_size``, or a 1-D/3-D array with ``per_expert=True``.

    Notes
    -----
    The KDE's sf/cdf are exact up to linear binning of the samples on the grid (second order in
    grid spacing / bandwidth, about 1e-8 at the default resolution). Above the largest (below the
    smallest) calibration logit the KDE is replaced by an exponential tail fitted to the
    ``sqrt(n)`` most extreme order statistics; see the module docstring.

    Examples
    --------
    >>> import torch
    >>> logits = torch.randn(5000, 64, generator=torch.Generator().manual_seed(0))
    >>> null = fit_null(logits, kernel="epanechnikov")
    >>> round(float(null.sf(torch.tensor(0.0))), 2)
    0.5
    """
    # Input Validation and Special Cases
    kernel = _check_kernel(kernel)
    bandwidth = _check_bandwidth(bandwidth, kernel)
    if not isinstance(per_expert, bool):
        raise ValueError(f"`per_expert` must be True or False, got {per_expert!r}")
    check_fit_options(kernel=kernel, grid_size=grid_size, statistic=statistic, trim=trim)
    statistic = check_statistic(statistic)
    if per_expert and trim:
        raise ValueError("`trim` needs a pooled null: with per_expert=True each expert's column would lose "
                         "different tokens; pass trim=0 or per_expert=False.")
    if trim:
        shape = tuple(getattr(logits, "shape", np.shape(logits)))
        if len(shape) != 2:
            raise ValueError(f"`trim` needs logits of shape [N, E], got shape {shape}")
        check_trim(trim, shape[1])
    else:
        check_trim(trim)
    check_finite_logits("logits", logits)  # before the trim: it would drop a +inf (and NaN sorts last)
    data = _as_float64(fit_values(logits, statistic, trim), per_expert=per_expert)
    recorded = {"statistic": statistic, "trim": trim}

    # Main Algorithm
    if not per_expert:
        sigma = check_spread(data, "")
        col = fit_column(data, sigma=sigma, kernel=kernel, bandwidth=bandwidth, grid_size=grid_size)
        return NullModel(
            grid=col.grid,
            sf=col.sf,
            cdf=col.cdf,
            pdf=col.pdf,
            tail_scale_upper=col.beta_upper,
            tail_scale_lower=col.beta_lower,
            kernel=kernel,
            bandwidth=col.bandwidth,
            n_samples=data.size,
            **recorded,
        )

    columns = np.ascontiguousarray(data.T)  # (E, N): each expert's logits contiguous
    n = columns.shape[1]
    sigmas = [check_spread(c, f"in expert column {e}") for e, c in enumerate(columns)]
    if grid_size is None and kernel in ("empirical", "efron"):
        grid_size = _GRID_MIN_PER_EXPERT  # at most this many distinct values (grid points) per expert
    elif grid_size is None:
        # One grid size for all experts (they are stored as one [E, G] array): the finest needed.
        grid_size = max(
            default_grid_size(
                float(np.ptp(c)),
                bandwidth_value(bandwidth, kernel=kernel, sigma=s, n=n),
                None,
                minimum=_GRID_MIN_PER_EXPERT,
            )
            for c, s in zip(columns, sigmas, strict=True)
        )
    # A loop over experts is fine here: fitting is offline and each step is vectorised over N.
    fitted = [
        fit_column(c, sigma=s, kernel=kernel, bandwidth=bandwidth, grid_size=grid_size)
        for c, s in zip(columns, sigmas, strict=True)
    ]
    width = max(col.grid.size for col in fitted)

    def stack(name: str) -> np.ndarray:
        # Empirical grids differ in length; pad by repeating the last point (a zero-width cell
        # that evaluation never interpolates in, since x >= last point goes to the tail).
        return np.stack(
            [np.pad(getattr(col, name), (0, width - col.grid.size), mode="edge") for col in fitted]
        )

    return NullModel(
        grid=stack("grid"),
        sf=stack("sf"),
        cdf=stack("cdf"),
        pdf=stack("pdf"),
        tail_scale_upper=np.array([col.beta_upper for col in fitted]),
        tail_scale_lower=np.array([col.beta_lower for col in fitted]),
        kernel=kernel,
        bandwidth=np.array([col.bandwidth for col in fitted]),
        n_samples=n,
        **recorded,
    )


def fit_null_bank(
    logits_by_layer: Mapping[int, Any],
    *,
    kernel: str = "gaussian",
    bandwidth: str | float = "scott",
    per_expert: bool = False,
    model_id: str | None = None,
    calibration: str = "unspecified calibration text",
    num_layers: int | None = None,
    grid_size: int | None = None,
    router_fingerprint: Mapping[int, Sequence[float]] | None = None,
    statistic: str = "raw",
    trim: int = 0,
) -> NullBank:
    """Fit one null per layer (see :func:`fit_null`) and collect them in a :class:`NullBank`.

    Parameters
    ----------
    logits_by_layer : mapping of int to Tensor of shape (N, E)
        Calibration router logits per layer, as returned by
        ``bh_helpers.capture.capture_router_logits``; every layer must have the same E.
    kernel, bandwidth, per_expert, grid_size, statistic, trim
        As in :func:`fit_null`; ``statistic`` and ``trim`` are recorded in the bank's metadata and
        applied by :meth:`NullBank.pvalues` and every selector.
    model_id : str, optional
        Model the logits come from (recorded in the metadata).
    calibration : str
        Description of the calibration text (dataset, split, number of tokens).
    num_layers : int, optional
        Number of MoE layers of the model; default: highest layer index + 1.
    router_fingerprint : mapping of int to list of float, optional
        :func:`bh_helpers.models.families.router_fingerprint` of that model, so that ``route``
        can refuse the bank on another model. Default: the fingerprint that a
        :class:`~bh_helpers.capture.CapturedLogits` carries (a plain dict of logits has none,
        and ``route`` then warns that it cannot check the bank).

    Returns
    -------
    NullBank
    """
    if not isinstance(logits_by_layer, Mapping) or not logits_by_layer:
        raise ValueError("`logits_by_layer` must be a non-empty dict {layer index: logits [N, E]}")
    if router_fingerprint is None:  # a CapturedLogits knows its model; a plain dict does not
        router_fingerprint = getattr(logits_by_layer, "router_fingerprint", None)
    statistic = check_statistic(statistic)
    for layer in logits_by_layer:
        if not is_int(layer) or layer < 0:
            raise ValueError(f"`logits_by_layer` keys must be layer indices >= 0, got {layer!r}")
    experts = set()
    for layer, logits in logits_by_layer.items():
        shape = tuple(getattr(logits, "shape", np.shape(logits)))
        if len(shape) != 2:
            raise ValueError(f"`logits_by_layer[{layer}]` must have shape [N, E], got {shape}")
        experts.add(shape[1])
    if len(experts) != 1:
        raise ValueError(f"`logits_by_layer` layers disagree on the number of experts: {sorted(experts)}")
    top = max(int(k) for k in logits_by_layer)
    if num_layers is None:
        num_layers = top + 1
    elif not is_int(num_layers) or num_layers <= top:
        raise ValueError(
            f"`num_layers` must be an integer > the highest layer index {top}, got {num_layers!r}"
        )
    nulls = {}
    for layer in sorted(logits_by_layer):
        check_finite_logits(f"logits_by_layer[{layer}]", logits_by_layer[layer])  # the argument as the caller named it
        try:
            nulls[int(layer)] = fit_null(
                logits_by_layer[layer],
                kernel=kernel,
                bandwidth=bandwidth,
                per_expert=per_expert,
                grid_size=grid_size,
                statistic=statistic,
                trim=trim,
            )
        except ValueError as err:
            raise ValueError(f"layer {layer}: {err}") from err
    metadata = NullBankMetadata(
        model_id=model_id,
        num_layers=num_layers,
        num_experts=experts.pop(),
        layers=sorted(nulls),
        kernel=kernel,
        bandwidth=bandwidth if isinstance(bandwidth, str) else float(bandwidth),
        per_expert=per_expert,
        n_samples={layer: null.n_samples_ for layer, null in nulls.items()},
        calibration=str(calibration),
        library_version=library_version(),
        created=utc_timestamp(),
        router_fingerprint=parse_fingerprint(dict(router_fingerprint)) if router_fingerprint is not None else None,
        statistic=statistic,
        trim=trim,
        schema_version=schema_version_for(statistic, trim),
    )
    return NullBank(nulls, metadata)


def fit_captured(captured: Any, *, kernel: str = "gaussian", grid_size: int | None = 8192, model_id: str | None = None,
                 calibration: str | None = None, out_dir: str | os.PathLike | None = None, statistic: str = "raw",
                 trim: int = 0) -> NullBank:
    """Fit one null per layer on a calibration capture, with its provenance, and optionally save it.

    Parameters
    ----------
    captured : CapturedLogits or path-like
        Logits, or a file written by :meth:`~bh_helpers.capture.CapturedLogits.save` (its header's
        calibration text and router fingerprint go into the bank's metadata).
    kernel : str, default "gaussian"
    statistic, trim
        Per-token statistic and trim (:func:`fit_null_bank`).
    grid_size : int or None, default 8192
        Grid points per layer (None: the library default, larger files).
    model_id, calibration : str, optional
        Provenance for the bank's metadata (default: the capture file's; ``"tiny"`` for logits).
    out_dir : path-like, optional
        Save the bank there: a new folder, or one without a bank (a bank is never overwritten; the
        folder is locked while the bank is fitted and written, so a second writer is refused).

    Returns
    -------
    NullBank
    """
    import contextlib

    from bh_helpers.capture import CAPTURE_DIGEST, CapturedLogits
    from bh_helpers.nulls.bank import METADATA_NAME

    check_fit_options(kernel=kernel, grid_size=grid_size, statistic=statistic, trim=trim)  # before reading anything
    holds = {"folder": True, "exists": lambda d: (d / METADATA_NAME).exists(), "holds": "already holds a null bank"}
    if out_dir is not None:
        refuse_existing(out_dir, "`out_dir`", **holds)
    meta: dict = {}
    if isinstance(captured, (str, os.PathLike)):
        source = str(captured)
        captured, meta = CapturedLogits.load(captured)
        asked = meta.get("max_tokens", "")
        if asked.isdigit() and captured.num_tokens < int(asked):  # said at capture; said again where it is used
            warnings.warn(f"{source!r} holds {captured.num_tokens:,} calibration tokens, fewer than the {int(asked):,} "
                          "its capture asked for (its text was shorter): the null is fitted on those.", stacklevel=2)
    if calibration is None:
        calibration = meta.get("calibration", f"{captured.num_tokens} captured tokens")
    if model_id is None:
        model_id = meta.get("model_id", "unknown" if meta else "tiny")
    experts = {tuple(logits.shape)[-1] for logits in captured.logits.values()}
    check_trim(trim, min(experts) if experts else None)  # against the capture's experts, before the folder is made
    with contextlib.ExitStack() as stack:
        if out_dir is not None:  # one writer: a second fit into the same folder is refused at once
            stack.enter_context(new_output(out_dir, "`out_dir`", **holds))
        bank = fit_null_bank(captured, kernel=kernel, grid_size=grid_size, model_id=model_id, statistic=statistic,
                             trim=trim, calibration=f"{calibration} ({captured.num_tokens} tokens used)")
        if meta.get(CAPTURE_DIGEST):  # the file fitted on: a folder whose capture is replaced later is told apart
            bank.metadata = dataclasses.replace(bank.metadata, capture_sha256=meta[CAPTURE_DIGEST])
        if out_dir is not None:
            bank.save(out_dir)
    return bank


def check_fit_options(*, kernel: str, grid_size: int | None, statistic: str, trim: int,
                      num_experts: int | None = None) -> None:
    """The options of a fit, checked before any logit is read (the one check of :func:`fit_null`,
    :func:`fit_captured`, ``bh-routing fit`` and the demo's settings).

    ``grid_size`` may be None (the default resolution); with ``num_experts`` the trim is checked
    against it (two values per token must remain).
    """
    _check_kernel(kernel)
    if grid_size is not None:
        check_int("grid_size", grid_size, MIN_GRID_SIZE, MAX_GRID_SIZE)
    check_statistic(statistic)
    check_trim(trim, num_experts)


def check_fitted_on(bank: Any, captured_path: str | os.PathLike, folder: str | os.PathLike) -> None:
    """Refuse a bank (in ``folder``) fitted on another capture file than ``captured_path`` holds now.

    A run folder's capture replaced after its banks were fitted (a resumed demo) solved alphas and
    saturation on logits the banks never saw, without a word. Banks that record no capture checksum
    (fitted in memory, or older) are not checked.
    """
    from bh_helpers.capture import CAPTURE_DIGEST, CapturedLogits

    fitted = getattr(bank.metadata, "capture_sha256", None)
    if fitted is not None and CapturedLogits.load(captured_path)[1].get(CAPTURE_DIGEST) != fitted:
        raise ValueError(f"{str(captured_path)!r} is not the capture the bank in {str(folder)!r} was fitted on (it "
                         "was replaced after the fit): pass a new `out_dir`, or put the original capture back.")
