"""vitkern's benchmark suite: one shared runner, one small setup per op or model.

- ``python -m benchmarks [--ops ...] [--models ...] [--quick] [--out DIR]``: run, print a table, write
  ``results.json``, ``summary.md`` and PNG plots (:mod:`benchmarks.cli`).
- :mod:`benchmarks.runner`: the run, case by case; :mod:`benchmarks.providers`: what each provider
  runs and how its result is checked; :mod:`benchmarks.timing`: the timers, the statistics, L2
  flushes, rotating inputs and CUDA graphs; :mod:`benchmarks.environment`: the recorded
  environment and the GPU ceilings.
- :mod:`benchmarks.results`: the results.json schema (documented there), its rows and validation.
- :mod:`benchmarks.cases`: the provider names, best-reference ratios and headline cases, from the
  JSON alone; :mod:`benchmarks.render`: every table and text made from it.
- :mod:`benchmarks.flops`: the FLOP and minimum-HBM-byte formulas, and ``vit_flops``.
- :mod:`benchmarks.setups`: one module per op or model; adding one means adding such a module.
- ``python -m benchmarks.plot results.json``: redraw a run's plots (:mod:`benchmarks.plot`).
- ``python -m benchmarks.readme benchmarks/results/<run>``: the README's GPU results section.
- ``pytest benchmarks/ --benchmark-only``: the same setups through pytest-benchmark.
"""
