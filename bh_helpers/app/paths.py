"""Where things live: model names as folder names, null-bank folders, output folders, sweep identity.

One :func:`model_slug` for every folder named after a model (``kde_models/<slug>/``,
``outputs/<slug>/``), so the demo, the CLI and the notebooks find the same banks.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from bh_helpers.models.loading import EMBEDDED_MODEL_DIR, OLMOE_HUB_ID, hub_reachable

__all__ = [
    "KDE_MODELS_ENV",
    "default_null_bank_dir",
    "model_key",
    "model_slug",
    "output_dir",
    "resolve_model_key",
    "sweep_grid_id",
    "sweep_results_path",
]

KDE_MODELS_ENV = "BH_ROUTING_KDE_MODELS"
_REPO_ROOT = Path(__file__).resolve().parents[2]  # the checkout (kde_models/ beside bh_helpers/)


def model_slug(model_name: str) -> str:
    """Folder name of a model's null bank: ``"tiny"`` -> ``"tiny-olmoe"``, ``"org/name"`` -> ``"org--name"``."""
    name = os.fspath(model_name)
    if name == "tiny":
        return "tiny-olmoe"
    if os.path.isdir(name):
        name = Path(name).resolve().name
    return name.replace("/", "--")


def model_key(model: torch.nn.Module) -> str:
    """``"tiny"`` for the embedded model, else the hub id or path it was loaded from."""
    path = str(getattr(model, "name_or_path", "") or getattr(model.config, "_name_or_path", ""))
    try:
        if path and Path(path).resolve() == EMBEDDED_MODEL_DIR.resolve():
            return "tiny"
    except OSError:
        pass
    return path or "unknown"


def resolve_model_key(name: str) -> str:
    """The model ``load_model(name)`` will load, without loading it: ``"auto"`` becomes the hub
    OLMoE when a CUDA GPU is present and the hub answers, else ``"tiny"``."""
    if name != "auto":
        return name
    if torch.cuda.is_available() and hub_reachable():
        return OLMOE_HUB_ID
    return "tiny"


def default_null_bank_dir(model_name: str = "tiny", *, must_exist: bool = True) -> Path:
    """The committed (or user-fitted) null bank folder of a model.

    Looks for ``<root>/kde_models/<model_slug(model_name)>/metadata.json`` with ``<root>`` in
    this order: the ``BH_ROUTING_KDE_MODELS`` environment variable (a ``kde_models`` folder
    itself), the current directory, the repository that holds this package.

    Parameters
    ----------
    model_name : str, default "tiny"
        ``"tiny"``, a hub id or a local model path.
    must_exist : bool, default True
        Raise when no bank is found; with False return the first candidate (a place to save one).

    Returns
    -------
    Path

    Raises
    ------
    FileNotFoundError
        ``must_exist`` and no candidate folder holds a bank.

    Examples
    --------
    >>> default_null_bank_dir("tiny").name  # doctest: +SKIP
    'tiny-olmoe'
    """
    slug = model_slug(model_name)
    roots = []
    if os.environ.get(KDE_MODELS_ENV):
        roots.append(Path(os.environ[KDE_MODELS_ENV]))
    roots += [Path.cwd() / "kde_models", _REPO_ROOT / "kde_models"]
    candidates = list(dict.fromkeys(r / slug for r in roots))
    for c in candidates:
        if (c / "metadata.json").is_file():
            return c
    if must_exist:
        raise FileNotFoundError(
            f"no null bank for {model_name!r} in {[str(c) for c in candidates]}; fit one with "
            f"`bh-routing capture` + `bh-routing fit --out kde_models/{slug}` (or set {KDE_MODELS_ENV})."
        )
    return candidates[-1] if not os.environ.get(KDE_MODELS_ENV) else candidates[0]


def output_dir(key: str, root: str | os.PathLike = "outputs") -> Path:
    """``<root>/<model slug>/`` (relative to the working directory, i.e. the notebook), created."""
    path = Path(root) / model_slug(key)
    path.mkdir(parents=True, exist_ok=True)
    return path


def _bank_identity(bank) -> dict | list:
    """What identifies a null bank (or, for a mapping of named banks, each of them) in a grid id."""
    from bh_helpers.nulls.bank import NullBank

    if not isinstance(bank, NullBank):  # a mapping {bank name: NullBank}
        return [[name, _bank_identity(b)] for name, b in sorted(bank.items())]
    meta = bank.metadata
    out = {"model_id": meta.model_id, "kernel": meta.kernel, "created": meta.created,
           "n_samples": {str(k): v for k, v in meta.n_samples.items()}}
    if meta.statistic != "raw" or meta.trim:  # raw banks keep the identity they had before statistics
        out.update(statistic=meta.statistic, trim=meta.trim)
    return out


def sweep_grid_id(*, model_id: str, null_bank, datasets: Sequence[str], max_tokens: int, window: int,
                  stride: int, weights: str) -> str:
    """The ``grid_id`` of a sweep: everything besides the configurations that changes its numbers."""
    return json.dumps({"model": model_id, "nulls": _bank_identity(null_bank), "datasets": list(datasets),
                       "max_tokens": int(max_tokens), "window": int(window), "stride": int(stride),
                       "weights": weights}, sort_keys=True, separators=(",", ":"))


def sweep_results_path(out: str | os.PathLike, bank: Any, configs: Sequence[Any], **settings: Any) -> Path:
    """A results file named after everything that defines a sweep (null bank, configurations,
    evaluation settings), so changing any of them starts a new file instead of colliding with
    the old grid (``run_sweep`` refuses another grid's file); rerunning the same sweep resumes."""

    meta = bank.metadata
    ident = json.dumps(
        [meta.model_id, meta.kernel, meta.created, sorted(meta.n_samples.items()),
         [c.key() for c in configs], sorted(settings.items())],
        default=str,
    )
    digest = hashlib.sha256(ident.encode()).hexdigest()[:10]
    return Path(out) / f"sweep_{meta.kernel}_{digest}.jsonl"
