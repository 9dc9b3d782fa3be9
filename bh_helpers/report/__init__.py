"""Report: markdown tables, figures and the written report of a sweep.

- :mod:`bh_helpers.report.write`  markdown tables and ``write_report``
- :mod:`bh_helpers.report.plots`  frontier, per-layer heat map, experts-per-token histogram, token view
"""
