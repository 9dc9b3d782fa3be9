"""The strongest static control: an integer number of experts per layer, fitted on calibration text.

Layers differ in what a missing expert costs, so one ``k`` for all layers (uniform top-k) is not
the best static policy at a compute budget. :func:`static_allocation_path` finds, for every total
``S`` between ``L * min_k`` and ``L * max_k`` experts per token over the ``L`` MoE layers, an
allocation ``(k_0, ..., k_{L-1})`` with ``sum k_l = S``, by calibration perplexity:

- ``method="greedy"`` (default; exact, about ``L^2 (max_k - 1) / 2`` perplexity runs): start
  at ``min_k`` everywhere and repeatedly give one more expert to the layer whose increment lowers
  the calibration NLL most (ties: the lower layer). At every ``S`` that is a multiple of ``L`` the
  uniform allocation is also scored and kept when it is better, so the path never loses to
  uniform top-k on its own calibration text.
- ``method="separable"`` (the cheaper, stated proxy for large models, ``L (max_k - 1)`` runs):
  the NLL of each layer at each ``k`` with every other layer at ``max_k``; the cost of an
  allocation is taken as the sum of the per-layer increases, and the same greedy runs on it.

:func:`fit_static_allocation` is the one-target form. :meth:`StaticAllocationPath.chord` gives the
runnable control at any realised mean k: the two allocations whose totals bracket ``m L``, mixed
per window with the probability that matches the compute (:func:`mix_windows` scores its expected
per-window NLL). Everything is deterministic for a given model and text.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from bh_helpers._validate import check_choice, check_int, check_number
from bh_helpers.evaluation.scoring import PerplexityResult, perplexity
from bh_helpers.models.families import find_moe_blocks
from bh_helpers.models.texts import calibration_texts
from bh_helpers.routing.patch import route
from bh_helpers.selection.selectors import NativeSelector
from bh_helpers.selection.static import StaticLayerSelector

__all__ = [
    "ALLOCATION_METHODS",
    "StaticAllocationPath",
    "check_allocation_tokens",
    "fit_static_allocation",
    "mix_windows",
    "static_allocation_path",
]

ALLOCATION_METHODS = ("greedy", "separable")
#: ``method="auto"``: greedy up to this many MoE layers (about L^2 (max_k - 1) / 2 perplexity runs),
#: the separable proxy (L (max_k - 1) runs) on deeper models such as OLMoE-1B-7B (16 layers).
AUTO_GREEDY_LAYERS = 8
_SUM_TOLERANCE = 1e-6  # a target whose total m * L is this close to an integer meets it exactly


@dataclass(frozen=True)
class StaticAllocationPath:
    """Static per-layer allocations for every total number of experts, with their calibration NLL.

    Attributes
    ----------
    layers : tuple of int
        The MoE layers, in order; ``allocations[S][i]`` is the k of ``layers[i]``.
    allocations : dict of int to tuple of int
        Total experts per token (summed over layers) -> experts per layer.
    nll : dict of int to float
        Calibration NLL (nats per token) of each allocation; for ``"separable"``, the proxy cost
        (sum of per-layer increases over the all-``max_k`` NLL) plus that NLL.
    method : {"greedy", "separable"}
    protocol : dict
        Calibration tokens, window, weights, ``min_k``/``max_k`` of the fit.
    versus_uniform : dict of int to (float, float)
        For each k strictly between ``min_k`` and ``max_k``: the calibration NLL of the allocation
        with ``k * L`` experts and of uniform top-k (both measured, for either method), so a reader
        sees that the static control beats uniform top-k on its own calibration text.
    """

    layers: tuple[int, ...]
    allocations: dict[int, tuple[int, ...]]
    nll: dict[int, float]
    method: str
    protocol: dict = field(default_factory=dict)
    versus_uniform: dict[int, tuple[float, float]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        # an allocation whose k's do not add up to its total would run another compute than it is labelled
        layers = list(self.layers)
        if not layers or layers != sorted(set(layers)) or any(not isinstance(x, int) or x < 0 for x in layers):
            raise ValueError(f"static allocation: `layers` must be distinct layer numbers >= 0 in increasing order; "
                             f"got {layers}.")
        for total, ks in self.allocations.items():
            if len(ks) != len(layers) or sum(ks) != total or min(ks) < 1:
                raise ValueError(f"static allocation: the allocation of {total} experts is {list(ks)}: it must give "
                                 f"each of the {len(layers)} layers at least 1 expert and add up to {total}.")
        if set(self.nll) != set(self.allocations):
            raise ValueError("static allocation: `nll` must have one value per allocation.")

    @property
    def num_layers(self) -> int:
        return len(self.layers)

    def total(self, mean_k: float, *, name: str = "target_mean_k") -> float:
        """``mean_k * L``, checked against the path's range (ValueError naming ``name``)."""
        mean_k = check_number(name, mean_k, hint="experts per token")
        lo, hi = min(self.allocations), max(self.allocations)
        total = mean_k * self.num_layers
        if not lo - _SUM_TOLERANCE <= total <= hi + _SUM_TOLERANCE:
            raise ValueError(f"`{name}`={mean_k:g} is outside the allocations fitted here: mean k "
                             f"{lo / self.num_layers:g} to {hi / self.num_layers:g} ({self.num_layers} layers); "
                             "pass a target in that range (or refit with a larger max_k).")
        return min(max(total, lo), hi)

    def allocation(self, mean_k: float) -> tuple[int, ...]:
        """The allocation with exactly ``mean_k * L`` experts (ValueError when that is not an integer)."""
        total = self.total(mean_k)
        if abs(total - round(total)) > _SUM_TOLERANCE:
            low, high = math.floor(total), math.ceil(total)
            raise ValueError(
                f"`target_mean_k`={mean_k:g} needs {total:g} experts over {self.num_layers} layers, not a whole "
                f"number: no integer allocation meets it. Pass {low / self.num_layers:g} or "
                f"{high / self.num_layers:g}, or use the static chord (StaticAllocationPath.chord), which mixes "
                "the two per window.")
        return self.allocations[round(total)]

    def chord(self, mean_k: float) -> list[tuple[tuple[int, ...], float]]:
        """The static chord at a realised mean k: ``[(allocation, probability), ...]``.

        The allocations whose totals bracket ``mean_k * L`` (one when it is an integer), with the
        per-window probabilities that make the expected compute exactly ``mean_k``.
        """
        total = self.total(mean_k, name="mean_k")
        low, high = math.floor(total + _SUM_TOLERANCE), math.ceil(total - _SUM_TOLERANCE)
        if high <= low:
            return [(self.allocations[low], 1.0)]
        frac = total - low
        return [(self.allocations[low], 1.0 - frac), (self.allocations[high], frac)]

    def to_dict(self) -> dict:
        d = asdict(self)
        d["allocations"] = {str(s): list(ks) for s, ks in self.allocations.items()}
        d["nll"] = {str(s): v for s, v in self.nll.items()}
        d["versus_uniform"] = {str(k): list(pair) for k, pair in self.versus_uniform.items()}
        d["layers"] = list(self.layers)
        return d

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> StaticAllocationPath:
        try:
            return cls(layers=tuple(int(x) for x in data["layers"]),
                       allocations={int(s): tuple(int(k) for k in ks) for s, ks in data["allocations"].items()},
                       nll={int(s): float(v) for s, v in data["nll"].items()},
                       method=check_choice("method", data["method"], ALLOCATION_METHODS),
                       protocol=dict(data.get("protocol", {})),
                       versus_uniform={int(k): (float(a), float(b))
                                       for k, (a, b) in data.get("versus_uniform", {}).items()})
        except (KeyError, TypeError, AttributeError) as err:
            raise ValueError(f"not a static allocation path (missing or bad field: {err}).") from None

    def save(self, path: str | os.PathLike) -> Path:
        """Write JSON with its checksum (through a temporary file, so a reader never sees half of it)."""
        path = Path(path)
        data = self.to_dict()
        data[ALLOCATION_DIGEST] = _allocation_digest(data)
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(json.dumps(data, indent=1) + "\n", encoding="utf-8")
        tmp.replace(path)
        return path

    @classmethod
    def load(cls, path: str | os.PathLike) -> StaticAllocationPath:
        """Read a file :meth:`save` wrote; ValueError (saying to delete it and refit) when it was edited since."""
        try:
            data = json.loads(Path(path).read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise ValueError(f"{str(path)!r} is not valid JSON ({err}); delete it to refit.") from None
        if not isinstance(data, dict) or data.get(ALLOCATION_DIGEST) != _allocation_digest(data):
            problem = "has no checksum (written by an older bh_helpers, or the field was deleted)" \
                if not isinstance(data, dict) or ALLOCATION_DIGEST not in data else \
                "does not match its checksum (an allocation or a field was edited after it was fitted)"
            raise ValueError(f"static allocation {str(path)!r} {problem}; delete it to refit.")
        return cls.from_dict({k: v for k, v in data.items() if k != ALLOCATION_DIGEST})


#: The field of a saved static allocation that holds the SHA-256 of the rest: an allocation edited by
#: hand would change the static controls' compute, and so every verdict read against them, without a word.
ALLOCATION_DIGEST = "allocation_sha256"


def _allocation_digest(data: Mapping[str, Any]) -> str:
    body = {k: v for k, v in data.items() if k != ALLOCATION_DIGEST}
    return hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":")).encode("utf-8")).hexdigest()


