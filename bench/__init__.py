"""Benchmarks: ``python -m bench`` (see bench/README.md); never run by the test suite."""
