"""Load a supported mixture-of-experts language model and its tokenizer.

``load_model("tiny")`` loads the embedded tiny OLMoE shipped in the package (no network at all);
``load_model("auto")`` picks allenai/OLMoE-1B-7B-0924 when a CUDA GPU is present and the Hugging
Face hub is reachable, and the embedded model otherwise; any other name is a hub id or a local
directory and goes through ``AutoModelForCausalLM.from_pretrained`` (the path Colab users hit).

Also the committed corpus slices the notebooks and tests use (``load_corpus_slice``), and what a loaded
model is: its key (``model_key``) and a one-row summary (``describe_model``).
"""

from __future__ import annotations

import importlib.resources
import json
import logging
import os
import socket
import warnings
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import torch

from bh_helpers._validate import check_choice
from bh_helpers._cuda import device_capability
from bh_helpers.models.families import SUPPORTED_MODEL_TYPES, find_moe_blocks, moe_shape

logger = logging.getLogger(__name__)

__all__ = [
    "EMBEDDED_CORPUS_DIR",
    "EMBEDDED_MODEL_DIR",
    "OLMOE_HUB_ID",
    "check_supported_moe",
    "default_dtype",
    "describe_model",
    "embedded_model_available",
    "embedded_model_dir",
    "hub_reachable",
    "load_corpus_slice",
    "load_model",
    "model_key",
    "resolve_device",
]

OLMOE_HUB_ID = "allenai/OLMoE-1B-7B-0924"
CORPUS_SLICES = ("calibration", "evaluation")
CORPUS_DOMAINS = ("prose", "code")
_HUB_TIMEOUT_S = 2.0
_WEIGHT_FILES = ("model.safetensors", "config.json")


def embedded_model_dir() -> Path:
    """Directory of the embedded tiny OLMoE inside the installed package.

    Returns
    -------
    pathlib.Path
        ``bh_helpers/data/tiny_olmoe`` (config, bf16 safetensors weights, tokenizer, model card).
    """
    return Path(str(importlib.resources.files("bh_helpers") / "data" / "tiny_olmoe"))


def _embedded_corpus_dir() -> Path:
    return Path(str(importlib.resources.files("bh_helpers") / "data" / "corpus"))


EMBEDDED_MODEL_DIR = embedded_model_dir()
EMBEDDED_CORPUS_DIR = _embedded_corpus_dir()


def embedded_model_available() -> bool:
    """Whether the embedded checkpoint (weights and config, not only the tokenizer) is present."""
    return all((EMBEDDED_MODEL_DIR / name).is_file() for name in _WEIGHT_FILES)


def load_corpus_slice(name: str, domain: str | None = None) -> list[dict]:
    """Load a committed corpus slice (held-out text for calibration or evaluation).

    Parameters
    ----------
    name : {"calibration", "evaluation"}
        ``"calibration"`` comes from the validation split of the tiny model's corpus,
        ``"evaluation"`` from its test split; neither overlaps the training split.
    domain : {"prose", "code"} or None
        Keep only one domain; None keeps both.

    Returns
    -------
    list of dict
        Records ``{"domain", "source", "text"}`` in file order.

    Examples
    --------
    >>> code = load_corpus_slice("evaluation", domain="code")
    >>> {r["domain"] for r in code}
    {'code'}
    """
    check_choice("name", name, CORPUS_SLICES)
    if domain is not None and domain not in CORPUS_DOMAINS:
        raise ValueError(f"`domain` must be one of {CORPUS_DOMAINS} or None, got {domain!r}.")
    path = EMBEDDED_CORPUS_DIR / f"{name}.jsonl"
    with path.open(encoding="utf-8") as f:
        records = [json.loads(line) for line in f if line.strip()]
    return [r for r in records if domain is None or r["domain"] == domain]


