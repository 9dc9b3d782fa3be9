"""What a sweep runs: :class:`SweepConfig` (one routing configuration) and the grids built from them.

:func:`expand_grid` crosses methods, levels, ceilings, floors and kernels; :func:`sweep_grid` (the
demo's and ``bh-routing sweep``'s grid) chooses levels for compute targets; :func:`with_controls`
follows each adaptive configuration with its compute-matched controls; :func:`bank_name` names the
null bank (kernel, statistic, trim) a configuration routes with. :mod:`bh_helpers.experiments.sweep`
runs them and keeps the results.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, fields
from typing import Any

from bh_helpers._validate import check_choice
from bh_helpers.nulls.bank import bank_name
from bh_helpers.selection.budget import ComputeBudget, layer_alphas
from bh_helpers.selection.reference import FDR_METHODS

__all__ = ["CONTROLS", "FDR_METHODS", "LAYER_TARGETS", "METHODS", "SweepConfig", "adaptive_of", "bank_name",
           "controls_by_adaptive",
           "expand_grid", "grid_hash", "sweep_grid", "with_controls"]

# FDR_METHODS (p-value based: need alpha and a null kernel) is the selection module's own tuple.
# "mixed" and "shuffled" are the compute-matched controls of one adaptive configuration.
CONTROLS = ("mixed", "shuffled")
METHODS = FDR_METHODS + ("topk", "top_p", "native") + CONTROLS


def _canonical_json(obj: Any) -> str:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False)


def _short_hash(text: str, n: int = 12) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:n]


@dataclass(frozen=True)
class SweepConfig:
    """One routing configuration of a sweep.

    Fields that do not apply to ``method`` must be ``None`` (``__post_init__`` checks), so equal
    configurations have equal :meth:`key` values.

    Attributes
    ----------
    method : str
        One of :data:`METHODS`: ``"bh"``, ``"by"``, ``"bonferroni"``, ``"holm"`` (p-values from
        a null model, ``alpha``, ``min_k``, ``max_k``, ``kernel``), ``"topk"`` (``k``),
        ``"top_p"`` (``top_p``, ``min_k``, ``max_k``) or ``"native"`` (the model untouched).
    alpha : float, optional
        Error rate of the multiple-testing procedure, in ``(0, 1]``.
    layer_alphas : tuple of float, optional
        Instead of ``alpha``: one level per layer (adaptive FDR), ``layer_alphas[i]`` for layer
        ``i``; a multiple-testing configuration sets exactly one of the two.
    max_k, min_k : int, optional
        Ceiling and floor on the number of experts per token.
    kernel : str, optional
        Null model kernel (see :mod:`bh_helpers.nulls.kernels`).
    k : int, optional
        Static top-k.
    top_p : float, optional
        Cumulative router probability of top-p routing, in ``(0, 1]``.
    statistic : {"centred", "zscore"}, optional
        Per-token statistic of the null bank (multiple-testing methods; None is ``"raw"``).
    trim : int, optional
        Largest values per token left out of the null's fit (None is 0).
    control_of : str, optional
        For ``"mixed"`` and ``"shuffled"``: the adaptive configuration they control, as the
        canonical JSON of its :meth:`to_dict` (see :func:`with_controls`).
    seed : int, optional
        Seed of a control's random draws.
    """

    method: str
    alpha: float | None = None
    max_k: int | None = None
    min_k: int | None = None
    kernel: str | None = None
    k: int | None = None
    top_p: float | None = None
    statistic: str | None = None
    trim: int | None = None
    control_of: str | None = None
    seed: int | None = None
    layer_alphas: tuple[float, ...] | None = None

    def __post_init__(self) -> None:
        check_choice("method", self.method, METHODS)
        if self.layer_alphas is not None:
            if isinstance(self.layer_alphas, (Mapping, str)) or not isinstance(self.layer_alphas, Iterable):
                raise ValueError(f"`layer_alphas` must be a sequence of levels, one per layer number; "
                                 f"got {self.layer_alphas!r}.")
            levels = layer_alphas(list(self.layer_alphas), "layer_alphas")
            object.__setattr__(self, "layer_alphas", tuple(levels.values()))
            if self.method in FDR_METHODS and self.alpha is not None:
                raise ValueError("give `alpha` (one level) or `layer_alphas` (one per layer), not both.")
        # The defaults are stored as None so that configurations written before statistics
        # existed keep their keys (and their results files resume).
        if self.statistic == "raw":
            object.__setattr__(self, "statistic", None)
        if self.trim == 0:
            object.__setattr__(self, "trim", None)
        if self.statistic is not None:
            check_choice("statistic", self.statistic, ("raw", "centred", "zscore"))
        uses = {
            "alpha": self.method in FDR_METHODS and self.layer_alphas is None,
            "kernel": self.method in FDR_METHODS,
            "max_k": self.method in FDR_METHODS + ("top_p",),
            "min_k": self.method in FDR_METHODS + ("top_p",),
            "k": self.method == "topk",
            "top_p": self.method == "top_p",
            "control_of": self.method in CONTROLS,
            "seed": self.method in CONTROLS,
        }
        optional = {"statistic": self.method in FDR_METHODS, "trim": self.method in FDR_METHODS,
                    "layer_alphas": self.method in FDR_METHODS}
        for name, used in uses.items():
            value = getattr(self, name)
            if used and value is None:
                raise ValueError(f"method {self.method!r} needs `{name}`.")
            if not used and value is not None:
                raise ValueError(f"method {self.method!r} does not use `{name}`; leave it None.")
        for name, allowed in optional.items():
            if not allowed and getattr(self, name) is not None:
                raise ValueError(f"method {self.method!r} does not use `{name}`; leave it None.")
        if self.control_of is not None:
            adaptive = self.adaptive()
            if adaptive.method not in FDR_METHODS:
                raise ValueError(f"`control_of` must be a multiple-testing configuration, got {adaptive.label()!r}.")
        # Normalise numeric types so that 0.05 and numpy.float64(0.05) give the same key.
        for name in ("alpha", "top_p"):
            value = getattr(self, name)
            if value is not None:
                value = float(value)
                if not 0.0 < value <= 1.0:
                    raise ValueError(f"`{name}` must be in (0, 1], got {value!r}.")
                object.__setattr__(self, name, value)
        for name, low in (("max_k", 1), ("min_k", 0), ("k", 1), ("trim", 1), ("seed", 0)):
            value = getattr(self, name)
            if value is not None:
                if isinstance(value, (bool, str)) or int(value) != value or int(value) < low:
                    raise ValueError(f"`{name}` must be an integer >= {low}, got {value!r}.")
                object.__setattr__(self, name, int(value))
        if self.min_k is not None and self.max_k is not None and self.min_k > self.max_k:
            raise ValueError(f"`min_k` ({self.min_k}) must not exceed `max_k` ({self.max_k}).")

    def to_dict(self) -> dict:
        """All fields, ``None`` included."""
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> SweepConfig:
        """Inverse of :meth:`to_dict` (unknown keys raise ``ValueError``)."""
        names = {f.name for f in fields(cls)}
        unknown = set(data) - names
        if unknown:
            raise ValueError(f"unknown SweepConfig fields {sorted(unknown)}; known: {sorted(names)}.")
        return cls(**data)

    def key(self) -> str:
        """Stable short identifier: hash of the canonical JSON of the set fields."""
        return _short_hash(_canonical_json({k: v for k, v in self.to_dict().items() if v is not None}))

    def adaptive(self) -> SweepConfig:
        """The adaptive configuration a control belongs to (``control_of``)."""
        if self.control_of is None:
            raise ValueError(f"{self.label()!r} is not a control (no `control_of`).")
        return adaptive_of(self.control_of)

    def bank_name(self) -> str:
        """Which null bank a multiple-testing configuration uses: :func:`bank_name` of its settings."""
        return bank_name(self.kernel, self.statistic or "raw", self.trim or 0)

    def label(self) -> str:
        """Short human-readable name, e.g. ``"bh a=0.05 k=1..8 gaussian"``."""
        if self.method in FDR_METHODS:
            extra = (f" {self.statistic}" if self.statistic else "") + (f" trim={self.trim}" if self.trim else "")
            level = f"a={self.alpha:g}" if self.layer_alphas is None else (
                f"a={min(self.layer_alphas):.3g}..{max(self.layer_alphas):.3g}/layer")
            return f"{self.method} {level} k={self.min_k}..{self.max_k} {self.kernel}{extra}"
        if self.method in CONTROLS:
            return f"{self.method}[{self.adaptive().label()}]"
        if self.method == "topk":
            return f"top-{self.k}"
        if self.method == "top_p":
            return f"top-p {self.top_p:g} k={self.min_k}..{self.max_k}"
        return "native"

    def to_selector(self, model=None, *, null_bank=None, weights: str | None = None,
                    mean_k: float | Mapping[int, float] | None = None):
        """The :mod:`bh_helpers.routing.patch` selector for this configuration.

        Parameters
        ----------
        model : nn.Module, optional
            Needed for ``"native"`` (its own k and weight convention).
        null_bank : NullBank or mapping of str to NullBank, optional
            Needed for the multiple-testing methods (and the controls and static methods with
            ``weights="inverse_p"``); a mapping is indexed by :meth:`bank_name` (the kernel, for
            raw banks). A static method's inverse-p weights use the mapping's only raw bank.
        mean_k : float or mapping of int to float, optional
            Needed for ``"mixed"``: the adaptive row's mean k (per layer).
        weights : {"renorm", "softmax", "uniform", "inverse_p"}, optional
            Weight convention of the selected experts (not used by ``"native"``). Default: the
            model's own convention when ``model`` is given (raw softmax for OLMoE, renormalised
            for Mixtral/Qwen), else "renorm". Changing the convention changes what the experts
            were trained with: renormalised weights raise the embedded OLMoE's top-8 perplexity.

        Returns
        -------
        Selector
            ``NativeSelector``, ``TopKSelector``, ``TopPSelector``, ``BHSelector``,
            ``MixedTopKSelector`` or ``ShuffledSelector``.
        """
        from bh_helpers.selection import controls, selectors

        if self.method == "native":
            if model is None:
                raise ValueError("method 'native' needs `model` to read its k and weight convention.")
            return selectors.NativeSelector.for_model(model)
        if self.method == "shuffled":
            inner = self.adaptive().to_selector(model, null_bank=null_bank, weights=weights)
            return controls.ShuffledSelector(inner, seed=self.seed, weights=inner.weights)
        if weights is None:
            weights = selectors.NativeSelector.for_model(model).weights if model is not None else "renorm"
        if self.method == "mixed":
            if mean_k is None:
                raise ValueError("method 'mixed' needs `mean_k`, the adaptive row's mean k (per layer).")
            adaptive = self.adaptive()
            bank = adaptive._bank(null_bank) if weights == "inverse_p" else None
            return controls.MixedTopKSelector(mean_k, seed=self.seed, max_k=adaptive.max_k, weights=weights,
                                              null_bank=bank)
        if self.method in ("topk", "top_p"):
            bank = self._bank(null_bank) if weights == "inverse_p" else None
            if self.method == "topk":
                return selectors.TopKSelector(k=self.k, weights=weights, null_bank=bank)
            return selectors.TopPSelector(p=self.top_p, min_k=self.min_k, max_k=self.max_k, weights=weights,
                                          null_bank=bank)
        return selectors.BHSelector(self._bank(null_bank), method=self.method, alpha=self.level(), min_k=self.min_k,
                                    max_k=self.max_k, weights=weights)

    def level(self) -> float | tuple[float, ...] | None:
        """The level a selector takes as ``alpha``: ``alpha``, or ``layer_alphas`` (one per layer)."""
        return self.alpha if self.layer_alphas is None else self.layer_alphas

    def _bank(self, null_bank: Any) -> Any:
        """The NullBank this configuration routes (or, static, weighs) with, out of ``null_bank``."""
        from bh_helpers.nulls.bank import NullBank

        if null_bank is None:
            raise ValueError(f"{self.label()!r} needs `null_bank` (a NullBank, or one per kernel).")
        # A NullBank is itself a Mapping (layer -> null): only other mappings are per kernel.
        if isinstance(null_bank, Mapping) and not isinstance(null_bank, NullBank):
            if self.method not in FDR_METHODS:  # static: the sweep's only raw bank
                raw = [name for name in null_bank if "/" not in name]
                if len(raw) != 1:
                    raise ValueError(f"{self.label()!r} with inverse-p weights needs one raw bank to weigh with; "
                                     f"`null_bank` has {sorted(null_bank)}: pass a single NullBank.")
                return null_bank[raw[0]]
            name = self.bank_name()
            if name not in null_bank:
                raise ValueError(f"`null_bank` has no bank {name!r}; it has {sorted(null_bank)}.")
            return null_bank[name]
        if isinstance(null_bank, NullBank) and self.method in FDR_METHODS and (
                null_bank.metadata.statistic, null_bank.metadata.trim) != (self.statistic or "raw", self.trim or 0):
            raise ValueError(f"{self.label()!r} needs a bank fitted with statistic={self.statistic or 'raw'!r}, "
                             f"trim={self.trim or 0}; `null_bank` has statistic={null_bank.metadata.statistic!r}, "
                             f"trim={null_bank.metadata.trim}.")
        return null_bank

    def selector_kwargs(self) -> dict:
        """Keyword arguments for :func:`bh_helpers.selection.reference.select_experts` (``{}`` for native)."""
        if self.method == "native":
            return {}
        if self.layer_alphas is not None:
            raise ValueError(f"{self.label()!r} has one alpha per layer: select_experts takes one level; "
                             "use to_selector(...), whose selector is told the layer.")
        out = {"method": self.method}
        for name in ("alpha", "min_k", "max_k", "k", "top_p"):
            if getattr(self, name) is not None:
                out[name] = getattr(self, name)
        return out


def adaptive_of(control_of: str) -> SweepConfig:
    """The adaptive configuration named by a control's ``control_of`` (the JSON of its fields)."""
    try:
        data = json.loads(control_of)
    except (TypeError, json.JSONDecodeError) as err:
        raise ValueError(f"`control_of` must be the JSON of a SweepConfig: {err}") from err
    return SweepConfig.from_dict(data)


