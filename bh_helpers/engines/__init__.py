"""Serving engines: calibrated routing outside transformers (vLLM first).

A floor above ``selection/`` and ``nulls/`` and below ``app/``. Nothing here imports transformers,
and vLLM is imported only inside the functions that drive it, so this package installs and loads in
vLLM's own environment (whose transformers is older than the one the rest of bh_helpers needs).

- :mod:`bh_helpers.engines.config`       ``RoutingConfig``: one JSON file -> the selector ``route()`` takes too
- :mod:`bh_helpers.engines.routing`      a selector as a fixed-width routing callback (weight-0 padding)
- :mod:`bh_helpers.engines.vllm_plugin`  the ``vllm.general_plugins`` entry point (``BH_ROUTING_CONFIG``)
- :mod:`bh_helpers.engines.perplexity`   perplexity of texts through a vLLM engine (prompt log-probs)
"""

from __future__ import annotations

import importlib
from typing import Any

#: Public name -> the module that defines it (loaded on first use).
_PUBLIC = {
    "RoutingConfig": "bh_helpers.engines.config",
    "LayerRouting": "bh_helpers.engines.routing",
    "pad_selection": "bh_helpers.engines.routing",
    "vllm_perplexity": "bh_helpers.engines.perplexity",
    "EnginePerplexity": "bh_helpers.engines.perplexity",
}

__all__ = list(_PUBLIC)


def __getattr__(name: str) -> Any:
    module = _PUBLIC.get(name)
    if module is None:
        raise AttributeError(f"module 'bh_helpers.engines' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_PUBLIC))