def mix_windows(results: Sequence[tuple[PerplexityResult, float]]) -> PerplexityResult:
    """The expected per-window NLL of a per-window random choice among routings of the same text.

    Parameters
    ----------
    results : sequence of (PerplexityResult, probability)
        Each routing scored on the same windows, and the probability a window runs it.

    Returns
    -------
    PerplexityResult
        ``window_nll`` the probability-weighted sum of the inputs' per-window NLL sums (the mean of
        the randomised policy, without the noise of one draw); ``perplexity`` and ``nll`` from it.
    """
    if not results:
        raise ValueError("`results` is empty; give at least one (PerplexityResult, probability).")
    probs = [float(p) for _, p in results]
    if any(p < 0 for p in probs) or abs(sum(probs) - 1.0) > 1e-9:
        raise ValueError(f"the probabilities must be >= 0 and sum to 1; got {probs}.")
    first = results[0][0]
    for res, _ in results[1:]:
        if list(res.window_tokens) != list(first.window_tokens):
            raise ValueError("the routings were scored on different windows; score them on the same text.")
    window_nll = [math.fsum(p * res.window_nll[w] for res, p in results) for w in range(len(first.window_nll))]
    n = sum(first.window_tokens)
    nll = math.fsum(window_nll) / n
    return PerplexityResult(perplexity=math.exp(nll), nll=nll, n_tokens=n, protocol=dict(first.protocol),
                            window_nll=window_nll, window_tokens=list(first.window_tokens),
                            window_docs=list(first.window_docs))