def controls_by_adaptive(results) -> dict[tuple[str, str, str], Any]:
    """Control rows of sweep results by ``(adaptive key, data set, control method)``."""
    if "control_of" not in results.columns:
        return {}
    return {(adaptive_of(r["control_of"]).key(), r["dataset"], r["method"]): r
            for _, r in results[results["method"].isin(CONTROLS)].iterrows()}


def with_controls(configs: Sequence[SweepConfig], *, seed: int = 0) -> list[SweepConfig]:
    """``configs`` with each multiple-testing configuration followed by its two controls.

    The mixed top-k control runs at the adaptive row's per-layer mean k on the same data set; the
    shuffled control permutes its per-token counts (:mod:`bh_helpers.selection.controls`). Each
    control comes right after its adaptive configuration, which :func:`run_sweep` evaluates first.
    """
    out: list[SweepConfig] = []
    for config in configs:
        out.append(config)
        if config.method in FDR_METHODS:
            of = _canonical_json({k: v for k, v in config.to_dict().items() if v is not None})
            out += [SweepConfig(method, control_of=of, seed=seed) for method in CONTROLS]
    return out


def _as_tuple(values) -> tuple:
    if values is None:
        return ()
    if isinstance(values, (str, int, float)):
        return (values,)
    return tuple(values)


