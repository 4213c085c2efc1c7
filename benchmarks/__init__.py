"""Benchmarks of mara-hf that are not tests: they print measurements (docs/ pages carry them with their commands)."""
