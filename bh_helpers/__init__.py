"""bh_helpers: statistically calibrated (Benjamini-Hochberg) expert routing for MoE language models.

Modules, one concern each:

- :mod:`bh_helpers.selection`  multiple-testing counts and expert selection (torch, vectorised)
- :mod:`bh_helpers.nulls`      per-layer null distributions of router logits (KDE / empirical)
- :mod:`bh_helpers.models`     loading the embedded tiny OLMoE or any supported hub model
- :mod:`bh_helpers.capture`    logging router logits with forward hooks
- :mod:`bh_helpers.patching`   the ``route`` context manager that changes what the model computes

Heavy imports (transformers, matplotlib, ipywidgets) happen only inside the modules that need them.
"""

__version__ = "0.1.0"
