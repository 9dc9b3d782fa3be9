"""A null bank's metadata and the checks of its on-disk files (``metadata.json`` beside ``nulls.npz``).

:class:`NullBankMetadata` is the provenance of a bank; :func:`metadata_to_json` and
:func:`read_metadata` write and read it. Two checksums guard what decides a p-value:

- ``array_sha256``: a sha256 of every stored array (grids, sf/cdf/pdf, tails, bandwidths, per
  layer), which :func:`check_digests` compares with ``nulls.npz`` on load;
- ``bank_sha256`` (:data:`BANK_DIGEST`): ONE sha256 of every other field of ``metadata.json``
  (statistic, trim, kernel, bandwidth, per-expert flag, layers, counts, router fingerprint, the
  format tags) and of ``array_sha256`` itself, so it covers the whole transform logit -> p-value.
  Any edit to the file (a field changed or deleted, ``array_sha256`` removed) fails it, and
  :func:`read_metadata` refuses the bank.

A bank without ``bank_sha256`` (saved before it existed, or with it deleted) or whose fields no longer
match it is refused unless the caller opts in with ``allow_unverified=True`` (then it loads with a
warning, and the array checksums are still compared where present). The way forward for an older
bank one trusts: ``NullBank.load(folder, allow_unverified=True).save(folder)`` writes both checksums.
:mod:`bh_helpers.nulls.bank` holds the bank itself.
"""

from __future__ import annotations

import hashlib
import json
import warnings
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from bh_helpers._validate import is_int
from bh_helpers.nulls.statistics import check_statistic, check_trim

__all__ = [
    "BANK_DIGEST",
    "METADATA_NAME",
    "NPZ_NAME",
    "SCHEMA_VERSION",
    "NullBankMetadata",
    "array_digest",
    "bank_digest",
    "check_digests",
    "library_version",
    "metadata_to_json",
    "parse_fingerprint",
    "read_digests",
    "read_metadata",
    "schema_version_for",
    "seal",
]

# Version of the on-disk layout written by NullBank.save; bump on any incompatible change.
SCHEMA_VERSION = 2  # 2: per-token statistic and trim (banks with the defaults are still written as 1)

NPZ_NAME = "nulls.npz"
METADATA_NAME = "metadata.json"
#: The key of ``metadata.json`` that holds :func:`bank_digest` of the rest of the file.
BANK_DIGEST = "bank_sha256"


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
    capture_sha256 : str, optional
        The checksum of the capture file the bank was fitted on (:func:`~bh_helpers.nulls.fit.fit_captured`
        of a file), so that a folder whose capture was replaced after the fit is told apart.
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
    capture_sha256: str | None = None


def schema_version_for(statistic: str, trim: int) -> int:
    """The oldest schema that holds a bank: 1 unless it has a statistic or trim (older readers load 1)."""
    return 1 if statistic == "raw" and trim == 0 else SCHEMA_VERSION


def library_version() -> str:
    from bh_helpers import __version__

    return __version__


def metadata_to_json(metadata: NullBankMetadata, arrays: Mapping[str, np.ndarray]) -> dict[str, Any]:
    """The ``metadata.json`` object of a bank: its metadata, the format tag and a sha256 of each array.

    Parameters
    ----------
    metadata : NullBankMetadata
    arrays : mapping of str to ndarray
        Everything written to ``nulls.npz``, by name.
    """
    meta = asdict(metadata)
    meta["n_samples"] = {str(k): v for k, v in meta["n_samples"].items()}
    if meta["router_fingerprint"] is not None:
        meta["router_fingerprint"] = {str(k): v for k, v in meta["router_fingerprint"].items()}
    if meta["capture_sha256"] is None:  # a bank fitted in memory: written as before (byte for byte)
        del meta["capture_sha256"]
    meta["format"] = "bh_helpers.NullBank"
    # A checksum per array: a shifted grid or two layers' arrays swapped still satisfy every
    # invariant and gave p-values off by 0.35-0.55 before; load() now refuses them.
    meta["array_sha256"] = {name: array_digest(value) for name, value in sorted(arrays.items())}
    return seal(meta)


