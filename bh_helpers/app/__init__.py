"""The applications on top of the package: the demo pipeline, the CLI, notebook helpers, widgets.

- :mod:`bh_helpers.app.pipeline`  the steps (capture, fit, sweep, report) and ``run_demo``
- :mod:`bh_helpers.app.cli`       the ``bh-routing`` commands (:mod:`bh_helpers.app.console` is the script)
- :mod:`bh_helpers.app.notebook`  what the notebooks need beyond the pipeline (environment, views)
- :mod:`bh_helpers.app.widgets`   the alpha explorer (ipywidgets)
"""