def default_dtype(device: str | torch.device, capability: tuple[int, int] | None = None) -> torch.dtype:
    """Default weight dtype for a device.

    Parameters
    ----------
    device : str or torch.device
        Target device.
    capability : tuple of int, optional
        CUDA compute capability ``(major, minor)``; queried from the device when None.

    Returns
    -------
    torch.dtype
        float16 on pre-Ampere GPUs (compute capability < 8, e.g. the Colab T4, which has no
        bf16 tensor cores), bfloat16 on Ampere and newer, float32 on CPU and other devices.

    Examples
    --------
    >>> default_dtype("cuda", capability=(7, 5))
    torch.float16
    >>> default_dtype("cpu")
    torch.float32
    """
    device = torch.device(device)
    if device.type != "cuda":
        return torch.float32
    if capability is None:
        capability = device_capability(device)
    return torch.float16 if capability[0] < 8 else torch.bfloat16


def hub_reachable(timeout: float = _HUB_TIMEOUT_S) -> bool:
    """Cheap check that the Hugging Face hub answers a TCP connection.

    ``HF_HUB_OFFLINE=1`` (or ``TRANSFORMERS_OFFLINE=1``) means not reachable, without any
    network access. The host is taken from ``HF_ENDPOINT`` when set.

    Parameters
    ----------
    timeout : float
        Seconds to wait for the connection.

    Returns
    -------
    bool
    """
    for var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
        if os.environ.get(var, "").strip().lower() in {"1", "true", "yes", "on"}:
            return False
    url = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co"))
    host = url.hostname or "huggingface.co"
    port = url.port or (80 if url.scheme == "http" else 443)
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def check_supported_moe(model: torch.nn.Module) -> list[str]:
    """Check that ``model`` is a supported mixture-of-experts model.

    Parameters
    ----------
    model : torch.nn.Module
        A loaded causal language model.

    Returns
    -------
    list of str
        Module names of the MoE blocks, in model order.

    Raises
    ------
    ValueError
        When no supported MoE block (router ``gate`` with a weight [num_experts, hidden] plus
        ``experts``) is found; the message lists the supported families.
    """
    try:
        return [block.name for block in find_moe_blocks(model)]
    except ValueError as err:
        raise _unsupported(f"{type(model).__name__}: {err}") from None


def _unsupported(what: str) -> ValueError:
    families = ", ".join(SUPPORTED_MODEL_TYPES.values())
    return ValueError(
        f"`name` must point to a supported mixture-of-experts model ({families}); {what}. "
        "Load one of the supported families, e.g. 'tiny' or 'allenai/OLMoE-1B-7B-0924'."
    )


def _resolve_name(name: str, device: torch.device) -> str:
    """Map "auto" to the hub OLMoE or the embedded model (with a one-line notice)."""
    if name != "auto":
        return name
    if device.type != "cuda":
        reason = "no CUDA device"
    elif not hub_reachable():
        reason = "the Hugging Face hub is not reachable (or HF_HUB_OFFLINE=1)"
    else:
        return OLMOE_HUB_ID
    warnings.warn(
        f"load_model('auto'): {reason}; using the embedded tiny OLMoE instead of {OLMOE_HUB_ID}.",
        stacklevel=3,
    )
    return "tiny"


def _prefer_expandable_segments() -> None:
    """Let the CUDA caching allocator grow segments instead of fragmenting (unless configured).

    OLMoE-1B-7B in float16 is 12.9 GiB; on a 15 GB T4, transformers' load-time fusion of each
    layer's 64 experts needs one more 512 MiB block at the end, and with fixed-size segments a
    GiB sits reserved but unusable: the load failed under a 14 GiB cap (T4 emulation harness).
    A user's own ``PYTORCH_CUDA_ALLOC_CONF`` is left alone.
    """
    if os.environ.get("PYTORCH_CUDA_ALLOC_CONF"):
        return
    setter = getattr(torch._C, "_accelerator_setAllocatorSettings", None)
    if setter is None:  # torch < 2.9
        setter = getattr(torch.cuda.memory, "_set_allocator_settings", None)
    if setter is not None:
        setter("expandable_segments:True")


