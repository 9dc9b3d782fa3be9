"""Evaluation of a (routed) model: perplexity, task accuracy, speed, and the data they read.

- :mod:`bh_helpers.evaluation.scoring`  perplexity, next-token / last-word / multiple-choice accuracy,
  speed, and memory-bounded scoring of token losses
- :mod:`bh_helpers.evaluation.data`     WikiText-2, LAMBADA, HellaSwag (hub, local files, embedded fixtures)
- :mod:`bh_helpers.evaluation.lm_eval`  an lm-evaluation-harness model that routes (optional extra)
"""
