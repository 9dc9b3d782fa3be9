"""Null distributions of router logits: one per MoE layer, fitted on logged logits.

- :mod:`bh_helpers.nulls.model`  kernels, fitting, ``NullModel``, goodness of fit and ``NullBank`` I/O
"""

from bh_helpers.nulls.model import (
    VALID_BANDWIDTHS,
    VALID_KERNELS,
    GoodnessOfFit,
    NullBank,
    NullModel,
    fit_null,
    fit_null_bank,
    goodness_of_fit,
)

__all__ = [
    "VALID_BANDWIDTHS",
    "VALID_KERNELS",
    "GoodnessOfFit",
    "NullBank",
    "NullModel",
    "fit_null",
    "fit_null_bank",
    "goodness_of_fit",
]
