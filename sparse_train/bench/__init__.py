"""Benchmarks behind `sparse-train bench ...`: commands that print JSON, not timed tests."""
