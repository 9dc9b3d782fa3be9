"""Experiments: resumable sweeps over routing configurations and what is read off them.

- :mod:`bh_helpers.experiments.sweep`       ``SweepConfig``, ``expand_grid``, ``run_sweep``, ``load_results``
- :mod:`bh_helpers.experiments.results_file` the results file's format and its one reader (``read_results_file``)
- :mod:`bh_helpers.experiments.frontier`    each adaptive configuration against static top-k at the same compute
- :mod:`bh_helpers.experiments.categories`  experts per token by prompt category, with bootstrap intervals
"""
