"""Colab T4 emulation for every Python process started by ``benchmarks/t4_emulation.py``.

That harness puts this folder first on ``PYTHONPATH`` and sets ``BH_T4_EMULATION=1``, so the
demo CLI, pytest and the notebooks' Jupyter kernels all start like this (Python imports
``sitecustomize`` at start-up). Outside the harness (the variable unset) it does nothing.

What a process gets:

- ``BH_ROUTING_CUDA_CAPABILITY=7.5``: the package's one capability switch
  (:func:`bh_helpers._cuda.device_capability`): float16 weights, no bf16 and no grouped-GEMM paths;
- a torch allocator cap of ``BH_T4_MEMORY_GIB`` (default 14 GiB, a T4's 15 GB less the CUDA
  context) through ``torch.cuda.set_per_process_memory_fraction``;
- transformers on its sm75 path: ``transformers.integrations.moe._can_use_grouped_mm`` answers
  False, so "grouped_mm" runs ``_grouped_mm_fallback`` (a per-expert ``torch.mm`` loop), as on a T4;
- its peak allocated / reserved memory, tagged with ``BH_T4_STEP``, written to
  ``<BH_T4_PEAK_LOG>.<pid>.json`` (when set) every 2 s and at exit.

What it cannot emulate: a T4's speed (an H200 has ~15x its memory bandwidth and no sm75 kernel
choices: torch's SDPA and cuBLAS still pick Hopper kernels). Every figure says "emulated".
"""

from __future__ import annotations

import os


def apply_t4_emulation() -> None:
    """Cap memory, set the capability switch and force transformers' sm75 MoE path (idempotent)."""
    os.environ["BH_ROUTING_CUDA_CAPABILITY"] = "7.5"
    import torch

    if torch.cuda.is_available():
        cap_gib = float(os.environ.get("BH_T4_MEMORY_GIB", "14"))
        total = torch.cuda.get_device_properties(0).total_memory
        torch.cuda.set_per_process_memory_fraction(min(1.0, cap_gib * 2**30 / total), 0)
    import transformers.integrations.moe as moe

    moe._can_use_grouped_mm = lambda *args, **kwargs: False


def _record_peak() -> None:
    """Write this process's peak memory to ``<BH_T4_PEAK_LOG>.<pid>.json`` (rewritten each time)."""
    import json
    import sys

    import torch

    path = os.environ.get("BH_T4_PEAK_LOG")
    if not path or not torch.cuda.is_available() or not torch.cuda.is_initialized():
        return
    line = {"step": os.environ.get("BH_T4_STEP", ""), "pid": os.getpid(), "argv": sys.argv[:4],
            "peak_allocated_gib": torch.cuda.max_memory_allocated() / 2**30,
            "peak_reserved_gib": torch.cuda.max_memory_reserved() / 2**30}
    tmp = f"{path}.{os.getpid()}.tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(line, f)
    os.replace(tmp, f"{path}.{os.getpid()}.json")


def _watch_peak(interval_s: float = 2.0) -> None:
    """Record the peak every few seconds too: Jupyter kernels can end without running atexit."""
    import threading
    import time

    def loop() -> None:
        while True:
            time.sleep(interval_s)
            try:
                _record_peak()
            except Exception:  # noqa: BLE001 - a failed write must never disturb the process
                pass

    threading.Thread(target=loop, daemon=True, name="t4-peak-memory").start()


if os.environ.get("BH_T4_EMULATION") == "1":
    import atexit

    apply_t4_emulation()
    atexit.register(_record_peak)
    if os.environ.get("BH_T4_PEAK_LOG"):
        _watch_peak()
