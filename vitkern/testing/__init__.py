"""Tools for testing kernels against vitkern's rules; they import without pytest and without Triton.

- :mod:`vitkern.testing.numerics`: the comparators, their tolerance tables and the output poisoning
  that vitkern's own tests use, for anyone checking a kernel of their own the same way.
- :mod:`vitkern.testing.compile_check`: the static sm_80 / sm_90 compile check over every
  registered Triton kernel (registers, spills, shared memory, wgmma), run without a GPU.
"""
