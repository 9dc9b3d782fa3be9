"""Where things live: model names as folder names, null-bank folders, output folders.

One :func:`model_slug` for every folder named after a model (``kde_models/<slug>/``,
``outputs/<slug>/``), so the demo, the CLI and the notebooks find the same banks.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from bh_helpers.models.loading import OLMOE_HUB_ID, hub_reachable, model_key

__all__ = [
    "KDE_MODELS_ENV",
    "default_null_bank_dir",
    "model_key",
    "model_slug",
    "output_dir",
    "resolve_model_key",
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
