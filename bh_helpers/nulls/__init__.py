"""Null distributions of router logits: one per MoE layer, fitted on logged logits.

- :mod:`bh_helpers.nulls.kernels`      the KDE kernels and the constants of tabulation
- :mod:`bh_helpers.nulls.model`        ``NullModel``: logit -> p-value (``sf``, ``cdf``, ``logsf``) with exponential tails
- :mod:`bh_helpers.nulls.fit`          ``fit_null`` (KDE or empirical, pooled or per expert) and ``fit_null_bank``
- :mod:`bh_helpers.nulls.columns`      the numerics of one fitted column (KDE, empirical, Efron, tails)
- :mod:`bh_helpers.nulls.bank`         ``NullBank``: one null per layer, safe save and load; bank folders
- :mod:`bh_helpers.nulls.metadata`     a bank's metadata and the checks of its files
- :mod:`bh_helpers.nulls.diagnostics`  goodness of fit on held-out logits, per kernel and layer
- :mod:`bh_helpers.nulls.legacy`       reading the earlier research code's pickled nulls (opt-in)
"""

from bh_helpers.nulls.bank import METADATA_NAME, SCHEMA_VERSION, NullBank, NullBankMetadata, bank_name, load_bank_folder
from bh_helpers.nulls.diagnostics import GoodnessOfFit, choose_kernel, goodness_of_fit, goodness_table
from bh_helpers.nulls.fit import fit_null, fit_null_bank
from bh_helpers.nulls.kernels import VALID_BANDWIDTHS, VALID_KERNELS
from bh_helpers.nulls.model import NullModel

__all__ = [
    "METADATA_NAME",
    "SCHEMA_VERSION",
    "VALID_BANDWIDTHS",
    "VALID_KERNELS",
    "GoodnessOfFit",
    "NullBank",
    "NullBankMetadata",
    "NullModel",
    "bank_name",
    "choose_kernel",
    "fit_null",
    "fit_null_bank",
    "goodness_of_fit",
    "goodness_table",
    "load_bank_folder",
]
