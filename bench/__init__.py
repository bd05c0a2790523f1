"""Benchmarks: ``python -m bench.compare`` (whole-path ratios) and pytest-benchmark micro
benches (``python -m pytest bench/ --benchmark-only``). Not part of the test suite."""
