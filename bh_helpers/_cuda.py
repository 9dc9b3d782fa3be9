"""Small CUDA helpers shared by the fast paths: the one capability check, and the launch device.

Every fast path asks :func:`device_capability` (never ``torch.cuda.get_device_capability``
directly), so ONE switch, the environment variable ``BH_ROUTING_CUDA_CAPABILITY`` (e.g. ``"7.5"``),
makes the whole package behave as on an older card: that is how the T4 emulation harness
(``benchmarks/t4_emulation.py``) keeps every sm80+ path (bf16, grouped GEMMs) off on an H200.
"""

from __future__ import annotations

import contextlib
import functools
import os
from typing import ContextManager

import torch

__all__ = ["CAPABILITY_ENV", "capture_stream", "device_capability", "on_device"]

#: Environment variable that overrides the compute capability of every CUDA device ("major.minor").
CAPABILITY_ENV = "BH_ROUTING_CUDA_CAPABILITY"

_SAME_DEVICE = contextlib.nullcontext()


def _parse_capability(text: str) -> tuple[int, int]:
    try:
        major, minor = (int(part) for part in text.strip().split("."))
    except ValueError:
        raise ValueError(
            f"{CAPABILITY_ENV}={text!r} is not a compute capability; write it as major.minor, e.g. "
            f"{CAPABILITY_ENV}=7.5 for a T4, or unset it."
        ) from None
    return major, minor


def device_capability(device: torch.device | str | int | None = None) -> tuple[int, int]:
    """The compute capability ``(major, minor)`` the package assumes for a CUDA ``device``.

    The device's own, unless ``BH_ROUTING_CUDA_CAPABILITY`` is set (then that, for every device).

    Raises
    ------
    ValueError
        When the environment variable is not of the form ``major.minor``.

    Examples
    --------
    >>> import os
    >>> os.environ[CAPABILITY_ENV] = "7.5"
    >>> device_capability("cuda")
    (7, 5)
    >>> del os.environ[CAPABILITY_ENV]
    """
    override = os.environ.get(CAPABILITY_ENV)
    if override:
        return _parse_capability(override)
    return torch.cuda.get_device_capability(device)


@functools.lru_cache(maxsize=1)
def _several_gpus() -> bool:
    return torch.cuda.device_count() > 1  # fixed for the life of the process


def on_device(device: torch.device) -> ContextManager:
    """Make ``device`` the current CUDA device for a Triton launch, when it is not already.

    Triton launches on the *current* device (and its current stream), not on the device of the
    tensors, so a layer placed on ``cuda:1`` (``device_map="auto"`` across GPUs) needs this. With
    one GPU it returns a shared no-op context at once.
    """
    if _several_gpus() and device.index is not None and device.index != torch.cuda.current_device():
        return torch.cuda.device(device)
    return _SAME_DEVICE


_CAPTURE_STREAMS: dict[int, torch.cuda.Stream] = {}


def capture_stream(device: torch.device) -> torch.cuda.Stream:
    """The one side stream per device on which CUDA graphs are warmed up and captured.

    Reused, never created per graph: torch keeps a cuBLAS workspace (32 MiB on Hopper) for every
    stream that ran a GEMM, for the life of the process, so a new stream per captured graph
    grew memory by about 0.6 GiB over a few ``route`` calls (seen under the T4 emulation's cap).
    """
    index = device.index if device.index is not None else torch.cuda.current_device()
    stream = _CAPTURE_STREAMS.get(index)
    if stream is None:
        stream = _CAPTURE_STREAMS[index] = torch.cuda.Stream(index)
    return stream
