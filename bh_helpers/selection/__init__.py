"""Selection: which experts each token gets.

- :mod:`bh_helpers.selection.reference`  multiple-testing counts (BH, BY, Bonferroni, Holm) and
  ``select_experts`` in plain torch: the definition every fast path is tested against
- :mod:`bh_helpers.selection.fused`      the same selection in one Triton kernel on CUDA
  (host-side tables and the one cache in :mod:`bh_helpers.selection.fused_tables`, device code in
  :mod:`bh_helpers.selection.fused_kernels`)
- :mod:`bh_helpers.selection.selectors`  ready-made routing rules for ``route`` (BH, top-k, native, top-p),
  the :class:`Selector` protocol and its ``check(RoutedModel)`` hook
"""

from bh_helpers.selection.reference import (
    FDR_METHODS,
    SELECTION_METHODS,
    WEIGHT_MODES,
    Selection,
    fdr_counts,
    select_experts,
)
from bh_helpers.selection.selectors import (
    BHSelector,
    NativeSelector,
    RoutedModel,
    Selector,
    TopKSelector,
    TopPSelector,
)

__all__ = [
    "FDR_METHODS",
    "SELECTION_METHODS",
    "WEIGHT_MODES",
    "BHSelector",
    "NativeSelector",
    "RoutedModel",
    "Selection",
    "Selector",
    "TopKSelector",
    "TopPSelector",
    "fdr_counts",
    "select_experts",
]
