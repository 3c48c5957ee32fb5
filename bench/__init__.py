"""Benchmarks and their load generator, run from the repository root as `python -m bench.X`
(e.g. `python -m bench.engine --help`); never installed (pyproject includes no bench*)."""
