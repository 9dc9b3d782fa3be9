"""What a sweep runs: :class:`SweepConfig`, one routing configuration, and its controls.

:func:`with_controls` follows each adaptive configuration with its compute-matched controls;
:func:`bank_name` names the null bank (kernel, statistic, trim) a configuration routes with;
:func:`config_of` reads a configuration back from results. The grids built from configurations are
in :mod:`bh_helpers.experiments.grids`; :mod:`bh_helpers.experiments.sweep` runs them and keeps the
results.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, fields
from typing import Any

from bh_helpers._validate import check_choice, check_level
from bh_helpers.nulls.bank import bank_name
from bh_helpers.selection.budget import layer_alphas
from bh_helpers.selection.reference import FDR_METHODS

__all__ = ["BUDGETS", "CONTROLS", "FDR_METHODS", "METHODS", "SweepConfig", "adaptive_of", "bank_name", "config_of",
           "controls_by_adaptive", "grid_hash", "with_controls"]

# FDR_METHODS (p-value based: need alpha and a null kernel) is the selection module's own tuple.
# "mixed", "shuffled" and "static_chord" are the compute-matched controls of one adaptive
# configuration; "static" is a fixed per-layer allocation (experiments.static_allocation).
CONTROLS = ("mixed", "shuffled", "static_chord")
METHODS = FDR_METHODS + ("topk", "top_p", "native", "static") + CONTROLS
#: Where a configuration's per-layer levels come from: compute targets of a static allocation.
BUDGETS = ("static",)


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
        For the controls (:data:`CONTROLS`): the adaptive configuration they control, as the
        canonical JSON of its :meth:`to_dict` (see :func:`with_controls`).
    seed : int, optional
        Seed of a control's random draws.
    ks : tuple of int, optional
        For ``"static"``: experts per MoE layer, in layer order.
    budget : {"static"}, optional
        For a multiple-testing configuration with ``layer_alphas``: the levels were solved so that
        each layer's mean k equals a static allocation's k in that layer ("per-layer budgets +
        BH within each layer").
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
    ks: tuple[int, ...] | None = None
    budget: str | None = None

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
            "ks": self.method == "static",
        }
        optional = {"statistic": self.method in FDR_METHODS, "trim": self.method in FDR_METHODS,
                    "layer_alphas": self.method in FDR_METHODS,
                    "budget": self.method in FDR_METHODS and self.layer_alphas is not None}
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
            if value is not None:  # a float in (0, 1]; True or "0.05" refused, not coerced
                object.__setattr__(self, name, check_level(name, value))
        for name, low in (("max_k", 1), ("min_k", 0), ("k", 1), ("trim", 1), ("seed", 0)):
            value = getattr(self, name)
            if value is not None:
                if isinstance(value, (bool, str)) or int(value) != value or int(value) < low:
                    raise ValueError(f"`{name}` must be an integer >= {low}, got {value!r}.")
                object.__setattr__(self, name, int(value))
        if self.min_k is not None and self.max_k is not None and self.min_k > self.max_k:
            raise ValueError(f"`min_k` ({self.min_k}) must not exceed `max_k` ({self.max_k}).")
        if self.ks is not None:
            if isinstance(self.ks, (str, Mapping)) or not isinstance(self.ks, Iterable):
                raise ValueError(f"`ks` must be a sequence of experts per layer; got {self.ks!r}.")
            ks = tuple(self.ks)
            if not ks or any(isinstance(k, (bool, str)) or int(k) != k or int(k) < 1 for k in ks):
                raise ValueError(f"`ks` must be integers >= 1, one per MoE layer; got {self.ks!r}.")
            object.__setattr__(self, "ks", tuple(int(k) for k in ks))
        if self.budget is not None:
            check_choice("budget", self.budget, BUDGETS)

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
            extra += f" {self.budget}-budget" if self.budget else ""
            return f"{self.method} {level} k={self.min_k}..{self.max_k} {self.kernel}{extra}"
        if self.method == "static_chord":
            return f"static chord[{self.adaptive().label()}]"
        if self.method in CONTROLS:
            return f"{self.method}[{self.adaptive().label()}]"
        if self.method == "topk":
            return f"top-{self.k}"
        if self.method == "static":
            return "static " + "/".join(map(str, self.ks))
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
        if self.method == "static_chord":
            raise ValueError("the static chord is a per-window mixture of two static allocations, not one selector: "
                             "score it with StaticAllocationPath.chord and mix_windows "
                             "(bh_helpers.experiments.static_allocation).")
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
        if self.method == "static":
            from bh_helpers.models.families import find_moe_blocks
            from bh_helpers.selection.static import StaticLayerSelector

            layers = [b.layer for b in find_moe_blocks(model)] if model is not None else range(len(self.ks))
            if len(layers) != len(self.ks):
                raise ValueError(f"{self.label()!r} has {len(self.ks)} per-layer ks for a model of {len(layers)} MoE "
                                 "layers; fit the allocation on this model.")
            bank = self._bank(null_bank) if weights == "inverse_p" else None
            return StaticLayerSelector(dict(zip(layers, self.ks)), weights=weights, null_bank=bank)
        if self.method in ("topk", "top_p"):
            bank = self._bank(null_bank) if weights == "inverse_p" else None
            if self.method == "topk":
                return selectors.TopKSelector(k=self.k, weights=weights, null_bank=bank)
            return selectors.TopPSelector(p=self.top_p, min_k=self.min_k, max_k=self.max_k, weights=weights,
                                          null_bank=bank)
        return selectors.BHSelector(self._bank(null_bank), method=self.method, alpha=self.level(), min_k=self.min_k,
                                    max_k=self.max_k, weights=weights)

    def routing_config(self, *, bank: str | None = None, weights: str = "softmax"):
        """This configuration as a :class:`~bh_helpers.engines.config.RoutingConfig` (one JSON file
        that ``route()`` users, the vLLM plugin and the CLI read).

        Parameters
        ----------
        bank : str, optional
            Folder of the saved null bank it routes with (multiple-testing methods, inverse-p weights).
        weights : str, default "softmax"
            Weights of the chosen experts (the sweep's).

        Raises
        ------
        ValueError
            For a configuration a routing config cannot hold (native, controls).
        """
        from bh_helpers.engines.config import RoutingConfig

        if self.method in FDR_METHODS:
            level = list(self.layer_alphas) if self.layer_alphas is not None else self.alpha
            return RoutingConfig(selector=self.method, alpha=level, min_k=self.min_k, max_k=self.max_k,
                                 weights=weights, bank=bank)
        if self.method == "topk":
            return RoutingConfig(selector="topk", k=self.k, max_k=self.k, weights=weights, bank=bank)
        if self.method == "top_p":
            return RoutingConfig(selector="top_p", p=self.top_p, min_k=self.min_k, max_k=self.max_k, weights=weights,
                                 bank=bank)
        if self.method == "static":
            return RoutingConfig(selector="static", ks=list(self.ks), weights=weights, bank=bank)
        raise ValueError(f"{self.label()!r} has no routing config (one is written for BH-family, top-k, top-p and "
                         "static per-layer configurations); pick another configuration.")

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


def config_of(results, key: str) -> SweepConfig:
    """The configuration of the rows of ``results`` (sweep results) whose ``key`` is ``key``."""
    rows = results[results["key"] == key]
    if not len(rows):
        raise ValueError(f"no row of `results` has key {key!r}.")
    row = rows.iloc[0]

    def value(name: str) -> Any:
        v = row.get(name)
        return None if v is None or (isinstance(v, float) and math.isnan(v)) else v

    return SweepConfig.from_dict({f.name: value(f.name) for f in fields(SweepConfig)})


def controls_by_adaptive(results) -> dict[tuple[str, str, str], Any]:
    """Control rows of sweep results by ``(adaptive key, data set, control method)``."""
    if "control_of" not in results.columns:
        return {}
    return {(adaptive_of(r["control_of"]).key(), r["dataset"], r["method"]): r
            for _, r in results[results["method"].isin(CONTROLS)].iterrows()}


def with_controls(configs: Sequence[SweepConfig], *, seed: int = 0,
                  controls: Sequence[str] = CONTROLS) -> list[SweepConfig]:
    """``configs`` with each multiple-testing configuration followed by its controls.

    The mixed top-k control runs at the adaptive row's per-layer mean k on the same data set; the
    shuffled control permutes its per-token counts (:mod:`bh_helpers.selection.controls`); the
    static chord mixes, per window, the two static per-layer allocations whose totals bracket the
    adaptive row's realised mean k (:mod:`bh_helpers.experiments.static_allocation`). Each
    control comes right after its adaptive configuration, which :func:`run_sweep` evaluates first.
    """
    bad = [c for c in controls if c not in CONTROLS]
    if bad:
        raise ValueError(f"`controls` must be among {list(CONTROLS)}; got {bad}.")
    out: list[SweepConfig] = []
    for config in configs:
        out.append(config)
        if config.method in FDR_METHODS:
            of = _canonical_json({k: v for k, v in config.to_dict().items() if v is not None})
            out += [SweepConfig(method, control_of=of, seed=seed) for method in controls]
    return out


def grid_hash(configs: Sequence[SweepConfig], datasets: Sequence[str], grid_id: str | None = None) -> str:
    """Identity of a sweep: hash of the ordered config keys, data set names and ``grid_id``."""
    return _short_hash(
        _canonical_json({"configs": [c.key() for c in configs], "datasets": list(datasets), "grid_id": grid_id}),
        n=16,
    )