def resolve_device(device: str | torch.device | None = None) -> torch.device:
    """The torch device ``device`` names, checked to work on this machine.

    Parameters
    ----------
    device : str or torch.device, optional
        ``None`` or ``"auto"``: CUDA when available, else CPU. Otherwise a torch device
        (``"cpu"``, ``"cuda"``, ``"cuda:1"``, ``"mps"``) that must accept a tensor here.

    Raises
    ------
    ValueError
        When ``device`` is not a torch device, or this machine cannot use it (mps or xpu on a
        machine without one, cuda on a CPU-only torch, a GPU index past the last GPU).
    """
    if device is None or device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(device)
    except (RuntimeError, TypeError):
        raise ValueError(f"`device` {device!r} is not a torch device; use cpu, cuda, cuda:1 or auto.") from None
    try:  # parsing is not enough: torch.device("mps") parses on every machine
        torch.empty(0, device=resolved)
    except (RuntimeError, AssertionError) as err:
        why = str(err).split(". ")[0].splitlines()[0].rstrip(".") if str(err) else type(err).__name__
        raise ValueError(f"`device` {str(device)!r} is not usable here ({why}); use cpu (or auto).") from None
    return resolved


def load_model(
    name: str = "auto",
    *,
    device: str | torch.device | None = None,
    dtype: torch.dtype | None = None,
    trust_remote_code: bool = False,
    **from_pretrained_kwargs: Any,
):
    """Load a supported MoE causal language model and its tokenizer, in eval mode.

    Parameters
    ----------
    name : str
        ``"tiny"`` (the embedded tiny OLMoE, loaded offline from package data), ``"auto"``
        (allenai/OLMoE-1B-7B-0924 when a CUDA GPU is present and the hub is reachable, else
        ``"tiny"`` with a warning), a hub model id, or a local directory written by
        ``save_pretrained``.
    device : str or torch.device, optional
        Defaults to ``"cuda"`` when available, else ``"cpu"`` (see :func:`resolve_device`).
    dtype : torch.dtype, optional
        Defaults to :func:`default_dtype` of the device (float16 before Ampere, bfloat16 on
        Ampere and newer, float32 on CPU).
    trust_remote_code : bool
        Passed to ``from_pretrained``; never enabled unless asked for.
    **from_pretrained_kwargs
        Extra keyword arguments for ``AutoModelForCausalLM.from_pretrained`` (e.g. ``revision``).

    Returns
    -------
    model : transformers.PreTrainedModel
        In eval mode, on ``device``.
    tokenizer : transformers.PreTrainedTokenizerBase
        With a pad token (the eos token when the checkpoint defines none).

    Raises
    ------
    FileNotFoundError
        ``name="tiny"`` but the embedded weights are missing.
    ValueError
        The model is not a supported MoE (see :data:`bh_helpers.models.families.SUPPORTED_MODEL_TYPES`).

    Examples
    --------
    >>> model, tok = load_model("tiny", device="cpu")  # doctest: +SKIP
    >>> type(model).__name__  # doctest: +SKIP
    'OlmoeForCausalLM'
    """
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    if not isinstance(name, (str, os.PathLike)):
        raise ValueError(f"`name` must be 'tiny', 'auto', a hub id or a local path, got {type(name).__name__}.")
    name = os.fspath(name)
    device = resolve_device(device)
    if dtype is None:
        dtype = default_dtype(device)
    name = _resolve_name(name, device)

    kwargs = dict(from_pretrained_kwargs)
    if name == "tiny":
        if not embedded_model_available():
            raise FileNotFoundError(
                f"the embedded tiny OLMoE weights are missing from {EMBEDDED_MODEL_DIR} "
                "(model.safetensors, config.json); reinstall bh-routing or train them with scripts/train_tiny.py."
            )
        source = str(EMBEDDED_MODEL_DIR)
        # Package data: never touch the network, whatever the environment says.
        kwargs["local_files_only"] = True
    else:
        source = name
    logger.info("loading %s (device=%s, dtype=%s)", source, device, dtype)

    hub_kwargs = {k: kwargs[k] for k in ("revision", "local_files_only", "cache_dir", "token") if k in kwargs}
    if not trust_remote_code:
        # Refuse unsupported families from the config alone, before gigabytes of weights move.
        # trust_remote_code=False explicitly: left as None, transformers ASKS on stdin for a config with
        # an auto_map, and an answer of "y" ran the folder's Python.
        try:
            model_type = AutoConfig.from_pretrained(source, trust_remote_code=False, **hub_kwargs).model_type
        except ValueError as err:
            if "trust_remote_code" not in str(err):
                raise
            raise _unsupported(
                f"{source!r} needs its own Python code (an \"auto_map\" entry in its config.json), which is not run "
                "(only with `trust_remote_code=True`, for code you trust)"
            ) from None
        if model_type not in SUPPORTED_MODEL_TYPES:
            raise _unsupported(f"{source!r} has model_type {model_type!r}")
    tokenizer = AutoTokenizer.from_pretrained(source, trust_remote_code=trust_remote_code, **hub_kwargs)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    placed = "device_map" in kwargs
    if device.type == "cuda":
        _prefer_expandable_segments()
    if device.type == "cuda" and not placed:
        # Load straight onto the GPU: Colab has less host RAM than a staged copy of OLMoE needs.
        kwargs["device_map"] = str(device)
        placed = True
    from safetensors import SafetensorError

    try:
        model = AutoModelForCausalLM.from_pretrained(source, dtype=dtype, trust_remote_code=trust_remote_code, **kwargs)
    except SafetensorError as err:  # truncated or damaged weights: not an OSError, say which model and what to do
        raise ValueError(f"`name` {name!r}: its weights cannot be read ({str(err).splitlines()[0]}); the "
                         "safetensors file is incomplete or damaged: download or save the model again.") from None
    check_supported_moe(model)
    if not placed:
        model.to(device)
    model.eval()
    return model, tokenizer


