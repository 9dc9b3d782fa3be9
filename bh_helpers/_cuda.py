"""Small CUDA helpers shared by the Triton fast paths."""

from __future__ import annotations

import contextlib
import functools
from typing import ContextManager

import torch

_SAME_DEVICE = contextlib.nullcontext()


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
