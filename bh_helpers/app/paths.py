"""Where things live: model names as folder names, null-bank folders, output folders.

One :func:`model_slug` for every folder named after a model (``kde_models/<slug>/``,
``outputs/<slug>/``), so the demo, the CLI and the notebooks find the same banks. The committed banks
ship inside the package (:data:`PACKAGED_KDE_MODELS`, ``bh_helpers/data/kde_models/``), so an installed
package finds them from any working directory.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from bh_helpers.models.loading import OLMOE_HUB_ID, hub_reachable, model_key

__all__ = [
    "KDE_MODELS_ENV",
    "PACKAGED_KDE_MODELS",
    "default_null_bank_dir",
    "model_key",
    "model_slug",
    "output_dir",
    "resolve_model_key",
]

KDE_MODELS_ENV = "BH_ROUTING_KDE_MODELS"
#: The committed null banks, one folder per model slug, installed with the package (package data).
PACKAGED_KDE_MODELS = Path(__file__).resolve().parents[1] / "data" / "kde_models"


def model_slug(model_name: str) -> str:
    """Folder name of a model's null bank: ``"tiny"`` -> ``"tiny-olmoe"``, ``"org/name"`` -> ``"org--name"``."""
    name = os.fspath(model_name)
    if name == "tiny":
        return "tiny-olmoe"
    if os.path.isdir(name):
        name = Path(name).resolve().name
    return name.replace("/", "--")


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

    Looks for ``<kde_models>/<model_slug(model_name)>/metadata.json`` with ``<kde_models>`` in
    this order: the ``BH_ROUTING_KDE_MODELS`` environment variable (a ``kde_models`` folder
    itself), ``./kde_models`` in the current directory, the banks installed with the package
    (:data:`PACKAGED_KDE_MODELS`).

    Parameters
    ----------
    model_name : str, default "tiny"
        ``"tiny"``, a hub id or a local model path.
    must_exist : bool, default True
        Raise when no bank is found; with False return a place to save one: the environment
        variable's folder when set, else the package's own (where notebook 02 updates the committed bank).

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
    roots += [Path.cwd() / "kde_models", PACKAGED_KDE_MODELS]
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
