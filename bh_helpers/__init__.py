"""bh_helpers: statistically calibrated (Benjamini-Hochberg) expert routing for MoE language models.

The data flow, one folder per floor::

    models/      load a model (embedded tiny OLMoE, hub id, local folder); its MoE family; texts, data sets
    capture.py   router logits per layer [N, E], logged with forward hooks
    nulls/       a null distribution per layer (KDE or empirical) -> NullBank, saved under data/kde_models/
    selection/   p-values -> BH / BY / Bonferroni / Holm counts, top-k, top-p, static per layer -> Selection
    routing/     route(model, selector): patched blocks dispatch only the selected experts; recorder
    engines/     the same selectors inside serving engines (vLLM), without transformers
    evaluation/  perplexity, task accuracy, speed, side-by-side generation
    experiments/ what a sweep row measures, resumable sweeps, controls (static allocation), the frontier,
                 the explorer's engine, prompt categories
    report/      markdown tables, figures, the assembled report
    app/         wiring only: the demo, the ``bh-routing`` CLI, paths, notebook settings, widgets

``_validate`` (argument checks), ``_cuda`` (device capability, streams), ``_clock`` (UTC timestamps) and
``_markdown`` (plain markdown tables) serve every floor.

The public names are importable from here (``from bh_helpers import route, BHSelector``) and from
their modules. They load on first use, so ``import bh_helpers`` stays light: heavy imports
(transformers, matplotlib, ipywidgets) happen only inside the modules that need them.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

#: Public name -> the module that defines it.
_PUBLIC = {
    "load_model": "bh_helpers.models.loading",
    "capture_router_logits": "bh_helpers.capture",
    "CapturedLogits": "bh_helpers.capture",
    "NullModel": "bh_helpers.nulls.model",
    "NullBank": "bh_helpers.nulls.bank",
    "fit_null": "bh_helpers.nulls.fit",
    "fit_null_bank": "bh_helpers.nulls.fit",
    "Selection": "bh_helpers.selection.reference",
    "fdr_counts": "bh_helpers.selection.reference",
    "select_experts": "bh_helpers.selection.reference",
    "BHSelector": "bh_helpers.selection.selectors",
    "NativeSelector": "bh_helpers.selection.selectors",
    "TopKSelector": "bh_helpers.selection.selectors",
    "TopPSelector": "bh_helpers.selection.selectors",
    "RoutedModel": "bh_helpers.selection.selectors",
    "StaticLayerSelector": "bh_helpers.selection.static",
    "fit_static_allocation": "bh_helpers.experiments.static_allocation",
    "static_allocation_path": "bh_helpers.experiments.static_allocation",
    "route": "bh_helpers.routing.patch",
    "RoutingRecorder": "bh_helpers.routing.recorder",
    "RoutingConfig": "bh_helpers.engines.config",
}

__all__ = ["__version__", *_PUBLIC]


def __getattr__(name: str) -> Any:
    module = _PUBLIC.get(name)
    if module is None:
        raise AttributeError(f"module 'bh_helpers' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_PUBLIC))
