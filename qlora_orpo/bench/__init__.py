"""The benchmark behind ``scripts/bench_orpo.py``: a tool around the training core, not part of it.

One ORPO optimizer step, measured: TRL's loss path against ours (``joint``, ``sequential``,
``split``), each configuration in a fresh worker process. Modules, by concern:

* :mod:`.spec` -- one configuration (:class:`~.spec.BenchSpec`), the plan, the fixed-length pair;
* :mod:`.worker` -- the worker (load, measure, one JSON line) and the parent's subprocess runner;
* :mod:`.trl_adapter` -- TRL's ``ORPOTrainer`` loss path on our batch (the peer row);
* ``models/floor.py`` -- the analytic memory floor of a step, from the model's config (the planner uses it too);
* :mod:`.flops` -- the analytic FLOPs of a step and its roofline time;
* :mod:`.report` -- the markdown table, the plot and ``results.json``;
* :mod:`.tiny` -- a tiny random Llama and tokenizer (``--quick``, and the tests' fixtures);
* ``cli/bench.py`` -- the command line.
"""
