"""A bank of nulls, one per MoE layer: :class:`NullBank`, its metadata and its safe on-disk format.

``NullBank.save`` writes ``nulls.npz`` (arrays only) and ``metadata.json`` (kernel, model id and
shape, router fingerprint, sha256 of every array); ``NullBank.load`` checks all of it before a
bank can route a model.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator, Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from bh_helpers._clock import utc_timestamp
from bh_helpers._validate import is_int
from bh_helpers.models.families import moe_shape
from bh_helpers.nulls.kernels import _LEGACY_KERNEL
from bh_helpers.nulls.legacy import LEGACY_PATTERN, _null_from_legacy, _read_legacy_pickle
from bh_helpers.nulls.model import NullModel
from bh_helpers.nulls.statistics import apply_statistic, check_statistic, check_trim

__all__ = ["SCHEMA_VERSION", "NullBankMetadata", "NullBank", "METADATA_NAME", "NPZ_NAME"]

# Version of the on-disk layout written by NullBank.save; bump on any incompatible change.
SCHEMA_VERSION = 2  # 2: per-token statistic and trim (banks with the defaults are still written as 1)

NPZ_NAME = "nulls.npz"
METADATA_NAME = "metadata.json"


# ---------------------------------------------------------------------------------------------
# NullBank
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class NullBankMetadata:
    """Provenance of a :class:`NullBank`, written to ``metadata.json``.

    Attributes
    ----------
    model_id : str or None
        Model the logits were captured from (hub id or path).
    num_layers : int
        Number of MoE layers of that model (the bank may cover a subset).
    num_experts : int or None
        Experts per layer (None only for legacy banks read without ``num_experts``).
    layers : list of int
        Layers that have a null.
    kernel : str
    bandwidth : str or float
        The bandwidth argument (rule name or number); per-layer values are in each null's
        ``bandwidth_``.
    per_expert : bool
    n_samples : dict of int to int
        Calibration logits per fitted distribution, per layer.
    calibration : str
        Free-text description of the calibration text.
    library_version : str
        ``bh_helpers.__version__`` that fitted the bank.
    created : str
        ISO 8601 UTC timestamp.
    schema_version : int
        On-disk layout version (:data:`SCHEMA_VERSION`).
    router_fingerprint : dict of int to list of float, optional
        :func:`bh_helpers.models.families.router_fingerprint` of the model the logits came from;
        :func:`bh_helpers.routing.patch.route` refuses the bank on a model whose routers differ.
        None for banks fitted without the model at hand (no check then).
    statistic : {"raw", "centred", "zscore"}
        Per-token statistic the nulls were fitted on (:mod:`bh_helpers.nulls.statistics`);
        :meth:`NullBank.pvalues` and every selector compute it from the logits.
    trim : int
        Largest values per token left out of the fit.
    """

    model_id: str | None
    num_layers: int
    num_experts: int | None
    layers: list[int]
    kernel: str
    bandwidth: str | float
    per_expert: bool
    n_samples: dict[int, int]
    calibration: str
    library_version: str
    created: str
    schema_version: int = SCHEMA_VERSION
    router_fingerprint: dict[int, list[float]] | None = None
    statistic: str = "raw"
    trim: int = 0


def schema_version_for(statistic: str, trim: int) -> int:
    """The oldest schema that holds a bank: 1 unless it has a statistic or trim (older readers load 1)."""
    return 1 if statistic == "raw" and trim == 0 else SCHEMA_VERSION


def _library_version() -> str:
    from bh_helpers import __version__

    return __version__


def _config_counts(model_or_config: Any) -> tuple[int, int]:
    try:
        shape = moe_shape(model_or_config)
    except ValueError as err:
        raise ValueError(f"`model_or_config` must be a MoE model or config: {err}") from None
    return shape.num_layers, shape.num_experts


class NullBank(Mapping[int, NullModel]):
    """One :class:`NullModel` per MoE layer, with provenance; a read-only mapping ``layer -> null``.

    Build it with :func:`fit_null_bank`, :meth:`load` or :meth:`from_legacy_pickles`.

    Parameters
    ----------
    nulls : mapping of int to NullModel
    metadata : NullBankMetadata

    Examples
    --------
    >>> import torch
    >>> g = torch.Generator().manual_seed(0)
    >>> bank = fit_null_bank({0: torch.randn(1000, 8, generator=g), 1: torch.randn(1000, 8, generator=g)})
    >>> bank.pvalues(torch.randn(3, 8, generator=g), layer=1).shape
    torch.Size([3, 8])
    """

    def __init__(self, nulls: Mapping[int, NullModel], metadata: NullBankMetadata) -> None:
        if not nulls:
            raise ValueError("`nulls` is empty: a NullBank needs at least one layer")
        for layer, null in nulls.items():
            if not isinstance(null, NullModel):
                raise ValueError(f"`nulls[{layer}]` must be a NullModel, got {type(null).__name__}")
            if (null.statistic, null.trim) != (metadata.statistic, metadata.trim):
                raise ValueError(
                    f"`nulls[{layer}]` was fitted on statistic={null.statistic!r}, trim={null.trim}, but the "
                    f"metadata says statistic={metadata.statistic!r}, trim={metadata.trim}; fit them together "
                    "with fit_null_bank."
                )
        self._nulls = {int(k): nulls[k] for k in sorted(nulls)}
        self.metadata = metadata

    # Mapping protocol
    def __getitem__(self, layer: int) -> NullModel:
        try:
            return self._nulls[layer]
        except KeyError:
            raise KeyError(f"no null for layer {layer}; this bank has layers {list(self._nulls)}") from None

    def __iter__(self) -> Iterator[int]:
        return iter(self._nulls)

    def __len__(self) -> int:
        return len(self._nulls)

    def __repr__(self) -> str:
        m = self.metadata
        return (
            f"NullBank(model_id={m.model_id!r}, layers={len(self)}/{m.num_layers}, "
            f"num_experts={m.num_experts}, kernel={m.kernel!r}, per_expert={m.per_expert})"
        )

    @property
    def num_layers(self) -> int:
        return self.metadata.num_layers

    @property
    def num_experts(self) -> int | None:
        return self.metadata.num_experts

    @property
    def statistic(self) -> str:
        """The per-token statistic of this bank (``metadata.statistic``)."""
        return self.metadata.statistic

    def pvalues(self, logits: Any, layer: int) -> torch.Tensor:
        """P-values of router logits of one layer: the null's sf of the bank's statistic, float32.

        ``self[layer].sf(apply_statistic(logits, self.statistic))``: the raw logits for a
        ``"raw"`` bank, each token's centred or standardised logits otherwise.

        Parameters
        ----------
        logits : Tensor of shape (..., E)
        layer : int

        Returns
        -------
        Tensor, float32, same shape and device as ``logits``.
        """
        null = self[layer]
        shape = getattr(logits, "shape", None)
        if self.num_experts is not None and (not shape or shape[-1] != self.num_experts):
            raise ValueError(
                f"`logits` must have {self.num_experts} experts in the last dimension, got shape "
                f"{tuple(shape) if shape is not None else None}"
            )
        values = apply_statistic(torch.as_tensor(logits), self.statistic)  # (..., E)
        return null.sf(values, dtype=torch.float32)

    def check_compatible(self, model_or_config: Any, *, what: str = "`model_or_config`") -> NullBank:
        """Raise ValueError unless layer and expert counts match the model; return self.

        Parameters
        ----------
        model_or_config : transformers model or config
            A MoE config or model, read by :func:`bh_helpers.models.families.moe_shape`.
        what : str
            How the message names the model.
        """
        layers, experts = _config_counts(model_or_config)
        self._check_counts(num_layers=layers, num_experts=experts, what=what)
        return self

    def _check_counts(self, *, num_layers: int | None, num_experts: int | None, what: str) -> None:
        if num_layers is not None and (self.num_layers != num_layers or max(self) >= num_layers):
            raise ValueError(
                f"null bank was fitted for a model with {self.num_layers} layers (layers "
                f"{list(self)}), but {what} has {num_layers}: fit a bank for this model"
            )
        if num_experts is not None and self.num_experts is not None and self.num_experts != num_experts:
            raise ValueError(
                f"null bank was fitted for {self.num_experts} experts per layer, but {what} has "
                f"{num_experts}: fit a bank for this model"
            )

    # -- persistence ------------------------------------------------------------------------

    def save(self, directory: str | Path) -> Path:
        """Write ``nulls.npz`` (float64 grids) and ``metadata.json`` into ``directory``.

        No pickle is involved: :meth:`load` reads the arrays with ``allow_pickle=False``.
        Returns the directory.
        """
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        arrays: dict[str, np.ndarray] = {}
        for layer, null in self._nulls.items():
            arrays.update({f"layer_{layer}.{name}": value for name, value in null.to_arrays().items()})
        meta = asdict(self.metadata)
        meta["n_samples"] = {str(k): v for k, v in meta["n_samples"].items()}
        if meta["router_fingerprint"] is not None:
            meta["router_fingerprint"] = {str(k): v for k, v in meta["router_fingerprint"].items()}
        meta["format"] = "bh_helpers.NullBank"
        # A checksum per array: a shifted grid or two layers' arrays swapped still satisfy every
        # invariant and gave p-values off by 0.35-0.55 before; load() now refuses them.
        meta["array_sha256"] = {name: _array_digest(value) for name, value in sorted(arrays.items())}
        # Write to temporary names first so an interrupted save never leaves a half-written bank.
        tmp_npz, tmp_json = directory / (NPZ_NAME + ".tmp"), directory / (METADATA_NAME + ".tmp")
        with open(tmp_npz, "wb") as fh:
            np.savez_compressed(fh, **arrays)
        tmp_json.write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")
        tmp_npz.replace(directory / NPZ_NAME)
        tmp_json.replace(directory / METADATA_NAME)
        return directory

    @classmethod
    def load(
        cls,
        directory: str | Path,
        *,
        num_layers: int | None = None,
        num_experts: int | None = None,
    ) -> NullBank:
        """Read a bank written by :meth:`save`, checking schema version and model shape.

        Parameters
        ----------
        directory : str or Path
            Folder with ``nulls.npz`` and ``metadata.json``.
        num_layers, num_experts : int, optional
            Layer and expert counts of the model the bank will be used with; a mismatch raises.
            (Or call :meth:`check_compatible` with the model.)

        Raises
        ------
        ValueError
            Missing, corrupt or truncated files, a schema newer than this library's, or a layer /
            expert count that does not match.
        """
        directory = Path(directory)
        meta_path, npz_path = directory / METADATA_NAME, directory / NPZ_NAME
        if not meta_path.is_file() or not npz_path.is_file():
            raise ValueError(
                f"`directory` {str(directory)!r} must contain {METADATA_NAME} and {NPZ_NAME} "
                "(written by NullBank.save)"
            )
        metadata = _read_metadata(meta_path)
        try:
            with np.load(npz_path, allow_pickle=False) as npz:
                arrays = {key: npz[key] for key in npz.files}  # read everything now: errors surface here
        # Damaged archives surface as many exception types (BadZipFile, zlib.error, EOFError, and
        # even tokenize errors from a garbled array header): any failure here means a bad file.
        except Exception as err:  # noqa: BLE001
            raise ValueError(
                f"`{npz_path}` is corrupt or truncated ({type(err).__name__}: {err}); "
                "save or fit the bank again"
            ) from err
        _check_digests(arrays, _read_digests(meta_path), npz_path)
        nulls = {}
        for layer in metadata.layers:
            prefix = f"layer_{layer}."
            try:
                nulls[layer] = NullModel.from_arrays(
                    {name[len(prefix):]: value for name, value in arrays.items() if name.startswith(prefix)},
                    kernel=metadata.kernel, statistic=metadata.statistic, trim=metadata.trim,
                )
            except (KeyError, IndexError, ValueError) as err:
                raise ValueError(
                    f"`{npz_path}` does not hold a valid null for layer {layer} ({err}); "
                    "save or fit the bank again"
                ) from err
        bank = cls(nulls, metadata)
        bank._check_counts(
            num_layers=num_layers, num_experts=num_experts, what="the model (`num_layers`/`num_experts`)"
        )
        return bank

    @classmethod
    def from_legacy_pickles(
        cls,
        directory: str | Path,
        *,
        trust: bool = False,
        model_id: str | None = None,
        num_layers: int | None = None,
        num_experts: int | None = None,
    ) -> NullBank:
        """Read nulls of the earlier research code (``distribution_model_layer_{i}.pkl``).

        Each file holds ``{'x': float64[G], 'cdf': float64[G]}``. Unpickling can run arbitrary
        code, so this refuses unless ``trust=True``; even then a restricted unpickler admits only
        what numpy arrays and plain containers need and raises ``pickle.UnpicklingError`` for
        any other global (``os.system``, ``builtins.eval``, ...). Save the result with
        :meth:`save` and use that from then on.

        Parameters
        ----------
        directory : str or Path
        trust : bool, default=False
            Set to True only for files from a source you trust.
        model_id : str, optional
        num_layers : int, optional
            Layers of the model; default: highest layer index + 1.
        num_experts : int, optional
            Experts per layer (the old format does not record it).

        Notes
        -----
        The legacy grids store only the CDF, so ``sf = 1 - cdf`` there carries the old format's
        absolute (not relative) precision in the upper tail; grid points with ``cdf`` exactly 0
        or 1 are dropped and replaced by exponential tails fitted to the last decade of the grid.
        """
        if trust is not True:
            raise ValueError(
                "refusing to unpickle legacy null files: pickle can execute code. If these files "
                "come from a source you trust, pass `trust=True` (a restricted unpickler is used even then)"
            )
        directory = Path(directory)
        files = {}
        for path in directory.glob("distribution_model_layer_*.pkl"):
            match = LEGACY_PATTERN.match(path.name)
            if match:
                files[int(match.group(1))] = path
        if not files:
            raise ValueError(
                f"`directory` {str(directory)!r} has no distribution_model_layer_{{i}}.pkl files"
            )
        nulls = {
            layer: _null_from_legacy(*_read_legacy_pickle(path), path)
            for layer, path in sorted(files.items())
        }
        metadata = NullBankMetadata(
            model_id=model_id,
            num_layers=num_layers if num_layers is not None else max(nulls) + 1,
            num_experts=num_experts,
            layers=sorted(nulls),
            kernel=_LEGACY_KERNEL,
            bandwidth="legacy",
            per_expert=False,
            n_samples={layer: 0 for layer in nulls},
            calibration=f"converted from legacy pickles in {directory.name}",
            library_version=_library_version(),
            created=utc_timestamp(),
        )
        bank = cls(nulls, metadata)
        bank._check_counts(num_layers=num_layers, num_experts=None, what="`num_layers`")
        return bank


def _array_digest(value: np.ndarray) -> str:
    """sha256 of an array's dtype, shape and bytes."""
    value = np.ascontiguousarray(value)
    return hashlib.sha256(f"{value.dtype.str}{value.shape}".encode() + value.tobytes()).hexdigest()


