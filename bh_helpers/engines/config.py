"""One routing configuration, one JSON file: which selector, its levels and bounds, which null bank.

:class:`RoutingConfig` is what a serving engine reads at start (the vLLM plugin takes its path from
the ``BH_ROUTING_CONFIG`` environment variable) and what a ``route()`` user can keep beside a
model to rebuild the very same selector::

    config = RoutingConfig.load("routing.json")
    selector = config.to_selector()            # a BHSelector / TopKSelector / TopPSelector
    with route(model, selector): ...           # the same object the engine's callback calls

The file holds one JSON object (every key optional except where a selector needs it)::

    {"format": "bh_helpers.RoutingConfig", "version": 1,
     "selector": "bh", "alpha": 0.05, "min_k": 1, "max_k": 8, "weights": "renorm",
     "bank": "bh_helpers/data/kde_models/tiny-olmoe"}

``alpha`` may also be a list (one level per layer, indexed by layer) or an object
``{"layer": level}``. A relative ``bank`` path is resolved against the folder of the config file
(or the working directory for a config read from a string). Unknown keys are refused, so a typo
never silently falls back to a default, and so is a field the selector does not read (``alpha`` for
"topk") or one that contradicts it (``max_k`` 2 with ``k`` 4): :meth:`RoutingConfig.__post_init__`
checks the fields together, the selector's ``check`` checks per-layer settings against the model.

No transformers here, and no engine: this module imports only the selection and nulls floors.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from bh_helpers._validate import check_choice, check_int, check_level
from bh_helpers.selection.budget import layer_alphas
from bh_helpers.selection.reference import FDR_METHODS, WEIGHT_MODES

__all__ = ["CONFIG_FORMAT", "CONFIG_VERSION", "SELECTORS", "UNUSED_SLOTS", "RoutingConfig"]

#: The ``format`` tag of a routing config file.
CONFIG_FORMAT = "bh_helpers.RoutingConfig"
#: Version of the file layout; bump on any incompatible change.
CONFIG_VERSION = 1
#: Selector names: the multiple-testing methods (need a bank), static top-k, top-p.
SELECTORS = (*FDR_METHODS, "topk", "top_p", "static")
#: What an engine puts in a token's unused slots: valid ids at weight 0, or -1 (skipped compute).
UNUSED_SLOTS = ("pad", "skip")


@dataclass(frozen=True)
class RoutingConfig:
    """A routing rule in serialisable form; :meth:`to_selector` builds the selector object.

    Parameters
    ----------
    selector : {"bh", "by", "bonferroni", "holm", "topk", "top_p", "static"}, default "bh"
        The multiple-testing methods build a :class:`~bh_helpers.selection.selectors.BHSelector`;
        "topk" a ``TopKSelector``; "top_p" a ``TopPSelector``; "static" a
        :class:`~bh_helpers.selection.static.StaticLayerSelector` (``ks``: one k per MoE layer).
    alpha : float, list of float or dict of int to float, optional
        Level of the testing procedure (one, or one per layer number); used by the testing methods
        only (default there 0.05; refused for the other selectors). A per-layer ``alpha`` needs a
        level for every routed layer and none for a layer the model lacks (checked when the
        selector meets the model: ``route`` or the vLLM plugin).
    min_k, max_k : int, optional
        Floor and ceiling on experts per token (testing methods and top-p; default 1 and 8).
        "topk" and "static" set them from ``k`` / ``ks``: there a given bound must agree.
        ``max_k`` is also the width an engine must give its routing callback.
    k : int, optional
        Experts per token for "topk" (required there).
    p : float, optional
        Probability mass for "top_p" (required there).
    ks : list of int, optional
        Experts per MoE layer, in layer order, for "static" (required there; e.g. the demo's
        ``static_allocation.json`` at one total); one per layer of the model it routes.
    weights : {"renorm", "softmax", "uniform", "inverse_p"}, default "renorm"
        How the chosen experts are mixed; "softmax" is OLMoE's own ``norm_topk_prob=False``.
    bank : str, optional
        Folder of a saved :class:`~bh_helpers.nulls.NullBank` (``NullBank.save``); required by the
        testing methods and by ``weights="inverse_p"``, refused elsewhere (with
        ``allow_other_model`` and ``allow_unverified_bank``: nothing would read them).
    allow_other_model : bool, default False
        Use a bank whose router fingerprint differs from the served model's (as
        ``route(..., allow_other_model=True)``).
    allow_unverified_bank : bool, default False
        Use a bank whose ``metadata.json`` has no checksum or fails it (saved by an older
        bh_helpers, or edited), with a warning (``NullBank.load(..., allow_unverified=True)``).
    unused_slots : {"pad", "skip"}, default "pad"
        Engines only (``route()`` runs only the chosen experts anyway): "pad" fills a token's unused
        slots with valid expert ids at weight 0 (exact, saves no compute); "skip" passes ``-1``
        there (compute saved where the engine's kernel skips such ids; vLLM 0.32 refuses it).
    base_dir : str, optional
        Folder a relative ``bank`` is resolved against (set by :meth:`load`; not written to JSON).
    """

    selector: str = "bh"
    alpha: float | list[float] | dict[int, float] | None = None
    min_k: int | None = None
    max_k: int | None = None
    k: int | None = None
    p: float | None = None
    ks: list[int] | None = None
    weights: str = "renorm"
    bank: str | None = None
    bank_sha256: str | None = None
    allow_other_model: bool = False
    allow_unverified_bank: bool = False
    unused_slots: str = "pad"
    base_dir: str | None = field(default=None, compare=False, repr=False)

    # -- Input validation ----------------------------------------------------------------------

    def __post_init__(self) -> None:
        check_choice("selector", self.selector, SELECTORS)
        check_choice("weights", self.weights, WEIGHT_MODES)
        check_choice("unused_slots", self.unused_slots, UNUSED_SLOTS)
        # Every field is read by some selectors only; given to another it is refused, never ignored
        # (a {"selector": "topk", "k": 4, "max_k": 2} routed 4 experts without a word).
        self._check_rule()
        self._check_bounds()
        if self.bank is not None and (not isinstance(self.bank, str) or not self.bank):
            raise ValueError(f"`bank` must be the path of a NullBank folder (a string); got {self.bank!r}.")
        if self.bank_sha256 is not None and (self.bank is None or not isinstance(self.bank_sha256, str)
                                             or len(self.bank_sha256) != 64):
            raise ValueError("`bank_sha256` pins the bank at `bank` (its metadata.json's bank_sha256, 64 hex digits); "
                             f"got {self.bank_sha256!r}{' without a bank' if self.bank is None else ''}.")
        for name in ("allow_other_model", "allow_unverified_bank"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"`{name}` must be true or false; got {getattr(self, name)!r}.")
        reads = f'selector "{self.selector}" with weights "{self.weights}"'
        if not self.needs_bank:
            if self.bank is not None:
                raise ValueError(f"`bank` is read only by the testing selectors ({', '.join(FDR_METHODS)}) and by "
                                 f'weights "inverse_p"; {reads} reads no p-values: remove `bank` from the config.')
            for name in ("allow_other_model", "allow_unverified_bank"):
                if getattr(self, name):
                    raise ValueError(f"`{name}` is about the null bank, and {reads} reads none: remove `{name}` "
                                     "from the config.")
        if self.needs_bank and self.bank is None:
            why = f'selector "{self.selector}"' if self.selector in FDR_METHODS else 'weights "inverse_p"'
            raise ValueError(
                f"`bank` is missing: {why} needs a null bank. Add \"bank\": \"<folder with metadata.json and "
                "nulls.npz>\" to the routing config (fit one with `bh-routing capture` + `bh-routing fit`)."
            )

    def _check_rule(self) -> None:
        """The fields of the rule itself: ``alpha`` (testing methods), ``k`` (topk), ``ks`` (static), ``p`` (top_p)."""
        if self.selector in FDR_METHODS:
            object.__setattr__(self, "alpha", layer_alphas(0.05 if self.alpha is None else self.alpha))
        elif self.alpha is not None:
            raise ValueError(f"`alpha` is only used by the testing selectors ({', '.join(FDR_METHODS)}), not "
                             f"{self.selector!r}; remove it from the config.")
        if self.selector == "topk":
            if self.k is None:
                raise ValueError('`k` is required for selector "topk": add "k": 8 (experts per token) to the config.')
            check_int("k", self.k, 1)
        elif self.k is not None:
            raise ValueError(f'`k` is only used by selector "topk", not {self.selector!r}; remove it from the config.')
        if self.selector == "static":
            if self.ks is not None and not isinstance(self.ks, (list, tuple)):
                raise ValueError(f'`ks` must be a list with one k per MoE layer, in layer order (e.g. "ks": '
                                 f'[3, 2, 2, 2, 2, 1]); got {type(self.ks).__name__} {self.ks!r}.')
            if not isinstance(self.ks, (list, tuple)) or not self.ks:
                raise ValueError('`ks` is required for selector "static": add e.g. "ks": [3, 2, 2, 2, 2, 1] (experts '
                                 "per MoE layer, in layer order) to the config.")
            object.__setattr__(self, "ks", [check_int(f"ks[{i}]", k, 1) for i, k in enumerate(self.ks)])
        elif self.ks is not None:
            raise ValueError(f'`ks` is only used by selector "static", not {self.selector!r}; remove it from the config.')
        if self.selector == "top_p":
            if self.p is None:
                raise ValueError('`p` is required for selector "top_p": add e.g. "p": 0.9 to the config.')
            object.__setattr__(self, "p", check_level("p", self.p, example="0.9"))
        elif self.p is not None:
            raise ValueError(f'`p` is only used by selector "top_p", not {self.selector!r}; remove it from the config.')

    def _check_bounds(self) -> None:
        """``min_k`` and ``max_k``: free for the testing methods and top-p; fixed by ``k`` (topk) or
        ``ks`` (static), where a given bound must agree (a file this class wrote has them)."""
        if self.min_k is not None:
            check_int("min_k", self.min_k, 0)
        if self.max_k is not None:
            check_int("max_k", self.max_k, 1)
        if self.selector == "topk":
            fixed, why = (self.k, self.k), f"`k`={self.k} (a top-k rule routes exactly k experts)"
        elif self.selector == "static":
            fixed = (min(self.ks), max(self.ks))
            why = f"`ks` (a static rule routes min(ks)={fixed[0]} to max(ks)={fixed[1]} experts)"
        else:
            fixed = None
        if fixed is None:
            bounds = (1 if self.min_k is None else self.min_k, 8 if self.max_k is None else self.max_k)
        else:
            bounds = fixed
            for name, given, right in (("min_k", self.min_k, fixed[0]), ("max_k", self.max_k, fixed[1])):
                if given is not None and given != right:
                    raise ValueError(f"`{name}`={given} contradicts {why}; remove `{name}` from the config (or "
                                     f"set it to {right}).")
        object.__setattr__(self, "min_k", bounds[0])
        object.__setattr__(self, "max_k", bounds[1])  # for static: the engine's routing width
        if self.min_k > self.max_k:
            raise ValueError(f"`min_k`={self.min_k} exceeds `max_k`={self.max_k}; give min_k <= max_k.")

    @property
    def needs_bank(self) -> bool:
        """Whether the selector reads p-values (testing methods, or inverse-p weights)."""
        return self.selector in FDR_METHODS or self.weights == "inverse_p"

    @property
    def bank_path(self) -> Path | None:
        """``bank`` resolved against ``base_dir`` (None without a bank)."""
        if self.bank is None:
            return None
        path = Path(self.bank).expanduser()
        if not path.is_absolute() and self.base_dir is not None:
            path = Path(self.base_dir) / path
        return path

    # -- JSON ----------------------------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        """The JSON object of this config (``format`` and ``version`` first, unset options left out)."""
        raw = {k: v for k, v in asdict(self).items() if k != "base_dir"}
        if isinstance(raw["alpha"], dict):
            raw["alpha"] = {str(layer): level for layer, level in sorted(raw["alpha"].items())}
        for name in ("alpha", "k", "p", "ks", "bank", "bank_sha256"):
            if raw[name] is None:
                del raw[name]
        return {"format": CONFIG_FORMAT, "version": CONFIG_VERSION, **raw}

    def to_json(self, path: str | Path | None = None) -> str:
        """The config as JSON text; also written to ``path`` when given."""
        text = json.dumps(self.to_dict(), indent=2) + "\n"
        if path is not None:
            Path(path).write_text(text)
        return text

    @classmethod
    def from_dict(cls, raw: Mapping[str, Any], *, base_dir: str | Path | None = None) -> RoutingConfig:
        """Read the JSON object of a config; ``base_dir`` resolves a relative ``bank``."""
        if not isinstance(raw, Mapping):
            raise ValueError(f"a routing config must be a JSON object; got {type(raw).__name__}.")
        raw = dict(raw)
        fmt, version = raw.pop("format", CONFIG_FORMAT), raw.pop("version", CONFIG_VERSION)
        if fmt != CONFIG_FORMAT:
            raise ValueError(f"`format` must be {CONFIG_FORMAT!r}; got {fmt!r}: is this a routing config?")
        if version != CONFIG_VERSION or isinstance(version, bool):  # "1" is text, not the version number 1
            raise ValueError(f"`version` {json.dumps(version)} is not understood by this bh_helpers: it reads "
                             f'"version": {CONFIG_VERSION} (a JSON number).')
        known = {f.name for f in fields(cls)} - {"base_dir"}
        unknown = sorted(set(raw) - known)
        if unknown:
            raise ValueError(f"unknown routing config field(s) {unknown}; the fields are {sorted(known)}.")
        alpha = raw.get("alpha")
        if isinstance(alpha, Mapping):
            try:
                raw["alpha"] = {int(layer): level for layer, level in alpha.items()}
            except ValueError:
                raise ValueError(f"`alpha` keys must be layer numbers; got {sorted(alpha)}.") from None
            if len(raw["alpha"]) != len(alpha):  # "0" and "00": one layer, the last level would win quietly
                raise ValueError(f"`alpha` names a layer twice ({sorted(alpha)}); give each layer one level.")
        return cls(**raw, base_dir=None if base_dir is None else str(base_dir))

    @classmethod
    def from_json(cls, text: str, *, base_dir: str | Path | None = None) -> RoutingConfig:
        """Parse JSON text (see :meth:`from_dict`)."""
        try:
            raw = json.loads(text)
        except json.JSONDecodeError as err:
            raise ValueError(f"the routing config is not valid JSON ({err}).") from None
        return cls.from_dict(raw, base_dir=base_dir)

    @classmethod
    def load(cls, path: str | Path) -> RoutingConfig:
        """Read a config file; a relative ``bank`` is resolved against the file's folder."""
        path = Path(path).expanduser()
        try:
            text = path.read_text()
        except OSError as err:
            raise ValueError(f"cannot read the routing config {str(path)!r} ({err.strerror or err}).") from None
        try:
            return cls.from_json(text, base_dir=path.resolve().parent)
        except (ValueError, TypeError) as err:
            raise type(err)(f"routing config {str(path)!r}: {err}") from None

    # -- Building the selector -----------------------------------------------------------------

    def load_bank(self, *, num_layers: int | None = None, num_experts: int | None = None) -> Any:
        """The :class:`~bh_helpers.nulls.NullBank` at ``bank``, checked against the model's counts.

        Raises
        ------
        ValueError
            Naming the ``bank`` field: no bank configured, an unreadable folder, or a bank fitted
            for another layer or expert count.
        """
        from bh_helpers.nulls.bank import NullBank

        path = self.bank_path
        if path is None:
            raise ValueError('`bank` is not set in the routing config; add "bank": "<NullBank folder>".')
        try:
            bank = NullBank.load(path, num_layers=num_layers, num_experts=num_experts,
                                 allow_unverified=self.allow_unverified_bank)
            pinned = self.bank_sha256 is not None and bank_sha256_of(path) != self.bank_sha256
            if pinned:  # same path, another bank (refitted or replaced since the config was saved)
                raise ValueError("`directory` holds another bank than the one this config was saved with (its "
                                 "bank_sha256 differs from `bank_sha256`): save the config again from the sweep that "
                                 "used this bank, or point `bank` at the bank it was saved with.")
            return bank
        except ValueError as err:
            # the config's words, not NullBank.load's argument names (`directory` is the config's `bank`)
            err = str(err).replace("`allow_unverified`", '"allow_unverified_bank": true in the routing config')
            err = err.replace(f"`directory` {str(path)!r} ", "it ").replace("`directory` ", "it ").rstrip(".")
            raise ValueError(f"routing config `bank` ({str(path)!r}): {err}. Point `bank` at a bank fitted "
                             "for this model (`bh-routing capture` + `bh-routing fit`).") from None

    def to_selector(self, bank: Any = None) -> Any:
        """The selector this config describes (the objects ``route()`` takes).

        Parameters
        ----------
        bank : NullBank, optional
            The bank to use; default: :meth:`load_bank` when the selector needs one.
        """
        from bh_helpers.selection.selectors import BHSelector, TopKSelector, TopPSelector

        if bank is None and self.needs_bank:
            bank = self.load_bank()
        if self.selector in FDR_METHODS:
            return BHSelector(bank, method=self.selector, alpha=self.alpha, min_k=self.min_k, max_k=self.max_k,
                              weights=self.weights)
        bank = bank if self.weights == "inverse_p" else None  # static rules read p-values only for weights
        if self.selector == "topk":
            return TopKSelector(self.k, weights=self.weights, null_bank=bank)
        if self.selector == "static":
            from bh_helpers.selection.static import StaticLayerSelector

            return StaticLayerSelector(list(self.ks), weights=self.weights, null_bank=bank)
        return TopPSelector(self.p, min_k=self.min_k, max_k=self.max_k, weights=self.weights, null_bank=bank)


def bank_sha256_of(folder: str | Path) -> str:
    """The ``bank_sha256`` of the bank in ``folder`` (of its ``metadata.json``, computed, not read): what a
    routing config's ``bank_sha256`` pins."""
    from bh_helpers.nulls.metadata import METADATA_NAME, bank_digest

    return bank_digest(json.loads((Path(folder) / METADATA_NAME).read_text(encoding="utf-8")))
