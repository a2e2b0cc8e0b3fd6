"""vitkern's benchmark suite: one shared runner, one small setup per op.

- ``python -m benchmarks [--ops ...] [--quick] [--out DIR]``: run, print a table, write
  ``results.json`` and ``summary.md`` (:mod:`benchmarks.runner`, which documents the JSON schema).
- :mod:`benchmarks.flops`: the FLOP and minimum-HBM-byte formulas, and ``vit_flops``.
- :mod:`benchmarks.setups`: one module per op; adding an op means adding one such module.
- ``pytest benchmarks/ --benchmark-only``: the same setups through pytest-benchmark.
"""
