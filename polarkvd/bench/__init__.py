"""Benchmarks behind `polarkvd bench ...`; results are recorded in docs/BENCHMARKS.md."""