def _read_digests(meta_path: Path) -> dict[str, str] | None:
    """The ``array_sha256`` map of ``metadata.json`` (None for banks saved before it existed)."""
    digests = json.loads(meta_path.read_text()).get("array_sha256")
    return digests if isinstance(digests, dict) else None


def _check_digests(arrays: Mapping[str, np.ndarray], digests: Mapping[str, str] | None, npz_path: Path) -> None:
    if digests is None:
        return
    missing, extra = sorted(set(digests) - set(arrays)), sorted(set(arrays) - set(digests))
    if missing or extra:

        def by_layer(names: list[str]) -> str:
            layers: dict[str, list[str]] = {}
            for name in names:
                head, _, field = name.partition(".")
                layers.setdefault(head.replace("layer_", "layer "), []).append(field)
            return "; ".join(f"{layer} ({', '.join(fields)})" for layer, fields in layers.items()) or "none"

        raise ValueError(f"`{npz_path}` does not hold the arrays its metadata lists (missing: {by_layer(missing)}; "
                         f"unexpected: {by_layer(extra)}); save or fit the bank again")
    changed = sorted(name for name, value in arrays.items() if _array_digest(value) != digests[name])
    if changed:
        raise ValueError(
            f"`{npz_path}` was changed after it was saved (checksum mismatch: {', '.join(changed[:6])}"
            f"{' ...' if len(changed) > 6 else ''}); save or fit the bank again"
        )


