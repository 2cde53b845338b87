"""Benchmark suites: each exposes run(ctx) -> list of row dicts, and COLUMNS / PLOT."""
