"""pmkernels benchmark suites (pytest-benchmark) and their report: ``python -m bench.scripts.report``.

A regular package so that bench/conftest.py is imported as ``bench.conftest`` and never shadows
tests/conftest.py when both are collected.
"""
