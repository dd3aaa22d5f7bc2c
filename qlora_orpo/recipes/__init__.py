"""Recipes: each wires the layers below into one whole job, read top to bottom.

``finetune`` is a training run (load, tokenise, train with periodic evaluation, select,
save, export); ``evaluate`` the standalone evaluation; ``chat`` generation from an
adapter; ``dry_run`` the report of what a run would train on. ``cli`` sits on top.
"""
