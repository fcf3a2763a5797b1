"""Benchmarks of the method's costs: ``python benchmarks/run.py`` (see its docstring)."""
