"""Evaluation: held-out preference scores, generation health, intervals, reports, plots, selection.

``scoring`` scores pairs (reward accuracy, margins, NLL), ``health`` checks greedy
generations, ``stats`` gives intervals, ``report`` the markdown tables, ``plots`` and
``sweep`` the figures, ``selection`` keeps the best healthy checkpoint and
``run_evaluator`` runs them all inside a training run, the base's part cached across runs by
``base_cache``. Imports the layers below it.
"""
