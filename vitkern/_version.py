"""The vitkern version (read by setup.py without importing vitkern)."""

__version__ = "0.1.0"
