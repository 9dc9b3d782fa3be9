"""Models: loading (the embedded tiny OLMoE, hub ids, local folders), the one registry of MoE
families, and the texts that feed capture and evaluation.

- :mod:`bh_helpers.models.loading`   ``load_model`` and the embedded model and corpus
- :mod:`bh_helpers.models.families`  supported MoE families: finding blocks, router logits, fingerprints, ``moe_shape``
- :mod:`bh_helpers.models.texts`     calibration token ids and evaluation texts by data-set name
- :mod:`bh_helpers.models.datasets`  WikiText-2, LAMBADA, HellaSwag (hub, local files, embedded fixtures)
"""

from bh_helpers.models.families import SUPPORTED_FAMILIES, MoEShape, find_moe_blocks, moe_shape
from bh_helpers.models.loading import (
    EMBEDDED_MODEL_DIR,
    OLMOE_HUB_ID,
    describe_model,
    embedded_model_dir,
    load_corpus_slice,
    load_model,
    model_key,
)

__all__ = [
    "EMBEDDED_MODEL_DIR",
    "OLMOE_HUB_ID",
    "SUPPORTED_FAMILIES",
    "MoEShape",
    "describe_model",
    "embedded_model_dir",
    "find_moe_blocks",
    "load_corpus_slice",
    "load_model",
    "model_key",
    "moe_shape",
]