def expand_grid(
    *,
    methods: Iterable[str] = ("bh",),
    alphas: Iterable[float] = (0.01, 0.05, 0.1, 0.2),
    max_ks: Iterable[int] = (8,),
    min_ks: Iterable[int] = (1,),
    kernels: Iterable[str] = ("gaussian",),
    topk: Iterable[int] | bool = True,
    top_ps: Iterable[float] = (),
    native: bool = True,
) -> list[SweepConfig]:
    """The configurations of a grid, in a fixed order.

    Parameters
    ----------
    methods : iterable of str
        Multiple-testing methods (subset of :data:`FDR_METHODS`), crossed with
        ``alphas x max_ks x min_ks x kernels``.
    alphas, max_ks, min_ks, kernels : iterables
        Grid axes of the multiple-testing methods (pairs with ``min_k > max_k`` are skipped).
    topk : iterable of int or bool
        Static top-k baselines: ``True`` for ``k = 1 .. max(max_ks)``, ``False`` for none, or
        the ``k`` values.
    top_ps : iterable of float
        Top-p baselines, each with ``min_k = min(min_ks)`` and ``max_k = max(max_ks)``.
    native : bool
        Include the unmodified model.

    Returns
    -------
    list of SweepConfig
        Native first, then the static top-k, top-p, and the multiple-testing configurations
        (method, alpha, max_k, min_k, kernel varying slowest to fastest).

    Examples
    --------
    >>> len(expand_grid(methods=["bh", "by"], alphas=[0.05, 0.1], max_ks=[8], topk=True))
    13
    """
    methods, alphas = _as_tuple(methods), _as_tuple(alphas)
    max_ks, min_ks = _as_tuple(max_ks), _as_tuple(min_ks)
    kernels, top_ps = _as_tuple(kernels), _as_tuple(top_ps)
    bad = [m for m in methods if m not in FDR_METHODS]
    if bad:
        raise ValueError(f"`methods` must be among {list(FDR_METHODS)} (baselines have their own options), got {bad}.")
    if methods and not (alphas and max_ks and min_ks and kernels):
        raise ValueError("`alphas`, `max_ks`, `min_ks` and `kernels` must be non-empty when `methods` is.")
    if topk is True:
        if not max_ks:
            raise ValueError("`topk=True` needs `max_ks` to know the largest k; pass the k values instead.")
        ks: tuple = tuple(range(1, max(max_ks) + 1))
    elif topk is False:
        ks = ()
    else:
        ks = _as_tuple(topk)
    configs: list[SweepConfig] = []
    if native:
        configs.append(SweepConfig("native"))
    configs += [SweepConfig("topk", k=k) for k in ks]
    if top_ps:
        if not (max_ks and min_ks):
            raise ValueError("`top_ps` needs non-empty `max_ks` and `min_ks`.")
        configs += [SweepConfig("top_p", top_p=p, min_k=min(min_ks), max_k=max(max_ks)) for p in top_ps]
    for method in methods:
        for alpha in alphas:
            for max_k in max_ks:
                for min_k in min_ks:
                    if min_k > max_k:
                        continue
                    for kernel in kernels:
                        configs.append(
                            SweepConfig(method, alpha=alpha, max_k=max_k, min_k=min_k, kernel=kernel)
                        )
    return configs


