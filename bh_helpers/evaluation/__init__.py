"""Evaluation of a (routed) model: perplexity, task accuracy, speed (the data sets: :mod:`bh_helpers.models.datasets`).

- :mod:`bh_helpers.evaluation.scoring`  perplexity (windowed), memory-bounded
  scoring of token losses, batch sizes that fit
- :mod:`bh_helpers.evaluation.tasks`    last-word (LAMBADA) and multiple-choice (HellaSwag) accuracy
- :mod:`bh_helpers.evaluation.speed`    prefill and decode throughput; relative expert compute
- :mod:`bh_helpers.evaluation.lm_eval`  an lm-evaluation-harness model that routes (optional extra)
"""

