"""A bank of nulls, one per MoE layer: :class:`NullBank`, its metadata and its safe on-disk format.

``NullBank.save`` writes ``nulls.npz`` (arrays only) and ``metadata.json`` (kernel, model id and
shape, router fingerprint, sha256 of every array, and one sha256 of all of that); ``NullBank.load``
checks all of it before a bank can route a model, and refuses a bank without those checksums
unless ``allow_unverified=True`` (the metadata and the file checks: :mod:`bh_helpers.nulls.metadata`).
:func:`load_bank_folder` reads one bank folder or a folder of them, named by :func:`bank_name`.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

from bh_helpers._clock import utc_timestamp
from bh_helpers.models.families import moe_shape
from bh_helpers.nulls.kernels import _LEGACY_KERNEL
from bh_helpers.nulls.legacy import _null_from_legacy, _read_legacy_pickle, legacy_layer_files
from bh_helpers.nulls.model import NullModel
from bh_helpers.nulls.metadata import (
    METADATA_NAME,
    NPZ_NAME,
    SCHEMA_VERSION,
    NullBankMetadata,
    check_digests,
    library_version,
    metadata_to_json,
    read_digests,
    read_metadata,
)
from bh_helpers.nulls.statistics import apply_statistic

__all__ = ["SCHEMA_VERSION", "NullBankMetadata", "NullBank", "METADATA_NAME", "NPZ_NAME", "bank_name", "load_bank_folder"]

# ---------------------------------------------------------------------------------------------
# NullBank
# ---------------------------------------------------------------------------------------------


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

    def check_compatible(self, model_or_config: Any, *, what: str = "the model") -> NullBank:
        """Raise ValueError unless layer and expert counts match the model; return self.

        Parameters
        ----------
        model_or_config : transformers model or config
            A MoE config or model, read by :func:`bh_helpers.models.families.moe_shape`.
        what : str
            How the message names the model.
        """
        layers, experts = _config_counts(model_or_config)
        self.check_counts(num_layers=layers, num_experts=experts, what=what)
        return self

    def check_counts(self, *, num_layers: int | None, num_experts: int | None, what: str) -> None:
        """Raise ValueError unless the bank covers ``num_layers`` layers of ``num_experts`` experts
        (None skips that count); ``what`` names the model in the message."""
        if num_layers is not None and (self.num_layers != num_layers or max(self) >= num_layers):
            raise ValueError(
                f"the null bank (`null_bank`) was fitted for a model with {self.num_layers} layers (layers "
                f"{list(self)}), but {what} has {num_layers}: fit a bank for this model"
            )
        if num_experts is not None and self.num_experts is not None and self.num_experts != num_experts:
            raise ValueError(
                f"the null bank (`null_bank`) was fitted for {self.num_experts} experts per layer, but {what} has "
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
        meta = metadata_to_json(self.metadata, arrays)
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
        allow_unverified: bool = False,
    ) -> NullBank:
        """Read a bank written by :meth:`save`, checking its checksums, schema version and model shape.

        Parameters
        ----------
        directory : str or Path
            Folder with ``nulls.npz`` and ``metadata.json``.
        num_layers, num_experts : int, optional
            Layer and expert counts of the model the bank will be used with; a mismatch raises.
            (Or call :meth:`check_compatible` with the model.)
        allow_unverified : bool, default False
            Load a bank whose ``metadata.json`` has no checksum (saved by an older bh_helpers) or
            was edited after it was saved, with a warning. Only for banks you trust; save it again
            (``NullBank.load(d, allow_unverified=True).save(d)``) to add the checksum.

        Raises
        ------
        ValueError
            Missing, corrupt or truncated files, a ``metadata.json`` without its checksum or edited
            after it was saved (unless ``allow_unverified``), arrays changed after they were saved,
            a schema newer than this library's, or a layer / expert count that does not match.
        """
        directory = Path(directory)
        meta_path, npz_path = directory / METADATA_NAME, directory / NPZ_NAME
        if not meta_path.is_file() or not npz_path.is_file():
            # a demo's nulls/ folder holds one bank per kernel: name them rather than the missing files
            banks = sorted(p.parent.name for p in directory.glob(f"*/{METADATA_NAME}") if (p.parent / NPZ_NAME).is_file()) \
                if directory.is_dir() else []
            hint = (f"; it holds the banks {', '.join(banks)}: pass one of them, e.g. "
                    f"{str(directory / banks[0])!r}" if banks else " (written by `bh-routing fit` or NullBank.save)")
            raise ValueError(f"`directory` {str(directory)!r} is not a null bank: it lacks {METADATA_NAME} and "
                             f"{NPZ_NAME}{hint}.")
        metadata = read_metadata(meta_path, allow_unverified=allow_unverified)
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
        check_digests(arrays, read_digests(meta_path), npz_path)
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
        bank.check_counts(
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
        files = legacy_layer_files(directory)  # two files for one layer: refused, naming both
        if not files:
            raise ValueError(
                f"`directory` {str(directory)!r} has no distribution_model_layer_{{i}}.pkl files"
            )
        beyond = {layer: path for layer, path in files.items() if num_layers is not None and layer >= num_layers}
        if beyond:  # a file of a deeper model: say which, before a generic layer-count mismatch hides it
            layer, path = min(beyond.items())
            raise ValueError(f"`num_layers` is {num_layers} (layers 0..{num_layers - 1}), but {str(directory)!r} has a "
                             f"null file for layer {layer} ({path.name}): pass the model's own layer count, or move "
                             "that file aside if it belongs to another model.")
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
            library_version=library_version(),
            created=utc_timestamp(),
        )
        bank = cls(nulls, metadata)
        bank.check_counts(num_layers=num_layers, num_experts=None, what="`num_layers`")
        return bank


# ---------------------------------------------------------------------------------------------
# Bank folders
# ---------------------------------------------------------------------------------------------


def bank_name(kernel: str, statistic: str = "raw", trim: int = 0) -> str:
    """The name of a null bank in a sweep: ``"gaussian"``, ``"gaussian/zscore"``, ``"gaussian/centred/trim8"``."""
    return kernel + ("" if statistic == "raw" else f"/{statistic}") + (f"/trim{trim}" if trim else "")


def load_bank_folder(path: str | Path, *, allow_unverified: bool = False) -> NullBank | dict[str, NullBank]:
    """The bank in ``path``, or every bank in its sub-folders keyed by :func:`bank_name`.

    Parameters
    ----------
    path : str or Path
        A bank folder (holds ``metadata.json``, written by :meth:`NullBank.save`), or a folder of
        bank folders (the demo's ``nulls/``: one per statistic and trim).
    allow_unverified : bool, default False
        Load banks without (or failing) their metadata checksum, with a warning (:meth:`NullBank.load`).

    Returns
    -------
    NullBank or dict of str to NullBank
        The bank of a bank folder; for a folder of banks, ``{bank_name(kernel, statistic, trim):
        bank}`` over its sub-folders that hold one, in sub-folder name order.

    Raises
    ------
    ValueError
        When ``path`` is neither, or a bank in it does not load (see :meth:`NullBank.load`).
    """
    root = Path(path)
    if (root / METADATA_NAME).is_file():
        return NullBank.load(root, allow_unverified=allow_unverified)
    subs = sorted(p for p in root.glob("*") if (p / METADATA_NAME).is_file()) if root.is_dir() else []
    if not subs:
        raise ValueError(f"`path` {str(path)!r} holds no null bank ({METADATA_NAME}) nor folders of banks; pass a "
                         "folder written by `bh-routing fit`, or the nulls/ folder of a demo.")
    banks = {}
    for sub in subs:
        bank = NullBank.load(sub, allow_unverified=allow_unverified)
        meta = bank.metadata
        banks[bank_name(meta.kernel, meta.statistic, meta.trim)] = bank
    return banks
