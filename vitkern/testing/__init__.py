"""Tools for testing kernels against vitkern's rules, importable without pytest.

- :mod:`vitkern.testing.compile_check`: the static sm_80 / sm_90 compile check over every
  registered Triton kernel (registers, spills, shared memory, wgmma), run without a GPU.
"""
