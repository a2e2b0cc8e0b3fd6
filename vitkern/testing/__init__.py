"""Helpers for testing kernels against vitkern's accuracy rules: :mod:`vitkern.testing.numerics`
holds the comparators, their tolerance tables and the output poisoning that vitkern's own tests
use, for anyone checking a kernel of their own the same way. They need torch only (no pytest)."""