def _parse_fingerprint(raw: Any) -> dict[int, list[float]] | None:
    if raw is None:
        return None
    if not isinstance(raw, dict):
        raise ValueError(f"`router_fingerprint` must be a mapping of layer to numbers, got {type(raw).__name__}")
    return {int(layer): [float(v) for v in values] for layer, values in raw.items()}


def _read_metadata(path: Path) -> NullBankMetadata:
    try:
        raw = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ValueError(f"`{path}` is corrupt or truncated ({err}); save or fit the bank again") from err
    if not isinstance(raw, dict):
        raise ValueError(f"`{path}` must hold a JSON object, got {type(raw).__name__}")
    version = raw.get("schema_version")
    if not is_int(version) or version < 1:
        raise ValueError(f"`{path}` has an invalid `schema_version` {version!r}; save or fit the bank again")
    if version > SCHEMA_VERSION:
        raise ValueError(
            f"`{path}` has `schema_version` {version}, newer than this bh_helpers "
            f"({_library_version()}, schema {SCHEMA_VERSION}): upgrade bh_helpers to load it"
        )
    try:
        meta = NullBankMetadata(
            model_id=raw["model_id"],
            num_layers=int(raw["num_layers"]),
            num_experts=None if raw["num_experts"] is None else int(raw["num_experts"]),
            layers=[int(v) for v in raw["layers"]],
            kernel=str(raw["kernel"]),
            bandwidth=raw["bandwidth"],
            per_expert=bool(raw["per_expert"]),
            n_samples={int(k): int(v) for k, v in raw["n_samples"].items()},
            calibration=str(raw["calibration"]),
            library_version=str(raw["library_version"]),
            created=str(raw["created"]),
            router_fingerprint=_parse_fingerprint(raw.get("router_fingerprint")),
            schema_version=version,
            statistic=check_statistic(raw.get("statistic", "raw")),
            trim=check_trim(raw.get("trim", 0)),
        )
    except (KeyError, TypeError, ValueError, AttributeError) as err:
        raise ValueError(
            f"`{path}` is missing or has a malformed field ({err!r}); save or fit the bank again"
        ) from err
    if not meta.layers:
        raise ValueError(f"`{path}` lists no layers")
    return meta