def model_key(model: torch.nn.Module) -> str:
    """``"tiny"`` for the embedded model, else the hub id or path it was loaded from (``"unknown"``)."""
    path = str(getattr(model, "name_or_path", "") or getattr(model.config, "_name_or_path", ""))
    try:
        if path and Path(path).resolve() == EMBEDDED_MODEL_DIR.resolve():
            return "tiny"
    except OSError:
        pass
    return path or "unknown"


def describe_model(model: torch.nn.Module) -> dict[str, Any]:
    """A one-row summary of a loaded MoE model (the first output of notebook 01).

    Parameters
    ----------
    model : transformers causal LM
        Of a supported MoE family.

    Returns
    -------
    dict
        ``model`` (:func:`model_key`), ``class``, ``moe_layers`` (MoE blocks found), ``experts`` and
        ``native_top_k`` (:func:`~bh_helpers.models.families.moe_shape` of its config), ``weights``
        (the native mixing convention), ``parameters_M``, ``dtype``, ``device``,
        ``experts_implementation``.

    Raises
    ------
    ValueError
        When ``model`` has no supported MoE block or its config is not a MoE config.
    """
    blocks = find_moe_blocks(model)
    shape = moe_shape(model.config)
    param = next(model.parameters())
    return {
        "model": model_key(model),
        "class": type(model).__name__,
        "moe_layers": len(blocks),
        "experts": shape.num_experts,
        "native_top_k": shape.top_k,
        "weights": blocks[0].native_weights,
        "parameters_M": round(sum(p.numel() for p in model.parameters()) / 1e6, 1),
        "dtype": str(param.dtype).replace("torch.", ""),
        "device": str(param.device),
        "experts_implementation": getattr(model.config, "_experts_implementation", None),
    }
