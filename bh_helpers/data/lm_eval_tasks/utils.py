"""Document processing of the local ``bh_hellaswag_style`` task: lm-eval's own HellaSwag code.

Re-exported, not copied, so that the task preprocesses exactly as lm-eval's ``hellaswag`` and
stays an independent check of :func:`bh_helpers.models.datasets.load_hellaswag`.
"""

from lm_eval.tasks.hellaswag.utils import preprocess, process_docs

__all__ = ["preprocess", "process_docs"]