def bank_digest(meta: Mapping[str, Any]) -> str:
    """sha256 of a ``metadata.json`` object without its :data:`BANK_DIGEST` key (canonical JSON).

    Every field enters, so no field that changes a p-value can be left out by mistake (nor one
    added later); ``array_sha256`` enters too, so the arrays are covered through it.
    """
    body = {key: value for key, value in meta.items() if key != BANK_DIGEST}
    text = json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def seal(meta: Mapping[str, Any]) -> dict[str, Any]:
    """``meta`` with :data:`BANK_DIGEST` set to :func:`bank_digest` of the rest (what ``save`` writes)."""
    return {**meta, BANK_DIGEST: bank_digest(meta)}


def _verify(raw: Mapping[str, Any], path: Path, allow_unverified: bool) -> None:
    """Refuse ``metadata.json`` whose :data:`BANK_DIGEST` is missing or does not match, unless opted in."""
    stored = raw.get(BANK_DIGEST)
    if stored is None or not isinstance(stored, str):
        problem = (f"has no checksum of its fields (`{BANK_DIGEST}`: saved by an older bh_helpers, or the field was "
                   "deleted), so an edited statistic, trim, kernel, grid or layer could not be detected")
    elif stored != bank_digest(raw):
        problem = (f"was edited after it was saved (its fields no longer match its checksum `{BANK_DIGEST}`: a "
                   "changed or deleted statistic, trim, kernel, bandwidth, layer or array checksum moves p-values)")
    else:
        return
    if not allow_unverified:
        raise ValueError(f"`{path}` {problem}; fit or save the bank again, or, if you trust it, pass "
                         "`allow_unverified` to load it anyway and save it again to add the checksum")
    warnings.warn(f"`{path}` {problem}; loading it unverified as asked (`allow_unverified=True`; save it again to "
                  "add the checksum).", UserWarning, stacklevel=4)


def array_digest(value: np.ndarray) -> str:
    """sha256 of an array's dtype, shape and bytes."""
    value = np.ascontiguousarray(value)
    return hashlib.sha256(f"{value.dtype.str}{value.shape}".encode() + value.tobytes()).hexdigest()


def read_digests(meta_path: Path) -> dict[str, str] | None:
    """The ``array_sha256`` map of ``metadata.json`` (None for banks saved before it existed)."""
    digests = json.loads(meta_path.read_text()).get("array_sha256")
    return digests if isinstance(digests, dict) else None


def check_digests(arrays: Mapping[str, np.ndarray], digests: Mapping[str, str] | None, npz_path: Path) -> None:
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
    changed = sorted(name for name, value in arrays.items() if array_digest(value) != digests[name])
    if changed:
        raise ValueError(
            f"`{npz_path}` was changed after it was saved (checksum mismatch: {', '.join(changed[:6])}"
            f"{' ...' if len(changed) > 6 else ''}); save or fit the bank again"
        )


def parse_fingerprint(raw: Any) -> dict[int, list[float]] | None:
    if raw is None:
        return None
    if not isinstance(raw, dict):
        raise ValueError(f"`router_fingerprint` must be a mapping of layer to numbers, got {type(raw).__name__}")
    return {int(layer): [float(v) for v in values] for layer, values in raw.items()}


def read_metadata(path: Path, *, allow_unverified: bool = False) -> NullBankMetadata:
    """The :class:`NullBankMetadata` of ``metadata.json`` at ``path``, its checksum verified.

    Parameters
    ----------
    path : Path
    allow_unverified : bool, default False
        Load a file without :data:`BANK_DIGEST`, or whose fields do not match it, with a warning
        instead of a ``ValueError``.
    """
    if not isinstance(allow_unverified, bool):
        raise ValueError(f"`allow_unverified` must be True or False, got {allow_unverified!r}")
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
            f"({library_version()}, schema {SCHEMA_VERSION}): upgrade bh_helpers to load it"
        )
    _verify(raw, path, allow_unverified)
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
            router_fingerprint=parse_fingerprint(raw.get("router_fingerprint")),
            schema_version=version,
            statistic=check_statistic(raw.get("statistic", "raw")),
            trim=check_trim(raw.get("trim", 0)),
            capture_sha256=None if raw.get("capture_sha256") is None else str(raw["capture_sha256"]),
        )
    except (KeyError, TypeError, ValueError, AttributeError) as err:
        raise ValueError(
            f"`{path}` is missing or has a malformed field ({err!r}); save or fit the bank again"
        ) from err
    if not meta.layers:
        raise ValueError(f"`{path}` lists no layers")
    return meta