def grid_hash(configs: Sequence[SweepConfig], datasets: Sequence[str], grid_id: str | None = None) -> str:
    """Identity of a sweep: hash of the ordered config keys, data set names and ``grid_id``."""
    return _short_hash(
        _canonical_json({"configs": [c.key() for c in configs], "datasets": list(datasets), "grid_id": grid_id}),
        n=16,
    )


#: Calibration tokens per layer on which a grid's alphas are chosen (evenly spaced).
_ALPHA_TOKENS = 4096


#: Where a grid's compute targets are reached: over all layers (one alpha), in every layer
#: (one alpha per layer: adaptive FDR at equal per-layer compute), or both.
LAYER_TARGETS = ("global", "per-layer", "both")


def _per_layer_levels(found: Mapping[int, float], where: str) -> tuple[float, ...]:
    """``{layer: alpha}`` as ``SweepConfig.layer_alphas`` (index = layer number), 4 significant digits."""
    if sorted(found) != list(range(len(found))):
        raise ValueError(f"per-layer alphas{where} need calibration logits of layers 0..L-1; got layers "
                         f"{sorted(found)}.")
    return tuple(float(f"{found[layer]:.4g}") for layer in range(len(found)))


def sweep_grid(*, banks: Mapping[str, Any], calibration: Mapping[int, Any] | None, methods: Sequence[str],
               alphas: Sequence[float], mean_ks: Sequence[float], max_ks: Sequence[int], min_ks: Sequence[int],
               topk_max: int, top_ps: Sequence[float], controls: bool = True, seed: int = 0,
               layer_alphas: Sequence[Sequence[float]] = (), layer_targets: str = "global"):
    """The grid of the demo and of ``bh-routing sweep``.

    Native, static top-1..``topk_max``, top-p, then for every null bank (one per statistic and
    trim), method, ``max_k`` and floor ``min_k``: the explicit ``alphas``, the explicit per-layer
    levels ``layer_alphas`` (each a sequence, one level per layer number) and, for each compute
    target in ``mean_ks`` above the floor (by at least half an expert; lower targets are skipped
    for that floor), the alpha that reaches it on ``calibration`` over all layers
    (``layer_targets="global"``), the per-layer alphas that reach it in every layer
    (``"per-layer"``), or both (:class:`bh_helpers.selection.budget.ComputeBudget` on at most
    :data:`_ALPHA_TOKENS` evenly spaced tokens per layer, rounded to 4 significant digits). With
    ``controls`` every adaptive configuration is followed by its mixed and shuffled controls.
    """
    check_choice("layer_targets", layer_targets, LAYER_TARGETS)
    if mean_ks and calibration is None:
        raise ValueError("compute targets (--mean-ks) need calibration logits (--captured) to choose alpha.")
    adaptive = []
    for bank in banks.values():
        meta = bank.metadata
        budget = ComputeBudget(bank, calibration, max_tokens=_ALPHA_TOKENS) if mean_ks else None
        for method in methods:
            for max_k in max_ks:
                for min_k in min_ks:
                    if min_k > max_k:
                        continue
                    same = dict(max_k=max_k, min_k=min_k, kernel=meta.kernel, statistic=meta.statistic, trim=meta.trim)
                    targets = [t for t in mean_ks if min_k + 0.5 <= t <= max_k]
                    levels = list(alphas)
                    per_layer = [tuple(row) for row in layer_alphas]
                    for t in targets:
                        reach = dict(method=method, min_k=min_k, max_k=max_k)
                        if layer_targets != "per-layer":
                            levels.append(float(f"{budget.alpha(t, **reach):.4g}"))
                        if layer_targets != "global":
                            found = budget.alpha(t, per_layer=True, **reach)
                            per_layer.append(_per_layer_levels(found, f" (target {t:g})"))
                    adaptive += [SweepConfig(method, alpha=a, **same) for a in dict.fromkeys(levels)]
                    adaptive += [SweepConfig(method, layer_alphas=a, **same) for a in dict.fromkeys(per_layer)]
    baselines = expand_grid(methods=(), topk=list(range(1, topk_max + 1)), top_ps=top_ps, max_ks=max_ks,
                            min_ks=min_ks, native=True)
    return baselines + (with_controls(adaptive, seed=seed) if controls else adaptive)
