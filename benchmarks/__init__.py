"""vitkern's benchmark suite: one shared runner, one small setup per op or model.

- ``python -m benchmarks [--ops ...] [--models ...] [--quick] [--out DIR]``: run, print a table, write
  ``results.json``, ``summary.md`` and PNG plots (:mod:`benchmarks.runner`, which documents the
  JSON schema).
- :mod:`benchmarks.flops`: the FLOP and minimum-HBM-byte formulas, and ``vit_flops``.
- :mod:`benchmarks.setups`: one module per op or model; adding one means adding such a module.
- :mod:`benchmarks.report`: the headline table and best-reference ratios, from the JSON alone.
- ``python -m benchmarks.plot results.json``: redraw a run's plots (:mod:`benchmarks.plot`).
- ``python -m benchmarks.readme benchmarks/results/<run>``: the README's GPU results section.
- ``pytest benchmarks/ --benchmark-only``: the same setups through pytest-benchmark.
"""