def _scorer(model, tokenizer, texts: Sequence[str], layers: tuple[int, ...], *, window: int, batch_size: int,
            weights: str) -> Callable[[tuple[int, ...]], float]:
    """``nll(ks)``: calibration NLL of the model routed top-``ks[i]`` in ``layers[i]`` (memoised)."""
    memo: dict[tuple[int, ...], float] = {}

    def nll(ks: tuple[int, ...]) -> float:
        if ks not in memo:
            selector = StaticLayerSelector(dict(zip(layers, ks)), weights=weights)
            with route(model, selector):
                memo[ks] = perplexity(model, tokenizer, texts, window=window, stride=window,
                                      batch_size=batch_size, progress=False).nll
        return memo[ks]

    return nll


def _greedy_path(cost: Callable[[tuple[int, ...]], float], n_layers: int, min_k: int, max_k: int,
                 max_total: int, uniform_check: bool, progress: bool) -> tuple[dict, dict]:
    """Greedy add from ``min_k`` everywhere, one expert per step, up to ``max_total`` experts."""
    from tqdm.auto import tqdm

    ks = (min_k,) * n_layers
    allocations, nll = {sum(ks): ks}, {sum(ks): cost(ks)}
    steps = min(max_total, n_layers * max_k) - n_layers * min_k
    for _ in tqdm(range(steps), desc="static allocation", disable=not progress):
        options = [ks[:i] + (ks[i] + 1,) + ks[i + 1:] for i in range(n_layers) if ks[i] < max_k]
        ks = min(options, key=lambda c: (cost(c), options.index(c)))  # ties: the lower layer
        total = sum(ks)
        allocations[total], nll[total] = ks, cost(ks)
        if uniform_check and total % n_layers == 0:
            uniform = (total // n_layers,) * n_layers
            if cost(uniform) < nll[total]:  # never worse than uniform top-k on the calibration text
                allocations[total], nll[total] = uniform, cost(uniform)
    return allocations, nll


def check_allocation_tokens(max_tokens: Any, window: int, *, name: str = "max_tokens") -> int:
    """``max_tokens`` of an allocation's calibration text: at least one ``window`` of each half (prose, code).

    Fewer tokens would choose the allocation by perplexity on less than one window per half: the
    greedy steps would follow noise. ``name`` is the argument's name where it is another one.
    """
    low = 2 * int(window)
    try:
        return check_int(name, max_tokens, low)
    except ValueError as err:
        if not isinstance(max_tokens, int) or isinstance(max_tokens, bool):
            raise
        raise ValueError(f"{err} (a static allocation is chosen by perplexity on windows of {window} tokens of "
                         "calibration text, half prose, half code: at least one window of each)") from None


def static_allocation_path(model, tokenizer, *, texts: Sequence[str] | None = None, max_k: int | None = None,
                           min_k: int = 1, method: str = "greedy", max_tokens: int = 2048, window: int = 256,
                           batch_size: int = 8, weights: str | None = None, max_mean_k: float | None = None,
                           progress: bool = False) -> StaticAllocationPath:
    """Static per-layer allocations for every total from ``L * min_k`` to ``L * max_k`` experts.

    Parameters
    ----------
    model, tokenizer
        A MoE causal LM of a supported family and its tokenizer.
    texts : sequence of str, optional
        Calibration documents; default: the package's calibration corpus
        (:func:`bh_helpers.models.texts.calibration_texts`, ``max_tokens`` tokens, half prose,
        half code), disjoint from the evaluation data sets.
    max_k : int, optional
        Most experts per layer; default the model's native top-k.
    min_k : int, default 1
    method : {"greedy", "separable", "auto"}, default "greedy"
        See the module docstring; "auto" is greedy up to :data:`AUTO_GREEDY_LAYERS` MoE layers,
        else separable.
    max_tokens : int, default 2048
        Calibration tokens when ``texts`` is None.
    window, batch_size : int
        Perplexity windows (stride = window) and windows per forward pass.
    weights : str, optional
        Weights of the chosen experts; default the model's own convention.
    max_mean_k : float, optional
        Stop once the mean reaches this (default: ``max_k``, the whole path).
    progress : bool

    Returns
    -------
    StaticAllocationPath
    """
    check_choice("method", method, (*ALLOCATION_METHODS, "auto"))
    native = NativeSelector.for_model(model)
    max_k = native.k if max_k is None else check_int("max_k", max_k, 1)
    min_k = check_int("min_k", min_k, 1, max_k)
    weights = native.weights if weights is None else weights
    layers = tuple(b.layer for b in find_moe_blocks(model))
    if texts is None:
        texts = calibration_texts(tokenizer, max_tokens=check_allocation_tokens(max_tokens, window))
        calibration = f"embedded calibration slice, {max_tokens} tokens (half prose, half code)"
    else:
        calibration = f"{len(texts)} given documents"
    nll = _scorer(model, tokenizer, list(texts), layers, window=check_int("window", window, 2),
                  batch_size=check_int("batch_size", batch_size, 1), weights=weights)
    n = len(layers)
    if method == "auto":
        method = "greedy" if n <= AUTO_GREEDY_LAYERS else "separable"
    max_total = n * max_k if max_mean_k is None else math.ceil(n * float(max_mean_k) - _SUM_TOLERANCE)
    if method == "greedy":
        allocations, costs = _greedy_path(nll, n, min_k, max_k, max_total, uniform_check=True, progress=progress)
    else:
        full = nll((max_k,) * n)
        rise = {(i, k): nll((max_k,) * i + (k,) + (max_k,) * (n - i - 1)) - full
                for i in range(n) for k in range(min_k, max_k)}
        rise.update({(i, max_k): 0.0 for i in range(n)})
        allocations, costs = _greedy_path(lambda ks: full + sum(rise[i, k] for i, k in enumerate(ks)), n, min_k,
                                          max_k, max_total, uniform_check=False, progress=progress)
    protocol = {"calibration": calibration, "window": int(window), "weights": weights, "min_k": min_k,
                "max_k": max_k}
    # measured, not the proxy's cost: the greedy path has them memoised, the separable one pays 2 runs per k
    versus_uniform = {k: (nll(allocations[k * n]), nll((k,) * n)) for k in range(min_k + 1, max_k)
                      if k * n in allocations}
    return StaticAllocationPath(layers=layers, allocations=allocations, nll=costs, method=method, protocol=protocol,
                                versus_uniform=versus_uniform)


def fit_static_allocation(model, tokenizer, target_mean_k: float, *, texts: Sequence[str] | None = None,
                          max_k: int | None = None, **kwargs: Any) -> tuple[int, ...]:
    """An integer number of experts per MoE layer whose mean is ``target_mean_k``, fitted on calibration text.

    Parameters
    ----------
    model, tokenizer
    target_mean_k : float
        Mean experts per token over the MoE layers, in ``[1, max_k]``; ``target_mean_k * L`` must
        be a whole number (otherwise no integer allocation meets it: use the static chord).
    texts : sequence of str, optional
        Calibration documents (default: the package's calibration corpus).
    max_k : int, optional
        Most experts in one layer (default: the model's native top-k).
    **kwargs
        Passed to :func:`static_allocation_path` (``method``, ``max_tokens``, ``window``, ...).

    Returns
    -------
    tuple of int
        One k per MoE layer, in layer order.

    Raises
    ------
    ValueError
        A target outside ``[1, max_k]`` or one that no integer allocation meets, naming the fix.

    Examples
    --------
    >>> ks = fit_static_allocation(model, tokenizer, 2.0)  # doctest: +SKIP
    >>> ks  # doctest: +SKIP
    (3, 2, 2, 2, 2, 1)
    """
    native_k = NativeSelector.for_model(model).k
    top = native_k if max_k is None else check_int("max_k", max_k, 1)
    target_mean_k = check_number("target_mean_k", target_mean_k, 1, top, hint="experts per token, up to max_k")
    n = len(find_moe_blocks(model))
    total = target_mean_k * n
    if abs(total - round(total)) > _SUM_TOLERANCE:  # refuse before any perplexity run
        low, high = math.floor(total), math.ceil(total)
        raise ValueError(
            f"`target_mean_k`={target_mean_k:g} needs {total:g} experts over {n} layers, not a whole number: no "
            f"integer allocation meets it. Pass {low / n:g} or {high / n:g}, or use the static chord "
            "(static_allocation_path(...).chord(mean_k)), which mixes the two per window.")
    path = static_allocation_path(model, tokenizer, texts=texts, max_k=top, max_mean_k=target_mean_k, **kwargs)
    return path.allocation(target_mean_k)
